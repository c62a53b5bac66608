"""'auto' strengths: calibrated on the first batch and, with dreg_recalibrate_steps, again every N steps;
each calibration checked against the gradient ratio recomputed by autograd on that step's weights and batch."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import classification_data, make_args, tiny_text_model, tokenizer
from transformers import TrainerCallback

import hf_dreg
from hf_dreg import DREGConfig, DREGTrainer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


class Snapshots(TrainerCallback):
    """The model's weights at the beginning of every optimizer step."""

    def __init__(self):
        self.weights = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = copy.deepcopy(model.state_dict())


def _ratio_norms(model, weights, batch):
    """(||grad task loss||, ||grad DREG||) over the trainable parameters, by autograd, on one batch."""
    model = copy.deepcopy(model)
    model.load_state_dict(weights)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    with hf_dreg.attach(model, kernels="eager") as handle:
        out = model(**batch)
        penalty = handle.penalty()
    norm = lambda value: torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(value, params, retain_graph=True, allow_unused=True) if g is not None))
    return float(norm(out.loss)), float(norm(penalty))


def test_recalibration_holds_the_ratio_at_every_calibrated_step(tmp_path, tok):
    data = classification_data(tok)
    model = tiny_text_model("bert", tok.vocab_size)
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=5, learning_rate=5e-2, dreg_lambda="auto",
                     dreg_target_ratio=0.2, dreg_recalibrate_steps=2)  # fmt: skip
    trainer = DREGTrainer(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok)
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    trainer.train()
    assert [step for step, _ in trainer.reg_lambdas] == [0, 2, 4]
    batches = [tok.pad([data[i] for i in range(start, start + 4)], return_tensors="pt") for start in (0, 4)]
    for step, strength in trainer.reg_lambdas:
        task, penalty = _ratio_norms(model, snapshots.weights[step], batches[step % 2])
        assert strength == pytest.approx(0.2 * task / penalty, rel=1e-4), step
    lambdas = [s for _, s in trainer.reg_lambdas]
    assert len(set(lambdas)) == 3  # each calibration found its own strength
    logged = [e["reg_lambda"] for e in trainer.state.log_history if "reg_lambda" in e]
    assert logged == pytest.approx(lambdas, rel=2e-5)
    assert trainer.dreg_config.strength == lambdas[-1] and trainer.dreg_config.dreg_lambda == "auto"


def test_without_recalibration_the_strength_is_calibrated_once(tmp_path, tok):
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=3, dreg_lambda="auto")
    trainer = DREGTrainer(model=tiny_text_model("bert", tok.vocab_size), args=args, train_dataset=classification_data(tok), processing_class=tok)
    trainer.train()
    assert [step for step, _ in trainer.reg_lambdas] == [0]


def test_auto_strength_for_a_comparator(tmp_path, tok):
    data = classification_data(tok)
    model = tiny_text_model("bert", tok.vocab_size)
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=2, regularizer="spectral_norm", dreg_lambda="auto",
                     dreg_target_ratio=0.1)  # fmt: skip
    trainer = DREGTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.dreg_config.auto_strength and trainer.dreg_config.calibrates
    trainer.train()
    assert len(trainer.reg_lambdas) == 1 and trainer.reg_lambdas[0][1] > 0
    assert trainer.dreg_config.auto_strength and not trainer.dreg_config.calibrates
    saved = trainer.dreg_config.dreg_config_dict()
    assert saved["dreg_lambda"] == "auto" and saved["calibrated_lambda"] == trainer.reg_lambdas[0][1]
    trainer.save_model(str(tmp_path / "saved"))
    restored = DREGConfig.from_pretrained(str(tmp_path / "saved"))
    assert restored.auto_strength and restored.strength == trainer.reg_lambdas[0][1]


@pytest.mark.parametrize("regularizer", ["weight_decay", "none"])
def test_auto_strength_needs_a_penalty(regularizer):
    with pytest.raises(ValueError, match="adds no penalty"):
        DREGConfig(regularizer=regularizer, dreg_lambda="auto")


def test_recalibrate_steps_must_not_be_negative():
    with pytest.raises(ValueError, match="dreg_recalibrate_steps"):
        DREGConfig(dreg_recalibrate_steps=-1)
