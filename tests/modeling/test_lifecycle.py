"""The trainer's lifecycle: hooks only inside train/evaluate/predict, model_init, hyperparameter_search, refusals."""

from __future__ import annotations

import logging

import pytest
import torch
from trainer_helpers import classification_data, hooked_modules, logs_with, make_args, tiny_text_model, tokenizer
from transformers import TrainerCallback, TrainingArguments

import hf_dreg
from hf_dreg import DREGTrainer, DREGTrainingArguments
from hf_dreg.modeling.hooks import PositionMismatchError


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _trainer(tmp_path, tok, model=None, **overrides):
    data = classification_data(tok)
    kwargs = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2, learning_rate=1e-2, dreg_lambda=1.0)
    kwargs.update(overrides)
    model = model if model is not None else tiny_text_model("bert", tok.vocab_size)
    return DREGTrainer(model=model, args=make_args(tmp_path, **kwargs), train_dataset=data, eval_dataset=data, processing_class=tok)


def test_no_hooks_outside_train_evaluate_predict(tmp_path, tok):
    trainer = _trainer(tmp_path, tok)
    model = trainer.model
    assert hooked_modules(model) == []  # construction finds the sites but attaches nothing
    seen = []
    site = trainer.dreg_sites[0].name
    act = dict(model.named_modules())[site]
    trainer.train()
    assert hooked_modules(model) == []
    metrics = trainer.evaluate()
    assert "eval_dreg" in metrics and metrics["eval_dreg"] > 0  # evaluate() after train() still reports it
    assert hooked_modules(model) == []
    prediction = trainer.predict(trainer.eval_dataset)
    assert prediction.metrics["test_loss"] > 0
    assert hooked_modules(model) == []
    # and the model computes nothing extra: the activation's output is all its hooks would have seen
    act.register_forward_hook(lambda m, a, o: seen.append(o))
    batch = tok(["a good movie", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    assert len(seen) == 1 and hooked_modules(model) == [site]


def test_eval_dreg_equals_the_penalty_of_the_evaluated_data(tmp_path, tok):
    trainer = _trainer(tmp_path, tok, per_device_eval_batch_size=8)
    trainer.train()
    metrics = trainer.evaluate()
    batch = tok.pad([trainer.eval_dataset[i] for i in range(8)], return_tensors="pt")
    batch.pop("labels")
    model = trainer.model.eval()
    with torch.no_grad(), hf_dreg.attach(model, kernels="eager") as handle:
        model(**batch)
        expected = float(handle.penalty())
    assert metrics["eval_dreg"] == pytest.approx(expected, rel=2e-5)


def test_model_init_rebuilds_the_sites_of_the_new_model(tmp_path, tok):
    built = []

    def model_init():
        built.append(tiny_text_model("bert", tok.vocab_size, seed=len(built)))
        return built[-1]

    data = classification_data(tok)
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=2, dreg_lambda=1.0)
    trainer = DREGTrainer(model_init=model_init, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert len(built) == 2 and trainer.model is built[-1]  # train() built a second model
    assert [e["dreg"] > 0 for e in logs_with(trainer, "dreg")] == [True, True]
    assert all(hooked_modules(m) == [] for m in built)


def test_hyperparameter_search_over_dreg_lambda_with_optuna(tmp_path, tok):
    optuna = pytest.importorskip("optuna")
    data = classification_data(tok)
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=2, eval_strategy="no", dreg_lambda=1.0)
    used = []

    class RecordStrength(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            used.append(trainer.dreg_config.strength)

    trainer = DREGTrainer(
        model_init=lambda: tiny_text_model("bert", tok.vocab_size), args=args, train_dataset=data, eval_dataset=data,
        processing_class=tok, callbacks=[RecordStrength()],
    )  # fmt: skip
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"dreg_lambda": trial.suggest_float("dreg_lambda", 1e-4, 10.0, log=True)},
        backend="optuna", n_trials=2, direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0),
    )  # fmt: skip
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    expected = [study.ask().suggest_float("dreg_lambda", 1e-4, 10.0, log=True) for _ in range(2)]
    assert used == pytest.approx(expected, rel=1e-12)  # each trial trained at its own strength
    assert any(best.hyperparameters["dreg_lambda"] == pytest.approx(value) for value in expected)


def test_attaching_twice_is_refused_with_how_to_detach(tok):
    model = tiny_text_model("bert", tok.vocab_size)
    handle = hf_dreg.attach(model, kernels="eager")
    with pytest.raises(RuntimeError, match=r"already has DREG attached.*detach\(\)"):
        hf_dreg.attach(model, kernels="eager")
    handle.detach()
    hf_dreg.attach(model, kernels="eager").detach()  # once detached, it can be attached again


def test_a_trainer_refuses_a_model_the_user_left_attached(tmp_path, tok):
    model = tiny_text_model("bert", tok.vocab_size)
    handle = hf_dreg.attach(model, kernels="eager")
    trainer = _trainer(tmp_path, tok, model=model)
    with pytest.raises(RuntimeError, match="already has DREG attached"):
        trainer.train()
    handle.detach()


def test_data_parallel_is_refused_by_name(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="DataParallel.*torchrun"):
        _trainer(tmp_path, tok)


def test_virtual_tokens_are_a_clear_error_not_a_silent_count(tok):
    peft = pytest.importorskip("peft")
    model = tiny_text_model("gpt2", tok.vocab_size)
    prompt_tuned = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prompt_tuning.*virtual tokens.*LoRA"):
        hf_dreg.attach(prompt_tuned, kernels="eager")


def test_a_mask_that_does_not_describe_the_positions_is_an_error(tok):
    model = tiny_text_model("bert", tok.vocab_size)
    batch = tok(["a good movie", "bad"], padding=True, return_tensors="pt")
    with hf_dreg.attach(model, kernels="eager") as handle:
        model(**batch)
        wrong = torch.ones(2, batch["input_ids"].shape[1] + 3, dtype=torch.long)
        with pytest.raises(PositionMismatchError, match="prompt/prefix tuning's virtual tokens"):
            handle.penalty(attention_mask=wrong)


def test_reentrant_checkpointing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use_reentrant"):
        DREGTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
        )


def test_resume_with_other_settings_warns(tmp_path, tok, caplog):
    trainer = _trainer(tmp_path, tok, save_strategy="steps", save_steps=2)
    trainer.train()
    other = _trainer(tmp_path, tok, save_strategy="steps", save_steps=2, max_steps=3, dreg_lambda=0.5)
    with caplog.at_level(logging.WARNING, logger="hf_dreg"):
        other.train(resume_from_checkpoint=True)
    assert any("was trained with" in r.getMessage() and "'dreg_lambda': 1.0" in r.getMessage() for r in caplog.records)
