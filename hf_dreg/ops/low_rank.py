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
    """The rows of ``base + up @ down``: ``base`` (out, in), ``up`` (out, R), ``down`` (R, in)."""

    base: Tensor
    up: Tensor
    down: Tensor

    def chunk(self, index: int, parts: int) -> LowRankRows:
        """The rows of part ``index`` of ``parts`` equal parts (a fused gate/up projection)."""
        return LowRankRows(self.base.chunk(parts, dim=0)[index], self.up.chunk(parts, dim=0)[index], self.down)


def _dtype(*weights) -> torch.dtype:
    dtype = torch.float32
    for w in weights:
        if isinstance(w, LowRankRows):
            dtype = torch.promote_types(dtype, torch.promote_types(w.base.dtype, w.up.dtype))
        else:
            dtype = torch.promote_types(dtype, w.dtype)
    return dtype


def _base(w: Tensor | LowRankRows) -> Tensor:
    return w.base if isinstance(w, LowRankRows) else w


def _cross(w0: Tensor, factors: LowRankRows, dtype: torch.dtype) -> Tensor:
    """U_i . (w0 D^T)_i for every row i: W0 in its own dtype (no copy of it is kept), the rest in ``dtype``."""
    projected = w0 @ factors.down.to(w0.dtype).t()
    return (factors.up.to(dtype) * projected.to(dtype)).sum(-1)


def _inner(a: LowRankRows, b: LowRankRows, dtype: torch.dtype) -> Tensor:
    """U_a,i (D_a D_b^T) U_b,i^T for every row i."""
    gram = a.down.to(dtype) @ b.down.to(dtype).t()
    return ((a.up.to(dtype) @ gram) * b.up.to(dtype)).sum(-1)


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
    g0, u0 = _base(w_gate), _base(w_up)
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
    return (w.base, w.up, w.down) if isinstance(w, LowRankRows) else (w, None, None)


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




# ---- LoRA row statistics as one node (the triton family) -------------------------------------------------


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


