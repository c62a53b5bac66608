"""The study's comparators: each checked against an explicit computation, then through DREGTrainer."""

import math

import pytest
import torch
from datasets import Dataset

from hf_dreg import DREGTrainer, DREGTrainingArguments
from hf_dreg.regularizers import PowerIteration, StepInfo, jacobian_frobenius
from hf_dreg.regularizers.base import model_inputs_with_grad
from tiny_models import tiny_inputs, tiny_model

REGS = ["none", "weight_decay", "spectral_norm", "igpen", "jacobian", "dreg"]


def test_power_iteration_converges_to_spectral_norm_and_has_the_right_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 7, generator=g, dtype=torch.float64, requires_grad=True)
    power = PowerIteration(12, g, "cpu", torch.float64)
    for _ in range(100):
        sigma = power.sigma(w, iterations=1)
    assert torch.equal(power.sigma(w, iterations=0), sigma)  # micro-batches of one step share the estimate
    exact = torch.linalg.matrix_norm(w, ord=2)
    assert torch.allclose(sigma, exact, rtol=1e-10)
    (ours,) = torch.autograd.grad(sigma**2, w)
    (expected,) = torch.autograd.grad(exact**2, w)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-9)


def test_igpen_equals_explicit_autograd():
    model = tiny_model("bert").double()
    model.train()
    inputs = tiny_inputs(model)
    labels = torch.tensor([0, 2, 1])
    from hf_dreg.regularizers import InputGradient

    reg = InputGradient(model, None)
    torch.manual_seed(0)

    def task_loss(m, i):
        out = m(**i, labels=labels)
        return out.loss, out

    for module in model.modules():  # dropout off so both computations see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    _, _, penalty = reg.compute(model, dict(inputs), task_loss, StepInfo())
    expected = 0.0
    for b in range(3):
        emb = model.get_input_embeddings()(inputs["input_ids"][b : b + 1]).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"][b : b + 1], labels=labels[b : b + 1]).loss
        (grad,) = torch.autograd.grad(loss, emb)
        expected += grad.pow(2).sum() / 3
    assert torch.allclose(penalty.term, expected, rtol=1e-8)
    assert penalty.term.requires_grad


@pytest.mark.parametrize("reg", ["igpen", "jacobian"])
def test_input_penalties_train_the_token_embeddings(reg):
    """The task loss still trains the embeddings, and the penalty's embedding gradient is its true derivative."""
    from hf_dreg.regularizers import InputGradient, Jacobian

    model = tiny_model("bert").double().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs = tiny_inputs(model)
    labels = torch.tensor([0, 2, 1])
    args = DREGTrainingArguments(output_dir="unused", regularizer=reg, jacobian_exact=True, use_cpu=True, report_to=[])
    regularizer = (InputGradient if reg == "igpen" else Jacobian)(model, args)
    embedding = model.get_input_embeddings().weight

    def task_loss(m, i):
        out = m(**i, labels=labels)
        return out.loss, out

    loss, _, penalty = regularizer.compute(model, dict(inputs), task_loss, StepInfo())
    (task_grad,) = torch.autograd.grad(loss, embedding, retain_graph=True)
    (expected_task_grad,) = torch.autograd.grad(model(**inputs, labels=labels).loss, embedding)
    assert torch.allclose(task_grad, expected_task_grad, rtol=1e-10, atol=1e-12)
    (penalty_grad,) = torch.autograd.grad(penalty.term, embedding)
    assert penalty_grad.abs().sum() > 0

    direction = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-6

    def penalty_at(shift):
        with torch.no_grad():
            embedding.add_(shift * direction)
        try:
            with torch.enable_grad():
                return regularizer.compute(model, dict(inputs), task_loss, StepInfo())[2].term.detach()
        finally:
            with torch.no_grad():
                embedding.sub_(shift * direction)

    finite_difference = (penalty_at(eps) - penalty_at(-eps)) / (2 * eps)
    assert torch.allclose((penalty_grad * direction).sum(), finite_difference, rtol=1e-6)


def test_jacobian_exact_equals_jacrev_and_projection_is_unbiased():
    model = tiny_model("vit").double().eval()
    x = tiny_inputs(model, batch=2)["pixel_values"].requires_grad_(True)
    logits = model(pixel_values=x).logits
    exact = jacobian_frobenius(logits, x, exact=True)
    jac = torch.func.jacrev(lambda p: model(pixel_values=p).logits)(x.detach())  # (B, C, B, ...)
    per_example = sum(jac[b, :, b].pow(2).sum() for b in range(2)) / 2
    assert torch.allclose(exact, per_example, rtol=1e-8)
    g = torch.Generator().manual_seed(0)
    estimates = torch.stack([jacobian_frobenius(logits, x, n_proj=1, generator=g).detach() for _ in range(1500)])
    stderr = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact.detach()) < 4 * stderr, (estimates.mean(), exact, stderr)


