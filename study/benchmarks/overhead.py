"""What each regularizer costs in a training step, against plain training, in one process.

    python study/benchmarks/overhead.py --output study/results/cost/overhead.json   # docs/cost.md's table (CPU, about 15 min)
    python study/benchmarks/overhead.py --shapes minilm --regularizers dreg --steps 40
    python study/benchmarks/overhead.py --shapes gemma2-lora:1x1024            # a shape at another batch x length
    python study/benchmarks/cost_table.py study/results/cost/overhead.json          # the Markdown table from the JSON
    bash study/benchmarks/gpu_cost.sh                                         # the same on a GPU, bf16

Shapes (random init from a config, nothing downloaded):
- ``minilm``, ``base``, ``tiny``: BertForSequenceClassification (MiniLM-L6: 6 x 384, MLP 1536; BERT-base:
  12 x 768, MLP 3072), full fine-tuning; plain GELU sites.
- ``gemma2``, ``gemma2-lora``, ``gemma2-lora-2k``: Gemma2ForCausalLM with Gemma-2-2B's layer shape scaled
  down (4 layers x 512, GeGLU MLP 2048, 8 heads of 64, 4 KV heads; gated sites, tanh GELU), eager
  attention as Gemma-2 trains; full fine-tuning or LoRA r = 8 (alpha 16, no dropout) on q/v/gate/up/down.
  The vocabulary is 16,384 so that the LM head's share of the step's matrix products (about 30 %) is
  Gemma-2-2B's (its 256k x 2304 head against 26 layers); a 256k head on 4 layers would dwarf the MLPs.
- ``gemma2-2b-lora``: Gemma-2-2B's full shape (26 x 2304, MLP 9216, vocabulary 256k) with LoRA: for a
  GPU (``study/benchmarks/gpu_cost.sh``).
- ``gemma2-tiny``, ``gemma2-tiny-lora``: 2 x 64, for the tests.

A training step is forward + backward + AdamW step (dropout on). Every regularizer gets its own copy of
the plain model (identical weights, and identical LoRA weights) and is built exactly as the trainers build
it (``build_regularizer`` with ``DREGTrainingArguments(regularizer=..., dreg_lambda=...)``, then
``activate``: DREG's hooks, with the fused kernels), so its cost includes what it does to the model:
igpen and jacobian switch attention to eager, which has a double backward. The loss is
``task_loss + dreg_lambda * penalty``; weight decay is AdamW's decoupled decay on the matrix weights, as
in the Trainer. ``none`` is a second plain model: its ratio is the noise floor.

Timing: every round runs one step of each model, in an order rotated from round to round (so no model
always runs first or after the same neighbour); a model's time ratio is the median over the rounds of
its step / the plain step of the same round, which cancels slow drifts of a shared machine's load. The
1-minute load average is recorded before and after each shape: on a loaded machine single steps vary
by tens of percent, so use many rounds before reading a difference of a few percent, and compare with
the ``none`` row.

Memory, for one step of each model:
- saved for backward: the unique storages autograd keeps from the start of the forward to the final
  backward (torch.autograd.graph.saved_tensors_hooks; for igpen and jacobian this includes the graph
  of their first backward), parameters excluded;
- peak allocated, step: the highest level of memory allocated during the whole step above the level
  before it (CPU: torch.profiler allocation events; CUDA: torch.cuda.max_memory_allocated):
  activations, gradients, optimizer temporaries;
- peak RSS, step (CPU): a fresh subprocess per shape builds each model in turn (alone), runs one
  warm-up step (compilation, AdamW state), resets the kernel's high-water mark (/proc/self/clear_refs)
  and runs one step: VmHWM minus the resident memory before it, with glibc's mmap threshold fixed so
  that freed tensors leave the resident set. What the operating system sees, allocator included.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cost_table

from hf_dreg import DREGTrainingArguments  # noqa: E402
from hf_dreg.ops.kernels import KERNEL_FAMILIES, KERNELS  # noqa: E402
from hf_dreg.regularizers import StepInfo, build_regularizer  # noqa: E402
from hf_dreg.training_args import REGULARIZERS  # noqa: E402

PLAIN = "plain"
LORA_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
ALL = tuple(REGULARIZERS)
DREG_ONLY = ("none", "dreg")

_GEMMA2_SMALL = dict(
    vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64,
)
_GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
)
_GEMMA2_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
)


@dataclass(frozen=True)
class Shape:
    label: str
    family: str  # "bert" or "gemma2"
    config: dict
    batch: int
    seq: int
    steps: int  # timed rounds
    warmup: int
    regularizers: tuple = ALL
    lora: bool = False
    extra: dict = field(default_factory=dict)


SHAPES = {
    "minilm": Shape("MiniLM-L6", "bert", dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536), 16, 128, 8, 1),
    "base": Shape("BERT-base", "bert", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072), 8, 64, 6, 1, DREG_ONLY),
    "tiny": Shape("tiny BERT", "bert", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256), 8, 32, 6, 1),
    "gemma2": Shape("Gemma-2 4 x 512, full", "gemma2", _GEMMA2_SMALL, 2, 512, 8, 1, DREG_ONLY),
    "gemma2-lora": Shape("Gemma-2 4 x 512, LoRA r=8", "gemma2", _GEMMA2_SMALL, 2, 512, 8, 1, DREG_ONLY, lora=True),
    "gemma2-lora-2k": Shape("Gemma-2 4 x 512, LoRA r=8", "gemma2", _GEMMA2_SMALL, 1, 2048, 4, 1, DREG_ONLY, lora=True),
    "gemma2-2b-lora": Shape("Gemma-2-2B, LoRA r=8", "gemma2", _GEMMA2_2B, 1, 2048, 20, 3, DREG_ONLY, lora=True),
    "gemma2-tiny": Shape("tiny Gemma-2, full", "gemma2", _GEMMA2_TINY, 2, 16, 2, 1, DREG_ONLY),
    "gemma2-tiny-lora": Shape("tiny Gemma-2, LoRA r=8", "gemma2", _GEMMA2_TINY, 2, 16, 2, 1, DREG_ONLY, lora=True),
}
DEFAULT_SHAPES = "minilm,gemma2,gemma2-lora,gemma2-lora-2k"


def parse_shape(text: str, parser=None) -> tuple[str, Shape]:
    """``name``, ``name:BxS`` (another batch x sequence length for that shape) or ``name:BxS:L`` (and L layers)."""
    name, _, size = text.partition(":")
    size, _, layers = size.partition(":")
    if name not in SHAPES:
        message = f"unknown shape {name!r}; choose from {list(SHAPES)}"
        if parser is None:
            raise ValueError(message)
        parser.error(message)
    shape = SHAPES[name]
    if size:
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if match is None:
            message = f"shape size {size!r}: write BATCHxSEQ, e.g. {name}:2x1024"
            if parser is None:
                raise ValueError(message)
            parser.error(message)
        shape = replace(shape, batch=int(match.group(1)), seq=int(match.group(2)))
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            message = f"shape layers {layers!r}: write NAME:BATCHxSEQ:LAYERS, e.g. {name}:2x16:6"
            if parser is None:
                raise ValueError(message)
            parser.error(message)
        shape = replace(shape, label=f"{shape.label}, {layers} layers", config={**shape.config, "num_hidden_layers": int(layers)})
    return name, shape


# ---- the models ------------------------------------------------------------------------------------


def build_model(shape: Shape, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    import transformers as tf

    torch.manual_seed(seed)
    with torch.device(device):  # Gemma-2-2B: initialised where it runs, not on the host first
        if shape.family == "bert":
            model = tf.BertForSequenceClassification(tf.BertConfig(**shape.config, num_labels=2))
        else:
            config = tf.Gemma2Config(**shape.config, hidden_activation="gelu_pytorch_tanh")
            config._attn_implementation = "eager"
            model = tf.Gemma2ForCausalLM(config)
    model = model.to(dtype=dtype).train()
    if shape.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed + 1)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
        model.train()
    return model


def make_batch(shape: Shape, model, device: str = "cpu", seed: int = 0) -> dict:
    config = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (shape.batch, shape.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(shape.batch, shape.seq, dtype=torch.long)}
    if shape.family == "bert":
        batch["labels"] = torch.randint(0, 2, (shape.batch,), generator=g)
    else:
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


class Contender:
    """One model trained with one regularizer (``plain``: none, the reference)."""

    def __init__(self, name: str, model, regularizer, strength: float, weight_decay: float):
        self.name, self.model, self.regularizer, self.strength = name, model, regularizer, strength
        self.forward = model  # torch.compile(model) with --torch_compile, as TrainingArguments(torch_compile=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.dim() >= 2]
        rest = [p for p in trainable if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-5)
        self.device = next(model.parameters()).device

    def loss(self, batch: dict) -> torch.Tensor:
        def task_loss(model, inputs):
            outputs = self.forward(**inputs)
            return outputs.loss, outputs

        loss, _, penalty = self.regularizer.compute(self.model, batch, task_loss, StepInfo())
        if penalty.term is not None:
            loss = loss + self.strength * penalty.term
        return loss

    def step(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # many model copies must not also hold their gradients

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_step(self, batch: dict) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process, all threads) of one training step."""
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        self.step(batch)
        self.sync()
        return time.perf_counter() - wall, time.process_time() - cpu


