"""DREGTrainer: each test checks one property of the training loop, against a reference it could miss.

Tiny random models (tests/tiny_models.py) unless a pretrained one is the point; dropout is switched
off wherever two runs are compared, and the data order is sequential.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from ddp_worker import padded_dataset, tiny_bert
from trainer_helpers import (
    LOGGED,
    GradCapture,
    WeightsAtStepBegin,
    assert_grads_close,
    assert_weights_close,
    load_weights,
    logs_with,
    make_args,
    padded_batch,
    plain_sites,
    sgd,
    state,
    task_and_dreg_by_hand,
    with_weights,
)
from transformers import Trainer, TrainingArguments

import hf_dreg
from hf_dreg import DREGTrainer
from hf_dreg.trainer import DREG_CONFIG_NAME

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the helper modules live

# eight examples, the first four long and the last four short: the two micro-batches of a 4 x 2
# accumulation step have 45 and 14 valid positions, so averaging per micro-batch would be wrong.
LENGTHS_8 = [12, 11, 10, 12, 3, 2, 4, 5]


def reference_grads(model, dataset: Dataset, dreg_lambda: float) -> dict[str, torch.Tensor]:
    """The gradient of mean CE + lambda * DREG (mean over every valid position) on the whole batch, by hand, float64."""
    model = copy.deepcopy(model).double()
    batch = {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}
    out, penalty = task_and_dreg_by_hand(model, "bert", batch)
    named = list(model.named_parameters())
    grads = torch.autograd.grad(out.loss + dreg_lambda * penalty, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


# ---- 1. gradient accumulation -------------------------------------------------------------------


def _one_step(tmp_path, name, model, dataset, batch, accumulation, dreg_lambda=1.0):
    args = make_args(
        tmp_path / name,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        dreg_lambda=dreg_lambda,
        **sgd(),
    )
    trainer = DREGTrainer(model=model, args=args, train_dataset=dataset)
    capture = GradCapture(trainer.model)
    trainer.add_callback(capture)
    trainer.train()
    assert len(capture.grads) == 1
    return trainer, capture.grads[0]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4 x 2 accumulation with padded inputs of different lengths gives the gradient of one batch of 8."""
    dataset = padded_dataset(LENGTHS_8)
    init = tiny_bert()
    expected = reference_grads(init, dataset, dreg_lambda=1.0)
    without_dreg = reference_grads(init, dataset, dreg_lambda=0.0)
    # the test has power: DREG moves the gradient of the MLP input layers a lot at lambda = 1
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    assert float((expected[name] - without_dreg[name]).norm()) > 0.5 * float(expected[name].norm())

    big, big_grads = _one_step(tmp_path, "8x1", copy.deepcopy(init), dataset, batch=8, accumulation=1)
    small, small_grads = _one_step(tmp_path, "4x2", copy.deepcopy(init), dataset, batch=4, accumulation=2)
    assert_grads_close(big_grads, expected)
    assert_grads_close(small_grads, expected)

    # and so the same weights after the SGD step, w - lr * g
    lr = big.args.learning_rate
    init_weights = dict(init.named_parameters())
    after = {n: (init_weights[n] - lr * g).detach() for n, g in expected.items()}
    for label, trained in (("8x1", big.model), ("4x2", small.model)):
        weights = dict(trained.named_parameters())
        actual = {n: weights[n].detach() for n in expected}
        assert_weights_close(actual, after, init_weights, what=f"{label}: weight")
    # the logged loss of the step is the same too
    assert logs_with(big, "loss")[0]["loss"] == pytest.approx(logs_with(small, "loss")[0]["loss"], rel=1e-6)


def test_gradient_accumulation_task_loss_only(tmp_path):
    """dreg_lambda=0: the task loss alone is also accumulated right (BERT accepts loss kwargs it ignores)."""
    dataset = padded_dataset(LENGTHS_8)
    init = tiny_bert()
    expected = reference_grads(init, dataset, dreg_lambda=0.0)
    _, grads = _one_step(tmp_path, "4x2", copy.deepcopy(init), dataset, batch=4, accumulation=2, dreg_lambda=0.0)
    assert_grads_close(grads, expected)


