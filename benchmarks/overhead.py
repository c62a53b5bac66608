"""What each regularizer of the study costs in a training step, against plain training, in one process.

    python benchmarks/overhead.py                       # MiniLM-L6 and BERT-base shapes, every regularizer
    python benchmarks/overhead.py --shapes minilm --regularizers dreg --steps 40 --output overhead.json

A training step is forward + backward + AdamW step of BertForSequenceClassification (random init,
float32, dropout on, the default attention implementation). Every regularizer gets its own copy of
the plain model (identical weights) and is built exactly as ``DREGTrainer`` builds it
(``build_regularizer`` with ``DREGTrainingArguments(regularizer=..., reg_lambda=...)``), so its cost
includes what it does to the model: igpen and jacobian switch attention to eager, which has a double
backward. The loss is ``task_loss + reg_lambda * penalty``; weight decay is AdamW's decoupled decay on
the matrix weights, as in the Trainer. ``none`` is a second plain model: its ratio is the noise floor.

Timing: every round runs one step of each model, in an order rotated from round to round (so no
model always runs first or after the same neighbour); a model's time ratio is the median over the
rounds of its step / the plain step of the same round, which cancels slow drifts of a shared
machine's load. On a loaded machine single steps vary by tens of percent: use many rounds (--steps)
before reading a difference of a few percent, and compare with the ``none`` row.

Memory, for one step of each model:
- saved for backward: the unique storages autograd keeps from the start of the forward to the final
  backward (torch.autograd.graph.saved_tensors_hooks; for igpen and jacobian this includes the graph
  of their first backward), parameters excluded;
- peak memory, step: the highest level of CPU memory allocated during the whole step above the
  level before it (torch.profiler allocation events): activations, gradients and temporaries;
- peak memory, total: the same plus what is held between steps (parameters, AdamW state).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from hf_dreg import DREGTrainingArguments  # noqa: E402
from hf_dreg import penalty as _penalty  # noqa: E402
from hf_dreg.args import REGULARIZERS  # noqa: E402
from hf_dreg.regularizers import StepInfo, build_regularizer  # noqa: E402

SHAPES = {
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
}
# batch x sequence length per shape when --batch/--seq are not given: BERT-base gets fewer tokens so
# that a round of every regularizer stays near a minute on one CPU thread
DEFAULT_BATCH_SEQ = {"minilm": (16, 128), "base": (8, 64), "tiny": (8, 32)}
# timed rounds per shape when --steps is not given: several minutes on one thread
DEFAULT_STEPS = {"minilm": 12, "base": 6, "tiny": 6}
DEFAULT_WARMUP = {"minilm": 2, "base": 1, "tiny": 1}
PLAIN = "plain"


class Contender:
    """One model trained with one regularizer (``plain``: none, the reference)."""

    def __init__(self, name: str, model, regularizer, strength: float, weight_decay: float):
        self.name, self.model, self.regularizer, self.strength = name, model, regularizer, strength
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-5)

    def loss(self, batch: dict) -> torch.Tensor:
        def task_loss(model, inputs):
            outputs = model(**inputs)
            return outputs.loss, outputs

        loss, _, penalty = self.regularizer.compute(self.model, batch, task_loss, StepInfo())
        if penalty.term is not None:
            loss = loss + self.strength * penalty.term
        return loss

    def step(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # seven BERT-base copies must not also hold seven gradients

    def timed_step(self, batch: dict) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process, all threads) of one training step."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.step(batch)
        return time.perf_counter() - wall, time.process_time() - cpu


def build(shape: str, regularizers: list[str], seed: int = 0) -> list[Contender]:
    """The plain model and one copy per regularizer, all with identical weights."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**SHAPES[shape], num_labels=2)
    torch.manual_seed(seed)
    plain = BertForSequenceClassification(config).train()
    contenders = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [PLAIN, *regularizers]:
            model = plain if name == PLAIN else copy.deepcopy(plain)
            args = DREGTrainingArguments(
                output_dir=tmp, regularizer="none" if name == PLAIN else name, use_cpu=True, report_to="none", seed=seed
            )
            regularizer = build_regularizer(model, args)
            contenders.append(Contender(name, model, regularizer, args.reg_lambda, args.weight_decay))
    return contenders


def make_batch(config, batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, config.num_labels, (batch,), generator=g),
    }