def split_name(name: str) -> tuple[str, str]:
    """(regularizer, DREG kernel family) of a contender's name: ``dreg@triton`` is DREG with the triton family."""
    regularizer, _, kernels = name.partition("@")
    return regularizer, kernels or "auto"


def build_contender(name: str, model, tmp: str, seed: int = 0) -> Contender:
    regularizer, kernels = split_name(name)
    args = DREGTrainingArguments(
        output_dir=tmp, regularizer="none" if name == PLAIN else regularizer, dreg_kernels=kernels, use_cpu=True,
        report_to="none", seed=seed,
    )  # fmt: skip
    regularizer = build_regularizer(model, args)
    regularizer.activate(model)
    return Contender(name, model, regularizer, args.strength, args.weight_decay)


def cast_weights(model, dtype: torch.dtype) -> None:
    """The model's weights to ``dtype``, LoRA adapters kept in float32 (PEFT's default on a bf16 base)."""
    if dtype == torch.float32:
        return
    model.to(dtype)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()


def compile_models(contenders: list[Contender], backend: str = "inductor") -> None:
    """Each contender's forward through ``torch.compile(model)``, as ``TrainingArguments(torch_compile=True)``
    wraps the model (inductor, default mode): DREG's hooks are traced into the model's graph, the penalty is
    read after it. Compiled at the warm-up rounds.

    Each contender's forward is a function of its own (dynamo keeps compiled code per code object): its models are
    copies of one class whose guards do not tell their submodules' hooks apart, so one shared code object would run
    the plain model's graph, without DREG's hooks, for the DREG models."""
    for i, c in enumerate(contenders):

        def forward(*args, _model=c.model, **kwargs):
            return _model(*args, **kwargs)

        forward.__code__ = forward.__code__.replace(co_name=f"forward_{i}_{c.name.replace('@', '_')}")
        c.forward = torch.compile(forward, backend=backend)


