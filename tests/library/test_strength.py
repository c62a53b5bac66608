"""The strength of the penalty: the gradient-ratio diagnostic and --dreg_lambda auto.

Every ratio the trainer reports or calibrates to is compared with one measured here: the gradients
of the task loss and of DREG, computed by hand from the model's activations (trainer_helpers,
nothing of hf_dreg) in float64 on a copy of the weights the trainer had at that step, on the batch
it saw (sequential sampling, the Trainer's own padding collator, texts of unequal length).
"""

import logging

import pytest
from trainer_helpers import (
    LOGGED,
    WORD_COUNTS_8,
    WeightsAtStepBegin,
    assert_weights_close,
    classification_data,
    clone,
    gradients,
    logs_with,
    make_args,
    norm_of,
    padded_batch,
    parameters,
    sgd,
    task_and_dreg_by_hand,
    tiny_text_model,
    tokenizer,
    with_weights,
)
from transformers import HfArgumentParser

from hf_dreg import DREGTrainer, DREGTrainingArguments

# twelve texts: three micro-batches of 4 per epoch, each padded to its own longest
WORD_COUNTS_12 = WORD_COUNTS_8 + [14, 2, 25, 5]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return classification_data(tok, WORD_COUNTS_12)


def _trainer(tmp_path, tok, data, batch=4, **overrides):
    args = make_args(tmp_path, per_device_train_batch_size=batch, **overrides)
    model = tiny_text_model("bert", tok.vocab_size)
    trainer = DREGTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    watch = WeightsAtStepBegin()
    trainer.add_callback(watch)
    return trainer, watch


def _batch_of_step(tok, data, step: int, batch: int):
    """The micro-batch a step of sequential sampling trains on (one micro-batch per step)."""
    per_epoch = len(data) // batch
    first = (step % per_epoch) * batch
    return padded_batch(tok, data, range(first, first + batch))


def _by_hand(model, weights, batch):
    """(task loss, DREG, their gradients) at ``weights``, float64, by hand."""
    model = with_weights(model, weights)
    out, penalty = task_and_dreg_by_hand(model, "bert", batch)
    return out.loss, penalty, gradients(out.loss, model), gradients(penalty, model)


def _ratio_by_hand(model, weights, batch, strength: float) -> float:
    _, _, task_grad, dreg_grad = _by_hand(model, weights, batch)
    return strength * norm_of(dreg_grad) / norm_of(task_grad)


