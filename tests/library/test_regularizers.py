"""The study's comparators: each checked against an explicit computation, then through DREGTrainer."""

import functools
import logging
import math

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_inputs, tiny_model
from trainer_helpers import (
    LOGGED,
    PreActivations,
    assert_weights_close,
    classification_data,
    difference,
    dreg_per_site_by_hand,
    gradients,
    logs_with,
    make_args,
    no_dropout,
    norm_of,
    parameters,
    plain_sites,
    sgd,
    tiny_text_model,
    tokenizer,
)

from hf_dreg import DREGConfig, DREGTrainer, DREGTrainingArguments
from hf_dreg.regularizers import PowerIteration, StepInfo, jacobian_frobenius

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
    model = no_dropout(tiny_model("bert").double()).train()  # dropout off so both computations see the same function
    inputs = tiny_inputs(model)
    labels = torch.tensor([0, 2, 1])
    from hf_dreg.regularizers import InputGradient

    reg = InputGradient(model, None)
    torch.manual_seed(0)

    def task_loss(m, i):
        out = m(**i, labels=labels)
        return out.loss, out

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
def test_input_penalties_train_the_token_embeddings(reg, tmp_path):
    """The task loss still trains the embeddings, and the penalty's embedding gradient is its true derivative."""
    from hf_dreg.regularizers import InputGradient, Jacobian

    model = no_dropout(tiny_model("bert").double()).train()
    inputs = tiny_inputs(model)
    labels = torch.tensor([0, 2, 1])
    args = make_args(tmp_path, regularizer=reg, jacobian_exact=True)
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


# ---- through DREGTrainer: one SGD step of 2 x 4 accumulation against the full batch by hand -------------
#
# Text: the Trainer's own padding collator on texts of unequal length (the two micro-batches have 114
# and 27 valid positions, each padded to its own longest); images: 8 random 8x8 images. The reference
# is computed example by example (each text unpadded) in float64, by autograd, from the definitions:
#   none           mean CE
#   weight_decay   mean CE, and the optimizer's decay lambda * w of every weight but biases and norms
#   spectral_norm  mean CE + lambda * sum over the MLP input Linears of sigma_max(W)^2 (exact, by SVD)
#   igpen          mean CE + lambda * mean_b ||d CE_b / d x_b||^2 (x: token embeddings or pixels)
#   jacobian       mean CE + lambda * mean_b ||d logits_b / d x_b||_F^2 (exact mode)
#   dreg           mean CE + lambda * mean over sites of the mean over every valid position of the step
#                  of (1/m) sum_i act'(z_i)^2 ||W_i||^2

# strengths at which the penalty moves the update by more than 20 % of the task's (checked in the test)
STRENGTH = {"none": None, "weight_decay": 0.5, "spectral_norm": 0.5, "igpen": 3.0, "jacobian": 20.0, "dreg": 100.0}
POWER_ITERATIONS = 60  # spectral_norm: converged, so that the exact sigma is the reference


@functools.lru_cache(maxsize=None)
def _data(family):
    if family == "bert":
        tok = tokenizer()
        return tok, classification_data(tok)
    g = torch.Generator().manual_seed(0)
    images = Dataset.from_dict({"pixel_values": torch.randn(8, 1, 8, 8, generator=g).tolist(), "labels": [i % 3 for i in range(8)]})
    return None, images


def _initial_model(family, tok):
    return tiny_text_model("bert", tok.vocab_size) if family == "bert" else no_dropout(tiny_model("vit", act="gelu"))


def _train(family, reg, out, batch, accumulation):
    """One SGD step (weight_decay: the optimizer's decay is dreg_lambda); returns (trainer, initial weights)."""
    tok, data = _data(family)
    model = _initial_model(family, tok)
    init = parameters(model)
    extra = {"jacobian_exact": True} if reg == "jacobian" else {}
    if reg == "spectral_norm":
        extra["spectral_power_iterations"] = POWER_ITERATIONS
    args = make_args(
        out, regularizer=reg, dreg_lambda=STRENGTH[reg], per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, **sgd(), **extra,
    )  # fmt: skip
    trainer = DREGTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return trainer, init


@pytest.fixture(scope="module")
def two_by_four(tmp_path_factory):
    """The 2 x 4 run of (family, reg), trained once for the tests of this module."""
    runs = {}

    def run(family, reg):
        if (family, reg) not in runs:
            runs[family, reg] = _train(family, reg, tmp_path_factory.mktemp(f"{family}-{reg}"), batch=4, accumulation=2)
        return runs[family, reg]

    return run


def _examples(family, tok, data):
    """Each example on its own (a text unpadded), float64 where it is a float."""
    if family == "bert":
        return [{k: torch.tensor([v]) for k, v in data[i].items()} for i in range(len(data))]
    return [{"pixel_values": torch.tensor([data[i]["pixel_values"]], dtype=torch.float64), "labels": torch.tensor([data[i]["labels"]])} for i in range(len(data))]


