"""Where the time of a DREG training step goes, against the plain step: a diagnostic for the GPU machine.

    python study/benchmarks/profile_step.py --device cuda --dtype bfloat16 --shapes base:32x128 --out DIR

For each shape it builds identical models (``study/benchmarks/overhead.py``'s), trained plain, with DREG's
fused kernels and with DREG's eager math, and:

- times them, interleaved (median step time / plain, as overhead.py does);
- counts, per step, the CUDA runtime calls (kernel launches, stream/device synchronisations, copies)
  and the operators each variant adds to the plain step (torch.profiler);
- on CUDA, names every host-device synchronisation DREG's step makes, with its Python line
  (``torch.cuda.set_sync_debug_mode("warn")``).

Writes ``profile.json`` and a readable ``profile.txt`` under ``--out``. It runs on the CPU too (no
CUDA counts, no sync report), which is how it is tested.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import overhead  # noqa: E402

from hf_dreg import DREGTrainingArguments  # noqa: E402
from hf_dreg.ops import functions  # noqa: E402
from hf_dreg.ops import low_rank as _low_rank  # noqa: E402
from hf_dreg.ops.kernels import KERNELS  # noqa: E402
from hf_dreg.regularizers import build_regularizer  # noqa: E402

VARIANTS = {
    "plain": ("none", "eager"), "dreg-fused": ("dreg", "compiled"), "dreg-parts": ("dreg", "compiled"), "dreg-eager": ("dreg", "eager"),
    "dreg-triton": ("dreg", "triton"), "dreg-triton-glue": ("dreg", "triton"),
}  # name -> (regularizer, DREG kernel family); dreg-triton on a CPU only under TRITON_INTERPRET=1 (counts, not times)
# dreg-parts: fused kernels, but each site as separately compiled parts (row statistics, the site's node),
# the route a torch that cannot trace a whole site as one region takes (hf_dreg.ops.kernels.KERNELS)
# dreg-triton-glue: the triton family with every kernel launch skipped: what the host does around the launches
# (allocations, views, the LoRA factor products, autograd), timed on a CPU where the launches themselves cannot
# be (the interpreter); its values are garbage (unwritten outputs), its time is the glue's
CUDA_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaMemcpyAsync", "cudaEventSynchronize", "cudaStreamWaitEvent")


WHOLE_SITES = {
    functions._plain_site_activation_whole, functions._plain_site_penalty_whole, functions._gated_site_penalty_whole,
    _low_rank._plain_site_activation_low_rank, _low_rank._plain_site_penalty_low_rank, _low_rank._gated_site_penalty_low_rank,
}


class PartsContender(overhead.Contender):
    """A DREG contender whose sites take the separately compiled parts, as if no whole site could be traced."""

    def step(self, batch):
        before = set(KERNELS.untraceable)
        KERNELS.untraceable.update(WHOLE_SITES)
        try:
            super().step(batch)
        finally:
            KERNELS.untraceable.clear()
            KERNELS.untraceable.update(before)


def build(shape, device: str, dtype: torch.dtype, variants: list[str]) -> dict:
    template = overhead.build_model(shape, 0, torch.float32, device)
    contenders = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            regularizer_name, kernels = VARIANTS[name]
            model = copy.deepcopy(template)
            args = DREGTrainingArguments(output_dir=tmp, regularizer=regularizer_name, dreg_kernels=kernels, use_cpu=True, report_to="none")
            regularizer = build_regularizer(model, args)
            regularizer.activate(model)
            overhead.cast_weights(model, dtype)
            kind = {"dreg-parts": PartsContender, "dreg-triton-glue": GlueContender}.get(name, overhead.Contender)
            contenders[name] = kind(name, model, regularizer, args.strength, args.weight_decay)
    del template
    return contenders


LAUNCH = "dreg::triton_launch"


class _MarkedKernel:
    """A Triton kernel whose launches run under a profiler label: what runs inside one (the launch itself;
    under TRITON_INTERPRET=1 the interpreter's own copies) is counted as one launch, not as operators."""

    skip = False  # dreg-triton-glue: launches skipped
    label = False  # under the profiler only (op_counts): a label costs host time of its own, not a launch's

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            if not _MarkedKernel.label:
                return None if _MarkedKernel.skip else launch(*args, **kwargs)
            with torch.profiler.record_function(LAUNCH):
                return None if _MarkedKernel.skip else launch(*args, **kwargs)

        return run


class GlueContender(overhead.Contender):
    """The triton family's contender with its kernel launches skipped (see dreg-triton-glue)."""

    def step(self, batch):
        _MarkedKernel.skip = True
        try:
            super().step(batch)
        finally:
            _MarkedKernel.skip = False


def mark_triton_launches() -> None:
    """Label every kernel of hf_dreg.ops.triton_kernels (once per process)."""
    from hf_dreg.ops import triton_kernels

    for name in dir(triton_kernels):
        if name.endswith("_kernel") and not isinstance(getattr(triton_kernels, name), _MarkedKernel):
            setattr(triton_kernels, name, _MarkedKernel(getattr(triton_kernels, name)))


def op_counts(contender, batch, cuda: bool) -> Counter:
    """Every profiler key's count in one step; what runs inside a Triton launch is left out (the launch is one key)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _MarkedKernel.label = True
    try:
        with profile(activities=activities) as prof:
            contender.step(batch)
            contender.sync()
    finally:
        _MarkedKernel.label = False
    counts: Counter = Counter()
    for event in prof.events():
        parent, inside = event.cpu_parent, False
        while parent is not None and not inside:
            inside, parent = parent.name == LAUNCH, parent.cpu_parent
        if not inside:
            counts[event.name] += 1
    return counts


def sync_stacks(contender, batch) -> list[tuple[int, str]]:
    """(count, Python stack) of every synchronising CUDA call one step makes (torch's sync debug mode)."""
    seen: Counter = Counter()
    torch.cuda.set_sync_debug_mode("warn")
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename or "hf_dreg" in f.filename]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[-4:][::-1])
            seen[where] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            contender.step(batch)
            contender.sync()
    finally:
        warnings.showwarning = original
        torch.cuda.set_sync_debug_mode("default")
    return sorted(((n, where) for where, n in seen.items()), reverse=True)


