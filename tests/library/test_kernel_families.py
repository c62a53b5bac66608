"""Choosing a DREG kernel family: the flag, its deprecated alias, what 'auto' means, and a trainer step under each."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import pytest
import torch
from tiny_models import tiny_model
from trainer_helpers import classification_data, make_args, relative_difference, sgd, tokenizer, update_of
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

import hf_dreg
from hf_dreg import DREGConfig, DREGTrainer, DREGTrainingArguments
from hf_dreg.ops.kernels import resolve_kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_dreg_fused_is_a_deprecated_alias_of_dreg_kernels(tmp_path):
    for fused, kernels in ((True, "compiled"), (False, "eager")):
        with pytest.warns(FutureWarning, match=f"dreg_kernels='{kernels}'"):
            config = DREGConfig(dreg_fused=fused)
        assert config.dreg_kernels == kernels and config.dreg_fused is None
    config.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved config carries dreg_kernels only: reading it back warns of nothing
        assert DREGConfig.from_pretrained(str(tmp_path)).dreg_kernels == "eager"


def test_contradicting_or_unknown_kernel_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="contradicts dreg_kernels='triton'"):
        DREGConfig(dreg_fused=True, dreg_kernels="triton")
    with pytest.raises(ValueError, match="auto, triton, compiled, eager"):
        DREGConfig(dreg_kernels="fast")
    parser = HfArgumentParser(DREGTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_kernels", "eager"])
    assert args.dreg_kernels == "eager"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--dreg_kernels", "fast"])


def test_auto_is_triton_on_cuda_and_compiled_elsewhere():
    assert resolve_kernels("auto", "cpu") == "compiled"
    assert resolve_kernels("auto", None) == "compiled"
    assert resolve_kernels("auto", "cuda:0") == ("triton" if HAS_TRITON else "compiled")
    assert resolve_kernels("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="--dreg_kernels"):
        resolve_kernels("fused", "cpu")


def test_attach_fused_is_deprecated_and_kernels_name_the_family():
    model = tiny_model("bert")
    with pytest.warns(FutureWarning, match="kernels='compiled'"):
        handle = hf_dreg.attach(model, fused=False)
    assert handle.kernels == "eager"
    handle.detach()
    with hf_dreg.attach(model) as handle:
        assert handle.kernels == "compiled"  # auto on a CPU


@pytest.mark.skipif(not HAS_TRITON or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
                    reason="the triton family needs triton, and a GPU or TRITON_INTERPRET=1")  # fmt: skip
def test_a_trainer_step_is_the_same_under_the_triton_and_eager_families(tmp_path):
    """The Trainer's update (SGD: -lr * gradient) of 8 tokenized texts of unequal length, padded by the Trainer's own
    collator (DataCollatorWithPadding from processing_class), DREG strength 1, under each family."""
    tok = tokenizer()
    data = classification_data(tok)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)

    def trainer(kernels, strength):
        args = make_args(tmp_path / f"{kernels}-{strength}", **sgd(per_device_train_batch_size=8), dreg_kernels=kernels, dreg_lambda=strength)
        return lambda m: DREGTrainer(model=m, args=args, train_dataset=data, processing_class=tok)

    eager = update_of(trainer("eager", 1.0), copy.deepcopy(model))
    triton = update_of(trainer("triton", 1.0), copy.deepcopy(model))
    task_only = update_of(trainer("eager", 0.0), copy.deepcopy(model))
    share = {n: eager[n] - task_only[n] for n in eager}  # DREG's part of the update, under each family
    triton_share = {n: triton[n] - task_only[n] for n in triton}
    assert max(float(v.abs().max()) for v in share.values()) > 1e-4
    assert relative_difference(triton_share, share) < 1e-4
