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


def stats_dtype(*weights) -> torch.dtype:
    """The dtype the row statistics of these weights (dense or :class:`LowRankRows`) are computed in."""
    return compute_dtype(_dtype(*weights))


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


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class LowRankStats(torch.autograd.Function):
    """The row statistics of a site's LoRA-fed weights as one node, as Gram matrices of stacked rows.

    A site reads n weights (1: plain, 2: gated), each a frozen base B_j plus, optionally, factors U_j (out, R_j),
    D_j (R_j, in). With D the present factors' D_j stacked (Rt, in) and V_j the U_j placed at their own columns
    of Rt (zeros elsewhere), W_j = B_j + V_j D, and per row i the (n, n) Gram matrix of the rows W_j,i is

        Gram_i = B_i + V_i Y_i^T + Y_i V_i^T + V_i (D D^T) V_i^T,     Y_j,i = (B_j D^T)_i,

    where B_i is the bases' own Gram matrix (``base_gram``, (out, n, n), no gradient: computed once per version
    of the frozen bases). Every step is a few batched products, forward and backward (the statistics' gradient
    Gamma_i as a symmetric (n, n) matrix: dV = 2 Gamma (Y + V G), dY = 2 Gamma V, dG = sum V^T Gamma V). The
    products ``B_j D^T`` are taken in the bases' dtype (no copy of a base), the rest in ``base_gram``'s. Returns
    r (plain) or (rg, ru, c) (gated), each contiguous; saves (out, n, Rt) tensors, never an (out, in) one.
    """

    @staticmethod
    def forward(ctx, base_gram, g0, ug, dg, u0, uu, du):
        dtype = base_gram.dtype
        bases = (g0,) if u0 is None else (g0, u0)
        factors = [(j, u, d) for j, (u, d) in enumerate(((ug, dg), (uu, du))[: len(bases)]) if u is not None]
        n, out = len(bases), g0.shape[0]
        D = _to(factors[0][2] if len(factors) == 1 else torch.cat([_to(d, dtype) for _, _, d in factors]), dtype)
        if n == 1:
            V = _to(ug, dtype).unsqueeze(1)  # (out, 1, R)
        else:
            V = D.new_zeros((out, n, D.shape[0]))
            offset = 0
            for j, u, _ in factors:
                V[:, j, offset : offset + u.shape[1]] = u
                offset += u.shape[1]
        Y = torch.stack([_to(b @ _to(D, b.dtype).t(), dtype) for b in bases], 1)  # (out, n, Rt)
        G = D @ D.t()
        VG = V @ G
        VY = torch.bmm(V, Y.transpose(1, 2))
        gram = base_gram + VY + VY.transpose(1, 2) + torch.bmm(VG, V.transpose(1, 2))
        ctx.save_for_backward(V, Y, VG, D, *bases)
        ctx.factors = [(j, u.shape[1], u.dtype, d.dtype) for j, u, d in factors]
        if n == 1:
            return gram.view(out)
        stats = gram.view(out, 4).t().contiguous()
        return stats[0], stats[3], stats[1]

    @staticmethod
    def backward(ctx, *grads):
        V, Y, VG, D, *bases = ctx.saved_tensors
        out, n, rt = V.shape
        if n == 1:
            gamma2 = (2.0 * grads[0]).view(out, 1, 1)
        else:
            grg, gru, gc = grads
            gamma2 = torch.stack([2.0 * grg, gc, gc, 2.0 * gru], 1).view(out, 2, 2)  # 2 Gamma
        grad_V = torch.bmm(gamma2, Y + VG)
        grad_Y = torch.bmm(gamma2, V)
        grad_D = (V.reshape(-1, rt).t() @ grad_Y.reshape(-1, rt)) @ D  # through D D^T: 2 dG D
        for j, b in enumerate(bases):  # through Y_j = B_j D^T
            grad_D = grad_D + _to(_to(grad_Y[:, j].t(), b.dtype) @ b, D.dtype)
        grad_u, grad_d = {}, {}
        offset = 0
        for j, rank, u_dtype, d_dtype in ctx.factors:
            grad_u[j] = _to(grad_V[:, j, offset : offset + rank], u_dtype)
            grad_d[j] = _to(grad_D[offset : offset + rank], d_dtype)
            offset += rank
        return None, None, grad_u.get(0), grad_d.get(0), None, grad_u.get(1), grad_d.get(1)


def base_gram(stats: tuple[Tensor, ...]) -> Tensor:
    """The bases' own Gram matrices (out, n, n) from their row statistics: (r,) or (rg, ru, c)."""
    if len(stats) == 1:
        return stats[0].view(-1, 1, 1)
    rg, ru, c = stats
    return torch.stack([rg, c, c, ru], 1).view(-1, 2, 2)


def bases_gram(w_gate, w_up=None, plain_stats=row_stats, gated_stats=gated_row_stats) -> Tensor:
    """The frozen bases' own Gram matrices (:func:`base_gram`) in the statistics' dtype, no gradient: the bases'
    row statistics from ``plain_stats`` (one weight) or ``gated_stats`` (two; the triton family passes its kernels)."""
    g0 = _base(w_gate)
    dtype = stats_dtype(w_gate, *(() if w_up is None else (w_up,)))
    with torch.no_grad():
        stats = (plain_stats(g0),) if w_up is None else gated_stats(g0, _base(w_up))
        return base_gram(tuple(t.to(dtype) for t in stats))


def low_rank_stats(w_gate, w_up=None, gram=None):
    """:func:`weight_row_stats` (``w_up`` None) or :func:`weight_gated_row_stats` as one :class:`LowRankStats`
    node. The bases must carry no gradient; ``gram``, their own Gram matrices (:func:`bases_gram`), is computed
    when not given."""
    g0, u0 = _base(w_gate), None if w_up is None else _base(w_up)
    if gram is None:
        gram = bases_gram(w_gate, w_up)
    ug, dg = (w_gate.up, w_gate.down) if isinstance(w_gate, LowRankRows) else (None, None)
    uu, du = (w_up.up, w_up.down) if isinstance(w_up, LowRankRows) else (None, None)
    return LowRankStats.apply(gram, g0, ug, dg, u0, uu, du)


__all__ = ["LowRankRows", "base_gram", "bases_gram", "low_rank_stats", "stats_dtype", "weight_gated_row_stats", "weight_row_stats"]
