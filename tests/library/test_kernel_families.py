"""Choosing a DREG kernel family: the flag, its deprecated alias, what 'auto' means, and a trainer step under each."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_model
from trainer_helpers import make_args, relative_difference, sgd, update_of
from transformers import HfArgumentParser

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


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        length = 3 + i % 4  # unequal lengths: padding inside the batch
        rows.append({"input_ids": torch.randint(3, 99, (length,), generator=g).tolist(), "labels": i % 3})
    return Dataset.from_list(rows)


def _collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows])}


@pytest.mark.skipif(not HAS_TRITON or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
                    reason="the triton family needs triton, and a GPU or TRITON_INTERPRET=1")  # fmt: skip
def test_a_trainer_step_is_the_same_under_the_triton_and_eager_families(tmp_path):
    """The Trainer's update (SGD: -lr * gradient) of a padded batch, DREG strength 1, under each family."""
    model = tiny_model("gpt2").eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = _data()

    def trainer(kernels, strength):
        args = make_args(tmp_path / kernels, **sgd(per_device_train_batch_size=8), dreg_kernels=kernels, dreg_lambda=strength)
        return lambda m: DREGTrainer(model=m, args=args, train_dataset=data, data_collator=_collate)

    eager = update_of(trainer("eager", 1.0), copy.deepcopy(model))
    triton = update_of(trainer("triton", 1.0), copy.deepcopy(model))
    task_only = update_of(trainer("eager", 0.0), copy.deepcopy(model))
    share = {n: eager[n] - task_only[n] for n in eager}  # DREG's part of the update, under each family
    triton_share = {n: triton[n] - task_only[n] for n in triton}
    assert max(float(v.abs().max()) for v in share.values()) > 1e-4
    assert relative_difference(triton_share, share) < 1e-4
