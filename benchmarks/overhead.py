"""What DREG costs in a training step: plain vs DREG, interleaved in one process.

    python benchmarks/overhead.py                       # MiniLM-L6 and BERT-base shapes, CPU
    python benchmarks/overhead.py --shapes minilm --steps 40 --threads 2 --output overhead.json

A training step is forward + backward + AdamW step of BertForSequenceClassification (random init,
float32, dropout on). "DREG" is a second instance with identical weights, ``hf_dreg.attach(model,
fused=True)`` and loss = task_loss + lambda * handle.penalty(). Plain and DREG steps alternate
(ABBA order, so neither always runs first); the time ratio is the median over the pairs of
DREG step / plain step, which cancels slow drifts of a shared machine's load (the ratio of the two
medians is in the JSON too). On a loaded machine single steps vary by tens of percent: use many
steps (--steps) before reading a difference of a few percent.

Memory, for one step of each model:
- saved for backward: the unique storages autograd keeps between forward and backward
  (torch.autograd.graph.saved_tensors_hooks), parameters excluded: what DREG.md's table counts;
- peak memory, step: the highest level of CPU memory allocated during the whole step above the
  level before it (torch.profiler allocation events): activations, gradients and temporaries;
- peak memory, total: the same plus what is held between steps (parameters, AdamW state).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import hf_dreg  # noqa: E402
from hf_dreg import penalty as _penalty  # noqa: E402

SHAPES = {
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
}
# timed steps per model (plain and DREG each) when --steps is not given: a few minutes on 2 cores
DEFAULT_STEPS = {"minilm": 24, "base": 8, "tiny": 10}
DEFAULT_WARMUP = {"minilm": 3, "base": 2, "tiny": 2}
LAMBDA = 10**-2.5


def build(shape: str, seed: int = 0):
    """(plain model, DREG model, handle): two instances with identical weights."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**SHAPES[shape], num_labels=2)
    torch.manual_seed(seed)
    plain = BertForSequenceClassification(config).train()
    dreg = copy.deepcopy(plain)
    handle = hf_dreg.attach(dreg, fused=True)
    return plain, dreg, handle


def make_batch(config, batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, config.num_labels, (batch,), generator=g),
    }


def loss_of(model, handle, batch: dict) -> torch.Tensor:
    loss = model(**batch).loss
    if handle is not None:
        loss = loss + LAMBDA * handle.penalty()
    return loss


def train_step(model, handle, optimizer, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_of(model, handle, batch).backward()
    optimizer.step()


def timed_step(model, handle, optimizer, batch: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    train_step(model, handle, optimizer, batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def saved_for_backward(model, handle, batch: dict) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, handle, batch)
    del loss
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def peak_allocated(model, handle, optimizer, batch: dict) -> int:
    """Peak CPU bytes allocated during one training step, above the level before it."""
    from torch.profiler import ProfilerActivity, profile

    optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, handle, optimizer, batch)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def state_bytes(model, optimizer) -> int:
    """Bytes held between steps: parameters and optimizer state (gradients are set to None)."""
    tensors = list(model.parameters())
    tensors += [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def run_shape(shape: str, steps: int, warmup: int, batch_size: int, seq: int) -> dict:
    plain, dreg, handle = build(shape)
    batch = make_batch(plain.config, batch_size, seq)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    opt_dreg = torch.optim.AdamW(dreg.parameters(), lr=1e-5)
    runs = {"plain": (plain, None, opt_plain), "dreg": (dreg, handle, opt_dreg)}

    graphs_before = compiled_graphs()
    for _ in range(warmup):  # includes the one-time compilation of the fused kernels
        for name in ("plain", "dreg"):
            train_step(*runs[name], batch)
    graphs_after_warmup = compiled_graphs()

    times = {"plain": [], "dreg": []}
    cpu_times = {"plain": [], "dreg": []}
    for i in range(steps):
        order = ("plain", "dreg") if i % 2 == 0 else ("dreg", "plain")
        for name in order:
            wall, cpu = timed_step(*runs[name], batch)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    recompiled = compiled_graphs() - graphs_after_warmup

    saved = {name: saved_for_backward(runs[name][0], runs[name][1], batch) for name in runs}
    peak = {name: peak_allocated(*runs[name], batch) for name in runs}
    state = {name: state_bytes(runs[name][0], runs[name][2]) for name in runs}
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    pair_ratios = [d / p for p, d in zip(times["plain"], times["dreg"])]
    cpu_pair_ratios = [d / p for p, d in zip(cpu_times["plain"], cpu_times["dreg"])]
    return {
        "shape": shape,
        "config": SHAPES[shape],
        "sites": len(handle.sites),
        "steps": steps,
        "warmup": warmup,
        "median_step_s": med,
        "step_s": times,
        "median_cpu_s": med_cpu,
        "cpu_s": cpu_times,
        "cpu_ratio": med_cpu["dreg"] / med_cpu["plain"],
        "cpu_ratio_pairs_median": statistics.median(cpu_pair_ratios),
        "time_ratio": med["dreg"] / med["plain"],
        "time_ratio_pairs_median": statistics.median(pair_ratios),
        "saved_bytes": saved,
        "saved_ratio": saved["dreg"] / saved["plain"],
        "peak_bytes": peak,
        "peak_ratio": peak["dreg"] / peak["plain"],
        "state_bytes": state,
        "total_peak_ratio": (state["dreg"] + peak["dreg"]) / (state["plain"] + peak["plain"]),
        "compiled_graphs_warmup": graphs_after_warmup - graphs_before,
        "recompiles_timed": recompiled,
        "fused": not _penalty._FUSION_FAILED,
    }


def table(results: list[dict], threads: int, batch: int, seq: int) -> str:
    lines = [
        f"DREG overhead per training step (forward + backward + AdamW), BertForSequenceClassification, CPU float32, "
        f"batch {batch}, seq {seq}, {threads} threads, plain and DREG steps interleaved",
        "",
        "| shape | sites | steps | plain s/step | time DREG/plain | CPU time DREG/plain | saved for backward "
        "| peak memory, step | peak memory, total |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['sites']} | {r['steps']} | {r['median_step_s']['plain']:.3f} "
            f"| {r['time_ratio_pairs_median']:.3f}x | {r['cpu_ratio_pairs_median']:.3f}x | {r['saved_ratio']:.3f}x "
            f"| {r['peak_ratio']:.3f}x | {r['total_peak_ratio']:.3f}x |"
        )
    lines += [
        "",
        "time: median over the interleaved pairs of DREG step / plain step (wall clock); CPU time: the same with "
        "the process's CPU time. saved for backward: unique storages autograd keeps (parameters excluded). "
        "peak memory, step: highest allocation during a step above the level before it; total: with parameters "
        "and AdamW state added.",
    ]
    if any(not r["fused"] for r in results):
        lines.append("note: fused kernels unavailable: the DREG numbers are for eager math")
    if any(r["recompiles_timed"] for r in results):
        lines.append("note: torch.compile recompiled during the timed steps")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="minilm,base", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default: per shape)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default: per shape)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")

    results = []
    for shape in shapes:
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[shape]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[shape]
        print(f"[{shape}] {warmup} warm-up + {steps} timed steps per model ...", file=sys.stderr, flush=True)
        results.append(run_shape(shape, steps, warmup, args.batch, args.seq))
    print(table(results, threads, args.batch, args.seq))

    if args.output:
        meta = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": threads,
            "batch": args.batch,
            "seq": args.seq,
            "lambda": LAMBDA,
        }
        Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
