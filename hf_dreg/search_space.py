"""The default search space of the regularizer's strength, for ``Trainer.hyperparameter_search``.

    from hf_dreg.search_space import default_hp_space
    trainer = DREGTrainer(model_init=..., args=DREGTrainingArguments(...), ...)
    best = trainer.hyperparameter_search(hp_space=default_hp_space, backend="optuna", n_trials=20,
                                         direction="maximize", compute_objective=lambda m: m["eval_accuracy"])

``default_hp_space(trial)`` is the Optuna space when given an Optuna trial and the Ray Tune space
when given ``None`` (what transformers passes for ``backend="ray"``), so one function serves both
backends; ``default_hp_space_optuna`` and ``default_hp_space_ray`` are the two halves.

The range. ``dreg_lambda`` is drawn log-uniformly from 1e-3 to 1e3. On the models docs/results.md measured
(study/results/lambda), the gradient ratio ||grad lambda*R|| / ||grad task loss|| grows in proportion to
lambda: about 0.5-0.85 per unit of lambda for the pretrained MiniLM-L6 and about 0.002 for a small ViT
trained from scratch. So 1e-3 is "no effect" on both (ratio ~5e-4 and ~2e-6), and 1e3 "dominates"
both (ratio in the hundreds for MiniLM, about 2 for the ViT; MiniLM already loses 16 points on trec6
at lambda = 1). A pretrained model of MiniLM's kind needs only [1e-3, 10]:
``DREGSearchSpace(lambda_max=10)`` (or ``--search_lambda_max 10`` in scripts/tune.py) spends the
trials there.

Other regularizers (optional): ``DREGSearchSpace(regularizers=["dreg", "weight_decay", "spectral_norm"])``
also searches which regularizer, each with its own log-uniform range of ``dreg_lambda``
(:data:`REG_LAMBDA_RANGES`); every DREG trainer rebuilds the regularizer of each trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import REGULARIZERS

LAMBDA_RANGE = (1e-3, 1e3)
# log-uniform ranges of dreg_lambda for the other regularizers (their defaults, 0.01, in the middle)
REG_LAMBDA_RANGES = {
    "weight_decay": (1e-4, 0.3),
    "spectral_norm": (1e-4, 1.0),
    "igpen": (1e-4, 1.0),
    "jacobian": (1e-4, 1.0),
}


def _check_range(name: str, low: float, high: float) -> None:
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name}: the range must be finite numbers, got ({low!r}, {high!r}).")
    if not 0 < low <= high:
        raise ValueError(f"{name}: a log-uniform range needs 0 < min <= max, got ({low}, {high}).")


@dataclass
class DREGSearchSpace:
    """A search space over the regularizer's strength (and optionally which regularizer).

    Call it with an Optuna trial (Optuna space) or with ``None`` (Ray Tune space): pass the object itself
    as ``hp_space=`` for either backend. :meth:`settings` turns a best run's hyperparameters back into
    ``DREGConfig`` fields.
    """

    lambda_min: float = LAMBDA_RANGE[0]
    lambda_max: float = LAMBDA_RANGE[1]
    regularizers: Sequence[str] = ("dreg",)
    reg_lambda_ranges: dict = field(default_factory=lambda: dict(REG_LAMBDA_RANGES))

    def __post_init__(self):
        self.regularizers = tuple(self.regularizers)
        if not self.regularizers:
            raise ValueError("DREGSearchSpace: regularizers is empty; give at least one (e.g. ['dreg']).")
        unknown = [r for r in self.regularizers if r not in REGULARIZERS]
        if unknown:
            raise ValueError(f"DREGSearchSpace: unknown regularizer(s) {unknown}; choose from {', '.join(REGULARIZERS)}.")
        if "dreg" in self.regularizers:
            _check_range("dreg_lambda", self.lambda_min, self.lambda_max)
        for name in self.regularizers:
            if name not in ("dreg", "none"):
                if name not in self.reg_lambda_ranges:
                    raise ValueError(f"DREGSearchSpace: no dreg_lambda range for {name!r} in reg_lambda_ranges.")
                _check_range(f"{name} dreg_lambda", *self.reg_lambda_ranges[name])

    @property
    def searches_regularizer(self) -> bool:
        return len(self.regularizers) > 1

    def __call__(self, trial):
        return self.ray() if trial is None else self.optuna(trial)

    # ---- Optuna -------------------------------------------------------------------------------------

    def optuna(self, trial) -> dict:
        """The trial's DREGConfig fields; Optuna parameter names: ``regularizer``, ``dreg_lambda``, ``<name>_lambda``."""
        name = trial.suggest_categorical("regularizer", list(self.regularizers)) if self.searches_regularizer else self.regularizers[0]
        params = {"regularizer": name}
        if name == "dreg":
            params["dreg_lambda"] = trial.suggest_float("dreg_lambda", self.lambda_min, self.lambda_max, log=True)
        elif name != "none":
            low, high = self.reg_lambda_ranges[name]
            params["dreg_lambda"] = trial.suggest_float(f"{name}_lambda", low, high, log=True)
        return params

    # ---- Ray Tune -----------------------------------------------------------------------------------

    def ray(self) -> dict:
        """The Ray Tune ``config``: ``dreg_lambda`` log-uniform; with several regularizers, ``regularizer`` a
        choice and ``dreg_lambda`` drawn from that regularizer's range."""
        from ray import tune

        if not self.searches_regularizer:
            name = self.regularizers[0]
            if name == "dreg":
                return {"regularizer": "dreg", "dreg_lambda": tune.loguniform(self.lambda_min, self.lambda_max)}
            if name == "none":
                return {"regularizer": "none"}
            return {"regularizer": name, "dreg_lambda": tune.loguniform(*self.reg_lambda_ranges[name])}
        ranges = {**self.reg_lambda_ranges, "dreg": (self.lambda_min, self.lambda_max)}

        def dreg_lambda(spec):
            import numpy as np

            name = spec.config.regularizer
            if name == "none":
                return 0.0
            lo, hi = ranges[name]
            return float(math.exp(np.random.uniform(math.log(lo), math.log(hi))))

        return {"regularizer": tune.choice(list(self.regularizers)), "dreg_lambda": tune.sample_from(dreg_lambda)}

    # ---- back to settings ---------------------------------------------------------------------------

    def settings(self, hyperparameters: dict) -> dict:
        """DREGConfig fields of a run's hyperparameters (Optuna's ``best_trial.params`` or Ray's ``config``)."""
        name = hyperparameters.get("regularizer", self.regularizers[0])
        if name == "dreg":
            return {"regularizer": "dreg", "dreg_lambda": float(hyperparameters["dreg_lambda"])}
        if name == "none":
            return {"regularizer": "none"}
        value = hyperparameters.get(f"{name}_lambda", hyperparameters.get("dreg_lambda"))
        return {"regularizer": name, "dreg_lambda": float(value)}


def default_hp_space_optuna(trial) -> dict:
    """``dreg_lambda`` log-uniform in [1e-3, 1e3] (Optuna)."""
    return DREGSearchSpace().optuna(trial)


def default_hp_space_ray(trial=None) -> dict:
    """``dreg_lambda`` log-uniform in [1e-3, 1e3] (Ray Tune)."""
    return DREGSearchSpace().ray()


def default_hp_space(trial) -> dict:
    """``dreg_lambda`` log-uniform in [1e-3, 1e3]: the Optuna space for an Optuna trial, Ray Tune's for ``None``."""
    return DREGSearchSpace()(trial)


# ---- a trainer that rebuilds the regularizer of each trial ------------------------------------------


__all__ = [
    "LAMBDA_RANGE",
    "REG_LAMBDA_RANGES",
    "DREGSearchSpace",
    "default_hp_space",
    "default_hp_space_optuna",
    "default_hp_space_ray",
]