def test_last_partial_accumulation_step(tmp_path):
    """12 examples, 4 x 2 accumulation: the second step has one micro-batch and is normalised over it alone."""
    lengths = LENGTHS_8 + [7, 1, 12, 6]
    dataset = padded_dataset(lengths)
    init = tiny_bert()
    args = make_args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        dreg_lambda=1.0,
        num_train_epochs=1,
        **sgd(max_steps=-1, learning_rate=0.0),  # lr 0: both steps see the initial weights
    )
    trainer = DREGTrainer(model=copy.deepcopy(init), args=args, train_dataset=dataset)
    capture = GradCapture(trainer.model)
    trainer.add_callback(capture)
    trainer.train()
    assert trainer.state.global_step == 2 and len(capture.grads) == 2
    assert_grads_close(capture.grads[0], reference_grads(init, dataset.select(range(8)), dreg_lambda=1.0))
    assert_grads_close(capture.grads[1], reference_grads(init, dataset.select(range(8, 12)), dreg_lambda=1.0))


# ---- 2. gradient checkpointing ------------------------------------------------------------------


def test_gradient_checkpointing_same_loss_and_gradients(tmp_path):
    dataset = padded_dataset(LENGTHS_8)
    init = tiny_bert()
    runs = {}
    for checkpointing in (False, True):
        args = make_args(
            tmp_path / str(checkpointing),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            dreg_lambda=1.0,
            gradient_checkpointing=checkpointing,
            **sgd(),
        )
        model = copy.deepcopy(init)
        trainer = DREGTrainer(model=model, args=args, train_dataset=dataset)
        # counted after the site probe, and only with autograd on: the trainer's one-time no-grad check of
        # whether the model honours num_items_in_batch also runs the activation
        calls = []
        act = model.bert.encoder.layer[0].intermediate.intermediate_act_fn
        act.register_forward_hook(lambda *a: calls.append(1) if torch.is_grad_enabled() else None)
        capture = GradCapture(trainer.model)
        trainer.add_callback(capture)
        trainer.train()
        # with checkpointing the layer really is recomputed in backward (the activation runs twice)
        assert len(calls) == (4 if checkpointing else 2)
        assert model.is_gradient_checkpointing == checkpointing
        runs[checkpointing] = (logs_with(trainer, "loss")[0], capture.grads[0])
    (log_off, grads_off), (log_on, grads_on) = runs[False], runs[True]
    assert log_on["loss"] == pytest.approx(log_off["loss"], rel=1e-6)
    assert log_on["dreg"] == pytest.approx(log_off["dreg"], rel=LOGGED)
    assert_grads_close(grads_on, grads_off)
    # and both are the gradient of the loss, the penalty counted once
    assert_grads_close(grads_on, reference_grads(init, dataset, dreg_lambda=1.0))


