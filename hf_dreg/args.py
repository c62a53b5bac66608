"""DREGTrainingArguments: TrainingArguments plus the DREG flags (usable with HfArgumentParser)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from transformers import TrainingArguments

from .activations import resolve_families

DEFAULT_DREG_LAMBDA = 10**-2.5


@dataclass
class DREGConfig:
    """What defines the penalty a run trains with (saved beside every checkpoint)."""

    dreg_lambda: float
    dreg_activations: str
    dreg_exclude_modules: list[str] | None


@dataclass
class DREGTrainingArguments(TrainingArguments):
    """TrainingArguments with the DREG penalty: ``loss = task_loss + dreg_lambda * DREG``."""

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

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.dreg_lambda, (int, float)) or not math.isfinite(self.dreg_lambda) or self.dreg_lambda < 0:
            raise ValueError(
                f"dreg_lambda must be a finite number >= 0 (0 turns DREG off), got {self.dreg_lambda!r}. "
                f"The default is 10**-2.5 = {DEFAULT_DREG_LAMBDA:.6g}."
            )
        resolve_families(self.dreg_activation_list)  # fails early with the list of valid choices
        if self.gradient_checkpointing and self.dreg_lambda > 0:
            kwargs = dict(self.gradient_checkpointing_kwargs or {})
            if kwargs.get("use_reentrant", False):
                raise ValueError(
                    "DREG needs non-reentrant gradient checkpointing (reentrant checkpointing runs the forward "
                    "without autograd, so the penalty would get no gradient). "
                    "Set gradient_checkpointing_kwargs={'use_reentrant': False}."
                )
            kwargs["use_reentrant"] = False
            self.gradient_checkpointing_kwargs = kwargs

    @property
    def dreg_activation_list(self):
        value = self.dreg_activations
        return value.split(",") if isinstance(value, str) and "," in value else value

    @property
    def dreg_config(self) -> DREGConfig:
        return DREGConfig(self.dreg_lambda, self.dreg_activations, self.dreg_exclude_modules)

    def dreg_config_dict(self) -> dict:
        return asdict(self.dreg_config)
