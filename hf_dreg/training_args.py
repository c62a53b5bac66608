"""DREGTrainingArguments: TrainingArguments plus the fields of DREGConfig (usable with HfArgumentParser)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from .config import (  # noqa: F401  (re-exported: the names scripts and tests import from here)
    AUTO,
    DEFAULT_DREG_LAMBDA,
    DEFAULT_REG_LAMBDA,
    DEFAULT_TARGET_RATIO,
    REGULARIZERS,
    DREGConfig,
    float_or_auto,
)


@dataclass
class DREGTrainingArguments(DREGConfig, TrainingArguments):
    """TrainingArguments with the study's regularizers: ``loss = task_loss + dreg_lambda * penalty``.

    Every field of :class:`~hf_dreg.DREGConfig` is a flag here; ``dreg_lambda`` is the strength of
    whichever ``regularizer`` is chosen.
    """

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        self.check_dreg_settings()
        self.weight_decay = self.resolve_weight_decay(self.weight_decay)
        require_non_reentrant_checkpointing(self, self)


def require_non_reentrant_checkpointing(args: TrainingArguments, config: DREGConfig) -> None:
    """DREG's penalty needs autograd in the forward: force non-reentrant checkpointing, refuse reentrant.

    transformers 5 names it ``activation_checkpointing`` (``gradient_checkpointing`` is its alias); both are set.
    """
    enabled = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
    if not (enabled and config.regularizer == "dreg" and config.dreg_lambda != 0):
        return
    current = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None)
    kwargs = dict(current or {})
    if kwargs.get("use_reentrant", False):
        raise ValueError(
            "DREG needs non-reentrant gradient checkpointing (reentrant checkpointing runs the forward "
            "without autograd, so the penalty would get no gradient). "
            "Set gradient_checkpointing_kwargs={'use_reentrant': False}."
        )
    kwargs["use_reentrant"] = False
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        if hasattr(args, name):
            setattr(args, name, dict(kwargs))