def test_gradient_checkpointing_args(tmp_path):
    args = make_args(tmp_path, gradient_checkpointing=True)
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    with pytest.raises(ValueError, match="use_reentrant"):
        make_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    # without DREG there is nothing to protect: reentrant checkpointing is the user's choice
    off = make_args(
        tmp_path, dreg_lambda=0.0, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    assert off.gradient_checkpointing_kwargs == {"use_reentrant": True}


# ---- 3. bf16 autocast on CPU ----------------------------------------------------------------------


def test_bf16_autocast_cpu_matches_float32(tmp_path):
    dataset = padded_dataset(LENGTHS_8)
    init = tiny_bert()
    logs = {}
    for bf16 in (False, True):
        args = make_args(tmp_path / str(bf16), per_device_train_batch_size=8, dreg_lambda=1.0, bf16=bf16, **sgd(max_steps=2))
        model = copy.deepcopy(init)
        trainer = DREGTrainer(model=model, args=args, train_dataset=dataset)
        dtypes = set()  # what the activation really computed in: autocast must be on, or this tests nothing
        act = model.bert.encoder.layer[0].intermediate.intermediate_act_fn
        act.register_forward_hook(lambda module, args, out: dtypes.add(args[0].dtype))
        trainer.train()
        assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
        logs[bf16] = logs_with(trainer, "dreg")
        assert [entry["step"] for entry in logs[bf16]] == [1, 2]
        assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["dreg"]) for entry in logs[bf16])
        assert next(trainer.model.parameters()).dtype == torch.float32  # autocast, not a bf16 model
    # bf16 rounding of the activations averages out over positions and units (observed: ~1e-4)
    for full, half in zip(logs[False], logs[True]):
        assert half["dreg"] == pytest.approx(full["dreg"], rel=0.01)
        assert half["task_loss"] == pytest.approx(full["task_loss"], rel=0.01)
        assert half["loss"] == pytest.approx(full["loss"], rel=0.01)


# ---- 4. two processes ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("collator", [False, True], ids=["pre-padded", "DataCollatorWithPadding"])
def test_two_processes_match_one_process(tmp_path, collator):
    """torchrun, 2 CPU processes (gloo) x 4 examples = one process x 8: same losses, same weights.

    With the Trainer's own padding collator each process pads its texts to its own longest, and the
    ranks see very different numbers of valid positions.
    """
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(TESTS / "ddp_worker.py"), str(out), "4", "collator" if collator else "padded",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ddp = json.loads((out / "log_history.json").read_text())
    assert ddp["world_size"] == 2

    import ddp_worker

    single, single_weights = ddp_worker.train(str(tmp_path / "single"), per_device_batch=8, collator=collator)
    single_logs = logs_with(single, "loss")
    ddp_logs = [entry for entry in ddp["log_history"] if "loss" in entry]
    assert [e["step"] for e in ddp_logs] == [e["step"] for e in single_logs] == [1, 2]
    for one, two in zip(single_logs, ddp_logs):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=0)
        assert two["task_loss"] == pytest.approx(one["task_loss"], rel=LOGGED, abs=0)
        assert "dreg" in two
    # the DREG share of the loss is not negligible, so a wrong normalisation would show
    assert single_logs[0]["loss"] - single_logs[0]["task_loss"] > 1e-3

    ddp_weights = torch.load(out / "weights.pt")
    names = [n for n, _ in single.model.named_parameters()]
    init = state(ddp_worker.initial_model(collator))
    assert_weights_close({n: ddp_weights[n] for n in names}, {n: single_weights[n] for n in names}, init, what="after 2 steps:")


# ---- 5. torch.compile ----------------------------------------------------------------------------