def saved_for_backward(contender: Contender, batch: dict) -> int:
    """Bytes of the unique storages autograd saves up to the final backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in contender.model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = contender.loss(batch)
    del loss
    contender.model.zero_grad(set_to_none=True)
    return sum(storages.values())


def peak_allocated(contender: Contender, batch: dict) -> int:
    """Peak CPU bytes allocated during one training step, above the level before it."""
    from torch.profiler import ProfilerActivity, profile

    contender.optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        contender.step(batch)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def state_bytes(contender: Contender) -> int:
    """Bytes held between steps: parameters and optimizer state (gradients are set to None)."""
    tensors = list(contender.model.parameters())
    state = contender.optimizer.state.values()
    tensors += [t for st in state for t in st.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def run_shape(shape: str, regularizers: list[str], steps: int, warmup: int, batch_size: int, seq: int) -> dict:
    contenders = build(shape, regularizers)
    batch = make_batch(contenders[0].model.config, batch_size, seq)
    names = [c.name for c in contenders]

    graphs_before = compiled_graphs()
    for _ in range(warmup):  # includes the one-time compilation of DREG's fused kernels
        for c in contenders:
            c.step(batch)
    graphs_after_warmup = compiled_graphs()

    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    for i in range(steps):
        shift = i % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            wall, cpu = c.timed_step(batch)
            times[c.name].append(wall)
            cpu_times[c.name].append(cpu)
    recompiled = compiled_graphs() - graphs_after_warmup

    saved = {c.name: saved_for_backward(c, batch) for c in contenders}
    peak = {}
    for c in contenders:
        peak[c.name] = peak_allocated(c, batch)
        gc.collect()  # the profiler's event lists of a BERT-base step are large
    state = {c.name: state_bytes(c) for c in contenders}

    def pair_median(series: dict, name: str) -> float:
        return statistics.median(r / p for p, r in zip(series[PLAIN], series[name]))

    rows = {}
    for c in contenders[1:]:
        n = c.name
        rows[n] = {
            "reg_lambda": c.strength,
            "time_ratio": pair_median(times, n),
            "time_ratio_of_medians": statistics.median(times[n]) / statistics.median(times[PLAIN]),
            "cpu_ratio": pair_median(cpu_times, n),
            "saved_ratio": saved[n] / saved[PLAIN],
            "peak_ratio": peak[n] / peak[PLAIN],
            "total_peak_ratio": (state[n] + peak[n]) / (state[PLAIN] + peak[PLAIN]),
        }
    dreg = next((c for c in contenders if c.name == "dreg"), None)
    return {
        "shape": shape,
        "config": SHAPES[shape],
        "batch": batch_size,
        "seq": seq,
        "steps": steps,
        "warmup": warmup,
        "dreg_sites": len(dreg.regularizer.handle.sites) if dreg else None,
        "median_step_s": {n: statistics.median(t) for n, t in times.items()},
        "step_s": times,
        "cpu_s": cpu_times,
        "saved_bytes": saved,
        "peak_bytes": peak,
        "state_bytes": state,
        "regularizers": rows,
        "compiled_graphs_warmup": graphs_after_warmup - graphs_before,
        "recompiles_timed": recompiled,
        "fused": not _penalty._FUSION_FAILED,
    }


def table(results: list[dict], threads: int) -> str:
    lines = [
        "Cost of each regularizer per training step (forward + backward + AdamW) against plain training, "
        f"BertForSequenceClassification, CPU float32, {threads} thread(s), all models interleaved in one process",
        "",
        "| shape | batch x seq | regularizer | reg_lambda | plain s/step | time / plain | CPU time / plain "
        "| saved for backward | peak memory, step | peak memory, total |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        plain_s = r["median_step_s"][PLAIN]
        for name, row in r["regularizers"].items():
            lines.append(
                f"| {r['shape']} | {r['batch']} x {r['seq']} | {name} | {row['reg_lambda']:.3g} | {plain_s:.3f} "
                f"| {row['time_ratio']:.3f}x | {row['cpu_ratio']:.3f}x | {row['saved_ratio']:.3f}x "
                f"| {row['peak_ratio']:.3f}x | {row['total_peak_ratio']:.3f}x |"
            )
    lines += [
        "",
        "time: median over the rounds of the regularizer's step / the plain step of the same round (wall clock); "
        "CPU time: the same with the process's CPU time; none: a second plain model (the noise floor). "
        "saved for backward: unique storages autograd keeps until the final backward (parameters excluded). "
        "peak memory, step: highest allocation during a step above the level before it; total: with parameters "
        "and AdamW state added.",
    ]
    if any(not r["fused"] for r in results):
        lines.append("note: fused kernels unavailable: the DREG numbers are for eager math")
    if any(r["recompiles_timed"] for r in results):
        lines.append("note: torch.compile recompiled during the timed steps")
    return "\n".join(lines)


def _names(text: str, valid, what: str, parser) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in valid]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {list(valid)}")
    return names


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="minilm,base", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument(
        "--regularizers", default=",".join(REGULARIZERS), help=f"comma-separated, of {', '.join(REGULARIZERS)}"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed rounds per shape (default: per shape)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per shape (default: per shape)")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 (minilm), 8 (base), 8 (tiny)")
    parser.add_argument("--seq", type=int, default=None, help="default: 128 (minilm), 64 (base), 32 (tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shapes = _names(args.shapes, SHAPES, "shape(s)", parser)
    regularizers = _names(args.regularizers, REGULARIZERS, "regularizer(s)", parser)

    results = []
    for shape in shapes:
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[shape]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[shape]
        batch = args.batch or DEFAULT_BATCH_SEQ[shape][0]
        seq = args.seq or DEFAULT_BATCH_SEQ[shape][1]
        print(
            f"[{shape}] batch {batch} x seq {seq}: {warmup} warm-up + {steps} timed rounds of plain + "
            f"{', '.join(regularizers)} ...",
            file=sys.stderr,
            flush=True,
        )
        results.append(run_shape(shape, regularizers, steps, warmup, batch, seq))
        print(table(results[-1:], threads), file=sys.stderr, flush=True)
        if args.output:  # after every shape, so a run stopped later keeps what it measured
            meta = {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "threads": threads,
                "regularizers": regularizers,
            }
            Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        gc.collect()
    print(table(results, threads))
    return results


if __name__ == "__main__":
    main()
