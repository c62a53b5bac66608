"""DREGTrainingArguments: TrainingArguments plus the regularizer flags (usable with HfArgumentParser)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .activations import resolve_families

DEFAULT_DREG_LAMBDA = 10**-2.5
REGULARIZERS = ("none", "weight_decay", "spectral_norm", "igpen", "jacobian", "dreg")
# documented default strength of each regularizer (dreg's is dreg_lambda: one source of truth)
DEFAULT_REG_LAMBDA = {"none": 0.0, "weight_decay": 0.01, "spectral_norm": 0.01, "igpen": 0.01, "jacobian": 0.01}


@dataclass
class DREGTrainingArguments(TrainingArguments):
    """TrainingArguments with the study's regularizers: ``loss = task_loss + reg_lambda * penalty``.

    With the default ``regularizer="dreg"``, ``reg_lambda`` is ``dreg_lambda``.
    """

    dreg_lambda: float = field(
        default=DEFAULT_DREG_LAMBDA,
        metadata={"help": "Strength of the DREG penalty (default 10**-2.5 = 0.00316); 0 turns DREG off."},
    )
    dreg_activations: str = field(
        default="gelu",
        metadata={
            "help": "Which MLP activations are DREG sites: 'gelu' (the GELU family), 'all' (every supported one), "
            "or 'silu', 'relu', 'tanh' (comma-separated for several)."
        },
    )
    dreg_exclude_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Activation module paths (or '.suffix') to leave out of DREG."},
    )
    dreg_fused: bool = field(
        default=True,
        metadata={"help": "Fuse the penalty's elementwise math into one kernel per pass with torch.compile."},
    )
    dreg_log_per_site: bool = field(
        default=False,
        metadata={"help": "Also log the DREG value of every site (as dreg/<site>) at each logging step."},
    )
    regularizer: str = field(
        default="dreg",
        metadata={"help": f"Which regularizer to train with: {', '.join(REGULARIZERS)}.", "choices": list(REGULARIZERS)},
    )
    reg_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Strength of the regularizer. Defaults: dreg = dreg_lambda, weight_decay 0.01 (the AdamW decay), "
            "spectral_norm 0.01, igpen 0.01, jacobian 0.01."
        },
    )
    spectral_mode: str = field(
        default="penalty",
        metadata={
            "help": "spectral_norm: 'penalty' (sum of squared top singular values) or 'normalize' (hard spectral "
            "normalization; from scratch only, refused on a pretrained checkpoint).",
            "choices": ["penalty", "normalize"],
        },
    )
    spectral_power_iterations: int = field(default=1, metadata={"help": "spectral_norm: power steps per training step."})
    jacobian_n_proj: int = field(default=1, metadata={"help": "jacobian: random projections per example."})
    jacobian_exact: bool = field(default=False, metadata={"help": "jacobian: exact Frobenius norm (one pass per logit)."})

    def __post_init__(self):
        super().__post_init__()
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"Unknown regularizer {self.regularizer!r}: choose one of {', '.join(REGULARIZERS)}.")
        _check_strength("dreg_lambda", self.dreg_lambda)
        if self.reg_lambda is not None:
            _check_strength("reg_lambda", self.reg_lambda)
        self._resolve_strength()
        resolve_families(self.dreg_activation_list)  # fails early with the list of valid choices
        if self.jacobian_n_proj < 1 or self.spectral_power_iterations < 1:
            raise ValueError("jacobian_n_proj and spectral_power_iterations must be >= 1.")
        if self.gradient_checkpointing and self.regularizer == "dreg" and self.dreg_lambda > 0:
            kwargs = dict(self.gradient_checkpointing_kwargs or {})
            if kwargs.get("use_reentrant", False):
                raise ValueError(
                    "DREG needs non-reentrant gradient checkpointing (reentrant checkpointing runs the forward "
                    "without autograd, so the penalty would get no gradient). "
                    "Set gradient_checkpointing_kwargs={'use_reentrant': False}."
                )
            kwargs["use_reentrant"] = False
            self.gradient_checkpointing_kwargs = kwargs

    def _resolve_strength(self) -> None:
        """One source of truth: reg_lambda is dreg_lambda for DREG, and weight_decay for weight decay."""
        if self.regularizer == "dreg":
            if self.reg_lambda is not None and self.reg_lambda != self.dreg_lambda:
                if self.dreg_lambda != DEFAULT_DREG_LAMBDA:
                    raise ValueError(
                        f"reg_lambda={self.reg_lambda} and dreg_lambda={self.dreg_lambda} disagree; for "
                        "regularizer='dreg' they are the same strength: pass only one."
                    )
                self.dreg_lambda = self.reg_lambda
            self.reg_lambda = self.dreg_lambda
            return
        if self.reg_lambda is None:
            self.reg_lambda = DEFAULT_REG_LAMBDA[self.regularizer]
        if self.regularizer == "weight_decay":
            if self.weight_decay not in (0.0, self.reg_lambda):
                raise ValueError(
                    f"weight_decay={self.weight_decay} and reg_lambda={self.reg_lambda} disagree; for "
                    "regularizer='weight_decay' reg_lambda is the AdamW decay: pass only reg_lambda."
                )
            self.weight_decay = self.reg_lambda

    @property
    def dreg_activation_list(self):
        value = self.dreg_activations
        return value.split(",") if isinstance(value, str) and "," in value else value

    def dreg_config_dict(self) -> dict:
        """The settings that define a run's penalty (saved beside every checkpoint)."""
        config = {"regularizer": self.regularizer, "reg_lambda": self.reg_lambda}
        if self.regularizer in ("dreg", "spectral_norm"):
            config.update(dreg_activations=self.dreg_activations, dreg_exclude_modules=self.dreg_exclude_modules)
        if self.regularizer == "dreg":
            config["dreg_lambda"] = self.dreg_lambda
        if self.regularizer == "spectral_norm":
            config.update(spectral_mode=self.spectral_mode, spectral_power_iterations=self.spectral_power_iterations)
        if self.regularizer == "jacobian":
            config.update(jacobian_n_proj=self.jacobian_n_proj, jacobian_exact=self.jacobian_exact)
        return config


def _check_strength(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0 (0 turns the penalty off), got {value!r}. "
            f"The DREG default is 10**-2.5 = {DEFAULT_DREG_LAMBDA:.6g}."
        )
