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
        self._last: tuple = ((), None)
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
        training = model.training and torch.is_grad_enabled()
        if training:
            groups = self.handle.site_groups(masks=step.masks)
            names = [site.name for sites, _, _ in groups for site in sites]
        else:
            sums = self.handle.site_sums(masks=step.masks)
            names = [site.name for site, _, _ in sums]
        if len(names) < len(self.sites) and not self._warned_missing and model.training:
            self._warned_missing = True
            missing = sorted({site.name for site in self.sites} - set(names))
            logger.warning(
                f"hf_dreg: {len(missing)} of {len(self.sites)} DREG sites computed nothing in this forward ({missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}): their modules did not run, or the model was patched after DREG "
                "attached (a kernel patch replacing the MLPs' forward). The penalty covers the other sites only."
            )
        if training and not groups:
            raise RuntimeError(
                f"No DREG site computed a value in this forward (of {len(self.sites)} sites found at attach): their modules "
                "did not run, or a patch replaced the MLPs' forward after DREG attached. Patch the model (Liger Kernel, "
                "torch.compile) before building the trainer, or pass dreg_lambda=0 to train without DREG."
            )
        if training:
            # logged as this micro-batch's share of the step: averaged over the step's micro-batches and
            # processes it is the step's penalty, the one in the loss
            per_site = self.step_normalised(groups, step)
            term = per_site.mean()
            self._last = (names, per_site.detach())  # for the finite check at the next logging step
            extra = {f"dreg/{n}": v.detach() for n, v in zip(names, per_site)} if self.log_per_site else {}
            return loss, outputs, Penalty(term=term, value=term.detach(), extra=extra)
        return loss, outputs, Penalty(parts=self.parts_of(sums))

    @property
    def last_values(self) -> dict[str, torch.Tensor]:
        """Every site's share of the step's DREG in the last training forward (the trainer's finite check)."""
        names, values = self._last
        return dict(zip(names, values.unbind(0))) if values is not None else {}

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
    def step_normalised(groups, step):
        """This micro-batch's share of the step's DREG, per site (the penalty is their mean), from the
        handle's :meth:`~hf_dreg.DREGHandle.site_groups`, in their order.

        Sites whose positions were counted for the whole step (every micro-batch, every process) are
        divided by that count, times the accumulation steps and processes that the Trainer and DDP
        divide by again; others (positions of no counted kind, e.g. image patches) use their local
        mean, as a classification loss does.
        """
        shares = []
        for sites, totals, count in groups:  # the sites of a group share their kind of position and count
            step_count = step.positions.get(sites[0].mask_key) if sites[0].mask_key else None
            if step_count is None:
                shares.append(totals / count.to(totals.dtype).clamp_min(1))
            else:
                shares.append(totals * ((step.accumulation_steps * step.processes) / step_count.to(totals.dtype).clamp_min(1)))
        return torch.cat(shares) if len(shares) > 1 else shares[0]

    def describe(self):
        kinds = sorted({s.kind for s in self.sites})
        return {"sites": len(self.sites), "kinds": kinds, "activations": sorted({s.activation for s in self.sites})}