class LowRankStats(torch.autograd.Function):
    """The row statistics of LoRA-fed weights as one autograd node with a hand-written backward.

    Each weight is a frozen base W0 plus, optionally, its factors U (out, R) and D (R, in) (see
    :class:`LowRankRows`); ``base_stats`` are the bases' own statistics, (||W0_i||^2,) for a plain site,
    (||G0_i||^2, ||U0_i||^2, <G0_i, U0_i>) for a gated one, which carry no gradient (computed once per
    version of the frozen bases). Returns r, or (rg, ru, c): the formulas of this module's docstring, with
    the products ``W0 D^T`` in the bases' dtype as there, the rest in the statistics' dtype. Saves the
    factors and the (out, R) products for backward, never an (out, in) tensor.
    """

    @staticmethod
    def forward(ctx, base_stats, g0, ug, dg, u0, uu, du):
        dtype = base_stats[0].dtype
        gated = u0 is not None

        def proj(w0, d):  # (w0 D^T) in w0's dtype, as _cross computes it
            return (w0 @ d.to(w0.dtype).t()).to(dtype)

        Ug, Dg = (ug.to(dtype), dg.to(dtype)) if ug is not None else (None, None)
        Uu, Du = (uu.to(dtype), du.to(dtype)) if uu is not None else (None, None)
        rg = base_stats[0]
        saved = {}
        if Ug is not None and not (gated and Uu is not None):
            saved["Pgg"], saved["UgGgg"] = proj(g0, dg), Ug @ (Dg @ Dg.t())
            rg = rg + 2.0 * _dot_rows(Ug, saved["Pgg"]) + _dot_rows(saved["UgGgg"], Ug)
        ctx.gated, ctx.dtypes = gated, (g0.dtype, None if ug is None else ug.dtype, None if uu is None else uu.dtype)
        ctx.both = gated and ug is not None and uu is not None
        ctx.has = (Ug is not None, Uu is not None)
        if not gated:
            ctx.save_for_backward(g0, Ug, Dg, saved.get("Pgg"), saved.get("UgGgg"))
            return rg
        ru, c = base_stats[1], base_stats[2]
        if Ug is not None and Uu is not None:  # both factored: the two weights' factors stacked, 5 products each way
            return LowRankStats._both_forward(ctx, rg, ru, c, g0, u0, Ug, Uu, dg, du, proj)
        if Uu is not None:
            saved["Puu"], saved["UuGuu"] = proj(u0, du), Uu @ (Du @ Du.t())
            ru = ru + 2.0 * _dot_rows(Uu, saved["Puu"]) + _dot_rows(saved["UuGuu"], Uu)
            saved["Pgu"] = proj(g0, du)
            c = c + _dot_rows(Uu, saved["Pgu"])
        if Ug is not None:
            saved["Pug"] = proj(u0, dg)
            c = c + _dot_rows(Ug, saved["Pug"])
        names = ("Pgg", "UgGgg", "Puu", "UuGuu", "Pgu", "Pug")
        ctx.save_for_backward(g0, u0, Ug, Dg, Uu, Du, *(saved.get(n) for n in names))
        return rg, ru, c

    @staticmethod
    def _both_forward(ctx, rg, ru, c, g0, u0, Ug, Uu, dg, du, proj):
        """D = [Dg; Du], U = [Ug | Uu]: Pg = G0 D^T = [Pgg | Pgu], Pu = U0 D^T = [Pug | Puu], and the blocks
        of D D^T, as five products (the two weights' own and cross terms in each)."""
        k = Ug.shape[1]
        D = torch.cat([dg, du]).to(Ug.dtype)
        Pg, Pu = proj(g0, D), proj(u0, D)
        gram = D @ D.t()
        UgG, UuG = Ug @ gram[:k], Uu @ gram[k:]  # [Ug Ggg | Ug Ggu], [Uu Gug | Uu Guu]
        rg = rg + 2.0 * _dot_rows(Ug, Pg[:, :k]) + _dot_rows(UgG[:, :k], Ug)
        ru = ru + 2.0 * _dot_rows(Uu, Pu[:, k:]) + _dot_rows(UuG[:, k:], Uu)
        c = c + _dot_rows(Ug, Pu[:, :k]) + _dot_rows(Uu, Pg[:, k:]) + _dot_rows(UgG[:, k:], Uu)
        ctx.save_for_backward(g0, u0, Ug, Uu, D, Pg, Pu, UgG, UuG)
        ctx.rank = k
        return rg, ru, c

    @staticmethod
    def _both_backward(ctx, grad_rg, grad_ru, grad_c):
        g0, u0, Ug, Uu, D, Pg, Pu, UgG, UuG = ctx.saved_tensors
        k = ctx.rank
        grg, gru, gc = (g.unsqueeze(-1) for g in (grad_rg, grad_ru, grad_c))
        grad_ug = 2.0 * grg * (Pg[:, :k] + UgG[:, :k]) + gc * (Pu[:, :k] + UuG[:, :k])
        grad_uu = 2.0 * gru * (Pu[:, k:] + UuG[:, k:]) + gc * (Pg[:, k:] + UgG[:, k:])
        A_g = torch.cat([2.0 * grg * Ug, gc * Uu], dim=1)  # D's gradient through G0: rows of Dg, then of Du
        A_u = torch.cat([gc * Ug, 2.0 * gru * Uu], dim=1)  # ... and through U0
        M = torch.cat([Ug.t() @ A_g, Uu.t() @ A_u])  # through D D^T
        grad_D = (A_g.t().to(g0.dtype) @ g0).to(D.dtype) + (A_u.t().to(u0.dtype) @ u0).to(D.dtype) + M @ D
        return None, None, grad_ug.to(ctx.dtypes[1]), grad_D[:k], None, grad_uu.to(ctx.dtypes[2]), grad_D[k:]

    @staticmethod
    def backward(ctx, *grads):
        has_g, has_u = ctx.has
        if not ctx.gated:
            g0, Ug, Dg, Pgg, UgGgg = ctx.saved_tensors
            k = 2.0 * grads[0].unsqueeze(-1)
            grad_ug = k * (Pgg + UgGgg)
            kU = k * Ug
            grad_dg = (kU.t().to(g0.dtype) @ g0).to(Dg.dtype) + (kU.t() @ Ug) @ Dg
            return None, None, grad_ug.to(ctx.dtypes[1]), grad_dg, None, None, None
        if ctx.both:
            return LowRankStats._both_backward(ctx, *grads)
        g0, u0, Ug, Dg, Uu, Du, Pgg, UgGgg, Puu, UuGuu, Pgu, Pug = ctx.saved_tensors  # one of the two factored
        grg, gru, gc = (g.unsqueeze(-1) for g in grads)
        grad_ug = grad_dg = grad_uu = grad_du = None
        if has_g:
            grad_ug = 2.0 * grg * (Pgg + UgGgg) + gc * Pug
            a, b = 2.0 * grg * Ug, gc * Ug  # row weights of Dg's gradient: through g0 and through u0
            grad_dg = (a.t().to(g0.dtype) @ g0).to(Dg.dtype) + (a.t() @ Ug) @ Dg + (b.t().to(u0.dtype) @ u0).to(Dg.dtype)
        if has_u:
            grad_uu = 2.0 * gru * (Puu + UuGuu) + gc * Pgu
            a, b = 2.0 * gru * Uu, gc * Uu
            grad_du = (a.t().to(u0.dtype) @ u0).to(Du.dtype) + (a.t() @ Uu) @ Du + (b.t().to(g0.dtype) @ g0).to(Du.dtype)
        grad_ug = None if grad_ug is None else grad_ug.to(ctx.dtypes[1])
        grad_uu = None if grad_uu is None else grad_uu.to(ctx.dtypes[2])
        return None, None, grad_ug, grad_dg, None, grad_uu, grad_du


def low_rank_stats(w_gate, w_up=None, base_stats=None):
    """:func:`weight_row_stats` (``w_up`` None) or :func:`weight_gated_row_stats` as one :class:`LowRankStats`
    node. The bases must carry no gradient; ``base_stats`` (their own statistics) are computed when not given."""
    g0, u0 = _base(w_gate), None if w_up is None else _base(w_up)
    if base_stats is None:
        with torch.no_grad():
            base_stats = (row_stats(g0),) if w_up is None else gated_row_stats(g0, u0)
    ug, dg = (w_gate.up, w_gate.down) if isinstance(w_gate, LowRankRows) else (None, None)
    uu, du = (w_up.up, w_up.down) if isinstance(w_up, LowRankRows) else (None, None)
    dtype = compute_dtype(_dtype(w_gate, *(() if w_up is None else (w_up,))))
    base_stats = tuple(t.to(dtype) for t in base_stats)
    return LowRankStats.apply(base_stats, g0, ug, dg, u0, uu, du)


__all__ = ["LowRankRows", "low_rank_stats", "weight_gated_row_stats", "weight_row_stats"]