def _text_dataset(n=8, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    for i in range(n):
        mask[i, seq - (i % 4) :] = 0
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": [i % 3 for i in range(n)]})


def _image_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"pixel_values": torch.randn(n, 1, 8, 8, generator=g).tolist(), "labels": [i % 3 for i in range(n)]})


def _train(family, reg, tmp_path, batch=8, accumulation=1, steps=1, **extra):
    model = tiny_model(family, act="gelu")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    args = DREGTrainingArguments(
        output_dir=str(tmp_path / f"{family}-{reg}-{batch}"),
        regularizer=reg,
        reg_lambda=None if reg == "none" else 0.5,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.1,
        optim="sgd",
        max_grad_norm=0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dreg_fused=False,
        lr_scheduler_type="constant",
        **extra,
    )
    data = _text_dataset() if family == "bert" else _image_dataset()
    trainer = DREGTrainer(model=model, args=args, train_dataset=data)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    trainer.train()
    return trainer


@pytest.mark.parametrize("family", ["bert", "vit"])
@pytest.mark.parametrize("reg", REGS)
def test_every_regularizer_trains_and_logs_its_value(family, reg, tmp_path):
    trainer = _train(family, reg, tmp_path, steps=2)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    if reg == "none":
        assert not any(name in logs[0] for name in REGS[1:])
    else:
        assert reg in logs[0], logs[0]
        assert logs[0][reg] > 0
    if reg in ("spectral_norm", "igpen", "jacobian", "dreg"):
        assert logs[0]["loss"] == pytest.approx(logs[0]["task_loss"] + 0.5 * logs[0][reg], rel=1e-4)


@pytest.mark.parametrize("reg", REGS)
def test_gradient_accumulation_matches_full_batch(reg, tmp_path):
    # the jacobian's random projections depend on how the batch is cut: compare its exact mode
    extra = {"jacobian_exact": True} if reg == "jacobian" else {}
    full = _train("bert", reg, tmp_path / "full", batch=8, accumulation=1, **extra)
    split = _train("bert", reg, tmp_path / "split", batch=4, accumulation=2, **extra)
    for (name, a), b in zip(full.model.named_parameters(), split.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_weight_decay_is_the_optimizers_decoupled_decay(tmp_path):
    args = DREGTrainingArguments(output_dir=str(tmp_path), regularizer="weight_decay", reg_lambda=0.05, report_to=[], use_cpu=True)
    assert args.weight_decay == 0.05
    with pytest.raises(ValueError, match="weight_decay"):
        DREGTrainingArguments(output_dir=str(tmp_path), regularizer="weight_decay", reg_lambda=0.05, weight_decay=0.1, use_cpu=True)


def test_dreg_lambda_and_reg_lambda_are_one_strength(tmp_path):
    args = DREGTrainingArguments(output_dir=str(tmp_path), reg_lambda=0.1, use_cpu=True)
    assert args.dreg_lambda == 0.1 and args.reg_lambda == 0.1
    args = DREGTrainingArguments(output_dir=str(tmp_path), dreg_lambda=0.2, use_cpu=True)
    assert args.reg_lambda == 0.2
    with pytest.raises(ValueError, match="disagree"):
        DREGTrainingArguments(output_dir=str(tmp_path), reg_lambda=0.1, dreg_lambda=0.2, use_cpu=True)
    with pytest.raises(ValueError, match="Unknown regularizer"):
        DREGTrainingArguments(output_dir=str(tmp_path), regularizer="dropout", use_cpu=True)


def test_hard_spectral_normalization_is_refused_on_a_pretrained_checkpoint(tmp_path):
    model = tiny_model("bert")
    model.config._name_or_path = "some/pretrained-model"
    args = DREGTrainingArguments(output_dir=str(tmp_path), regularizer="spectral_norm", spectral_mode="normalize", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="from scratch"):
        DREGTrainer(model=model, args=args)
    scratch = tiny_model("bert")
    trainer = DREGTrainer(model=scratch, args=args)
    w = scratch.bert.encoder.layer[0].intermediate.dense.weight
    assert torch.linalg.matrix_norm(w.detach(), ord=2) < 1.01


def test_double_backward_regularizers_switch_attention_to_eager(tmp_path, caplog):
    model = tiny_model("bert")
    model.set_attn_implementation("sdpa")
    args = DREGTrainingArguments(output_dir=str(tmp_path), regularizer="igpen", use_cpu=True, report_to=[])
    DREGTrainer(model=model, args=args)
    assert model.config._attn_implementation == "eager"
