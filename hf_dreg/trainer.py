"""DREG in any transformers Trainer: ``with_dreg(cls)`` and ``DREGTrainer``.

``with_dreg(SFTTrainer)`` (or ``Seq2SeqTrainer``, ``Trainer``, any subclass) is a subclass of the
given trainer that takes ``dreg_config=DREGConfig(...)`` and adds ``dreg_lambda * penalty`` to the
loss its base class computes. ``DREGTrainer`` is ``with_dreg(Trainer)`` reading the settings from
``DREGTrainingArguments``.

Exactness (docs/correctness.md):

- DREG is normalised over the whole optimizer step: the valid positions of every micro-batch, on
  every process, are counted before the step from the batches the Trainer really built
  (:mod:`hf_dreg.modeling.positions`), so accumulation and several processes give the gradients of one batch.
- The task loss is the base class's. The only change: a model that accepts loss kwargs but ignores
  ``num_items_in_batch`` (BERT classifiers, T5 and BART in transformers 5) is found on the first
  batch by asking it (two no-grad forwards) and trained on per-batch means like a model without loss
  kwargs; with the plain Trainer it trains on ``accumulation steps`` (or ``processes``) times the loss.
- Hooks are on the model only during ``train``, ``evaluate``, ``predict`` (and a direct
  ``compute_loss``): the user's model computes nothing extra outside them.
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .config import CONFIG_NAME, DREGConfig
from .modeling.diagnostics import gradient_norms
from .modeling.hooks import check_finite
from .modeling.positions import count_positions, position_masks
from .regularizers import DREG, StepInfo, build_regularizer
from .training_args import DREGTrainingArguments, require_non_reentrant_checkpointing

logger = logging.get_logger(__name__)


def _resume_choice(value):
    """``--resume_from_checkpoint`` as the command line gives it: "True"/"last" mean the last checkpoint, "False" none."""
    if isinstance(value, str) and value.strip().lower() in ("true", "last", "latest"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "none", ""):
        return None
    return value

DREG_CONFIG_NAME = CONFIG_NAME
_WRAPPED: dict[type, type] = {}


def _float_metric(values: list) -> torch.Tensor:
    return torch.stack([v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for v in values]).mean()


class DREGTrainerMixin:
    """What ``with_dreg`` adds to a Trainer class. Use ``with_dreg(cls)``, not this class directly."""

    def __init__(self, *args, dreg_config: DREGConfig | None = None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if isinstance(training_args, DREGConfig):
            if dreg_config is not None and dreg_config is not training_args:
                raise ValueError(
                    f"{type(training_args).__name__} already holds the DREG settings: pass them there or as "
                    "dreg_config=, not both."
                )
            dreg_config = training_args
        elif dreg_config is None:
            dreg_config = DREGConfig()
        elif not isinstance(dreg_config, DREGConfig):
            raise TypeError(f"dreg_config must be a hf_dreg.DREGConfig, got {type(dreg_config).__name__}.")
        self.dreg_config = dreg_config
        self._base_weight_decay = None  # the optimizer's decay apart from regularizer='weight_decay'
        if training_args is not None:
            self._apply_dreg_to_args(training_args)
        self._dreg_depth = 0
        self._dreg_metrics = {"train": {}, "eval": {}}
        self._dreg_parts = {"train": {}, "eval": {}}  # (sums, counts) added up before dividing (see Penalty.parts)
        self._positions: dict[str, torch.Tensor] = {}
        self._loss_kwargs_decided = False
        self.reg_grad_ratios: list[tuple[int, float]] = []  # (optimizer step, ratio) of every measurement
        self.reg_lambdas: list[tuple[int, float]] = []  # (optimizer step, lambda) of every 'auto' calibration
        self._warned: set[str] = set()
        self.regularizer = None
        self._regularizer_model = None
        self._dreg_ready = False
        super().__init__(*args, **kwargs)
        self._apply_dreg_to_args(self.args)  # the base class may have built its own default arguments
        if self.args.n_gpu > 1:
            raise ValueError(
                f"DREG does not support nn.DataParallel (this process sees {self.args.n_gpu} GPUs): the replicas would "
                "share one record of the penalty. Launch one process per GPU with `torchrun` or `accelerate launch` "
                "(DistributedDataParallel), or set CUDA_VISIBLE_DEVICES to one GPU."
            )
        if self.model is not None:
            self._build_regularizer(self.model)
        self._dreg_ready = True

    # ---- settings ---------------------------------------------------------------------------------

    def _apply_dreg_to_args(self, args) -> None:
        if self._base_weight_decay is None:
            self._base_weight_decay = 0.0 if self.dreg_config.regularizer == "weight_decay" else args.weight_decay
        args.weight_decay = self.dreg_config.resolve_weight_decay(args.weight_decay)
        require_non_reentrant_checkpointing(args, self.dreg_config)

    @property
    def dreg(self):
        """The DREG handle while it is attached (inside train/evaluate/predict), else None."""
        regularizer = getattr(self, "regularizer", None)
        return regularizer.handle if isinstance(regularizer, DREG) else None

    @property
    def dreg_sites(self):
        """The DREG sites of the model (empty when DREG is not the regularizer)."""
        return list(self.regularizer.sites) if isinstance(self.regularizer, DREG) else []

    def _build_regularizer(self, model) -> None:
        if getattr(self, "regularizer", None) is not None:
            self.regularizer.deactivate()
        self.regularizer = build_regularizer(model, self.dreg_config, seed=self.args.seed)
        self._regularizer_model = model

    # ---- lifecycle: hooks only inside the trainer's loops ----------------------------------------

    @contextlib.contextmanager
    def _dreg_attached(self):
        self._dreg_depth += 1
        try:
            # with model_init and no model yet, train() builds one: call_model_init attaches to it
            if self._dreg_depth == 1 and self.model is not None:
                if self._regularizer_model is not self.model:
                    self._build_regularizer(self.model)
                self.regularizer.activate(self.model)
            yield
        finally:
            self._dreg_depth -= 1
            if self._dreg_depth == 0 and self.regularizer is not None:
                self.regularizer.deactivate()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = _resume_choice(resume_from_checkpoint)
        output_dir = self.args.output_dir
        last = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        if checkpoint is True:
            if last is None:
                raise ValueError(
                    f"--resume_from_checkpoint {resume_from_checkpoint}: {output_dir} has no checkpoint-* folder to resume "
                    "from. Pass a checkpoint folder, or leave the flag out to train from step 0."
                )
            checkpoint = last
        elif checkpoint in (None, False) and last is not None and self.is_world_process_zero():
            logger.warning(
                f"hf_dreg: {output_dir} holds checkpoints (the last: {os.path.basename(last)}); this run trains from step 0 "
                "and may overwrite them. To continue that run instead, pass --resume_from_checkpoint last "
                "(train(resume_from_checkpoint=True) in Python)."
            )
        if isinstance(checkpoint, str):
            self._check_resumed_settings(checkpoint)
        self._loss_kwargs_decided = False
        # use_liger_kernel: the base trainer patches the model inside train(), after DREG has attached, which would
        # leave DREG's hooks on activation modules that no longer run. Patched here instead, before the sites are found
        # (Liger's fused MLPs are sites of their own: hf_dreg.modeling.fused_mlps), and not again by the base trainer.
        liger = bool(getattr(self.args, "use_liger_kernel", False))
        if liger and self.model is not None and self.model_init is None:
            self._apply_liger(self.model)
            self._build_regularizer(self.model)
        self._liger_pending = liger
        self.args.use_liger_kernel = False
        try:
            with self._dreg_attached():
                return super().train(checkpoint if checkpoint is not False else None, *args, **kwargs)
        finally:
            self.args.use_liger_kernel = liger
            self._liger_pending = False

    def _apply_liger(self, model) -> None:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, self.args.liger_kernel_config)

    def evaluate(self, *args, **kwargs):
        with self._dreg_attached():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._dreg_attached():
            return super().predict(*args, **kwargs)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if getattr(self, "_liger_pending", False):  # use_liger_kernel with model_init: patched before its sites are found
            self._apply_liger(model)
        if getattr(self, "_dreg_ready", False):  # train() rebuilt the model: the sites of the new one
            attached = self._dreg_depth > 0
            self._build_regularizer(model)
            if attached:
                self.regularizer.activate(model)
        return model

    def _hp_search_setup(self, trial):
        """Hyperparameter search over DREGConfig fields (``dreg_lambda``, ``regularizer``...)."""
        super()._hp_search_setup(trial)
        if trial is None or self.hp_search_backend is None:
            return
        params = self.hp_space(trial) if self.hp_search_backend.value == "optuna" else dict(trial)
        fields = set(DREGConfig.field_names())
        chosen = {k: v for k, v in params.items() if k in fields}
        if not chosen:
            return
        values = {**self.dreg_config.dreg_dict(), **chosen}
        if "dreg_lambda" not in chosen and values["regularizer"] != self.dreg_config.regularizer:
            values["dreg_lambda"] = None  # the chosen regularizer's default, not the last one's strength
        for key, value in values.items():
            setattr(self.dreg_config, key, value)
        self.dreg_config.calibrated_lambda = None  # an 'auto' trial calibrates its own
        self.dreg_config.check_dreg_settings()
        self.args.weight_decay = self._base_weight_decay  # not the decay a previous weight_decay trial set
        self._apply_dreg_to_args(self.args)
        # train() calls model_init before this: rebuild the regularizer of this trial on the model it built
        if self.model is not None:
            self._build_regularizer(self.model)
            if self._dreg_depth > 0:
                self.regularizer.activate(self.model)

    # ---- the loss ---------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self._loss_kwargs_decided and batch_samples:
            self._loss_kwargs_decided = True
            # it matters only when a step has several micro-batches (accumulation, processes)
            split = self.args.gradient_accumulation_steps > 1 or self.accelerator.num_processes > 1
            if split and self.model_accepts_loss_kwargs and not self._model_honours_num_items(batch_samples[0]):
                self.model_accepts_loss_kwargs = False
                num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
        self._positions = self._count_positions(batch_samples, device) if isinstance(self.regularizer, DREG) else {}
        return batch_samples, num_items_in_batch

    def _model_honours_num_items(self, batch) -> bool:
        """Whether the task loss is normalised by ``num_items_in_batch`` (asked of the model on one batch).

        Only the base Trainer's ``compute_loss`` hands ``num_items_in_batch`` to the model: a trainer with
        its own loss (TRL's SFTTrainer) or a ``compute_loss_func`` normalises it itself and is trusted.
        """
        base_loss = getattr(super(DREGTrainerMixin, self).compute_loss, "__func__", None)
        if base_loss is not Trainer.compute_loss or self.compute_loss_func is not None or self.label_smoother is not None:
            return True
        if "labels" not in batch:
            return True
        inputs = self._prepare_inputs(batch)
        items = inputs["labels"].ne(-100).sum().clamp_min(1)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                one = model(**inputs, num_items_in_batch=items)["loss"]
                two = model(**inputs, num_items_in_batch=2 * items)["loss"]
        except (TypeError, KeyError, IndexError):
            return False
        finally:
            model.train(was_training)
        honours = bool(torch.isclose(one.float(), 2 * two.float(), rtol=1e-4, atol=0)) and not bool(torch.isclose(one, two))
        if not honours:
            logger.info(
                f"hf_dreg: {type(self.accelerator.unwrap_model(model)).__name__} accepts loss kwargs but ignores "
                "num_items_in_batch: its loss is a per-batch mean, divided by the accumulation steps as for a model "
                "without loss kwargs (the plain Trainer would train it on steps x the loss)."
            )
        return honours

    def _count_positions(self, batch_samples, device) -> dict[str, torch.Tensor]:
        """Valid positions of the whole step (all micro-batches, all processes), per kind of position."""
        counts = count_positions(batch_samples, device)
        if self.accelerator.num_processes > 1:
            counts = {key: self.accelerator.gather(total.reshape(1)).sum() for key, total in counts.items()}
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._dreg_loss_seen = True
        masks = position_masks(inputs)  # before the base class pops anything (labels) from the batch

        def task_loss(model, inputs):
            result = super(DREGTrainerMixin, self).compute_loss(
                model, inputs, return_outputs=return_outputs or self.regularizer.needs_outputs, num_items_in_batch=num_items_in_batch
            )
            return result if isinstance(result, tuple) else (result, None)

        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # as Trainer.training_step decides whether to divide by the accumulation steps
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        with self._dreg_attached():
            training = model.training
            steps = self.current_gradient_accumulation_steps if training else 1
            step = StepInfo(steps, self.accelerator.num_processes, self._positions, self.state.global_step, masks)
            if scaled and num_items_in_batch is not None:
                # the task loss is a sum over the step's items divided by their count (times the processes)
                step.example_scale = num_items_in_batch / (self.accelerator.num_processes if self.args.average_tokens_across_devices else 1)
            loss, outputs, penalty = self.regularizer.compute(model, inputs, task_loss, step)
        mode = "train" if training else "eval"
        if penalty.value is not None:
            self._record(mode, self.regularizer.name, penalty.value)
        for key, value in penalty.extra.items():
            self._record(mode, key, value)
        for key, parts in penalty.parts.items():
            self._dreg_parts[mode].setdefault(key, []).append(parts)
        if penalty.term is not None:
            term = penalty.term / steps if scaled else penalty.term
            if self._calibration_due(model):
                self._calibrate(model, loss, term)
            elif self._should_measure_ratio():
                self._measure_ratio(model, loss, term)
            # logged per step: a loss normalised over the whole step is one micro-batch's part of it
            self._record("train", "task_loss", loss.detach() * steps if scaled else loss.detach())
            loss = loss + self.dreg_config.strength * term
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, *args, **kwargs):
        self._dreg_loss_seen = False
        result = super().prediction_step(model, inputs, *args, **kwargs)
        regularizer = self.regularizer
        if not self._dreg_loss_seen and isinstance(regularizer, DREG) and regularizer.handle is not None and "labels" in inputs:
            # the base class computed the loss with its own forward, not compute_loss (Seq2SeqTrainer with
            # predict_with_generate: generate, then model(**inputs)): the penalty of that last forward
            for key, parts in regularizer.value_of_last_forward(position_masks(inputs)).items():
                self._dreg_parts["eval"].setdefault(key, []).append(parts)
        return result

    def _record(self, mode: str, key: str, value) -> None:
        self._dreg_metrics[mode].setdefault(key, []).append(value)

    # ---- the strength: gradient-ratio diagnostic and calibration ----------------------------------

    def _trainable(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    def _gradient_norms(self, model, loss, term):
        task_norm, term_norm = gradient_norms(loss, term, self._trainable(model))
        if self.accelerator.num_processes > 1:  # every process must agree (lambda) and log the same value
            task_norm = self.accelerator.reduce(task_norm, reduction="mean")
            term_norm = self.accelerator.reduce(term_norm, reduction="mean")
        return task_norm, term_norm

    def _calibration_due(self, model) -> bool:
        """An 'auto' strength is calibrated on the first batch, and with dreg_recalibrate_steps N again on the
        first micro-batch of every N-th optimizer step."""
        config = self.dreg_config
        if config.calibrates:
            return True
        every = config.dreg_recalibrate_steps
        step = self.state.global_step
        if not (config.auto_strength and every and model.training) or step == 0 or step % every:
            return False
        return getattr(self, "_last_calibrated_step", None) != step

    def _calibrate(self, model, loss, term) -> None:
        """An 'auto' strength: lambda such that ||grad lambda*R|| = target * ||grad task loss|| on this micro-batch."""
        task_norm, term_norm = self._gradient_norms(model, loss, term)
        first = self.dreg_config.calibrates
        if not float(term_norm) > 0:
            if first:
                raise ValueError(
                    "'auto' strength: the penalty has no gradient on the first batch; set dreg_lambda to a number."
                )
            return  # keep the last calibration
        target = self.dreg_config.dreg_target_ratio
        strength = target * float(task_norm) / float(term_norm)
        step = self.state.global_step
        self._last_calibrated_step = step
        self.dreg_config.set_calibrated(strength)
        self.reg_lambdas.append((step, strength))
        self._record("train", "reg_lambda", torch.tensor(strength))
        self._record("train", "reg_grad_ratio", torch.tensor(target))
        self.reg_grad_ratios.append((step, float(target)))
        (logger.warning if first else logger.info)(
            f"'auto' strength of {self.regularizer.name} at step {step}: lambda = {strength:.4g} gives a gradient ratio "
            f"of {target} (||grad task|| = {float(task_norm):.4g}, ||grad R|| = {float(term_norm):.4g})."
        )

    def _should_measure_ratio(self) -> bool:
        interval = self.dreg_config.reg_ratio_interval
        if not interval or not self.model.training:
            return False
        first_micro_batch = getattr(self, "_last_measured_step", None) != self.state.global_step
        return first_micro_batch and self.state.global_step % interval == 0

    def _measure_ratio(self, model, loss, term) -> None:
        self._last_measured_step = self.state.global_step
        task_norm, term_norm = self._gradient_norms(model, loss, term)
        strength = float(self.dreg_config.strength)
        ratio = strength * float(term_norm) / max(float(task_norm), 1e-30)
        self._record("train", "reg_grad_ratio", torch.tensor(ratio))
        self.reg_grad_ratios.append((self.state.global_step, ratio))
        recent = [r for _, r in self.reg_grad_ratios[-3:]]
        name = self.regularizer.name
        if len(recent) == 3 and max(recent) < 1e-2 and "low" not in self._warned:
            self._warned.add("low")
            logger.warning(
                f"{name} has no measurable effect at dreg_lambda={strength:.4g}: its gradient is {ratio:.2e} of the "
                "task loss's. Raise the strength (or use --dreg_lambda auto)."
            )
        if len(recent) == 3 and min(recent) > 1 and "high" not in self._warned:
            self._warned.add("high")
            logger.warning(
                f"{name} dominates training at dreg_lambda={strength:.4g}: its gradient is {ratio:.2f}x the task "
                "loss's. Lower the strength (or use --dreg_lambda auto)."
            )

    # ---- logging ---------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            mode, prefix = "train", ""
        else:
            prefix = next((k[: -len("loss")] for k in logs if k.endswith("_loss") and k != "train_loss"), None)
            mode = "eval" if prefix is not None else None
        if mode is not None and self._dreg_metrics[mode]:
            for key, values in self._dreg_metrics[mode].items():
                value = _float_metric(values)
                if self.accelerator.num_processes > 1:
                    value = self.accelerator.reduce(value.to(self.args.device), reduction="mean")
                if key == self.regularizer.name:  # the finite check, once per logging step (no sync per micro-batch)
                    check_finite(value, getattr(self.regularizer, "last_values", {}) or {key: value})
                logs[prefix + key] = float(f"{value.item():.6g}")
            self._dreg_metrics[mode].clear()
        if mode is not None and self._dreg_parts[mode]:
            for key, parts in self._dreg_parts[mode].items():
                total = torch.stack([p.double() for p in parts]).sum(0)  # (2, sites): sums and counts
                if self.accelerator.num_processes > 1:
                    total = self.accelerator.reduce(total.to(self.args.device), reduction="sum")
                value = (total[0] / total[1].clamp_min(1)).mean()
                logs[prefix + key] = float(f"{value.item():.6g}")
            self._dreg_parts[mode].clear()
        super().log(logs, start_time)

    def evaluation_loop(self, *args, **kwargs):
        # eval_<penalty> is this loop's alone: predict() runs the same loop but does not log, so drop what it left
        self._dreg_metrics["eval"].clear()
        self._dreg_parts["eval"].clear()
        return super().evaluation_loop(*args, **kwargs)

    # ---- saving: the settings beside every checkpoint and in the model card -----------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.is_world_process_zero() and os.path.isdir(folder):
            self.dreg_config.save_pretrained(folder)

    def create_model_card(self, *args, tags=None, **kwargs):
        """One valid model card (``README.md``) for any base trainer: the base trainer's card, its metadata completed
        (tags ``hf_dreg`` and the regularizer, ``model-index`` of the evaluation results, base model, datasets,
        library) and the DREG section (regularizer, strength, sites, data regime, results).

        Takes the arguments of the base class's ``create_model_card`` (transformers: ``model_name``,
        ``finetuned_from``, ``dataset``...; TRL: ``model_name``, ``dataset_name``), whichever the base is.
        """
        from .model_card import write_model_card

        write_model_card(self, super().create_model_card, *args, tags=tags, **kwargs)

    # ---- resuming --------------------------------------------------------------------------------

    def _check_resumed_settings(self, checkpoint: str) -> None:
        if not os.path.isfile(os.path.join(checkpoint, CONFIG_NAME)):
            return
        saved = DREGConfig.from_pretrained(checkpoint)
        config = self.dreg_config
        if config.auto_strength and saved.calibrated_lambda is not None and config.regularizer == saved.regularizer:
            config.set_calibrated(saved.calibrated_lambda)  # keep the strength calibrated so far
        if saved.dreg_config_dict() != config.dreg_config_dict():
            logger.warning(
                f"Resuming from {checkpoint} with regularizer settings {config.dreg_config_dict()}, but it was trained "
                f"with {saved.dreg_config_dict()}. Pass the same --regularizer/--dreg_* flags to continue "
                "the same run."
            )


def with_dreg(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` (a transformers ``Trainer`` subclass) that adds DREG to its loss.

    The subclass takes one more keyword, ``dreg_config=DREGConfig(...)`` (default ``DREGConfig()``;
    with ``DREGTrainingArguments`` as ``args`` the settings are read from there)::

        Trainer = hf_dreg.with_dreg(SFTTrainer)
        trainer = Trainer(model=..., args=SFTConfig(...), train_dataset=..., dreg_config=hf_dreg.DREGConfig(dreg_lambda=1e-2))
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_dreg expects a transformers Trainer class (or subclass), got {trainer_cls!r}.")
    if issubclass(trainer_cls, DREGTrainerMixin):
        return trainer_cls
    if trainer_cls not in _WRAPPED:
        name = f"DREG{trainer_cls.__name__}"
        doc = f"{trainer_cls.__name__} with the DREG penalty (or another regularizer) in its loss: see hf_dreg.with_dreg."
        _WRAPPED[trainer_cls] = type(name, (DREGTrainerMixin, trainer_cls), {"__doc__": doc, "__module__": trainer_cls.__module__})
    return _WRAPPED[trainer_cls]


class DREGTrainer(DREGTrainerMixin, Trainer):
    """The transformers Trainer with ``dreg_lambda * penalty`` added to the loss (``with_dreg(Trainer)``).

    Reads the DREG settings from ``DREGTrainingArguments`` (or ``dreg_config=``). The penalty is logged
    under the regularizer's name (``dreg``, ``spectral_norm``, ``igpen``, ``jacobian``;
    ``weight_decay`` logs the squared norm of the decayed weights); evaluation logs ``eval_<name>``
    while ``eval_loss`` stays the task loss.
    """

    def __init__(self, model=None, args=None, *positional, **kwargs):
        if args is None and kwargs.get("dreg_config") is None:
            args = DREGTrainingArguments(output_dir="trainer_output")
        super().__init__(model, args, *positional, **kwargs)


_WRAPPED[Trainer] = DREGTrainer