def run_shape(text: str, device: str, dtype: torch.dtype, variants: list[str], rounds: int, warmup: int) -> dict:
    if {"dreg-triton", "dreg-triton-glue"} & set(variants):
        mark_triton_launches()
    name, shape = overhead.parse_shape(text)
    contenders = build(shape, device, dtype, variants)
    batch = overhead.make_batch(shape, next(iter(contenders.values())).model, device)
    for _ in range(warmup):
        for c in contenders.values():
            c.step(batch)
    times = {n: [] for n in contenders}
    order = list(contenders.items())
    for i in range(rounds):  # interleaved, the order rotated every round (as overhead.py)
        shift = i % len(order)
        for n, c in order[shift:] + order[:shift]:
            times[n].append(c.timed_step(batch)[0])
    cuda = device.startswith("cuda")
    counts = {n: op_counts(c, batch, cuda) for n, c in contenders.items()}
    result = {
        "shape": text,
        "median_step_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "time_ratio": {n: statistics.median(a / b for a, b in zip(t, times["plain"])) for n, t in times.items()},
        "cuda_calls_per_step": {n: {k: c[k] for k in CUDA_CALLS if c[k]} for n, c in counts.items()},
        "operators_per_step": {n: sum(v for k, v in c.items() if k.startswith("aten::")) for n, c in counts.items()},
        # calls of a torch.compile region per step (forward regions and their compiled backwards)
        "compiled_calls_per_step": {n: c["Torch-Compiled Region"] + sum(v for k, v in c.items() if k.startswith("Torch-Compiled Region:"))
                                    + c["CompiledFunctionBackward"] for n, c in counts.items()},  # fmt: skip
        "triton_launches_per_step": {n: c[LAUNCH] for n, c in counts.items()},
        "sites": next((len(c.regularizer.handle.sites) for c in contenders.values() if getattr(c.regularizer, "handle", None)), None),
        "added_over_plain": {},
        "sync_stacks": {},
    }
    sites = result["sites"] or 1
    ops = result["operators_per_step"]
    result["operators_added_per_site"] = {n: (ops[n] - ops["plain"]) / sites for n in contenders if n != "plain"}
    # the host time a site adds, in units of one operator of the plain step (that step's time / its operators):
    # on a host-bound step this is what a site costs; the interpreter's Triton launches (numpy) have no such time
    plain_op_s = statistics.median(times["plain"]) / max(1, ops["plain"])
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and not cuda
    result["op_equivalents_per_site"] = {
        n: None if (interpreted and n == "dreg-triton") else
        statistics.median(a - b for a, b in zip(times[n], times["plain"])) / sites / plain_op_s
        for n in contenders if n != "plain"
    }  # fmt: skip
    result["triton_launches_per_site"] = {n: result["triton_launches_per_step"][n] / sites for n in contenders if n != "plain"}
    result["compiled_calls_per_site"] = {n: (result["compiled_calls_per_step"][n] - result["compiled_calls_per_step"]["plain"]) / sites
                                         for n in contenders if n != "plain"}  # fmt: skip
    for n in contenders:
        if n == "plain":
            continue
        diff = counts[n].copy()
        diff.subtract(counts["plain"])
        result["added_over_plain"][n] = [(k, v) for k, v in diff.most_common(30) if v > 0]
        if cuda:
            result["sync_stacks"][n] = sync_stacks(contenders[n], batch)
    if cuda:
        result["sync_stacks"]["plain"] = sync_stacks(contenders["plain"], batch)
    del contenders
    overhead.release_free_memory()
    return result


def as_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"== {r['shape']}")
        for n in r["median_step_ms"]:
            lines.append(
                f"{n:12s} {r['median_step_ms'][n]:9.2f} ms  x{r['time_ratio'][n]:.3f}  aten ops {r['operators_per_step'][n]}  "
                f"cuda {r['cuda_calls_per_step'][n]}"
            )
        equivalents = {n: None if v is None else round(v) for n, v in r["op_equivalents_per_site"].items()}
        lines.append(f"-- per site ({r['sites']} sites): host time added in plain operators {equivalents} "
                     "(None: interpreted Triton, not timed), "
                     f"aten operators added {r['operators_added_per_site']}, "
                     f"compiled-region calls {r['compiled_calls_per_site']}, triton launches {r['triton_launches_per_site']}")
        for n, added in r["added_over_plain"].items():
            lines.append(f"-- {n}: added over plain: {added}")
        for n, stacks in r["sync_stacks"].items():
            lines.append(f"-- {n}: synchronising calls in one step ({sum(c for c, _ in stacks)}):")
            lines.extend(f"   {c:4d}  {where}" for c, where in stacks[:15])
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", default="tiny:2x16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if variants[0] != "plain" or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: start with plain, then any of {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for text in args.shapes.split(","):
        started = time.perf_counter()
        results.append(run_shape(text, args.device, getattr(torch, args.dtype), variants, args.rounds, args.warmup))
        results[-1]["wall_s"] = time.perf_counter() - started
        (out / "profile.json").write_text(json.dumps(results, indent=1))
        (out / "profile.txt").write_text(as_text(results))
        print(as_text(results[-1:]), flush=True)
    return results


if __name__ == "__main__":
    main()
