"""DREG as a regularizer of the study: the attached penalty, normalised over the whole step."""

from __future__ import annotations

import torch
from transformers.utils import logging

from ..modeling.hooks import DREGHandle
from ..modeling.sites import find_sites
from .base import Penalty, Regularizer

logger = logging.get_logger(__name__)


class DREG(Regularizer):
    """The DREG penalty. The sites are found once (at construction); the hooks that compute the penalty
    are on the model only between ``activate`` and ``deactivate`` (the trainer's train/evaluate/predict)."""

    name = "dreg"
    default_strength = 10**-2.5  # the seed study's fixed strength

    def __init__(self, model, config):
        self.sites = find_sites(model, activations=config.dreg_activation_list, exclude_modules=config.dreg_exclude_modules)
        self.kernels = config.dreg_kernels
        self.log_per_site = config.dreg_log_per_site
        self.handle: DREGHandle | None = None
        self.last_values: dict = {}
        self._warned_missing = False
        logger.info(f"DREG sites (lambda={config.dreg_lambda}): {len(self.sites)}")

    def activate(self, model):
        self.deactivate()
        self.handle = DREGHandle(model, self.sites, kernels=self.kernels)

    def deactivate(self):
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    def compute(self, model, inputs, task_loss, step):
        if self.handle is None:
            raise RuntimeError("DREG is not attached: the trainer attaches it for train(), evaluate() and predict().")
        loss, outputs = task_loss(model, inputs)
        sums = self.handle.site_sums(masks=step.masks)
        names = [site.name for site, _, _ in sums]
        if len(sums) < len(self.sites) and not self._warned_missing and model.training:
            self._warned_missing = True
            missing = sorted({site.name for site in self.sites} - set(names))
            logger.warning(
                f"hf_dreg: {len(missing)} of {len(self.sites)} DREG sites computed nothing in this forward ({missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}): their modules did not run, or the model was patched after DREG "
                "attached (a kernel patch replacing the MLPs' forward). The penalty covers the other sites only."
            )
        if model.training and torch.is_grad_enabled():
            # logged as this micro-batch's share of the step: averaged over the step's micro-batches and
            # processes it is the step's penalty, the one in the loss
            per_site = self.step_normalised(sums, step)
            term = per_site.mean()
            self.last_values = dict(zip(names, per_site.detach()))  # for the finite check at the next logging step
            extra = {f"dreg/{n}": v.detach() for n, v in zip(names, per_site)} if self.log_per_site else {}
            return loss, outputs, Penalty(term=term, value=term.detach(), extra=extra)
        return loss, outputs, Penalty(parts=self.parts_of(sums))

    def parts_of(self, sums) -> dict[str, torch.Tensor]:
        """(sum, count) of every site, under the logged names: the value is sum / count, mean over sites."""
        parts = torch.stack([torch.stack([total for _, total, _ in sums]), torch.stack([count for _, _, count in sums])]).detach()
        named = {self.name: parts}
        if self.log_per_site:
            named.update({f"dreg/{site.name}": parts[:, i : i + 1] for i, (site, _, _) in enumerate(sums)})
        return named

    def value_of_last_forward(self, masks) -> dict[str, torch.Tensor]:
        """The parts (see ``parts_of``) of the model's last forward."""
        return self.parts_of(self.handle.site_sums(masks=masks))

    @staticmethod
    def step_normalised(sums, step):
        """This micro-batch's share of the step's DREG, per site (the penalty is their mean).

        Sites whose positions were counted for the whole step (every micro-batch, every process) are
        divided by that count, times the accumulation steps and processes that the Trainer and DDP
        divide by again; others (positions of no counted kind, e.g. image patches) use their local
        mean, as a classification loss does.
        """
        totals = torch.stack([total for _, total, _ in sums])
        factors, shared = [], {}  # sites of one kind of position (or one count) share their factor
        for site, _, count in sums:
            step_count = step.positions.get(site.mask_key) if site.mask_key else None
            key = ("step", site.mask_key) if step_count is not None else ("local", id(count))
            if key not in shared:
                if step_count is None:
                    shared[key] = 1.0 / count.to(totals.dtype).clamp_min(1)
                else:
                    shared[key] = (step.accumulation_steps * step.processes) / step_count.to(totals.dtype).clamp_min(1)
            factors.append(shared[key])
        return totals * torch.stack(factors)

    def describe(self):
        kinds = sorted({s.kind for s in self.sites})
        return {"sites": len(self.sites), "kinds": kinds, "activations": sorted({s.activation for s in self.sites})}