def _compile_run(model, handle, batches, compiled=None):
    fn = compiled if compiled is not None else model
    penalties, grads = [], []
    for batch in batches:
        model.zero_grad()
        out = fn(**batch)
        penalty = handle.penalty()
        (out.loss + penalty).backward()
        penalties.append(penalty.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return penalties, grads


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # inductor's code generation takes a minute on 2 cores; aot_eager traces the same graph
def test_torch_compile_matches_eager(backend):
    from tiny_models import tiny_inputs

    torch._dynamo.reset()
    eager_model = tiny_bert()
    batches = []
    for seed in (0, 1):  # two calls with different masks: nothing of the first call is baked in
        batch = tiny_inputs(eager_model, batch=3, seq=6, seed=seed)
        if seed == 1:
            batch["attention_mask"][0, 2:] = 0
        batch["labels"] = torch.tensor([0, 1, 2])
        batches.append(batch)
    compiled_model = copy.deepcopy(eager_model)
    eager_handle = hf_dreg.attach(eager_model, kernels="eager")
    compiled_handle = hf_dreg.attach(compiled_model, kernels="eager")
    compiled = torch.compile(compiled_model, backend=backend)
    pe, ge = _compile_run(eager_model, eager_handle, batches)
    pc, gc = _compile_run(compiled_model, compiled_handle, batches, compiled)
    assert pe[0] != pe[1]
    for a, b, ga, gb in zip(pc, pe, gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        assert_grads_close(ga, gb, what=f"compiled ({backend}) gradient")
    torch._dynamo.reset()


# ---- 6. resuming ---------------------------------------------------------------------------------


def _resume_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=6,
        learning_rate=1e-2,
        dreg_lambda=1.0,
        save_strategy="steps",
        save_steps=3,
    )
    kwargs.update(overrides)
    return make_args(tmp_path, **kwargs)


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path, caplog):
    dataset = padded_dataset()  # 16 examples: 6 steps of 2 stay in one epoch
    full = DREGTrainer(model=tiny_bert(), args=_resume_args(tmp_path), train_dataset=dataset)
    full.train()
    final = state(full.model)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert checkpoint.is_dir()
    saved = json.loads((checkpoint / DREG_CONFIG_NAME).read_text())
    expected_settings = {"dreg_lambda": 1.0, "dreg_activations": "gelu", "dreg_exclude_modules": None}
    assert {k: saved.get(k, "missing") for k in expected_settings} == expected_settings
    # hooks only: the checkpoint is a vanilla transformers checkpoint
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(checkpoint)

    # a new trainer, a differently initialised model: everything comes from the checkpoint
    with caplog.at_level(logging.WARNING, logger="hf_dreg"):
        resumed = DREGTrainer(model=tiny_bert(seed=1), args=_resume_args(tmp_path), train_dataset=dataset)
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Resuming" in r.getMessage()]
    assert resumed.state.global_step == 6
    # the log history of steps 1-3 comes back from the checkpoint; 4-6 are logged as in the full run
    resumed_logs, full_logs = logs_with(resumed, "dreg"), logs_with(full, "dreg")
    assert [e["step"] for e in resumed_logs] == [e["step"] for e in full_logs] == [1, 2, 3, 4, 5, 6]
    for one, two in zip(full_logs[3:], resumed_logs[3:]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert two["dreg"] == pytest.approx(one["dreg"], rel=LOGGED)
    for name, value in final.items():
        torch.testing.assert_close(state(resumed.model)[name], value, rtol=1e-6, atol=1e-7, msg=name)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_dreg"):
        other = DREGTrainer(
            model=tiny_bert(), args=_resume_args(tmp_path, dreg_lambda=0.5, max_steps=3), train_dataset=dataset
        )
        other.train(resume_from_checkpoint=True)  # the last checkpoint, checkpoint-6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Resuming" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "0.5" in warnings[0] and "checkpoint-6" in warnings[0]


# ---- 7. PEFT LoRA ------------------------------------------------------------------------------


def _lora_model(seed=0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value", "intermediate.dense"]
    )
    return peft.get_peft_model(tiny_bert(seed), config)


def test_peft_lora_trains_adapters_with_dreg(tmp_path):
    model = _lora_model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert base_before and lora_before
    args = make_args(tmp_path, per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2, dreg_lambda=1.0)
    trainer = DREGTrainer(model=model, args=args, train_dataset=padded_dataset(LENGTHS_8))
    assert len(trainer.dreg_sites) == 2
    for site in trainer.dreg_sites:
        assert site.name.endswith("intermediate.intermediate_act_fn")
        assert site.inputs[0].endswith("intermediate.dense")
        assert site.mask_key == "attention_mask"
    trainer.train()
    assert logs_with(trainer, "dreg") and logs_with(trainer, "task_loss")
    after = dict(model.named_parameters())
    for name, value in base_before.items():
        assert torch.equal(after[name].detach(), value), f"frozen weight {name} changed"
    for name, value in lora_before.items():
        assert not torch.equal(after[name].detach(), value), f"adapter weight {name} did not change"


def test_peft_lora_penalty_reflects_the_adapters():
    model = _lora_model()
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)  # non-zero adapters: W + B A differs from W
    batch = padded_dataset(LENGTHS_8)[:]
    batch = {k: torch.tensor(batch[k]) for k in ("input_ids", "attention_mask")}

    handle = hf_dreg.attach(model, kernels="eager")
    model(**batch)
    penalty = handle.penalty()
    penalty.backward()
    handle.detach()
    grads = {n: p.grad for n, p in model.named_parameters() if "intermediate.dense.lora_" in n}
    assert len(grads) == 4
    for name, grad in grads.items():
        assert grad is not None and float(grad.abs().max()) > 0, f"no DREG gradient at {name}"

    merged = copy.deepcopy(model).merge_and_unload()
    with hf_dreg.attach(merged, kernels="eager") as merged_handle:
        merged(**batch)
        expected = merged_handle.penalty()
    torch.testing.assert_close(penalty.detach(), expected.detach(), rtol=1e-5, atol=0)
    with model.disable_adapter(), hf_dreg.attach(model, kernels="eager") as base_handle:
        model(**batch)
        base = base_handle.penalty()
    assert abs(float(base) - float(expected)) > 1e-3 * float(expected)  # the adapters changed the penalty


