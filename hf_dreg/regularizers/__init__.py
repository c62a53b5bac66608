"""The regularizers of the study behind one flag (``--regularizer``)."""

from __future__ import annotations

from ..args import REGULARIZERS
from .base import Penalty, Regularizer, StepInfo
from .dreg import DREG
from .input_gradient import InputGradient
from .jacobian import Jacobian, jacobian_frobenius
from .none import NoRegularizer
from .spectral_norm import PowerIteration, SpectralNorm
from .weight_decay import WeightDecay



def build_regularizer(model, args) -> Regularizer:
    """The regularizer ``args.regularizer`` for ``model`` (none when its strength is 0)."""
    name = args.regularizer
    if name == "none" or (name != "weight_decay" and args.reg_lambda == 0):
        return NoRegularizer()
    if name == "weight_decay":
        return WeightDecay(model, args)
    if name == "spectral_norm":
        pretrained = bool(getattr(getattr(model, "config", None), "_name_or_path", ""))
        return SpectralNorm(model, args, pretrained=pretrained)
    if name == "igpen":
        return InputGradient(model, args)
    if name == "jacobian":
        return Jacobian(model, args)
    if name == "dreg":
        return DREG(model, args)
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
