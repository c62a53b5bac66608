"""DREGConfig: the regularizer settings of a run, on their own (like PEFT's ``LoraConfig``).

Usable alone (``with_dreg(SFTTrainer)(..., dreg_config=DREGConfig(dreg_lambda=1e-2))``), parsed
beside a trainer's arguments (``HfArgumentParser((ScriptArguments, SFTConfig, DREGConfig))``), and
mixed into :class:`~hf_dreg.DREGTrainingArguments`. The loss is
``task_loss + dreg_lambda * penalty``: ``dreg_lambda`` is the strength of whichever regularizer is chosen
(``regularizer="dreg"`` by default; for ``weight_decay`` it is the AdamW decay).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field

from .ops.activations import resolve_families
from .ops.kernels import KERNEL_FAMILIES
from .regularizers import REGISTRY, REGULARIZERS

DEFAULT_TARGET_RATIO = 0.1
AUTO = "auto"
# the documented default strength of each regularizer, from the registry: one source of truth
DEFAULT_REG_LAMBDA = {name: cls.default_strength for name, cls in REGISTRY.items()}
DEFAULT_DREG_LAMBDA = DEFAULT_REG_LAMBDA["dreg"]  # 10**-2.5, the seed study's
CONFIG_NAME = "dreg_config.json"


def float_or_auto(text):
    """The argparse type of ``--dreg_lambda``: a number, or 'auto'."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"dreg_lambda must be a number or 'auto', got {text!r}.") from None


