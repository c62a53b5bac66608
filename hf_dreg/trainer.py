"""DREGTrainer: the transformers Trainer with ``reg_lambda * penalty`` added to the task loss.

The penalty comes from the regularizer chosen by ``args.regularizer`` (DREG by default). DREG is
normalised over the whole optimizer step: the valid positions of every micro-batch of a
gradient-accumulation step, on every process, are counted before the step (like the Trainer's
``num_items_in_batch``), so 2 x 4 accumulation and 2 processes give the gradients of one batch of 8.
The model's own loss keeps the Trainer's convention (``model_accepts_loss_kwargs = False``: a
per-batch mean divided by the accumulation steps), which is also what makes a model that accepts
loss kwargs but ignores them (BERT) train on the right loss.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .args import DREGTrainingArguments
from .attach import _MASK_KEYS
from .model_card import dreg_card_section
from .regularizers import DREG, StepInfo, build_regularizer

logger = logging.get_logger(__name__)

DREG_CONFIG_NAME = "dreg_config.json"


class _SaveDREGConfig(TrainerCallback):
    """Writes the regularizer settings beside every checkpoint, so a resumed run can check they match."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, DREG_CONFIG_NAME), "w") as f:
                    json.dump(args.dreg_config_dict(), f, indent=2)


class DREGTrainer(Trainer):
    """A Trainer that adds ``args.reg_lambda * penalty`` to the loss and logs the penalty and ``task_loss``.

    The penalty is logged under the regularizer's name (``dreg``, ``spectral_norm``, ``igpen``,
    ``jacobian``; ``weight_decay`` logs the squared norm of the decayed weights); evaluation logs
    ``eval_<name>`` while ``eval_loss`` stays the task loss.
    """

    def __init__(self, model=None, args: DREGTrainingArguments | None = None, *positional, **kwargs):
        if args is None:
            args = DREGTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, DREGTrainingArguments):
            raise TypeError(
                f"DREGTrainer needs DREGTrainingArguments, got {type(args).__name__}: "
                "build them with DREGTrainingArguments(...) or HfArgumentParser(DREGTrainingArguments)."
            )
        super().__init__(model, args, *positional, **kwargs)
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._positions: dict[str, torch.Tensor] = {}
        self.regularizer = build_regularizer(self.model, args)
        self.add_callback(_SaveDREGConfig())

    @property
    def dreg(self):
        """The attached DREG handle (sites, per_site values), or None when DREG is not the regularizer."""
        return self.regularizer.handle if isinstance(self.regularizer, DREG) else None

    # ---- the loss -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        def task_loss(model, inputs):
            return super(DREGTrainer, self).compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )

        steps = self.current_gradient_accumulation_steps if model.training else 1
        step = StepInfo(steps, self.accelerator.num_processes, self._positions, self.state.global_step)
        loss, outputs, penalty = self.regularizer.compute(model, inputs, task_loss, step)
        mode = "train" if model.training else "eval"
        if penalty.value is not None:
            self._metrics[mode][self.regularizer.name].append(penalty.value)
        for key, value in penalty.extra.items():
            self._metrics[mode][key].append(value)
        if penalty.term is not None:
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = self.compute_loss_func is not None
            term = penalty.term / steps if scaled else penalty.term
            self._metrics["train"]["task_loss"].append(loss.detach())
            loss = loss + self.args.reg_lambda * term
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._positions = self._count_positions(batch_samples, device) if self.dreg is not None else {}
        return batch_samples, num_items_in_batch

    def _count_positions(self, batch_samples, device) -> dict[str, torch.Tensor]:
        """Valid positions of the whole step (all micro-batches, all processes), per mask."""
        counts = {}
        for key in _MASK_KEYS:
            masks = [b.get(key) for b in batch_samples if isinstance(b, dict)]
            if not masks or any(m is None for m in masks):
                continue
            total = sum(m.sum() for m in masks).to(device=device, dtype=torch.float32)
            if self.accelerator.num_processes > 1:
                total = self.accelerator.gather(total.reshape(1)).sum()
            counts[key] = total
        return counts

    # ---- logging ---------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            mode, prefix = "train", ""
        else:
            prefix = next((k[: -len("_loss")] + "_" for k in logs if k.endswith("_loss")), None)
            mode = "eval" if prefix is not None else None
        if mode is not None and self._metrics[mode]:
            for key, values in self._metrics[mode].items():
                value = torch.stack([v.float() for v in values]).mean()
                if self.accelerator.num_processes > 1:
                    value = self.accelerator.reduce(value.to(self.args.device), reduction="mean")
                logs[prefix + key] = round(value.item(), 8)
            self._metrics[mode].clear()
        super().log(logs, start_time)

    # ---- model card ------------------------------------------------------------------------------

    def create_model_card(self, *args, tags=None, **kwargs):
        """The Trainer's model card plus the regularizer, its strength, the DREG sites, the data regime and results."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(*args, tags=tags + ["hf_dreg", self.args.regularizer], **kwargs)
        if self.is_world_process_zero():
            with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as f:
                f.write(dreg_card_section(self))

    # ---- resuming --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            self._check_resumed_settings(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_resumed_settings(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, DREG_CONFIG_NAME)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            saved = json.load(f)
        current = self.args.dreg_config_dict()
        if saved != current:
            logger.warning(
                f"Resuming from {checkpoint} with regularizer settings {current}, but it was trained with {saved}. "
                "Pass the same --regularizer/--reg_lambda/--dreg_* flags to continue the same run."
            )
