"""Decoupled weight decay, applied by the Trainer's own AdamW (its weight_decay = dreg_lambda).

Nothing is added to the loss; the squared norm of the decayed parameters is logged as ``weight_decay``.
"""

from __future__ import annotations

import torch

from .base import Penalty, Regularizer


class WeightDecay(Regularizer):
    name = "weight_decay"
    default_strength = 0.01  # the AdamW decay

    def __init__(self, model, config):
        self.strength = config.dreg_lambda
        self.decayed = None

    def compute(self, model, inputs, task_loss, step):
        loss, outputs = task_loss(model, inputs)
        if self.decayed is None:  # the Trainer decays every matrix weight but biases and norms
            self.decayed = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
        with torch.no_grad():
            value = sum(p.float().pow(2).sum() for p in self.decayed)
        return loss, outputs, Penalty(value=value)

    def describe(self):
        return {"weight_decay": self.strength, "decoupled": True}