def build(shape: Shape, regularizers: list[str], seed: int = 0, dtype=torch.float32, device: str = "cpu") -> list[Contender]:
    """The plain model and one copy per regularizer, all with identical weights.

    The regularizers are built on the float32 model, then the weights are cast to ``dtype``: DREG's site
    probe checks numerically that each feeding layer computes x @ W.T + b, with float32 tolerances that a
    bf16 base under float32 LoRA adapters does not meet (hf_dreg.modeling.layers.computes_linear).
    """
    template = build_model(shape, seed, torch.float32, device)
    names = [PLAIN, *regularizers]
    # every model a copy, plain included: the original object, allocated among the build's temporaries,
    # ran measurably slower than its copies (about 5 % for the LoRA model here)
    models = [copy.deepcopy(template) for _ in names]
    del template
    contenders = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in zip(names, models):
            contender = build_contender(name, model, tmp, seed)
            cast_weights(model, dtype)
            contenders.append(contender)
    return contenders


# ---- memory ----------------------------------------------------------------------------------------


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
    """Peak bytes allocated during one training step, above the level before it."""
    contender.optimizer.zero_grad(set_to_none=True)
    if contender.device.type == "cuda":
        contender.sync()
        torch.cuda.reset_peak_memory_stats(contender.device)
        before = torch.cuda.memory_allocated(contender.device)
        contender.step(batch)
        contender.sync()
        return torch.cuda.max_memory_allocated(contender.device) - before
    from torch.profiler import ProfilerActivity, profile

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


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def rss_probe(shape: Shape, names: list[str], seed: int = 0) -> dict:
    """In this (fresh) process, one model after the other: the resident-set peak of one step, in kB.

    Each model is built, warmed up (compilation, AdamW state) and measured alone, then freed; with
    glibc's mmap threshold fixed (see rss_in_subprocess) freed tensors leave the resident set, so each
    step's peak is measured against the resident set just before it.
    """
    out = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            contender = build_contender(name, build_model(shape, seed), tmp, seed)
        batch = make_batch(shape, contender.model)
        contender.step(batch)  # warm-up: compilation, AdamW state
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
        contender.step(batch)
        peak = _status_kb("VmHWM")
        out[name] = {"rss_before_kb": before, "rss_peak_kb": peak, "rss_step_kb": peak - before}
        contender.regularizer.deactivate()
        del contender, batch
        gc.collect()
    return out


