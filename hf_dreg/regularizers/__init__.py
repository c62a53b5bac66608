"""The regularizers of the study behind one flag (``--regularizer``): a name -> class registry.

Each regularizer is a :class:`Regularizer` subclass in a module of its own, with its ``name``, its
``default_strength`` and a ``build`` classmethod; adding one is its module plus one entry of
:data:`REGISTRY` (the flag's choices and the default strengths of :class:`~hf_dreg.DREGConfig` are read
from it).
"""

from __future__ import annotations

from .base import Penalty, Regularizer, StepInfo
from .dreg import DREG
from .input_gradient import InputGradient
from .jacobian import Jacobian, jacobian_frobenius
from .none import NoRegularizer
from .spectral_norm import PowerIteration, SpectralNorm
from .weight_decay import WeightDecay

# name -> class, in the order the flag and the reports list them
REGISTRY: dict[str, type[Regularizer]] = {
    cls.name: cls for cls in (NoRegularizer, WeightDecay, SpectralNorm, InputGradient, Jacobian, DREG)
}
REGULARIZERS = tuple(REGISTRY)


def build_regularizer(model, config, seed: int = 0) -> Regularizer:
    """The regularizer ``config.regularizer`` for ``model`` (none when its strength is 0).

    ``config`` is a :class:`~hf_dreg.DREGConfig` (or DREGTrainingArguments); ``seed`` seeds the random
    projections and power iterations.
    """
    name = config.regularizer
    if name not in REGISTRY:
        raise ValueError(f"Unknown regularizer {name!r}: choose one of {', '.join(REGISTRY)}.")
    if name == "none" or (name != "weight_decay" and config.dreg_lambda == 0):
        return NoRegularizer()
    return REGISTRY[name].build(model, config, seed=seed)


__all__ = [
    "REGISTRY",
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
