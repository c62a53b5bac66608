"""Row statistics of a LoRA layer's weight W = W0 + B A from its factors, without forming W.

A LoRA layer computes ``x @ W0.T + s * (x @ A.T) @ B.T``: its effective weight (rows: (out, in)) is
``W0 + U D`` with ``U = s * B`` (out, R) and ``D = A`` (R, in), the factors of every active adapter
stacked along R. The row statistics DREG needs follow from small products:

    ||W_i||^2        = ||W0_i||^2 + 2 U_i . (W0 D^T)_i + U_i (D D^T) U_i^T
    <Wg_i, Wu_i>     = <G0_i, U0_i> + Ug_i . (U0 Dg^T)_i + Uu_i . (G0 Du^T)_i + Ug_i (Dg Du^T) Uu_i^T

Forming ``W0 + U D`` (what ``peft``'s ``get_delta_weight`` does) costs a dense (out, in) tensor per layer,
kept for the backward when the adapters train; here the backward keeps (out, R) and (R, R) products and
W0 itself (a parameter), and the frozen ``||W0_i||^2`` and ``<G0_i, U0_i>`` carry no gradient. The values
are the same up to rounding (tested against the dense weight in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .formulas import compute_dtype
from .functions import (
    GatedSitePenalty,
    PlainSiteActivation,
    PlainSitePenalty,
    gated_row_stats,
    gated_site_penalty,
    plain_site_penalty,
    row_stats,
)
from .kernels import kernel as _kernel


@dataclass
class LowRankRows:
    """The rows of ``base + scale * up @ down``: ``base`` (out, in), ``up`` (out, R), ``down`` (R, in), ``scale``
    a Python number (a LoRA adapter's scaling, kept apart so that the triton family applies it in its kernels)."""

    base: Tensor
    up: Tensor
    down: Tensor
    scale: float = 1.0

    def chunk(self, index: int, parts: int) -> LowRankRows:
        """The rows of part ``index`` of ``parts`` equal parts (a fused gate/up projection)."""
        return LowRankRows(self.base.chunk(parts, dim=0)[index], self.up.chunk(parts, dim=0)[index], self.down, self.scale)

    def scaled_up(self) -> Tensor:
        """``scale * up``."""
        return self.up if self.scale == 1.0 else self.up * self.scale


def _dtype(*weights) -> torch.dtype:
    dtype = torch.float32
    for w in weights:
        for t in (w.base, w.up) if isinstance(w, LowRankRows) else (w,):
            if t.dtype != dtype:  # (promote_types is an operator call: only where dtypes differ)
                dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def stats_dtype(*weights) -> torch.dtype:
    """The dtype the row statistics of these weights (dense or :class:`LowRankRows`) are computed in."""
    return compute_dtype(_dtype(*weights))


def rows_base(w: Tensor | LowRankRows) -> Tensor:
    """The base weight of :class:`LowRankRows`; a dense weight itself."""
    return w.base if isinstance(w, LowRankRows) else w


def _cross(w0: Tensor, factors: LowRankRows, dtype: torch.dtype) -> Tensor:
    """U_i . (w0 D^T)_i for every row i: W0 in its own dtype (no copy of it is kept), the rest in ``dtype``."""
    projected = w0 @ factors.down.to(w0.dtype).t()
    return (factors.scaled_up().to(dtype) * projected.to(dtype)).sum(-1)


def _inner(a: LowRankRows, b: LowRankRows, dtype: torch.dtype) -> Tensor:
    """U_a,i (D_a D_b^T) U_b,i^T for every row i."""
    gram = a.down.to(dtype) @ b.down.to(dtype).t()
    return ((a.scaled_up().to(dtype) @ gram) * b.scaled_up().to(dtype)).sum(-1)


def weight_row_stats(w: Tensor | LowRankRows, fused: bool = False) -> Tensor:
    """||W_i||^2 for every row i of a weight given dense or as :class:`LowRankRows`."""
    if not isinstance(w, LowRankRows):
        return row_stats(w, fused)
    dtype = compute_dtype(_dtype(w))
    return row_stats(w.base, fused).to(dtype) + 2.0 * _cross(w.base, w, dtype) + _inner(w, w, dtype)


def weight_gated_row_stats(w_gate: Tensor | LowRankRows, w_up: Tensor | LowRankRows, fused: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(||Wg_i||^2, ||Wu_i||^2, <Wg_i, Wu_i>) for weights given dense or as :class:`LowRankRows`."""
    if not isinstance(w_gate, LowRankRows) and not isinstance(w_up, LowRankRows):
        return gated_row_stats(w_gate, w_up, fused)
    dtype = compute_dtype(_dtype(w_gate, w_up))
    g0, u0 = rows_base(w_gate), rows_base(w_up)
    rg, ru, c = (t.to(dtype) for t in gated_row_stats(g0, u0, fused))
    if isinstance(w_gate, LowRankRows):
        rg = rg + 2.0 * _cross(g0, w_gate, dtype) + _inner(w_gate, w_gate, dtype)
        c = c + _cross(u0, w_gate, dtype)
    if isinstance(w_up, LowRankRows):
        ru = ru + 2.0 * _cross(u0, w_up, dtype) + _inner(w_up, w_up, dtype)
        c = c + _cross(g0, w_up, dtype)
    if isinstance(w_gate, LowRankRows) and isinstance(w_up, LowRankRows):
        c = c + _inner(w_gate, w_up, dtype)
    return rg, ru, c


# ---- a LoRA site as one compiled region (see the end of hf_dreg.ops.functions) ------------------------------


def _rows(base, up, down):
    return base if up is None else LowRankRows(base, up, down)


def _factors(w: Tensor | LowRankRows) -> tuple:
    return (w.base, w.scaled_up(), w.down) if isinstance(w, LowRankRows) else (w, None, None)


def _plain_site_activation_low_rank(spec, z, a, base, up, down):
    return PlainSiteActivation.apply(z, a, weight_row_stats(_rows(base, up, down)), spec, False)


def _plain_site_penalty_low_rank(spec, z, a, base, up, down):
    s = (z if spec.saved == "input" else a).detach()
    return PlainSitePenalty.apply(z, weight_row_stats(_rows(base, up, down)), s, a.detach(), spec, False)


def _gated_site_penalty_low_rank(spec, g, a, u, g_base, g_up, g_down, u_base, u_up, u_down):
    rg, ru, c = weight_gated_row_stats(_rows(g_base, g_up, g_down), _rows(u_base, u_up, u_down))
    s = (g if spec.saved == "input" else a).detach()
    return GatedSitePenalty.apply(g, u, rg, ru, c, s, a.detach(), spec, False)


def plain_site_activation_low_rank(z, a, w: LowRankRows, spec, fused: bool = False):
    """(a, p) of a plain site fed by a LoRA layer, its row statistics from the factors, in one compiled region."""

    def penalty_only(z, a, *factors):  # the activation's output stays its own node (its own backward runs)
        return a, plain_site_penalty_low_rank(z, a, _rows(*factors), spec, fused)

    return _kernel(_plain_site_activation_low_rank, spec, fused, penalty_only)(z, a, *_factors(w))


def plain_site_penalty_low_rank(z, a, w: LowRankRows, spec, fused: bool = False):
    """p of a plain site fed by a LoRA layer, its row statistics from the factors, in one compiled region."""

    def parts(z, a, *factors):
        return plain_site_penalty(z, a, weight_row_stats(_rows(*factors), fused), spec, fused)

    return _kernel(_plain_site_penalty_low_rank, spec, fused, parts)(z, a, *_factors(w))


def gated_site_penalty_low_rank(g, a, u, w_g, w_u, spec, fused: bool = False):
    """p of a gated site whose gate and/or up projection is a LoRA layer, in one compiled region."""

    def parts(g, a, u, *factors):
        rows = weight_gated_row_stats(_rows(*factors[:3]), _rows(*factors[3:]), fused)
        return gated_site_penalty(g, a, u, *rows, spec, fused)

    return _kernel(_gated_site_penalty_low_rank, spec, fused, parts)(g, a, u, *_factors(w_g), *_factors(w_u))


__all__ = ["LowRankRows", "rows_base", "stats_dtype", "weight_gated_row_stats", "weight_row_stats"]
