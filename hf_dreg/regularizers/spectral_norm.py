"""Spectral-norm penalty (Yoshida & Miyato 2017) on the Linears that feed DREG's sites.

penalty = sum over layers of sigma_max(W)^2, with sigma_max estimated by persistent power
iteration (``power_iterations`` steps per training step; the vectors live in this object, not in
the state dict). The gradient of sigma = u^T W v is u v^T, exactly as in the paper.

``mode="normalize"`` instead divides each weight by its spectral norm (torch's spectral_norm
parametrization). That rescales the weights, so it is for models trained from scratch only:
it is refused on a pretrained checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils import parametrizations

from ..modeling.layers import weight_rows
from ..modeling.sites import find_sites
from .base import Penalty, Regularizer


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm().clamp_min(1e-12)


class PowerIteration:
    """sigma_max of one weight, with its singular vectors kept between calls."""

    def __init__(self, rows: int, generator: torch.Generator, device, dtype):
        self.u = _normalize(torch.randn(rows, generator=generator).to(device=device, dtype=dtype))
        self.v = None

    def sigma(self, w: Tensor, iterations: int = 1) -> Tensor:
        """u^T W v, differentiable in W only, after ``iterations`` power steps from the kept vectors.

        ``iterations=0`` reuses the vectors of the last step, so every micro-batch of one optimizer
        step sees the same estimate.
        """
        with torch.no_grad():
            w_ = w.detach()
            if iterations or self.v is None:
                u = self.u.to(w_.dtype)
                v = _normalize(w_.t() @ u)
                for _ in range(iterations):
                    u = _normalize(w_ @ v)
                    v = _normalize(w_.t() @ u)
                self.u, self.v = u, v
        return self.u @ (w @ self.v)


class SpectralNorm(Regularizer):
    name = "spectral_norm"
    default_strength = 0.01

    @classmethod
    def build(cls, model, config, seed: int = 0) -> "SpectralNorm":
        pretrained = bool(getattr(getattr(model, "config", None), "_name_or_path", ""))
        return cls(model, config, pretrained=pretrained, seed=seed)

    def __init__(self, model, args, pretrained: bool, seed: int = 0):
        self.mode = args.spectral_mode
        self.iterations = args.spectral_power_iterations
        sites = find_sites(model, activations=args.dreg_activation_list, exclude_modules=args.dreg_exclude_modules)
        paths = list(dict.fromkeys(path for site in sites for path in site.inputs))
        modules = dict(model.named_modules())
        self.layers = {path: modules[path] for path in paths}
        if self.mode == "normalize":
            if pretrained:
                raise ValueError(
                    "spectral_mode='normalize' rescales every MLP weight to spectral norm 1, which destroys a "
                    "pretrained checkpoint. Use it only for models trained from scratch, or use "
                    "spectral_mode='penalty' (the default) to fine-tune."
                )
            for module in self.layers.values():
                parametrizations.spectral_norm(module, n_power_iterations=self.iterations)
            return
        generator = torch.Generator().manual_seed(seed)
        self._last_step = None
        self.power = {}
        for path, module in self.layers.items():
            w = weight_rows(module)
            self.power[path] = PowerIteration(w.shape[0], generator, w.device, torch.float32)

    def compute(self, model, inputs, task_loss, step):
        loss, outputs = task_loss(model, inputs)
        if self.mode == "normalize":
            return loss, outputs, Penalty()
        training = model.training and torch.is_grad_enabled()
        first_of_step = training and step.optimizer_step != self._last_step
        self._last_step = step.optimizer_step if training else self._last_step
        total = 0.0
        for path, module in self.layers.items():
            sigma = self.power[path].sigma(weight_rows(module).float(), self.iterations if first_of_step else 0)
            total = total + sigma**2
        return loss, outputs, Penalty(term=total if training else None, value=total.detach())

    def describe(self):
        return {"spectral_mode": self.mode, "power_iterations": self.iterations, "layers": list(self.layers)}