def rss_in_subprocess(shape_text: str, names: list[str], threads: int, seed: int = 0) -> dict:
    """rss_probe in a fresh interpreter, apart from the timed models; {} where /proc cannot reset the peak."""
    if not Path("/proc/self/clear_refs").exists():
        return {}
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "131072",  # fixed: large tensors are mmapped and unmapped when freed
        "MALLOC_TRIM_THRESHOLD_": "131072",
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
    }
    probe = f"{shape_text}={','.join(names)}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-probe", probe, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        print(f"rss probe {probe} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def release_free_memory() -> None:
    """Give freed heap memory back to the system (glibc), between steps: a 2k-token step frees GBs in
    pieces that glibc would otherwise keep, and three models' worth of fragments exhausted 23 GB."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def bootstrap_median_interval(ratios: list[float], draws: int = 2000, seed: int = 0) -> list[float]:
    """A 90 % percentile-bootstrap interval of the median of the per-round ratios."""
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return [medians[int(0.05 * draws)], medians[int(0.95 * draws) - 1]]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


# ---- one shape -------------------------------------------------------------------------------------


def run_shape(
    name: str,
    shape: Shape,
    regularizers: list[str],
    steps: int,
    warmup: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    rss: bool = True,
    threads: int = 1,
    shape_text: str | None = None,
    torch_compile: str | None = None,
) -> dict:
    load_before = os.getloadavg()
    contenders = build(shape, regularizers, dtype=dtype, device=device)
    if torch_compile:
        compile_models(contenders, torch_compile)
    batch = make_batch(shape, contenders[0].model, device)
    names = [c.name for c in contenders]

    graphs_before = compiled_graphs()
    for _ in range(warmup):  # includes the one-time compilation of DREG's fused kernels
        for c in contenders:
            c.step(batch)
            release_free_memory()
    graphs_after_warmup = compiled_graphs()

    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    for i in range(steps):
        shift = i % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            wall, cpu = c.timed_step(batch)
            times[c.name].append(wall)
            cpu_times[c.name].append(cpu)
            release_free_memory()
    recompiled = compiled_graphs() - graphs_after_warmup
    load_after = os.getloadavg()

    saved = {c.name: saved_for_backward(c, batch) for c in contenders}
    peak = {}
    for c in contenders:
        peak[c.name] = peak_allocated(c, batch)
        gc.collect()  # the profiler's event lists of a large step are large
        release_free_memory()
    state = {c.name: state_bytes(c) for c in contenders}
    strengths = {c.name: c.strength for c in contenders}
    dreg = next((c for c in contenders if split_name(c.name)[0] == "dreg"), None)
    sites = len(dreg.regularizer.handle.sites) if dreg else None
    trainable = sum(p.numel() for p in contenders[0].model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in contenders[0].model.parameters())
    del contenders, batch
    gc.collect()

    # (the fresh-subprocess probe builds uncompiled models: not run under --torch_compile)
    rss_kb = rss_in_subprocess(shape_text or name, names, threads) if rss and device == "cpu" and not torch_compile else {}

    def per_round(series: dict, n: str) -> list[float]:
        return [r / p for p, r in zip(series[PLAIN], series[n])]

    def pair_median(series: dict, n: str) -> float:
        return statistics.median(per_round(series, n))

    rows = {}
    for n in names[1:]:
        row = {
            "time_ratio": pair_median(times, n),
            "time_ratio_interval": bootstrap_median_interval(per_round(times, n)),
            "time_ratio_of_minima": min(times[n]) / min(times[PLAIN]),
            "time_ratio_of_medians": statistics.median(times[n]) / statistics.median(times[PLAIN]),
            "cpu_ratio": pair_median(cpu_times, n),
            "saved_ratio": saved[n] / saved[PLAIN],
            "reg_lambda": strengths[n],
            "peak_ratio": peak[n] / peak[PLAIN],
            "total_peak_ratio": (state[n] + peak[n]) / (state[PLAIN] + peak[PLAIN]),
        }
        if n in rss_kb and PLAIN in rss_kb:
            row["rss_step_ratio"] = rss_kb[n]["rss_step_kb"] / rss_kb[PLAIN]["rss_step_kb"]
            row["rss_peak_ratio"] = rss_kb[n]["rss_peak_kb"] / rss_kb[PLAIN]["rss_peak_kb"]
        rows[n] = row
    return {
        "shape": name,
        "label": shape.label,
        "family": shape.family,
        "lora": shape.lora,
        "config": shape.config,
        "batch": shape.batch,
        "seq": shape.seq,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "warmup": warmup,
        "dreg_sites": sites,
        "parameters": total,
        "trainable_parameters": trainable,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "median_step_s": {n: statistics.median(t) for n, t in times.items()},
        "step_s": times,
        "cpu_s": cpu_times,
        "saved_bytes": saved,
        "peak_bytes": peak,
        "state_bytes": state,
        "rss_kb": rss_kb,
        "regularizers": rows,
        "compiled_graphs_warmup": graphs_after_warmup - graphs_before,
        "recompiles_timed": recompiled,
        "fused": not KERNELS.failed,
        # whole-site regions this torch could not trace (their sites ran a simpler route: hf_dreg.ops.kernels.KERNELS)
        "untraceable_regions": sorted(fn.__name__ for fn in KERNELS.untraceable),
    }


def _names(text: str, valid, what: str, parser) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if split_name(s)[0] not in valid or (split_name(s)[0] != "dreg" and "@" in s)
               or split_name(s)[1] not in KERNEL_FAMILIES]  # fmt: skip
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {list(valid)}")
    return names


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated, of {', '.join(SHAPES)} (name:BxS for another size, name:BxS:L for L layers)")
    parser.add_argument(
        "--regularizers", default="default",
        help=f"comma-separated, of {', '.join(REGULARIZERS)} (dreg@<kernels> for one DREG kernel family: "
        f"{', '.join(KERNEL_FAMILIES)}); 'default': every one for the BERT shapes but "
        "BERT-base, none and dreg for the others",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed rounds per shape (default: per shape)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per shape (default: per shape)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's weights (bfloat16: pure bf16 training)")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-subprocess peak RSS (CPU)")
    parser.add_argument("--torch_compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="every model's forward through torch.compile (backend: inductor, the Trainer's default), as "
                        "TrainingArguments(torch_compile=True); none and dreg only")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    parser.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)  # SHAPE=REGULARIZER, internal
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.rss_probe:
        shape_text, _, names = args.rss_probe.partition("=")
        print(json.dumps(rss_probe(parse_shape(shape_text, parser)[1], names.split(","))))
        return []
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    dtype = getattr(torch, args.dtype)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    parsed = [(text, *parse_shape(text, parser)) for text in shapes]
    custom = None if args.regularizers == "default" else _names(args.regularizers, REGULARIZERS, "regularizer(s)", parser)
    if args.torch_compile:
        others = sorted({split_name(n)[0] for n in (custom or ALL)} - {"none", "dreg"})
        if others:
            parser.error(f"--torch_compile times none and dreg only (the others differentiate twice): drop {others} from --regularizers")

    from cost_table import table

    results = []
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "threads": threads,
        "torch_compile": args.torch_compile,
        "command": " ".join(["python", "study/benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    started = time.time()
    for text, name, shape in parsed:
        regularizers = custom if custom is not None else list(shape.regularizers)
        steps = args.steps if args.steps is not None else shape.steps
        warmup = args.warmup if args.warmup is not None else shape.warmup
        print(
            f"[{text}] batch {shape.batch} x seq {shape.seq}: {warmup} warm-up + {steps} timed rounds of plain + "
            f"{', '.join(regularizers)} (load {os.getloadavg()[0]:.2f}) ...",
            file=sys.stderr,
            flush=True,
        )
        results.append(
            run_shape(name, shape, regularizers, steps, warmup, args.device, dtype, not args.no_rss, threads, text, args.torch_compile)
        )
        print(table({"meta": meta, "results": results[-1:]}), file=sys.stderr, flush=True)
        if args.output:  # after every shape, so a run stopped later keeps what it measured
            meta["wall_s"] = round(time.time() - started, 1)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        gc.collect()
    print(table({"meta": meta, "results": results}))
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
