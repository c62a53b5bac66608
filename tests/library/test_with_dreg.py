"""``with_dreg`` and ``DREGConfig``: DREG in TRL's SFTTrainer (GPT-2, Gemma-2; LoRA; text, prompt/completion,
padding-free), against the base trainer at lambda 0 and against one full batch under accumulation.

TRL's own task loss is not exact across accumulation (its token count per micro-batch), so the
accumulation tests compare the DREG share of the update: the update at lambda minus the update at
lambda 0, from the same weights and batches. The models are float64: in float32 that difference of
two updates loses ~1e-3 to rounding (measured), which would hide an error of that size.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trainer_helpers import COMMON_ARGS, difference, logs_with, no_dropout, relative_difference, sgd, texts, tokenizer
from transformers import HfArgumentParser, Seq2SeqTrainer, Trainer

import hf_dreg
from hf_dreg import DREGConfig, DREGTrainer, with_dreg

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
from trl import SFTConfig, SFTTrainer  # noqa: E402

LAMBDA = 100.0
EXACT = 1e-9  # float64
# Gemma-2's RMSNorm computes in float32 whatever the model's dtype (x.float()), so a float64 Gemma-2 is
# float32-accurate in its forward: measured 8e-8 between two batchings of the same data
EXACT_FOR = {"gpt2": EXACT, "gemma2": 1e-6}
WORD_COUNTS = [38, 21, 30, 17, 1, 6, 3, 9]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    base = tokenizer()
    return AutoTokenizer.from_pretrained(base.name_or_path, eos_token="[SEP]", bos_token="[CLS]")


def tiny_lm(kind: str, vocab_size: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_inner=24, n_positions=128,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=102, bos_token_id=101)  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
    elif kind == "gemma2":
        config = tf.Gemma2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8, hidden_activation="gelu_pytorch_tanh",
                                 attention_dropout=0.0, pad_token_id=0, eos_token_id=102, bos_token_id=101, max_position_embeddings=128)  # fmt: skip
        model = tf.Gemma2ForCausalLM(config)
    else:
        raise KeyError(kind)
    model.config._attn_implementation = "eager"
    return no_dropout(model)


def text_data() -> Dataset:
    return Dataset.from_dict({"text": texts(WORD_COUNTS)})


def prompt_completion_data() -> Dataset:
    prompts = texts(WORD_COUNTS, seed=1)
    completions = texts([max(1, (n * 5) % 11) for n in WORD_COUNTS], seed=2)
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def sft_args(tmp_path, name, batch, accumulation, **overrides):
    kwargs = dict(COMMON_ARGS, output_dir=str(tmp_path / name), per_device_train_batch_size=batch,
                  gradient_accumulation_steps=accumulation, gradient_checkpointing=False, max_length=64, **sgd(learning_rate=1.0))  # fmt: skip
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def sft_update(trainer_cls, model, args, data, tok, dreg_lambda=None, peft_config=None):
    """One SGD step of ``trainer_cls``; the change of every trainable parameter of the trained model."""
    extra = {} if dreg_lambda is None else {"dreg_config": DREGConfig(dreg_lambda=dreg_lambda, dreg_kernels="eager")}
    trainer = trainer_cls(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok, peft_config=peft_config, **extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    return {n: after[n].detach() - b for n, b in before.items()}, trainer


def lora():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


CASES = [
    ("gpt2", "text", False, {}),
    ("gpt2", "prompt-completion", True, {}),
    ("gemma2", "text", True, {}),
    ("gemma2", "prompt-completion", False, {}),
    ("gpt2", "text", False, {"padding_free": True, "max_length": None}),
]


@pytest.mark.parametrize("kind, data_format, use_lora, extra", CASES, ids=[f"{c[0]}-{c[1]}{'-lora' if c[2] else ''}{'-padding_free' if c[3] else ''}" for c in CASES])
def test_sft_dreg_share_under_accumulation_equals_the_full_batch(tmp_path, tok, kind, data_format, use_lora, extra):
    model = tiny_lm(kind, tok.vocab_size).double()
    data = text_data() if data_format == "text" else prompt_completion_data()
    peft_config = lora() if use_lora else None
    DREGSFT = with_dreg(SFTTrainer)

    def update(name, batch, accumulation, dreg_lambda):
        args = sft_args(tmp_path, name, batch, accumulation, **extra)
        return sft_update(DREGSFT, model, args, data, tok, dreg_lambda, peft_config)

    zero_full, trainer = update("zero-8x1", 8, 1, 0.0)
    if data_format == "prompt-completion":
        assert trainer.completion_only_loss  # TRL's default for prompt/completion data
    share_full = difference(update("dreg-8x1", 8, 1, LAMBDA)[0], zero_full)
    zero_accumulated, _ = update("zero-4x2", 4, 2, 0.0)
    accumulated, trainer = update("dreg-4x2", 4, 2, LAMBDA)
    share_accumulated = difference(accumulated, zero_accumulated)
    assert relative_difference(share_full, zero_full) > 0.05  # DREG moves the update: the test has power
    assert relative_difference(share_accumulated, share_full) < EXACT_FOR[kind]
    if use_lora:
        assert all("lora_" in n for n in accumulated)  # only adapters train; DREG's gradient reaches them
        assert any(float(share_full[n].norm()) > 0 for n in share_full)


@pytest.mark.parametrize("kind", ["gpt2", "gemma2"])
def test_sft_at_lambda_zero_is_sfttrainer(tmp_path, tok, kind):
    """With and without accumulation, the wrapped trainer at lambda 0 updates exactly as SFTTrainer does."""
    model = tiny_lm(kind, tok.vocab_size).double()
    data = prompt_completion_data()
    for batch, accumulation in ((8, 1), (4, 2)):
        base, _ = sft_update(SFTTrainer, model, sft_args(tmp_path, f"base{accumulation}", batch, accumulation), data, tok)
        wrapped, _ = sft_update(with_dreg(SFTTrainer), model, sft_args(tmp_path, f"zero{accumulation}", batch, accumulation), data, tok, 0.0)
        assert relative_difference(wrapped, base) < EXACT_FOR[kind]


def test_sft_logs_dreg_beside_trls_metrics(tmp_path, tok):
    model = tiny_lm("gemma2", tok.vocab_size)
    data = text_data()
    args = sft_args(tmp_path, "logs", 4, 1, max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer = with_dreg(SFTTrainer)(
        model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tok, dreg_config=DREGConfig(dreg_lambda=1.0)
    )
    trainer.train()
    train_logs = logs_with(trainer, "loss")
    assert len(train_logs) == 2
    for entry in train_logs:
        for key in ("dreg", "task_loss", "mean_token_accuracy", "num_tokens", "entropy"):
            assert key in entry, (key, entry)
        assert entry["loss"] == pytest.approx(entry["task_loss"] + 1.0 * entry["dreg"], rel=1e-4)
    evaluation = logs_with(trainer, "eval_loss")[-1]
    for key in ("eval_dreg", "eval_mean_token_accuracy", "eval_entropy"):
        assert key in evaluation, (key, evaluation)
    assert [m for m in trainer.model.modules() if m._forward_hooks or m._forward_pre_hooks] == []
    # the settings beside the saved model, readable back as a DREGConfig
    trainer.save_model(str(tmp_path / "saved"))
    assert DREGConfig.from_pretrained(str(tmp_path / "saved")).dreg_config_dict() == trainer.dreg_config.dreg_config_dict()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_logged_task_loss_is_the_steps_task_loss(tmp_path, tok, accumulation):
    """At a negligible lambda the logged task_loss equals the logged loss, whatever the accumulation
    (TRL's loss is normalised over the whole step, so each micro-batch's loss is only part of it)."""
    args = sft_args(tmp_path, f"ga{accumulation}", 4 // accumulation, accumulation, max_steps=2)
    trainer = with_dreg(SFTTrainer)(model=tiny_lm("gpt2", tok.vocab_size), args=args, train_dataset=text_data(),
                                    processing_class=tok, dreg_config=DREGConfig(dreg_lambda=1e-12))  # fmt: skip
    trainer.train()
    for entry in logs_with(trainer, "loss"):
        assert entry["task_loss"] == pytest.approx(entry["loss"], rel=2e-5)


def test_dreg_config_parses_beside_sft_config(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class ScriptArguments:
        dataset_name: str = field(default="x")

    parser = HfArgumentParser((ScriptArguments, SFTConfig, DREGConfig))
    script, sft, dreg = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--dreg_lambda", "auto", "--dreg_target_ratio", "0.05", "--dreg_activations", "silu",
         "--learning_rate", "1e-4"]
    )  # fmt: skip
    assert isinstance(dreg, DREGConfig) and dreg.dreg_lambda == "auto" and dreg.strength is None
    assert dreg.dreg_target_ratio == 0.05 and dreg.dreg_activations == "silu" and sft.learning_rate == 1e-4
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\ndataset_name: y\nregularizer: spectral_norm\ndreg_lambda: 0.02\n")
    _, _, dreg = parser.parse_yaml_file(str(yaml_file))
    assert dreg.regularizer == "spectral_norm" and dreg.dreg_lambda == 0.02
    with pytest.raises(ValueError, match="dreg_lambda must be"):
        DREGConfig(dreg_lambda=-1.0)
    with pytest.raises(ValueError, match="Unknown regularizer"):
        DREGConfig(regularizer="dropout")


def test_weight_decay_regularizer_sets_the_base_trainers_decay(tmp_path, tok):
    model = tiny_lm("gpt2", tok.vocab_size)
    args = sft_args(tmp_path, "wd", 4, 1, weight_decay=0.0)
    trainer = with_dreg(SFTTrainer)(model=model, args=args, train_dataset=text_data(), processing_class=tok,
                                    dreg_config=DREGConfig(regularizer="weight_decay", dreg_lambda=0.05))  # fmt: skip
    assert trainer.args.weight_decay == 0.05
    with pytest.raises(ValueError, match="disagree"):
        with_dreg(SFTTrainer)(model=model, args=sft_args(tmp_path, "wd2", 4, 1, weight_decay=0.1), train_dataset=text_data(),
                              processing_class=tok, dreg_config=DREGConfig(regularizer="weight_decay", dreg_lambda=0.05))  # fmt: skip


def test_with_dreg_classes():
    assert with_dreg(Trainer) is DREGTrainer
    assert with_dreg(SFTTrainer) is with_dreg(SFTTrainer) and issubclass(with_dreg(SFTTrainer), SFTTrainer)
    assert with_dreg(with_dreg(Seq2SeqTrainer)) is with_dreg(Seq2SeqTrainer)
    assert with_dreg(SFTTrainer).__name__ == "DREGSFTTrainer"
    with pytest.raises(TypeError, match="Trainer class"):
        with_dreg(torch.nn.Module)


def test_settings_given_twice_are_refused(tmp_path, tok):
    args = hf_dreg.DREGTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="not both"):
        DREGTrainer(model=tiny_lm("gpt2", tok.vocab_size), args=args, dreg_config=DREGConfig())
