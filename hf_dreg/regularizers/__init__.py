"""The regularizers of the study behind one flag (``--regularizer``)."""

from __future__ import annotations

from ..config import REGULARIZERS
from .base import Penalty, Regularizer, StepInfo
from .dreg import DREG
from .input_gradient import InputGradient
from .jacobian import Jacobian, jacobian_frobenius
from .none import NoRegularizer
from .spectral_norm import PowerIteration, SpectralNorm
from .weight_decay import WeightDecay


def build_regularizer(model, config, seed: int = 0) -> Regularizer:
    """The regularizer ``config.regularizer`` for ``model`` (none when its strength is 0).

    ``config`` is a :class:`~hf_dreg.DREGConfig` (or DREGTrainingArguments); ``seed`` seeds the random
    projections and power iterations.
    """
    name = config.regularizer
    if name == "none" or (name != "weight_decay" and config.reg_lambda == 0):
        return NoRegularizer()
    if name == "weight_decay":
        return WeightDecay(model, config)
    if name == "spectral_norm":
        pretrained = bool(getattr(getattr(model, "config", None), "_name_or_path", ""))
        return SpectralNorm(model, config, pretrained=pretrained, seed=seed)
    if name == "igpen":
        return InputGradient(model, config)
    if name == "jacobian":
        return Jacobian(model, config, seed=seed)
    if name == "dreg":
        return DREG(model, config)
    raise ValueError(f"Unknown regularizer {name!r}: choose one of {', '.join(REGULARIZERS)}.")


__all__ = [
    "REGULARIZERS",
    "build_regularizer",
    "Regularizer",
    "Penalty",
    "StepInfo",
    "DREG",
    "InputGradient",
    "Jacobian",
    "jacobian_frobenius",
    "NoRegularizer",
    "PowerIteration",
    "SpectralNorm",
    "WeightDecay",
]
