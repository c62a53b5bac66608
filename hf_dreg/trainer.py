"""DREGTrainer: the transformers Trainer with ``lambda * DREG`` added to the task loss.

The penalty is normalised over the whole optimizer step: the valid positions of every micro-batch
of a gradient-accumulation step, on every process, are counted before the step (like the Trainer's
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
from .attach import _MASK_KEYS, attach, check_finite

logger = logging.get_logger(__name__)

DREG_CONFIG_NAME = "dreg_config.json"


class _SaveDREGConfig(TrainerCallback):
    """Writes the DREG settings beside every checkpoint, so a resumed run can check it matches."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, DREG_CONFIG_NAME), "w") as f:
                    json.dump(args.dreg_config_dict(), f, indent=2)


class DREGTrainer(Trainer):
    """A Trainer that adds ``args.dreg_lambda * DREG`` to the loss and logs ``dreg`` and ``task_loss``."""

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
        self._dreg_counts: dict[str, torch.Tensor] = {}
        self.dreg = None
        if args.dreg_lambda > 0:
            self.dreg = attach(
                self.model,
                activations=args.dreg_activation_list,
                exclude_modules=args.dreg_exclude_modules,
                fused=args.dreg_fused,
            )
            logger.info(f"DREG attached (lambda={args.dreg_lambda:.4g}): {self.dreg}")
        self.add_callback(_SaveDREGConfig())

    # ---- the loss -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.dreg is not None:
            sums = self.dreg.site_sums()
            local = torch.stack([s / n.clamp_min(1) for _, s, n in sums])
            mode = "train" if model.training else "eval"
            self._metrics[mode]["dreg"].append(local.mean().detach())
            if self.args.dreg_log_per_site:
                for (site, _, _), value in zip(sums, local):
                    self._metrics[mode][f"dreg/{site.name}"].append(value.detach())
            if model.training and torch.is_grad_enabled():
                penalty = self._step_normalised(sums)
                check_finite(penalty, {site.name: v for (site, _, _), v in zip(sums, local)})
                self._metrics["train"]["task_loss"].append(loss.detach())
                loss = loss + self.args.dreg_lambda * penalty
        return (loss, outputs) if return_outputs else loss

    def _step_normalised(self, sums) -> torch.Tensor:
        """This micro-batch's share of the step's DREG, in the convention the Trainer scales the loss by.

        Sites whose mask was counted for the whole step are divided by the step's count of valid
        positions, times the accumulation steps and processes that the Trainer and DDP divide by
        again; others (no mask: every position valid) use their local mean, as the task loss does.
        """
        steps = self.current_gradient_accumulation_steps
        processes = self.accelerator.num_processes
        terms = []
        for site, total, count in sums:
            step_count = self._dreg_counts.get(site.mask_key) if site.mask_key else None
            if step_count is None:
                terms.append(total / count.clamp_min(1))
            else:
                terms.append(total * (steps * processes) / step_count.clamp_min(1))
        penalty = torch.stack(terms).mean()
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else self.compute_loss_func is not None
        return penalty / steps if scaled else penalty

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._dreg_counts = self._count_positions(batch_samples, device) if self.dreg is not None else {}
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
                value = torch.stack(values).float().mean()
                if self.accelerator.num_processes > 1:
                    value = self.accelerator.reduce(value.to(self.args.device), reduction="mean")
                logs[prefix + key] = round(value.item(), 8)
            self._metrics[mode].clear()
        super().log(logs, start_time)

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
                f"Resuming from {checkpoint} with DREG settings {current}, but it was trained with {saved}. "
                "Pass the same --dreg_* flags to continue the same run."
            )