# ---- 8. the pretrained MiniLM on real data ----------------------------------------------------------


def test_minilm_fine_tunes_on_sst2(tmp_path, minilm_path, sst2_train):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    lines = [json.loads(line) for line in sst2_train.read_text().splitlines()[:48]]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)

    def encode(rows):
        data = tokenizer([r["text"] for r in rows], truncation=True, max_length=64)
        return Dataset.from_dict({**data, "labels": [r["label"] for r in rows]})

    train, evaluation = encode(lines[:32]), encode(lines[32:48])
    # dropout off, so that the logged values can be recomputed
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    init = copy.deepcopy(model)
    args = make_args(
        tmp_path, per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=3, learning_rate=5e-5, logging_steps=1
    )
    trainer = DREGTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer)
    assert len(trainer.dreg_sites) == 6
    watch = WeightsAtStepBegin()
    trainer.add_callback(watch)
    trainer.train()
    train_logs = logs_with(trainer, "loss")
    assert [e["step"] for e in train_logs] == [1, 2, 3]
    for entry in train_logs:
        assert 0.1 < entry["dreg"] < 0.4, entry  # the pretrained MiniLM starts near 0.21 per site
        assert 0.3 < entry["task_loss"] < 1.2, entry
        # each value recomputed by hand at the step's weights, on its batch padded by the Trainer's collator
        step = entry["step"] - 1
        batch = padded_batch(tokenizer, train, range(8 * step, 8 * step + 8))
        with torch.no_grad():
            reference = load_weights(init, watch.weights[step])  # float32 (the 6-significant-digit logs allow it)
            out, penalty = task_and_dreg_by_hand(reference, "bert", batch, sites=plain_sites("bert", layers=6))
        assert entry["task_loss"] == pytest.approx(float(out.loss), rel=LOGGED)
        assert entry["dreg"] == pytest.approx(float(penalty), rel=LOGGED)
        assert entry["loss"] == pytest.approx(float(out.loss) + args.dreg_lambda * float(penalty), rel=1e-5)

    metrics = trainer.evaluate()
    assert 0.1 < metrics["eval_dreg"] < 0.4
    assert not [m for m in trainer.model.modules() if m._forward_hooks or m._forward_pre_hooks]  # detached after evaluate
    plain_args = make_args(tmp_path / "plain", cls=TrainingArguments, per_device_eval_batch_size=8)
    plain = Trainer(model=trainer.model, args=plain_args, eval_dataset=evaluation, processing_class=tokenizer).evaluate()
    assert metrics["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)
    assert "eval_dreg" not in plain


# ---- 9. logging ------------------------------------------------------------------------------------


def test_logging_steps_average_the_values_of_their_steps(tmp_path):
    """logging_steps=2: each log holds the mean over its two steps of the task loss, DREG and every site's DREG,
    each computed here by hand at the weights and on the batch of its step (valid lengths 2..12)."""
    dataset = padded_dataset()  # 16 examples, 4 per step
    args = make_args(tmp_path, per_device_train_batch_size=4, logging_steps=2, dreg_lambda=1.0, dreg_log_per_site=True, **sgd(max_steps=5))
    model = tiny_bert()
    init = copy.deepcopy(model)
    trainer = DREGTrainer(model=model, args=args, train_dataset=dataset)
    watch = WeightsAtStepBegin()
    trainer.add_callback(watch)
    trainer.train()
    with_dreg = logs_with(trainer, "dreg")
    assert [e["step"] for e in with_dreg] == [2, 4]
    assert [e["step"] for e in logs_with(trainer, "loss")] == [2, 4]
    assert [e["step"] for e in logs_with(trainer, "task_loss")] == [2, 4]
    sites = [act for _, act in plain_sites("bert")]
    assert sorted(k for k in with_dreg[0] if k.startswith("dreg/")) == sorted(f"dreg/{site}" for site in sites)

    by_step = {}  # step -> (task loss, {site: DREG})
    for step in range(4):
        batch = {k: torch.tensor(v) for k, v in dataset[4 * step : 4 * step + 4].items()}
        with torch.no_grad():
            out, per_site = task_and_dreg_by_hand(with_weights(init, watch.weights[step]), "bert", batch, per_site=True)
        by_step[step] = (float(out.loss), {site: float(v) for site, v in per_site.items()})
    for entry in with_dreg:
        window = [entry["step"] - 2, entry["step"] - 1]
        task = sum(by_step[s][0] for s in window) / 2
        per_site = {site: sum(by_step[s][1][site] for s in window) / 2 for site in sites}
        dreg = sum(per_site.values()) / len(sites)
        assert entry["task_loss"] == pytest.approx(task, rel=LOGGED)
        assert entry["dreg"] == pytest.approx(dreg, rel=LOGGED)
        for site, value in per_site.items():
            assert entry[f"dreg/{site}"] == pytest.approx(value, rel=LOGGED), site
        assert entry["loss"] == pytest.approx(task + args.dreg_lambda * dreg, rel=1e-5)
        assert entry["loss"] - entry["task_loss"] > 1e-4
    # the weights moved between the steps, so a value of another step would be caught
    assert abs(by_step[0][1][sites[0]] - by_step[2][1][sites[0]]) > 1e-3 * by_step[0][1][sites[0]]
    summary = trainer.state.log_history[-1]
    assert "train_loss" in summary and not any(k.endswith("dreg") for k in summary)


def _dreg_by_hand(model, dataset) -> float:
    """DREG of a whole (pre-padded) data set: mean over sites of the mean over all its valid positions."""
    model = copy.deepcopy(model).double().eval()
    batch = {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return float(task_and_dreg_by_hand(model, "bert", batch)[1])


def test_eval_dreg_counts_only_the_evaluated_data(tmp_path):
    """eval_dreg is the DREG of this evaluation's batches: a predict() on other data in between changes nothing."""
    long, short = padded_dataset([12] * 8, seed=0), padded_dataset([2] * 8, seed=5)
    args = make_args(tmp_path, per_device_eval_batch_size=4, dreg_lambda=1.0)
    trainer = DREGTrainer(model=tiny_bert(), args=args, eval_dataset=long)
    first = trainer.evaluate()
    assert first["eval_dreg"] == pytest.approx(_dreg_by_hand(trainer.model, long), rel=LOGGED)
    other = trainer.evaluate(eval_dataset=short)
    assert other["eval_dreg"] == pytest.approx(_dreg_by_hand(trainer.model, short), rel=LOGGED)
    assert other["eval_dreg"] != pytest.approx(first["eval_dreg"], rel=1e-3)  # the two data sets differ
    trainer.predict(short)
    again = trainer.evaluate()
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    assert again["eval_dreg"] == pytest.approx(first["eval_dreg"], rel=LOGGED)


def test_eval_dreg_is_the_penalty_of_the_evaluated_data_whatever_the_batch_size(tmp_path):
    dataset = padded_dataset(LENGTHS_8)  # eval batches of 4 with 45 and 14 valid positions
    trainer = DREGTrainer(model=tiny_bert(), args=make_args(tmp_path, per_device_eval_batch_size=4), eval_dataset=dataset)
    assert trainer.evaluate()["eval_dreg"] == pytest.approx(_dreg_by_hand(trainer.model, dataset), rel=LOGGED)


# ---- 10. settings ----------------------------------------------------------------------------------


def test_lambda_zero_turns_dreg_off(tmp_path):
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=2, dreg_lambda=0.0)
    dataset = padded_dataset(LENGTHS_8)
    model = tiny_bert()
    trainer = DREGTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    assert trainer.dreg is None
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks
    trainer.train()
    metrics = trainer.evaluate()
    assert logs_with(trainer, "loss")
    assert not any(k.endswith("dreg") or k.startswith("dreg") for e in trainer.state.log_history for k in e)
    assert "eval_dreg" not in metrics


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf"), -float("inf"), "abc"])
def test_invalid_lambda_is_rejected(tmp_path, value):
    with pytest.raises(ValueError, match="dreg_lambda"):
        make_args(tmp_path, dreg_lambda=value)


def test_unknown_activations_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="swish42"):
        make_args(tmp_path, dreg_activations="swish42")
    with pytest.raises(ValueError):
        make_args(tmp_path, dreg_activations="gelu,swish42")


