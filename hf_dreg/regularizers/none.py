"""Plain fine-tuning: no penalty."""

from .base import Regularizer


class NoRegularizer(Regularizer):
    name = "none"

    @classmethod
    def build(cls, model, config, seed: int = 0) -> "NoRegularizer":
        return cls()
