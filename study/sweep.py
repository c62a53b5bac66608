"""A factorial sweep: expand a grid of runs, run every cell, append each result to a JSONL file.

A config (YAML) has ``base`` (flags common to every run: any field of ModelArguments, DataArguments
or DREGTrainingArguments), ``grid`` (axis -> list of values; a value is a scalar setting the flag of
the axis' name, or a dict of flags with a ``name``), and ``results`` (the JSONL path). Every cell of
the full cross product is one run of :func:`hf_dreg.recipes.classification.run_classification`.

Resumable: cells already in the results file are skipped. ``shard=(i, n)`` takes every n-th cell.
``workers`` runs cells in parallel processes with one thread each (``backend="local"``, the default).
``backend="ray"`` runs every cell as a Ray task asking for ``num_cpus`` CPUs and ``num_gpus`` GPUs, on
the Ray cluster at ``address`` (default: a new local Ray instance, or the one this process already
started); the driver appends each finished cell to the results file as it arrives, so a killed sweep
keeps every cell that finished. A cell that fails on Ray does not stop the others: the failures are
raised together at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from hf_dreg.recipes.provenance import versions
from hf_dreg.recipes.results_store import append_result, read_results


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its key (axis -> value name) and the flags it runs with."""

    key: tuple[tuple[str, str], ...]
    flags: dict = field(hash=False, compare=False)

    @property
    def id(self) -> str:
        return "|".join(f"{axis}={value}" for axis, value in self.key)


@dataclass
class SweepConfig:
    base: dict
    grid: dict
    results: str
    name: str = "sweep"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SweepConfig":
        raw = yaml.safe_load(Path(path).read_text())
        missing = {"grid", "results"} - set(raw)
        if missing:
            raise ValueError(f"Sweep config {path} lacks {sorted(missing)}: it needs 'grid' and 'results' (and usually 'base').")
        # paths in a config (results, data_dir...) are relative to the folder the sweep is run from
        return cls(base=raw.get("base", {}), grid=raw["grid"], results=raw["results"], name=raw.get("name", Path(path).stem))


def _value_name(axis: str, value) -> str:
    if isinstance(value, dict):
        if "name" not in value:
            raise ValueError(f"Grid axis {axis!r}: a dict value needs a 'name' ({value}).")
        return str(value["name"])
    return str(value)


def expand_grid(config: SweepConfig) -> list[Cell]:
    """Every cell of the cross product, in a stable order."""
    axes = list(config.grid)
    cells = []
    for values in itertools.product(*(config.grid[a] for a in axes)):
        flags = dict(config.base)
        for axis, value in zip(axes, values):
            if isinstance(value, dict):
                flags.update({k: v for k, v in value.items() if k != "name"})
            else:
                flags[axis] = value
        key = tuple((axis, _value_name(axis, value)) for axis, value in zip(axes, values))
        cells.append(Cell(key, flags))
    return cells


