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

from .penalty import compute_dtype, gated_row_stats, row_stats


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


__all__ = ["LowRankRows", "weight_gated_row_stats", "weight_row_stats"]