@dataclass
class DREGConfig:
    """The regularizer of a run and its strength: ``loss = task_loss + dreg_lambda * penalty``."""

    dreg_lambda: float_or_auto = field(
        default=None,
        metadata={
            "help": "Strength of the regularizer (--regularizer). Default: its own; for dreg 10**-2.5 = 0.00316, the "
            "seed study's (on the models we measured it has no measurable effect, and no strength beat plain training: "
            "docs/results.md); weight_decay 0.01 (it is the AdamW decay); spectral_norm, igpen, jacobian 0.01. 0 turns "
            "the penalty off; 'auto' (every regularizer but none and weight_decay) calibrates it on the first batch so "
            "that ||grad lambda*R|| / ||grad task loss|| = dreg_target_ratio."
        },
    )
    dreg_target_ratio: float = field(
        default=DEFAULT_TARGET_RATIO,
        metadata={
            "help": "With --dreg_lambda auto: the gradient ratio ||grad lambda*R|| / ||grad task loss|| the strength "
            "is calibrated to (default 0.1)."
        },
    )
    dreg_recalibrate_steps: int = field(
        default=0,
        metadata={
            "help": "With an 'auto' strength: calibrate it again every N optimizer steps (on the first micro-batch of "
            "the step), so that the gradient ratio stays near the target as training goes on; 0 = calibrate once, on "
            "the first batch. Every calibration is logged as reg_lambda and kept in trainer.reg_lambdas (step, lambda)."
        },
    )
    dreg_activations: str = field(
        default="gelu",
        metadata={
            "help": "Which MLP activations are DREG sites: 'gelu' (the GELU family), 'all' (every supported one), "
            "or 'silu', 'relu', 'tanh' (comma-separated for several). SwiGLU models (Llama, Qwen, Mistral) need 'silu'."
        },
    )
    dreg_exclude_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Activation module paths (or '.suffix') to leave out of DREG."},
    )
    dreg_kernels: str = field(
        default="auto",
        metadata={
            "help": "Kernel family of the penalty's passes (the same values from each): 'auto' (triton on a CUDA GPU, compiled "
            "elsewhere), 'triton' (one Triton kernel per site and direction), 'compiled' (torch.compile's fused kernels, compiled "
            "once per machine), 'eager' (plain torch operators, nothing to compile).",
            "choices": list(KERNEL_FAMILIES),
        },
    )
    dreg_fused: bool | None = field(
        default=None,
        metadata={"help": "Deprecated: use --dreg_kernels (True: compiled, False: eager)."},
    )
    dreg_log_per_site: bool = field(
        default=False,
        metadata={"help": "Also log the DREG value of every site (as dreg/<site>) at each logging step."},
    )
    regularizer: str = field(
        default="dreg",
        metadata={"help": f"Which regularizer to train with: {', '.join(REGULARIZERS)}.", "choices": list(REGULARIZERS)},
    )
    reg_lambda: float_or_auto = field(
        default=None,
        metadata={"help": "Deprecated: use --dreg_lambda, the strength of every regularizer."},
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
    reg_ratio_interval: int = field(
        default=0,
        metadata={
            "help": "Every N optimizer steps, log reg_grad_ratio = ||grad dreg_lambda*penalty|| / ||grad task loss|| "
            "over the trainable parameters, measured on one micro-batch (two extra backward passes of it: about "
            "2/N of a step). 0 = off. Warns when it stays below 1e-2 (no measurable effect) or above 1."
        },
    )

    # not a flag: the value an 'auto' dreg_lambda was calibrated to (None until then); set by set_calibrated (a new
    # hyperparameter-search trial clears it)
    calibrated_lambda: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.check_dreg_settings()

    def check_dreg_settings(self) -> None:
        """Validate the settings and resolve ``dreg_lambda`` (fails early, naming the flag and the fix)."""
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"Unknown regularizer {self.regularizer!r}: choose one of {', '.join(REGULARIZERS)}.")
        self._resolve_strength()
        if not (isinstance(self.dreg_target_ratio, (int, float)) and math.isfinite(self.dreg_target_ratio) and self.dreg_target_ratio > 0):
            raise ValueError(f"dreg_target_ratio must be a finite number > 0, got {self.dreg_target_ratio!r}.")
        if self.reg_ratio_interval < 0:
            raise ValueError(f"reg_ratio_interval must be >= 0 (0 = off), got {self.reg_ratio_interval}.")
        if self.dreg_recalibrate_steps < 0:
            raise ValueError(f"dreg_recalibrate_steps must be >= 0 (0 = calibrate once), got {self.dreg_recalibrate_steps}.")
        self._resolve_kernels()
        resolve_families(self.dreg_activation_list)  # fails early with the list of valid choices
        if self.jacobian_n_proj < 1 or self.spectral_power_iterations < 1:
            raise ValueError("jacobian_n_proj and spectral_power_iterations must be >= 1.")

    def _resolve_kernels(self) -> None:
        """dreg_kernels from the deprecated dreg_fused (which is then cleared: saved configs carry dreg_kernels)."""
        if self.dreg_kernels not in KERNEL_FAMILIES:
            raise ValueError(f"dreg_kernels must be one of {', '.join(KERNEL_FAMILIES)} (--dreg_kernels), got {self.dreg_kernels!r}.")
        if self.dreg_fused is None:
            return
        fused_as = "compiled" if self.dreg_fused else "eager"
        if self.dreg_kernels not in ("auto", fused_as):
            raise ValueError(f"dreg_fused={self.dreg_fused} (deprecated) contradicts dreg_kernels={self.dreg_kernels!r}: pass dreg_kernels only.")
        warnings.warn(
            f"dreg_fused is deprecated: use dreg_kernels={fused_as!r} (--dreg_kernels {fused_as}).", FutureWarning, stacklevel=4
        )
        self.dreg_kernels, self.dreg_fused = fused_as, None

    def _resolve_strength(self) -> None:
        """dreg_lambda: a number >= 0, 'auto', or None for the regularizer's default (the deprecated reg_lambda moved in)."""
        if self.reg_lambda is not None:
            alias = float_or_auto(self.reg_lambda) if isinstance(self.reg_lambda, str) else self.reg_lambda
            if self.dreg_lambda is not None and self.dreg_lambda != alias:
                raise ValueError(
                    f"reg_lambda={alias} (deprecated) and dreg_lambda={self.dreg_lambda} disagree: pass only dreg_lambda, "
                    "the strength of every regularizer."
                )
            warnings.warn(
                f"reg_lambda is deprecated: dreg_lambda is the strength of every regularizer (dreg_lambda={alias!r}, "
                f"--dreg_lambda {alias}).",
                FutureWarning,
                stacklevel=5,
            )
            self.dreg_lambda, self.reg_lambda = alias, None
        if self.dreg_lambda is None:
            self.dreg_lambda = DEFAULT_REG_LAMBDA[self.regularizer]
        if isinstance(self.dreg_lambda, str):
            self.dreg_lambda = float_or_auto(self.dreg_lambda)
        if self.dreg_lambda == AUTO:
            if self.regularizer in ("none", "weight_decay"):
                raise ValueError(
                    f"dreg_lambda='auto' calibrates a penalty's gradient against the task loss's; regularizer="
                    f"{self.regularizer!r} adds no penalty to the loss: give its strength as a number."
                )
            return
        value = self.dreg_lambda
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"dreg_lambda must be a finite number >= 0 (0 turns the penalty off) or 'auto', got {value!r}. The "
                f"{self.regularizer} default is {DEFAULT_REG_LAMBDA[self.regularizer]:.6g}"
                f"{' = 10**-2.5' if self.regularizer == 'dreg' else ''}."
            )

    def resolve_weight_decay(self, weight_decay: float) -> float:
        """The optimizer's weight decay under this config (regularizer='weight_decay' sets it to dreg_lambda)."""
        if self.regularizer != "weight_decay":
            return weight_decay
        if weight_decay not in (0.0, self.dreg_lambda):
            raise ValueError(
                f"weight_decay={weight_decay} and dreg_lambda={self.dreg_lambda} disagree; for "
                "regularizer='weight_decay' dreg_lambda is the AdamW decay: pass only dreg_lambda."
            )
        return self.dreg_lambda

    @property
    def dreg_activation_list(self):
        value = self.dreg_activations
        return value.split(",") if isinstance(value, str) and "," in value else value

    @property
    def auto_strength(self) -> bool:
        """Whether the strength is calibrated to ``dreg_target_ratio`` (``--dreg_lambda auto``)."""
        return self.dreg_lambda == AUTO

    @property
    def calibrates(self) -> bool:
        """True while an 'auto' strength has not yet been calibrated."""
        return self.auto_strength and self.calibrated_lambda is None

    @property
    def strength(self) -> float | None:
        """The lambda in use: ``dreg_lambda``, or under 'auto' its last calibration (None before the first)."""
        return self.calibrated_lambda if self.auto_strength else self.dreg_lambda

    def set_calibrated(self, strength: float) -> None:
        """Record the calibration of the 'auto' strength (replacing the last one)."""
        if not self.auto_strength:
            raise ValueError(f"set_calibrated: dreg_lambda={self.dreg_lambda!r} is not 'auto'.")
        self.calibrated_lambda = float(strength)

    def dreg_config_dict(self) -> dict:
        """The settings that define a run's penalty (saved beside every checkpoint)."""
        config = {"regularizer": self.regularizer, "dreg_lambda": self.dreg_lambda}
        if self.regularizer in ("dreg", "spectral_norm"):
            config.update(dreg_activations=self.dreg_activations, dreg_exclude_modules=self.dreg_exclude_modules)
        if self.auto_strength:
            config["calibrated_lambda"] = self.calibrated_lambda
            config["dreg_target_ratio"] = self.dreg_target_ratio
            if self.dreg_recalibrate_steps:
                config["dreg_recalibrate_steps"] = self.dreg_recalibrate_steps
        if self.regularizer == "spectral_norm":
            config.update(spectral_mode=self.spectral_mode, spectral_power_iterations=self.spectral_power_iterations)
        if self.regularizer == "jacobian":
            config.update(jacobian_n_proj=self.jacobian_n_proj, jacobian_exact=self.jacobian_exact)
        return config

    # ---- as a DREGConfig of its own (also from DREGTrainingArguments) --------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(DREGConfig) if f.init]

    def dreg_dict(self) -> dict:
        """Every DREGConfig field (``dreg_lambda`` as resolved: a number or 'auto')."""
        return {name: getattr(self, name) for name in DREGConfig.field_names()}

    def save_pretrained(self, folder: str) -> None:
        """Write every field to ``folder/dreg_config.json`` (what ``from_pretrained`` reads back)."""
        import os

        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump({**self.dreg_dict(), "calibrated_lambda": self.calibrated_lambda, "penalty": self.dreg_config_dict()}, f, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str) -> "DREGConfig":
        """The DREGConfig saved in ``folder`` (a checkpoint or an output directory)."""
        import os

        with open(os.path.join(folder, CONFIG_NAME)) as f:
            saved = json.load(f)
        values = {k: v for k, v in saved.items() if k in cls.field_names() and k not in ("reg_lambda", "dreg_fused")}
        calibrated = saved.get("calibrated_lambda")
        if "reg_lambda_auto" in saved:  # written before dreg_lambda became the one strength: reg_lambda held the number
            strength, auto = saved.get("reg_lambda"), saved["reg_lambda_auto"]
            if values.get("regularizer", "dreg") != "dreg":
                values["dreg_lambda"] = AUTO if auto else strength
            if auto and strength != AUTO:
                calibrated = strength
        config = cls(**values)
        if calibrated is not None and config.auto_strength:
            config.set_calibrated(calibrated)
        return config
