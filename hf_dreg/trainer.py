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

from .args import AUTO, DREGTrainingArguments
from .attach import _MASK_KEYS
from .diagnostics import gradient_norms
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
        self.reg_grad_ratios: list[tuple[int, float]] = []  # (optimizer step, ratio) of every measurement
        self._warned: set[str] = set()
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
            if self.args.reg_lambda == AUTO:
                self._calibrate(model, loss, term)
            elif self._should_measure_ratio():
                self._measure_ratio(model, loss, term)
            self._metrics["train"]["task_loss"].append(loss.detach())
            loss = loss + self.args.reg_lambda * term
        return (loss, outputs) if return_outputs else loss

    # ---- the strength: gradient-ratio diagnostic and calibration ----------------------------------

    def _trainable(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    def _gradient_norms(self, model, loss, term):
        task_norm, term_norm = gradient_norms(loss, term, self._trainable(model))
        if self.accelerator.num_processes > 1:  # every process must agree (lambda) and log the same value
            task_norm = self.accelerator.reduce(task_norm, reduction="mean")
            term_norm = self.accelerator.reduce(term_norm, reduction="mean")
        return task_norm, term_norm

    def _calibrate(self, model, loss, term) -> None:
        """--dreg_lambda auto: lambda such that ||grad lambda*R|| = target * ||grad task loss|| on this batch."""
        task_norm, term_norm = self._gradient_norms(model, loss, term)
        if not float(term_norm) > 0:
            raise ValueError("--dreg_lambda auto: the penalty has no gradient on the first batch; set dreg_lambda explicitly.")
        strength = self.args.dreg_target_ratio * float(task_norm) / float(term_norm)
        self.args.reg_lambda = strength
        self._metrics["train"]["reg_lambda"].append(torch.tensor(strength))
        self._metrics["train"]["reg_grad_ratio"].append(torch.tensor(self.args.dreg_target_ratio))
        self.reg_grad_ratios.append((self.state.global_step, float(self.args.dreg_target_ratio)))
        logger.warning(
            f"--dreg_lambda auto: lambda = {strength:.4g} gives a gradient ratio of {self.args.dreg_target_ratio} "
            f"(||grad task|| = {float(task_norm):.4g}, ||grad R|| = {float(term_norm):.4g} on the first batch)."
        )

    def _should_measure_ratio(self) -> bool:
        interval = self.args.reg_ratio_interval
        if not interval or not self.model.training:
            return False
        first_micro_batch = self._last_measured_step != self.state.global_step
        return first_micro_batch and self.state.global_step % interval == 0

    _last_measured_step = None

    def _measure_ratio(self, model, loss, term) -> None:
        self._last_measured_step = self.state.global_step
        task_norm, term_norm = self._gradient_norms(model, loss, term)
        ratio = float(self.args.reg_lambda) * float(term_norm) / max(float(task_norm), 1e-30)
        self._metrics["train"]["reg_grad_ratio"].append(torch.tensor(ratio))
        self.reg_grad_ratios.append((self.state.global_step, ratio))
        recent = [r for _, r in self.reg_grad_ratios[-3:]]
        if len(recent) == 3 and max(recent) < 1e-2 and "low" not in self._warned:
            self._warned.add("low")
            logger.warning(
                f"{self.regularizer.name} has no measurable effect at reg_lambda={self.args.reg_lambda:.4g}: its "
                f"gradient is {ratio:.2e} of the task loss's. Raise the strength (or use --dreg_lambda auto)."
            )
        if len(recent) == 3 and min(recent) > 1 and "high" not in self._warned:
            self._warned.add("high")
            logger.warning(
                f"{self.regularizer.name} dominates training at reg_lambda={self.args.reg_lambda:.4g}: its gradient "
                f"is {ratio:.2f}x the task loss's. Lower the strength (or use --dreg_lambda auto)."
            )

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
                logs[prefix + key] = float(f"{value.item():.6g}")
            self._metrics[mode].clear()
        super().log(logs, start_time)

    def evaluation_loop(self, *args, **kwargs):
        # eval_<penalty> is this loop's alone: predict() runs the same loop but does not log, so drop what it left
        self._metrics["eval"].clear()
        return super().evaluation_loop(*args, **kwargs)

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
        if current.get("dreg_lambda") == AUTO and saved.get("dreg_lambda") == AUTO:
            self.args.reg_lambda = saved["reg_lambda"]  # keep the strength calibrated at the start of the run
            current = self.args.dreg_config_dict()
        if saved != current:
            logger.warning(
                f"Resuming from {checkpoint} with regularizer settings {current}, but it was trained with {saved}. "
                "Pass the same --regularizer/--reg_lambda/--dreg_* flags to continue the same run."
            )
