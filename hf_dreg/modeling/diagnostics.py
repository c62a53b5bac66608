"""Measurements of what a regularizer does: its gradient against the task's, and where DREG's pressure goes."""

from __future__ import annotations

import torch

from .hooks import attach


@torch.no_grad()
def per_site_dreg(model, batches, handle=None, activations="gelu", exclude_modules=None) -> dict[str, float]:
    """Per-site DREG value (padding excluded) over ``batches`` (dicts of model inputs, labels allowed).

    Uses ``handle`` if given, else attaches a temporary one (so it also measures models trained
    without DREG) and detaches it afterwards.
    """
    own = handle is None or not handle.attached
    if own:
        handle = attach(model, activations=activations, exclude_modules=exclude_modules)
    sums: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
            model(**inputs)
            for site, total, count in handle.site_sums():
                entry = sums.setdefault(site.name, [0.0, 0.0])
                entry[0] += float(total)
                entry[1] += float(count)
    finally:
        model.train(was_training)
        if own:
            handle.detach()
    return {name: total / max(count, 1.0) for name, (total, count) in sums.items()}


def gradient_norms(task_loss: torch.Tensor, term: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(||d task_loss / d params||, ||d term / d params||) over ``params``, keeping the graph for backward.

    Two extra backward passes of this micro-batch: the cost of one measurement.
    """
    def norm(value):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=value.device)

    return norm(task_loss), norm(term)