def test_resume_flag_as_the_command_line_gives_it(tmp_path, caplog):
    """--resume_from_checkpoint True / last (strings from the command line) resume from the last checkpoint; with no
    checkpoint it is an error naming the folder; a rerun into a folder with checkpoints says it starts from step 0."""
    dataset = padded_dataset()
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint last: .*run has no checkpoint-\* folder"):
        DREGTrainer(model=tiny_bert(), args=_resume_args(tmp_path, max_steps=3), train_dataset=dataset).train(resume_from_checkpoint="last")
    for flag in ("True", "last"):
        folder = tmp_path / flag
        DREGTrainer(model=tiny_bert(), args=_resume_args(folder, max_steps=3), train_dataset=dataset).train()
        again = DREGTrainer(model=tiny_bert(seed=1), args=_resume_args(folder, max_steps=4), train_dataset=dataset)
        again.train(resume_from_checkpoint=flag)
        assert again.state.global_step == 4
        assert [e["step"] for e in logs_with(again, "dreg")] == [1, 2, 3, 4]  # steps 1-3 came back from checkpoint-3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_dreg"):
        fresh = DREGTrainer(model=tiny_bert(), args=_resume_args(tmp_path / "True", max_steps=1, save_strategy="no"), train_dataset=dataset)
        fresh.train()
    messages = [r.getMessage() for r in caplog.records if "holds checkpoints" in r.getMessage()]
    assert len(messages) == 1 and "--resume_from_checkpoint last" in messages[0]


def test_a_penalty_that_overflows_is_an_error_naming_its_sites(tmp_path):
    """An inf weight in layer 1 makes that site's penalty (and every site after it) non-finite: the logging step
    raises, naming the sites from the step's own per-site values (not the penalty's name alone), and layer 0,
    which stayed finite, is not blamed."""
    model = tiny_bert()
    args = make_args(tmp_path, **sgd(per_device_train_batch_size=4, max_steps=1), dreg_lambda=1.0)
    trainer = DREGTrainer(model=model, args=args, train_dataset=padded_dataset(LENGTHS_8[:4]))
    with torch.no_grad():  # after the sites were found (their check of the layers computes with the weights)
        model.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="not finite") as raised:
        trainer.train()
    said = str(raised.value)
    assert "layer.1.intermediate" in said and "layer.0." not in said