def test_dreg_lambda_flag_accepts_auto_and_numbers():
    parser = HfArgumentParser(DREGTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_lambda", "auto", "--use_cpu"])
    assert args.dreg_lambda == "auto" and args.strength is None  # calibrated on the first batch
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_lambda", "0.03", "--use_cpu"])
    assert args.dreg_lambda == 0.03 and args.strength == 0.03
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_lambda", "strong", "--use_cpu"])
    with pytest.raises(ValueError, match="dreg_target_ratio"):
        DREGTrainingArguments(output_dir="o", dreg_lambda="auto", dreg_target_ratio=0, use_cpu=True)


def test_auto_lambda_reaches_the_target_ratio_on_the_first_batch(tmp_path, tok):
    """The calibrated lambda, measured here on the first batch, gives the target ratio; and the step trains with it."""
    data = classification_data(tok)  # one batch of 8 texts of valid lengths 3..40
    trainer, _ = _trainer(tmp_path, tok, data, batch=8, dreg_lambda="auto", dreg_target_ratio=0.25, **sgd())
    init = clone(trainer.model)
    trainer.train()
    strength = trainer.args.strength
    assert isinstance(strength, float) and strength > 0
    assert trainer.dreg_config.dreg_lambda == "auto" and trainer.dreg_config.strength == strength

    batch = padded_batch(tok, data, range(8))
    task, penalty, task_grad, dreg_grad = _by_hand(init, parameters(init), batch)
    assert strength * norm_of(dreg_grad) / norm_of(task_grad) == pytest.approx(0.25, rel=1e-5)

    # the step trained with that lambda: its SGD update is -lr * (grad task + lambda * grad DREG) ...
    lr = trainer.args.learning_rate
    before = parameters(init)
    expected = {n: before[n].double() - lr * (task_grad[n] + strength * dreg_grad[n]) for n in before}
    assert_weights_close(parameters(trainer.model), expected, before)
    # ... and its logged loss is task + lambda * DREG
    (log,) = logs_with(trainer, "task_loss")
    assert log["reg_lambda"] == pytest.approx(strength, rel=LOGGED)
    assert log["task_loss"] == pytest.approx(float(task.detach()), rel=LOGGED)
    assert log["loss"] - log["task_loss"] == pytest.approx(strength * float(penalty.detach()), abs=LOGGED * log["task_loss"])


def test_auto_lambda_is_deterministic_for_a_seed(tmp_path, tok, data):
    first, _ = _trainer(tmp_path / "a", tok, data, dreg_lambda="auto", max_steps=1)
    first.train()
    second, _ = _trainer(tmp_path / "b", tok, data, dreg_lambda="auto", max_steps=1)
    second.train()
    assert isinstance(first.args.strength, float)  # calibrated, not None twice
    assert first.args.strength == second.args.strength


def test_ratio_diagnostic_is_the_measured_ratio_at_its_interval(tmp_path, tok, data, caplog):
    """lambda = 10 (ratio ~0.2): every logged reg_grad_ratio is the ratio of that step's weights and batch."""
    strength = 10.0
    trainer, watch = _trainer(tmp_path, tok, data, dreg_lambda=strength, reg_ratio_interval=2, **sgd(max_steps=6))
    init = clone(trainer.model)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logged = {entry["step"]: entry["reg_grad_ratio"] for entry in logs_with(trainer, "reg_grad_ratio")}
    assert sorted(logged) == [1, 3, 5]  # measured at global steps 0, 2, 4, logged after those steps
    measured = dict(trainer.reg_grad_ratios)
    assert sorted(measured) == [0, 2, 4]
    by_hand = {step: _ratio_by_hand(init, watch.weights[step], _batch_of_step(tok, data, step, 4), strength) for step in measured}
    for step, ratio in by_hand.items():
        assert measured[step] == pytest.approx(ratio, rel=1e-5), step
        assert logged[step + 1] == pytest.approx(ratio, rel=LOGGED), step
    # the test has power: another step's batch or weights give another ratio
    assert min(abs(a - b) for a in by_hand.values() for b in by_hand.values() if a != b) > 1e-3 * max(by_hand.values())
    assert 1e-2 < min(by_hand.values()) and max(by_hand.values()) < 1  # so the diagnostic must not warn
    assert not [r for r in caplog.records if "measurable effect" in r.getMessage() or "dominates" in r.getMessage()]


@pytest.mark.parametrize(
    "strength, warning, other",
    [(1e-9, "has no measurable effect at dreg_lambda=1e-09", "dominates"), (1e4, "dominates training at dreg_lambda=1e+04", "measurable")],
)
def test_ratio_diagnostic_warns_once_when_negligible_or_dominant(tmp_path, tok, data, caplog, strength, warning, other):
    trainer, _ = _trainer(tmp_path, tok, data, dreg_lambda=strength, reg_ratio_interval=1, **sgd(max_steps=4, learning_rate=0.0))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("hf_dreg")]
    assert len([m for m in messages if warning in m]) == 1, messages  # after three measurements, once
    assert not [m for m in messages if other in m], messages


def test_every_ratio_measurement_is_kept_even_when_no_training_log_follows_it(tmp_path, tok, data):
    """A sweep run with logging_steps > max_steps logs no training step, but must still record its ratios."""
    trainer, watch = _trainer(tmp_path, tok, data, dreg_lambda="auto", reg_ratio_interval=2, logging_steps=500, **sgd(max_steps=5))
    init = clone(trainer.model)
    trainer.train()
    assert not logs_with(trainer, "reg_grad_ratio")
    steps = [step for step, _ in trainer.reg_grad_ratios]
    assert steps == [0, 2, 4]  # the calibration at step 0, then measurements at steps 2 and 4
    strength = trainer.args.strength
    assert isinstance(strength, float)
    for step, ratio in trainer.reg_grad_ratios:
        expected = _ratio_by_hand(init, watch.weights[step], _batch_of_step(tok, data, step, 4), strength)
        assert ratio == pytest.approx(expected, rel=1e-5), step
    assert trainer.reg_grad_ratios[0][1] == pytest.approx(0.1)  # the default target, reached (checked above by hand)