def select_shard(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    if shard is None:
        return cells
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {index}/{count}.")
    return cells[index::count]


def run_cell(cell: Cell, threads: int | None = None) -> dict:
    """Run one cell in this process; returns its record (config, metrics, wall time, versions)."""
    import torch
    from transformers.utils import logging as hf_logging

    from hf_dreg.recipes.arguments import classification_arguments
    from hf_dreg.recipes.classification import run_classification

    if threads:
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_dreg_cell_") as tmp:
        flags = {"output_dir": tmp, "report_to": [], "disable_tqdm": True, "save_strategy": "no", **cell.flags}
        flags["output_dir"] = tmp
        model_args, data_args, training_args = classification_arguments(flags)
        result = run_classification(model_args, data_args, training_args, save=False, quiet=True)
    return {
        "cell": cell.id,
        "axes": dict(cell.key),
        "config": {k: v for k, v in cell.flags.items()},
        "metrics": result["metrics"],
        "regularizer": result["regularizer"],
        "data": result["data"],
        "per_site_dreg": result.get("per_site_dreg", {}),
        "grad_ratios": result.get("grad_ratios", []),
        "reg_lambdas": result.get("reg_lambdas", []),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _run_in_worker(cell: Cell) -> dict:
    return run_cell(cell, threads=1)


def _run_as_ray_task(cell: Cell, cwd: str, threads: int) -> dict:
    """One cell in a Ray worker: from the driver's folder when this node has it (relative data paths)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return run_cell(cell, threads=threads)


BACKENDS = ("local", "ray")


def _run_on_ray(todo: list[Cell], finish, address: str | None, num_cpus: float, num_gpus: float) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False)
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_run_as_ray_task)
    threads = max(1, int(num_cpus))
    cwd = os.getcwd()
    pending = {task.remote(cell, cwd, threads): cell for cell in todo}
    failed = []
    try:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                cell = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as error:
                    failed.append((cell.id, error))
                    continue
                finish(record)
    finally:
        for ref in pending:  # interrupted: stop what is still queued or running
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    if failed:
        causes = [(cell, getattr(error, "cause", None) or error) for cell, error in failed]  # RayTaskError: the cell's own
        lines = "\n".join(f"  {cell}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}" for cell, cause in causes)
        raise RuntimeError(f"{len(failed)} cell(s) failed on Ray (the others are in the results file):\n{lines}") from failed[0][1]


def run_sweep(
    config: SweepConfig,
    shard=None,
    workers: int = 1,
    limit: int | None = None,
    progress: bool = True,
    backend: str = "local",
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> list[dict]:
    """Run every unfinished cell of this shard; returns the records written in this call.

    ``backend="local"``: in this process (``workers=1``) or a pool of ``workers`` processes; ``backend="ray"``:
    each cell a Ray task with ``num_cpus``/``num_gpus`` on the cluster at ``address``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "ray" and (num_cpus <= 0 or num_gpus < 0):
        raise ValueError(f"Ray tasks need num_cpus > 0 and num_gpus >= 0, got {num_cpus} and {num_gpus}.")
    done = {record["cell"] for record in read_results(config.results)}
    cells = select_shard(expand_grid(config), shard)
    todo = [cell for cell in cells if cell.id not in done]
    if limit is not None:
        todo = todo[:limit]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=config.name, unit="run", disable=not progress)
    written = []

    def finish(record):
        append_result(config.results, record)
        written.append(record)
        bar.set_postfix_str(record["cell"][-40:], refresh=False)
        bar.update(1)

    try:
        if backend == "ray":
            if todo:
                _run_on_ray(todo, finish, address, num_cpus, num_gpus)
        elif workers <= 1:
            for cell in todo:
                finish(run_cell(cell))
        else:
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                pending = {pool.submit(_run_in_worker, cell) for cell in todo[:workers]}
                queue = list(todo[workers:])
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        finish(future.result())
                        if queue:
                            pending.add(pool.submit(_run_in_worker, queue.pop(0)))
    finally:
        bar.close()
    return written


USAGE = """Run a factorial sweep: python -m study.sweep study/configs/sweep_low_data.yaml [--workers 2] [--shard 0/4]

Resumable (finished cells in the results JSONL are skipped); run it from the repository root.
On a Ray cluster: python -m study.sweep CONFIG --backend ray [--address auto] [--num_cpus 1] [--num_gpus 0]
(every cell a Ray task; the driver appends each finished cell to the JSONL, so a killed sweep resumes).
"""


def main():
    parser = argparse.ArgumentParser(description=USAGE)
    parser.add_argument("config", help="A sweep YAML (base, grid, results).")
    parser.add_argument("--shard", default=None, help="i/n: run every n-th cell starting at i (for job arrays).")
    parser.add_argument("--workers", type=int, default=1, help="Local backend: cells run in parallel processes, one thread each.")
    parser.add_argument("--backend", choices=["local", "ray"], default="local", help="local (this machine, default) or ray.")
    parser.add_argument("--address", default=None, help="Ray: the cluster address ('auto', 'ray://host:10001'); default a local Ray instance.")
    parser.add_argument("--num_cpus", type=float, default=1, help="Ray: CPUs each cell asks for (also its torch threads).")
    parser.add_argument("--num_gpus", type=float, default=0, help="Ray: GPUs each cell asks for.")
    parser.add_argument("--limit", type=int, default=None, help="Run at most this many unfinished cells, then stop.")
    parser.add_argument("--dry_run", action="store_true", help="List the cells and exit.")
    args = parser.parse_args()
    config = SweepConfig.from_yaml(args.config)
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    if args.dry_run:
        cells = select_shard(expand_grid(config), shard)
        for cell in cells:
            print(cell.id)
        print(f"{len(cells)} cells")
        return
    if args.backend == "ray" and args.workers != 1:
        parser.error("--workers is for the local backend; with --backend ray, Ray schedules the cells (--num_cpus/--num_gpus each).")
    if args.backend == "local" and (args.address or args.num_gpus):
        parser.error("--address and --num_gpus are for --backend ray.")
    run_sweep(
        config, shard=shard, workers=args.workers, limit=args.limit, backend=args.backend, address=args.address,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus,
    )


if __name__ == "__main__":
    main()
