"""The strength of the penalty: the gradient-ratio diagnostic and --dreg_lambda auto."""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser

from hf_dreg import DREGTrainer, DREGTrainingArguments
from hf_dreg.diagnostics import gradient_norms
from tiny_models import tiny_model


def _data(n=16, seq=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::2, -2:] = 0
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": [i % 3 for i in range(n)]})


def _trainer(tmp_path, steps=2, **extra):
    flags = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dreg_fused=False,
        seed=0,
    )
    args = DREGTrainingArguments(**{**flags, **extra})
    return DREGTrainer(model=_model(), args=args, train_dataset=_data())


def _model():
    model = tiny_model("bert")
    for module in model.modules():  # no dropout: the test recomputes the ratio exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_dreg_lambda_flag_accepts_auto_and_numbers():
    parser = HfArgumentParser(DREGTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_lambda", "auto", "--use_cpu"])
    assert args.dreg_lambda == "auto" and args.reg_lambda == "auto"
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_lambda", "0.03", "--use_cpu"])
    assert args.dreg_lambda == 0.03 and args.reg_lambda == 0.03
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_lambda", "strong", "--use_cpu"])
    with pytest.raises(ValueError, match="dreg_target_ratio"):
        DREGTrainingArguments(output_dir="o", dreg_lambda="auto", dreg_target_ratio=0, use_cpu=True)


def test_auto_lambda_reaches_the_target_ratio_on_the_first_batch(tmp_path):
    trainer = _trainer(tmp_path, steps=1, dreg_lambda="auto", dreg_target_ratio=0.25)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    strength = trainer.args.reg_lambda
    assert isinstance(strength, float) and strength > 0
    assert trainer.state.log_history[0]["reg_lambda"] == pytest.approx(strength, rel=1e-6)
    # recompute the ratio at the initial weights, independently
    model = _model().train()
    from hf_dreg import attach

    handle = attach(model)
    task = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    task_norm, term_norm = gradient_norms(task, handle.penalty(), params)
    ratio = strength * term_norm / task_norm
    assert ratio == pytest.approx(0.25, rel=1e-4)


def test_auto_lambda_is_deterministic_for_a_seed(tmp_path):
    first = _trainer(tmp_path / "a", steps=1, dreg_lambda="auto")
    first.train()
    second = _trainer(tmp_path / "b", steps=1, dreg_lambda="auto")
    second.train()
    assert first.args.reg_lambda == second.args.reg_lambda


def test_ratio_diagnostic_is_logged_at_its_interval_and_warns_when_negligible(tmp_path, caplog):
    trainer = _trainer(tmp_path, steps=6, dreg_lambda=1e-9, reg_ratio_interval=2)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    ratios = {entry["step"]: entry["reg_grad_ratio"] for entry in trainer.state.log_history if "reg_grad_ratio" in entry}
    assert sorted(ratios) == [1, 3, 5]  # measured at global steps 0, 2, 4, logged after those steps
    assert all(0 < r < 1e-2 for r in ratios.values())
    assert "no measurable effect" in caplog.text


def test_every_ratio_measurement_is_kept_even_when_no_training_log_follows_it(tmp_path):
    """A sweep run with logging_steps > max_steps logs no training step, but must still record its ratios."""
    trainer = _trainer(tmp_path, steps=5, dreg_lambda="auto", reg_ratio_interval=2, logging_steps=500)
    trainer.train()
    assert not [e for e in trainer.state.log_history if "reg_grad_ratio" in e]
    steps = [step for step, _ in trainer.reg_grad_ratios]
    assert steps == [0, 2, 4]  # the calibration at step 0, then measurements at steps 2 and 4
    assert trainer.reg_grad_ratios[0][1] == pytest.approx(0.1)
    assert all(ratio > 0 for _, ratio in trainer.reg_grad_ratios)


def test_resume_keeps_the_calibrated_lambda(tmp_path):
    first = _trainer(tmp_path, steps=2, dreg_lambda="auto", save_strategy="steps", save_steps=1)
    first.train()
    resumed = _trainer(tmp_path, steps=2, dreg_lambda="auto", save_strategy="steps", save_steps=1)
    resumed._check_resumed_settings(str(tmp_path / "checkpoint-1"))
    assert resumed.args.reg_lambda == first.args.reg_lambda