def test_resume_keeps_the_calibrated_lambda(tmp_path, tok, data):
    first, _ = _trainer(tmp_path, tok, data, dreg_lambda="auto", max_steps=2, save_strategy="steps", save_steps=1)
    first.train()
    assert isinstance(first.args.strength, float)
    resumed, _ = _trainer(tmp_path, tok, data, dreg_lambda="auto", max_steps=2, save_strategy="steps", save_steps=1)
    assert resumed.args.strength is None
    resumed._check_resumed_settings(str(tmp_path / "out" / "checkpoint-1"))
    assert resumed.args.strength == first.args.strength and resumed.args.dreg_lambda == "auto"


def test_dreg_lambda_is_the_strength_of_every_regularizer_and_errors_quote_its_default(tmp_path):
    """One strength: dreg_lambda=0.5 with weight decay is a decay of 0.5 (it was ignored for 0.01 before), each
    regularizer's default applies when none is given, and the deprecated reg_lambda moves into dreg_lambda."""
    import warnings as _warnings

    from hf_dreg import DREGConfig

    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        config = DREGConfig(regularizer="weight_decay", dreg_lambda=0.5)
        args = DREGTrainingArguments(output_dir=str(tmp_path), regularizer="weight_decay", dreg_lambda=0.5, report_to=[], use_cpu=True)
    assert config.strength == 0.5 and args.weight_decay == 0.5
    assert DREGConfig(regularizer="weight_decay").dreg_lambda == 0.01 and DREGConfig(regularizer="jacobian").dreg_lambda == 0.01
    assert DREGConfig().dreg_lambda == 10**-2.5 and DREGConfig(regularizer="none").dreg_lambda == 0.0
    with pytest.warns(FutureWarning, match=r"reg_lambda is deprecated.*--dreg_lambda 0.1"):
        old = DREGConfig(regularizer="weight_decay", reg_lambda=0.1)
    assert old.dreg_lambda == 0.1 and old.reg_lambda is None
    with pytest.raises(ValueError, match="disagree: pass only dreg_lambda"):
        DREGConfig(reg_lambda=0.1, dreg_lambda=0.2)
    with pytest.raises(ValueError, match=r"got -1.*The weight_decay default is 0.01") as error:
        DREGConfig(regularizer="weight_decay", dreg_lambda=-1.0)
    assert "10**-2.5" not in str(error.value)
    with pytest.raises(ValueError, match=r"got -1.*The dreg default is 0.00316228 = 10\*\*-2.5"):
        DREGConfig(dreg_lambda=-1.0)
    with pytest.raises(ValueError, match="adds no penalty"):
        DREGConfig(regularizer="weight_decay", dreg_lambda="auto")


def test_configs_saved_before_the_one_strength_still_load(tmp_path):
    """dreg_config.json files of earlier runs (reg_lambda held the number, reg_lambda_auto the mode) load as they meant."""
    import json

    from hf_dreg import DREGConfig

    base = {"dreg_lambda": 10**-2.5, "dreg_target_ratio": 0.1, "dreg_activations": "gelu"}
    cases = [
        ({**base, "regularizer": "weight_decay", "reg_lambda": 0.1, "reg_lambda_auto": False}, 0.1, 0.1),
        ({**base, "regularizer": "igpen", "reg_lambda": 0.042, "reg_lambda_auto": True}, "auto", 0.042),
        ({**base, "dreg_lambda": "auto", "regularizer": "dreg", "reg_lambda": 0.7, "reg_lambda_auto": True}, "auto", 0.7),
        ({**base, "regularizer": "dreg", "reg_lambda": 10**-2.5, "reg_lambda_auto": False}, 10**-2.5, 10**-2.5),
    ]
    for i, (saved, setting, strength) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "dreg_config.json").write_text(json.dumps(saved))
        config = DREGConfig.from_pretrained(str(folder))
        assert (config.regularizer, config.dreg_lambda, config.strength) == (saved["regularizer"], setting, strength)
        config.save_pretrained(str(folder))  # and the new format reads back the same
        again = DREGConfig.from_pretrained(str(folder))
        assert (again.dreg_lambda, again.strength) == (setting, strength)


def test_no_sites_names_the_family_and_the_flag_of_every_entry_point():
    from tiny_models import tiny_model

    from hf_dreg import find_sites
    from hf_dreg.modeling.sites import NoSitesError

    with pytest.raises(NoSitesError) as error:
        find_sites(tiny_model("llama"))  # SwiGLU, default activations='gelu'
    message = str(error.value)
    assert "--dreg_activations silu" in message and "DREGConfig(dreg_activations='silu')" in message
    assert "activations='silu'" in message