def _decayed(name: str) -> bool:
    """What the Trainer's optimizer decays: every weight but biases and normalisation layers."""
    return "bias" not in name and "norm" not in name.lower()


@functools.lru_cache(maxsize=None)
def _reference(family, reg):
    """(task loss, penalty, gradient of task + strength * penalty, the weights) at the initial weights, full batch,
    float64, by hand."""
    tok, data = _data(family)
    model = _initial_model(family, tok).double().train()
    weights = parameters(model)
    examples = _examples(family, tok, data)
    n = len(examples)
    task, penalty = 0.0, 0.0
    dreg_sum, dreg_count = {}, {}
    for example in examples:
        inputs = dict(example)
        labels = inputs.pop("labels")
        if family == "bert":
            x = model.get_input_embeddings()(inputs.pop("input_ids"))
            inputs["inputs_embeds"] = x
        else:
            x = inputs["pixel_values"].requires_grad_(True)
        with PreActivations(model, plain_sites(family)) as captured:
            logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        task = task + loss / n
        if reg == "igpen":
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            penalty = penalty + g.pow(2).sum() / n
        elif reg == "jacobian":
            for c in range(logits.shape[-1]):
                (g,) = torch.autograd.grad(logits[0, c], x, create_graph=True)
                penalty = penalty + g.pow(2).sum() / n
        elif reg == "dreg":  # sums over positions here (unpadded: every one is valid); divided by the step's count below
            means = dreg_per_site_by_hand(model, plain_sites(family), captured.z, None)
            for linear, site in plain_sites(family):
                count = captured.z[linear].shape[:-1].numel()
                dreg_sum[site] = dreg_sum.get(site, 0.0) + means[site] * count
                dreg_count[site] = dreg_count.get(site, 0) + count
    if reg == "dreg":
        penalty = torch.stack([dreg_sum[s] / dreg_count[s] for s in dreg_sum]).mean()
    elif reg == "spectral_norm":
        modules = dict(model.named_modules())
        penalty = sum(torch.linalg.matrix_norm(modules[linear].weight, ord=2) ** 2 for linear, _ in plain_sites(family))
    elif reg == "weight_decay":  # the optimizer's decay lambda * w is the gradient of lambda/2 ||w||^2
        penalty = sum(p.pow(2).sum() for name, p in model.named_parameters() if _decayed(name)) / 2
    total = task if reg == "none" else task + STRENGTH[reg] * penalty
    return float(task), float(penalty), gradients(total, model), weights


def _cases(regs):
    """(family, reg) for both families."""
    return [pytest.param(family, reg, id=f"{reg}-{family}") for family in ("bert", "vit") for reg in regs]


@pytest.mark.parametrize("family, reg", _cases(REGS))
def test_accumulated_update_is_the_full_batch_gradient_of_task_plus_strength_times_penalty(family, reg, two_by_four):
    """2 x 4 accumulation, one SGD step: the update is -lr * grad(task + strength * penalty) of the whole batch."""
    trainer, init = two_by_four(family, reg)
    task, penalty, grad, weights = _reference(family, reg)
    assert all(torch.equal(init[n].double(), weights[n]) for n in init)  # the same initial model
    lr = trainer.args.learning_rate
    expected = {n: init[n].double() - lr * g for n, g in grad.items()}
    assert_weights_close(parameters(trainer.model), expected, init, rtol=1e-5)
    if reg != "none":  # the test has power: the penalty moves the update by over 1000x the tolerance above
        _, _, task_only, _ = _reference(family, "none")
        share = norm_of(difference(grad, task_only)) / norm_of(task_only)
        assert share > 1e-2, share  # igpen on the ViT moves it least: 1.3 %
    # and the logged loss of the step is task + strength * penalty (the Trainer's own, not rounded)
    (log,) = logs_with(trainer, "loss")
    if reg in ("none", "weight_decay"):  # nothing is added to the loss
        assert log["loss"] == pytest.approx(task, rel=1e-5)
        assert not [key for key in log if key in REGS[2:] or key == "task_loss"]
    else:
        assert log["loss"] == pytest.approx(task + STRENGTH[reg] * penalty, rel=1e-5)


@pytest.mark.parametrize(
    "family, reg", _cases(REGS[1:])
)
def test_logged_value_is_the_penalty_of_the_step(family, reg, two_by_four):
    """What is logged under the regularizer's name is the step's penalty (weight_decay: ||w||^2 of the decayed weights)."""
    trainer, _ = two_by_four(family, reg)
    _, penalty, _, _ = _reference(family, reg)
    expected = 2 * penalty if reg == "weight_decay" else penalty
    (log,) = logs_with(trainer, "loss")
    assert log[reg] == pytest.approx(expected, rel=LOGGED)


@pytest.mark.parametrize("family, reg", _cases(REGS[2:]))
def test_logged_task_loss_is_the_task_loss_of_the_step(family, reg, two_by_four):
    """ViT honours num_items_in_batch (each micro-batch's loss is its part of the step's); BERT does not."""
    trainer, _ = two_by_four(family, reg)
    task, _, _, _ = _reference(family, reg)
    (log,) = logs_with(trainer, "loss")
    assert log["task_loss"] == pytest.approx(task, rel=LOGGED)


