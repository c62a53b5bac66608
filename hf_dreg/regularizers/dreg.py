"""DREG as a regularizer of the study: the attached penalty, normalised over the whole step."""

from __future__ import annotations

import torch
from transformers.utils import logging

from ..attach import attach, check_finite
from .base import Penalty, Regularizer

logger = logging.get_logger(__name__)


class DREG(Regularizer):
    name = "dreg"

    def __init__(self, model, args):
        self.handle = attach(
            model, activations=args.dreg_activation_list, exclude_modules=args.dreg_exclude_modules, fused=args.dreg_fused
        )
        self.log_per_site = args.dreg_log_per_site
        logger.info(f"DREG attached (lambda={args.reg_lambda}): {self.handle}")

    def compute(self, model, inputs, task_loss, step):
        loss, outputs = task_loss(model, inputs)
        sums = self.handle.site_sums()
        local = torch.stack([total / count.clamp_min(1) for _, total, count in sums])
        names = [site.name for site, _, _ in sums]
        extra = {f"dreg/{n}": v.detach() for n, v in zip(names, local)} if self.log_per_site else {}
        term = None
        if model.training and torch.is_grad_enabled():
            term = self.step_normalised(sums, step)
            check_finite(term, dict(zip(names, local)))
        return loss, outputs, Penalty(term=term, value=local.mean().detach(), extra=extra)

    @staticmethod
    def step_normalised(sums, step):
        """This micro-batch's share of the step's DREG.

        Sites whose mask was counted for the whole step are divided by the step's count of valid
        positions, times the accumulation steps and processes that the Trainer and DDP divide by
        again; others (no mask: every position valid) use their local mean, as the task loss does.
        """
        terms = []
        for site, total, count in sums:
            step_count = step.positions.get(site.mask_key) if site.mask_key else None
            if step_count is None:
                terms.append(total / count.clamp_min(1))
            else:
                terms.append(total * (step.accumulation_steps * step.processes) / step_count.clamp_min(1))
        return torch.stack(terms).mean()

    def describe(self):
        sites = self.handle.sites
        kinds = sorted({s.kind for s in sites})
        return {"sites": len(sites), "kinds": kinds, "activations": sorted({s.activation for s in sites})}
