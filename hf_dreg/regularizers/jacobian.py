"""Jacobian regularization (Hoffman et al. 2019): ||d logits / d x||_F^2, mean over examples.

Estimated with ``n_proj`` random unit projections v of the logits: ||J||_F^2 ~ C * mean ||v^T J||^2
(C = number of logits), unbiased; ``exact=True`` sums over the C one-hot projections instead.
The projections are taken with ``create_graph=True`` (double backward).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.utils import logging

from .base import (
    Penalty,
    Regularizer,
    batch_mean_of_squares,
    logits_of,
    model_inputs_with_grad,
    needs_double_backward,
)

logger = logging.get_logger(__name__)


def jacobian_frobenius(logits: Tensor, x: Tensor, n_proj: int = 1, exact: bool = False, generator=None) -> Tensor:
    """Mean over examples of ||d logits_b / d x_b||_F^2 (examples independent, as in a transformer)."""
    flat = logits.reshape(logits.shape[0], -1)
    classes = flat.shape[1]
    if exact:
        projections = [torch.nn.functional.one_hot(torch.full((flat.shape[0],), c), classes).to(flat) for c in range(classes)]
        scale = 1.0
    else:
        projections = []
        for _ in range(n_proj):
            v = torch.randn(flat.shape, generator=generator, device="cpu").to(flat)
            projections.append(v / v.norm(dim=1, keepdim=True))
        scale = classes / n_proj
    total = 0.0
    for i, v in enumerate(projections):
        (jv,) = torch.autograd.grad(flat, x, grad_outputs=v, create_graph=True, retain_graph=True)
        total = total + batch_mean_of_squares(jv)
    return scale * total


class Jacobian(Regularizer):
    name = "jacobian"
    default_strength = 0.01
    needs_outputs = True

    @classmethod
    def build(cls, model, config, seed: int = 0) -> "Jacobian":
        return cls(model, config, seed=seed)

    def __init__(self, model, args, seed: int = 0):
        needs_double_backward(model, self.name, logger)
        self.n_proj = args.jacobian_n_proj
        self.exact = args.jacobian_exact
        self.generator = torch.Generator().manual_seed(seed)

    def compute(self, model, inputs, task_loss, step):
        if not (model.training and torch.is_grad_enabled()):
            loss, outputs = task_loss(model, inputs)
            return loss, outputs, Penalty()
        inputs, x = model_inputs_with_grad(model, inputs)
        loss, outputs = task_loss(model, inputs)
        value = jacobian_frobenius(logits_of(outputs), x, self.n_proj, self.exact, self.generator)
        return loss, outputs, Penalty(term=value, value=value.detach())

    def describe(self):
        return {"n_proj": self.n_proj, "exact": self.exact}