@pytest.mark.parametrize("reg", REGS)
def test_gradient_accumulation_matches_full_batch(reg, tmp_path, two_by_four):
    """2 x 4 and 1 x 8 of the same texts, each micro-batch padded to its own longest (114 and 27 valid positions)."""
    split, init = two_by_four("bert", reg)
    full, init_full = _train("bert", reg, tmp_path / "full", batch=8, accumulation=1)
    assert all(torch.equal(init[n], init_full[n]) for n in init)
    assert_weights_close(parameters(split.model), parameters(full.model), init, rtol=1e-5, what="2 x 4 against 1 x 8:")


def test_weight_decay_is_the_optimizers_decoupled_decay(tmp_path):
    args = DREGTrainingArguments(output_dir=str(tmp_path), regularizer="weight_decay", dreg_lambda=0.05, report_to=[], use_cpu=True)
    assert args.weight_decay == 0.05
    with pytest.raises(ValueError, match="weight_decay"):
        DREGTrainingArguments(output_dir=str(tmp_path), regularizer="weight_decay", dreg_lambda=0.05, weight_decay=0.1, use_cpu=True)


def test_the_deprecated_reg_lambda_is_dreg_lambda(tmp_path):
    with pytest.warns(FutureWarning, match="reg_lambda is deprecated"):
        args = DREGTrainingArguments(output_dir=str(tmp_path), reg_lambda=0.1, use_cpu=True)
    assert args.dreg_lambda == 0.1 and args.reg_lambda is None
    with pytest.raises(ValueError, match="disagree"):
        DREGTrainingArguments(output_dir=str(tmp_path), reg_lambda=0.1, dreg_lambda=0.2, use_cpu=True)
    with pytest.raises(ValueError, match="Unknown regularizer"):
        DREGTrainingArguments(output_dir=str(tmp_path), regularizer="dropout", use_cpu=True)


def test_hard_spectral_normalization_is_refused_on_a_pretrained_checkpoint(tmp_path):
    model = tiny_model("bert")
    model.config._name_or_path = "some/pretrained-model"
    args = make_args(tmp_path, regularizer="spectral_norm", spectral_mode="normalize")
    with pytest.raises(ValueError, match="from scratch"):
        DREGTrainer(model=model, args=args)
    scratch = tiny_model("bert")
    DREGTrainer(model=scratch, args=args)  # normalizes the from-scratch weights
    w = scratch.bert.encoder.layer[0].intermediate.dense.weight
    assert torch.linalg.matrix_norm(w.detach(), ord=2) < 1.01


@pytest.mark.parametrize("reg", ["igpen", "jacobian"])
def test_double_backward_regularizers_switch_attention_to_eager(tmp_path, caplog, reg):
    model = tiny_model("bert")
    model.set_attn_implementation("sdpa")
    with caplog.at_level(logging.WARNING):
        DREGTrainer(model=model, args=make_args(tmp_path, regularizer=reg))
    assert model.config._attn_implementation == "eager"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("hf_dreg")]
    assert warnings == [f"{reg}: switched attention from 'sdpa' to 'eager', which supports double backward."]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # already eager: nothing to switch, nothing said
        DREGTrainer(model=model, args=make_args(tmp_path, regularizer=reg))
    assert not [r for r in caplog.records if "switched attention" in r.getMessage()]


def test_the_registry_builds_every_regularizer_by_name(monkeypatch):
    """build_regularizer goes through REGISTRY (no per-name code): a class put under a name is what gets built,
    and the config's choices and default strengths are the registry's."""
    import hf_dreg.regularizers as regs
    from hf_dreg.config import DEFAULT_REG_LAMBDA, REGULARIZERS

    assert REGULARIZERS == ("none", "weight_decay", "spectral_norm", "igpen", "jacobian", "dreg")
    assert DEFAULT_REG_LAMBDA == {"none": 0.0, "weight_decay": 0.01, "spectral_norm": 0.01, "igpen": 0.01, "jacobian": 0.01, "dreg": 10**-2.5}
    built = []

    class Recorded(regs.Regularizer):
        name = "jacobian"

        @classmethod
        def build(cls, model, config, seed=0):
            built.append((config.regularizer, config.dreg_lambda, seed))
            return cls()

    monkeypatch.setitem(regs.REGISTRY, "jacobian", Recorded)
    config = DREGConfig(regularizer="jacobian", dreg_lambda=0.5)
    assert isinstance(regs.build_regularizer(torch.nn.Linear(2, 2), config, seed=3), Recorded)
    assert built == [("jacobian", 0.5, 3)]
    assert isinstance(regs.build_regularizer(torch.nn.Linear(2, 2), DREGConfig(regularizer="jacobian", dreg_lambda=0.0)), regs.NoRegularizer)
