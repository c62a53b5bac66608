"""Where the triton family's host time per site goes: its step with one part at a time taken away.

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python study/benchmarks/glue_ablation.py --shape gemma2-tiny-lora:2x16:6 --out DIR

Builds ``profile_step.py``'s ``plain`` and ``dreg-triton-glue`` (every Triton launch skipped: what the host does
around the launches) and times, in one process, interleaved (the order rotated every round), the glue step as it is
and with a part removed:

- ``weights-memoized``: each feeding layer's weight read (``penalty_weight_rows``: the adapters' checks and the
  LoRA factors) done once and reused, as an attach-time resolution would;
- ``stats-constant``: a LoRA-fed site's row statistics given as constants (no factor products, no low-rank
  kernels, no gradient for the factors through them);
- ``both``: the two together (what is left: the site's node, the hooks, the autograd engine's share);
- ``activation-hooked``: gated MLPs kept on their own forward with the activation hooked, instead of the
  product computed in the site's node (``hf_dreg.modeling.fused_mlps.is_transformers_gated_mlp``).

The removed variants compute wrong penalties (constants, no gradient): they are timings, not training. Writes
``ablation.json`` and ``ablation.txt`` under ``--out``: median step / plain, and the added time per site in
plain operators (the step's time / its torch operators), the unit of ``profile_step.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import overhead  # noqa: E402
import profile_step  # noqa: E402

from hf_dreg.modeling import hooks  # noqa: E402

VARIANTS = ("plain", "glue", "weights-memoized", "stats-constant", "both", "activation-hooked")


class _Ablation:
    """The patches a variant's step runs under (each put back after the step)."""

    def __init__(self):
        self.rows, self.stats = hooks.penalty_weight_rows, hooks.DREGHandle._site_stats
        self._rows, self._stats = {}, {}

    def memoized_rows(self, module, read=None):
        if id(module) not in self._rows:
            self._rows[id(module)] = (module, self.rows(module) if read is None else self.rows(module, read))
        return self._rows[id(module)][1]

    def constant_stats(self, handle, site, w_gate, w_up=None):
        key = (id(handle), site.name)
        if key not in self._stats:
            source, inputs = self.stats(handle, site, w_gate, w_up)
            t = handle._triton
            if source == t.LOW_RANK:
                with torch.no_grad():
                    stats = t._low_rank_forward(*inputs)[0]
                    inputs = tuple(stats.unbind(0)) if stats.dim() == 2 else (stats,)
                source = t.STATS
            self._stats[key] = (handle, source, tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs))
        return self._stats[key][1:]

    def apply(self, variant: str) -> None:
        memo, const = variant in ("weights-memoized", "both"), variant in ("stats-constant", "both")
        hooks.penalty_weight_rows = self.memoized_rows if memo else self.rows
        hooks.DREGHandle._site_stats = (lambda handle, *args: self.constant_stats(handle, *args)) if const else self.stats

    def restore(self) -> None:
        hooks.penalty_weight_rows, hooks.DREGHandle._site_stats = self.rows, self.stats


def build(shape) -> dict:
    contenders = profile_step.build(shape, "cpu", torch.float32, ["plain"])
    for variant in VARIANTS[1:]:
        product = hooks.DREGHandle._product_mlp
        if variant == "activation-hooked":
            hooks.DREGHandle._product_mlp = lambda self, site, modules: None
        try:
            contenders[variant] = profile_step.build(shape, "cpu", torch.float32, ["dreg-triton-glue"])["dreg-triton-glue"]
        finally:
            hooks.DREGHandle._product_mlp = product
    return contenders


def run(text: str, rounds: int, warmup: int) -> dict:
    name, shape = overhead.parse_shape(text)
    profile_step.mark_triton_launches()
    contenders = build(shape)
    batch = overhead.make_batch(shape, contenders["plain"].model, "cpu")
    ablation = _Ablation()

    def step(variant, contender, timed):
        ablation.apply(variant)
        profile_step._MarkedKernel.skip = variant != "plain"
        try:
            return contender.timed_step(batch)[0] if timed else contender.step(batch)
        finally:
            ablation.restore()
            profile_step._MarkedKernel.skip = False

    order = list(contenders.items())
    for _ in range(warmup):
        for variant, contender in order:
            step(variant, contender, False)
    times = {variant: [] for variant in contenders}
    for i in range(rounds):
        shift = i % len(order)
        for variant, contender in order[shift:] + order[:shift]:
            times[variant].append(step(variant, contender, True))
    sites = len(contenders["glue"].regularizer.handle.sites)
    counts = profile_step.op_counts(contenders["plain"], batch, False)
    plain_ops = sum(v for k, v in counts.items() if k.startswith("aten::"))
    plain_op_s = statistics.median(times["plain"]) / plain_ops  # profile_step.py's unit: one operator of the plain step
    rows = {}
    for variant, ts in times.items():
        rows[variant] = {
            "ratio": statistics.median(a / b for a, b in zip(ts, times["plain"])),
            "per_site_plain_ops": statistics.median(a - b for a, b in zip(ts, times["plain"])) / sites / plain_op_s,
        }
    plain = statistics.median(times["plain"])
    return {"shape": text, "sites": sites, "rounds": rounds, "plain_ms": plain * 1e3, "plain_ops": plain_ops, "variants": rows}


def as_text(result: dict) -> str:
    lines = [f"== {result['shape']} ({result['sites']} sites, {result['rounds']} interleaved rounds, plain {result['plain_ops']} operators)"]
    for variant, row in result["variants"].items():
        lines.append(f"{variant:18s} x{row['ratio']:.3f}  {row['per_site_plain_ops']:6.0f} plain operators per site")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gemma2-tiny-lora:2x16:6")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("the triton family runs on a CPU only under the interpreter: run with TRITON_INTERPRET=1 (launches are skipped, not timed)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.shape, args.rounds, args.warmup)
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    (out / "ablation.txt").write_text(as_text(result))
    print(as_text(result), end="")
    return result


if __name__ == "__main__":
    main()
