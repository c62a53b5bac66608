"""The ``triton`` kernel family: one autograd Function per site, one kernel launch per pass.

:class:`PlainSite` and :class:`GatedSite` are the sites of :mod:`hf_dreg.ops.functions` with every pass a
kernel of :mod:`hf_dreg.ops.triton_kernels`, called directly (no ``torch.compile`` region, no dynamo
guards, no per-call wrapper): forward, the row statistics (from the dense weight, in the same node) and
the per-position penalty; backward, one kernel for the site's input gradient and the column partials,
one sum of the partials, one kernel for the weight's gradient. The same nodes take row statistics
computed elsewhere instead of a weight, or a LoRA-fed weight's factors: then the statistics come from the
factors (:mod:`hf_dreg.ops.low_rank`'s algebra, the adapter's scaling applied in the kernel) by one more
kernel each way, still inside the site's node, so a site is one autograd node whatever feeds it.

A plain site's node is also the activation's output (as :class:`~hf_dreg.ops.functions.PlainSiteActivation`):
its backward gives z the activation's gradient and the penalty's in one kernel. A gated MLP whose product
f(g) * u is one fused call (Liger Kernel's MLPs) gets that product from the penalty's forward kernel, and
its gradient from the penalty's backward kernel.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from transformers.utils import logging

from . import triton_kernels as tk
from .activations import ActivationSpec
from .formulas import compute_dtype

ROWS = 32  # positions per program in the backward kernels (one partial column sum per program)
FORWARD_BLOCK = 1024  # units per step of a forward program's loop over the m units of its position
BACKWARD_BLOCK = 256  # units per backward program


logger = logging.get_logger(__name__)
_announced = False


def check_device(device: torch.device | str | None) -> None:
    """Triton runs on CUDA (and ROCm/XPU) tensors, or anywhere under ``TRITON_INTERPRET=1``: checked once, at attach.

    The first check of the process also says that the kernels are being compiled: triton compiles each kernel on
    its first launch (seconds, for each activation and dtype) and keeps it in its cache (``~/.triton/cache``), so on
    a machine that has run them they load at once.
    """
    global _announced
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "dreg_kernels='triton' runs on a GPU; on a CPU only under TRITON_INTERPRET=1 (slow: for tests). "
            "Use dreg_kernels='auto' (--dreg_kernels auto; hf_dreg.attach(model, kernels='auto')) on a CPU."
        )
    if not _announced:
        _announced = True
        logger.warning(
            "hf_dreg: compiling the DREG Triton kernels, once per machine (seconds; triton caches them in ~/.triton/cache)."
        )


def _rows(t: Tensor, m: int) -> Tensor:
    """t as (positions, m) with unit stride along m (a view where it can be)."""
    flat = t.reshape(-1, m)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _act(spec: ActivationSpec) -> dict:
    if not spec.kernel:
        raise ValueError(f"the activation {spec.name!r} has no Triton kernel")
    code, k, low, high = spec.kernel
    return {"ACT": code, "K": k, "LOW": low, "HIGH": high}


def _grid_rows(n_rows: int) -> int:
    return max(1, -(-n_rows // ROWS))


# ---- the row statistics ----------------------------------------------------------------------------


def row_stats(w: Tensor) -> Tensor:
    w = _rows(w, w.shape[-1])
    r = torch.empty(w.shape[0], dtype=compute_dtype(w.dtype), device=w.device)
    tk.row_stats_kernel[(w.shape[0],)](w, r, w.stride(0), w.shape[1], BLOCK=tk.block_size(w.shape[1]))
    return r


def row_stats_backward(w: Tensor, grad_r: Tensor) -> Tensor:
    w = _rows(w, w.shape[-1])
    grad_w = torch.empty_like(w)
    block = tk.block_size(w.shape[1])
    grid = (w.shape[0], -(-w.shape[1] // block))
    tk.row_stats_backward_kernel[grid](w, grad_r.contiguous(), grad_w, w.stride(0), grad_w.stride(0), w.shape[1], BLOCK=block)
    return grad_w


def gated_row_stats(w_g: Tensor, w_u: Tensor) -> Tensor:
    """(rg, ru, c) as the rows of one (3, m) tensor: a gated site's statistics travel as one."""
    w_g, w_u = _rows(w_g, w_g.shape[-1]), _rows(w_u, w_u.shape[-1])
    stats = torch.empty((3, w_g.shape[0]), dtype=compute_dtype(w_g.dtype), device=w_g.device)
    block = tk.block_size(w_g.shape[1])
    if w_g.shape[0]:
        tk.gated_row_stats_kernel[(w_g.shape[0],)](w_g, w_u, stats, w_g.stride(0), w_u.stride(0), w_g.shape[1], BLOCK=block)
    return stats


def gated_row_stats_backward(w_g, w_u, grad_stats) -> tuple[Tensor, Tensor]:
    w_g, w_u = _rows(w_g, w_g.shape[-1]), _rows(w_u, w_u.shape[-1])
    grad_g, grad_u = torch.empty_like(w_g), torch.empty_like(w_u)
    block = tk.block_size(w_g.shape[1])
    grid = (w_g.shape[0], -(-w_g.shape[1] // block))
    tk.gated_row_stats_backward_kernel[grid](
        w_g, w_u, _positions(grad_stats), grad_g, grad_u,
        w_g.stride(0), w_u.stride(0), grad_g.stride(0), grad_u.stride(0), w_g.shape[1], BLOCK=block,
    )  # fmt: skip
    return grad_g, grad_u


# ---- the sites' passes -----------------------------------------------------------------------------


def _flat(t: Tensor, m: int) -> tuple[Tensor, int]:
    """(t, or a copy, whose positions are rows of m units at unit stride; the stride between rows). A contiguous
    t is passed as it is: a kernel takes a pointer, no view of it is needed."""
    if t.is_contiguous():
        return t, m
    flat = _rows(t, m)
    return flat, flat.stride(0)


def _positions(t: Tensor) -> Tensor:
    """A per-position tensor (a penalty's gradient: often an expanded scalar) as contiguous values."""
    return t if t.is_contiguous() else t.contiguous()


def plain_forward(s: Tensor, r: Tensor, spec: ActivationSpec) -> Tensor:
    m = s.shape[-1]
    flat, stride = _flat(s, m)
    p = torch.empty(s.shape[:-1], dtype=r.dtype, device=s.device)
    n = p.numel()
    if n:
        tk.plain_forward_kernel[(n,)](flat, r, p, stride, m, **_act(spec), BLOCK=tk.block_size(m, FORWARD_BLOCK))
    return p


def plain_backward(s, r, grad_p, grad_a, z_dtype, spec) -> tuple[Tensor, Tensor]:
    m = s.shape[-1]
    flat, stride = _flat(s, m)
    grad_z = torch.empty(s.shape, dtype=z_dtype, device=s.device)
    n = grad_z.numel() // m if m else 0
    programs = _grid_rows(n)
    part = torch.empty((programs, m), dtype=r.dtype, device=s.device)
    block = tk.block_size(m, BACKWARD_BLOCK)
    ga, stride_ga = _flat(grad_a, m) if grad_a is not None else (flat, stride)  # a placeholder pointer where HAS_GA is off
    tk.plain_backward_kernel[(programs, -(-m // block))](
        flat, r, _positions(grad_p), ga, grad_z, part, n, m, stride, stride_ga, m,
        HAS_GA=grad_a is not None, **_act(spec), ROWS=ROWS, BLOCK=block,
    )  # fmt: skip
    return grad_z, part.sum(0)


def gated_forward(s, u, stats, spec, product: bool) -> tuple[Tensor, Tensor | None]:
    m = s.shape[-1]
    (flat, stride), (uf, stride_u) = _flat(s, m), _flat(u, m)
    p = torch.empty(s.shape[:-1], dtype=stats.dtype, device=s.device)
    h = torch.empty(u.shape, dtype=u.dtype, device=s.device) if product else None
    n = p.numel()
    if n:
        out, stride_h = (h, m) if product else (uf, stride_u)  # a placeholder pointer where HAS_H is off
        tk.gated_forward_kernel[(n,)](
            flat, uf, stats, p, out, stride, stride_u, stride_h, m,
            HAS_H=product, **_act(spec), BLOCK=tk.block_size(m, FORWARD_BLOCK),
        )  # fmt: skip
    return p, h


def gated_backward(s, u, stats, grad_p, grad_h, dtypes, spec):
    m = s.shape[-1]
    (flat, stride), (uf, stride_u) = _flat(s, m), _flat(u, m)
    grad_g = torch.empty(s.shape, dtype=dtypes[0], device=s.device)
    grad_u = torch.empty(u.shape, dtype=dtypes[1], device=s.device)
    n = grad_g.numel() // m if m else 0
    programs = _grid_rows(n)
    part = torch.empty((3, programs, m), dtype=stats.dtype, device=s.device)
    block = tk.block_size(m, BACKWARD_BLOCK)
    gh, stride_gh = _flat(grad_h, m) if grad_h is not None else (uf, stride_u)
    tk.gated_backward_kernel[(programs, -(-m // block))](
        flat, uf, stats, _positions(grad_p), gh, grad_g, grad_u, part, n, m, programs,
        stride, stride_u, stride_gh, m, m,
        HAS_GH=grad_h is not None, **_act(spec), ROWS=ROWS, BLOCK=block,
    )  # fmt: skip
    return grad_g, grad_u, part.sum(1)


# ---- a LoRA-fed site's row statistics, from the factors ---------------------------------------------


LOW_RANK_ROWS = 32  # rows of the weights per program of the low-rank statistics' kernels
LOW_RANK_BLOCK = 64  # columns of the weights per step (forward) and per program (D's gradient)
SPLIT_ROWS = 1024  # D's gradient: a weight with more rows has it summed from parts of this many rows


def _unit_rows(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _low_rank_forward(g0, u0, ug, dg, uu, du, scale_g, scale_u):
    """The row statistics [r] or [rg, ru, c] of :class:`LowRankStats` in one launch, with what their backward
    needs: (statistics, tensors to save, meta)."""
    gated = u0 is not None
    if gated and u0.dtype != g0.dtype:
        u0 = _to(u0, torch.promote_types(g0.dtype, u0.dtype))
        g0 = _to(g0, u0.dtype)
    g0, u0, ug, dg, uu, du = (_unit_rows(t) for t in (g0, u0, ug, dg, uu, du))
    dtype = g0.dtype
    for x in (ug, uu):
        if x is not None and x.dtype != dtype:  # (promote_types is an operator call: only where dtypes differ)
            dtype = torch.promote_types(dtype, x.dtype)
    dtype = compute_dtype(dtype)
    n_rows, n_cols = g0.shape
    ranks = (0 if ug is None else ug.shape[1], 0 if uu is None else uu.shape[1])
    rank_t = ranks[0] + ranks[1]
    device = g0.device
    out = torch.empty((3, n_rows) if gated else n_rows, dtype=dtype, device=device)
    y = torch.empty((n_rows, (2 if gated else 1) * rank_t), dtype=dtype, device=device)
    gm = torch.empty((rank_t, rank_t), dtype=dtype, device=device)
    u0_, ug_, uu_, dg_, du_ = (g0 if x is None else x for x in (u0, ug, uu, dg, du))  # placeholder pointers where absent
    meta = (gated, ranks, float(scale_g), float(scale_u), tk.block_size(rank_t))
    if n_rows:
        tk.low_rank_stats_kernel[(-(-n_rows // LOW_RANK_ROWS),)](
            g0, u0_, ug_, uu_, dg_, du_, out, y, gm, n_rows, n_cols, *ranks, meta[2], meta[3],
            g0.stride(0), u0_.stride(0), ug_.stride(0), uu_.stride(0), dg_.stride(0), du_.stride(0),
            GATED=gated, HAS_G=ug is not None, HAS_U=uu is not None,
            ROWS=LOW_RANK_ROWS, BLOCK_T=meta[4], BLOCK_K=LOW_RANK_BLOCK,
        )  # fmt: skip
    return out, (g0, u0_, ug_, dg_, uu_, du_, y, gm), meta


def _low_rank_backward(saved, meta, grad) -> tuple:
    """(grad ug, grad dg, grad uu, grad du) of :func:`_low_rank_forward` from the statistics' gradient (r's, or
    (rg, ru, c)'s as one (3, n) tensor), in one launch (two where a weight has more than ``SPLIT_ROWS`` rows)."""
    gated, ranks, scale_g, scale_u, block_t = meta
    g0, u0, ug, dg, uu, du, y, gm = saved
    has_g, has_u = ranks[0] > 0, ranks[1] > 0
    n_rows, n_cols = g0.shape
    grad = _positions(grad)
    d_ug, d_uu = (torch.empty_like(ug) if has_g else None), (torch.empty_like(uu) if has_u else None)
    d_dg, d_du = (torch.empty_like(dg) if has_g else None), (torch.empty_like(du) if has_u else None)
    splits = max(1, -(-n_rows // SPLIT_ROWS))
    rows_per_split = -(-n_rows // splits)
    part = torch.empty((splits, ranks[0] + ranks[1], n_cols), dtype=gm.dtype, device=gm.device) if splits > 1 else gm
    row_programs = -(-n_rows // LOW_RANK_ROWS)
    programs = row_programs + splits * -(-n_cols // LOW_RANK_BLOCK)
    outs = [g0 if x is None else x for x in (d_ug, d_uu, d_dg, d_du)]  # placeholder pointers where absent
    if n_rows:
        tk.low_rank_stats_backward_kernel[(programs,)](
            g0, u0, ug, uu, dg, du, y, gm, grad, *outs, part,
            n_rows, n_cols, *ranks, scale_g, scale_u, row_programs, rows_per_split,
            g0.stride(0), u0.stride(0), ug.stride(0), uu.stride(0), dg.stride(0), du.stride(0),
            *(o.stride(0) for o in outs),
            GATED=gated, HAS_G=has_g, HAS_U=has_u, SPLIT=splits > 1,
            ROWS=LOW_RANK_ROWS, BLOCK_T=block_t, BLOCK_K=LOW_RANK_BLOCK,
        )  # fmt: skip
    if splits > 1:
        grad_d = part.sum(0)
        d_dg = _to(grad_d[: ranks[0]], dg.dtype) if has_g else None
        d_du = _to(grad_d[ranks[0] :], du.dtype) if has_u else None
    return d_ug, d_dg, d_uu, d_du


class LowRankStats(torch.autograd.Function):
    """The row statistics of a site's LoRA-fed weights as one node: r (plain) or (rg, ru, c) (gated).

    A site reads n = 1 or 2 weights W_j = B_j + s_j U_j D_j (U_j = ``lora_B``, D_j = ``lora_A``, s_j the
    adapter's scaling; a dense weight has no factors). One kernel each way
    (:func:`~hf_dreg.ops.triton_kernels.low_rank_stats_kernel`): forward, one pass over the frozen bases B_j gives
    their own statistics and Y_j = B_j D^T (D the present D_j stacked), G = D D^T, and the rows' statistics;
    backward, the factors' gradients (D's through Y and G: dY^T B + (V^T dY) D). Kept for backward: the bases
    (parameters), the factors, Y and G: (out, T) and (T, T) tensors, never an (out, in) one. A site's own node
    (``source=LOW_RANK``) runs the same passes inside it, without this node.
    """

    @staticmethod
    def forward(ctx, g0, u0, ug, dg, uu, du, scale_g, scale_u):
        out, saved, ctx.meta = _low_rank_forward(g0, u0, ug, dg, uu, du, scale_g, scale_u)
        ctx.save_for_backward(*saved)
        return tuple(out.unbind(0)) if u0 is not None else out

    @staticmethod
    def backward(ctx, *grads):
        grad = torch.stack(grads) if len(grads) > 1 else grads[0]
        dug, ddg, duu, ddu = _low_rank_backward(ctx.saved_tensors, ctx.meta, grad)
        return None, None, dug, ddg, duu, ddu, None, None


def low_rank_inputs(w_gate, w_up=None) -> tuple:
    """The inputs of :class:`LowRankStats` (and of a site node with ``source=LOW_RANK``) for a site's weights,
    at least one of them :class:`~hf_dreg.ops.low_rank.LowRankRows` with a frozen base."""
    from .low_rank import LowRankRows

    args = []
    for w in (w_gate, w_up):
        if isinstance(w, LowRankRows):
            up, scale = w.up, w.scale
            if scale != 1.0 and torch.float64 in (w.base.dtype, up.dtype):  # a kernel's float argument is a float32
                up, scale = up * scale, 1.0
            args.append((w.base, up, w.down, scale))
        else:
            args.append((w, None, None, 1.0))
    (g0, ug, dg, sg), (u0, uu, du, su) = args
    return (g0, u0, ug, dg, uu, du, sg, su)


def low_rank_stats(w_gate, w_up=None):
    """The row statistics of :func:`low_rank_inputs`' weights as one :class:`LowRankStats` node: r (``w_up``
    None) or (rg, ru, c)."""
    return LowRankStats.apply(*low_rank_inputs(w_gate, w_up))


# ---- the autograd Functions --------------------------------------------------------------------------


WEIGHTS, STATS, LOW_RANK = "weights", "stats", "low_rank"  # what a site node's statistics inputs are


def _stats_forward(source: str, inputs: tuple, gated: bool) -> tuple[Tensor, tuple, object]:
    """A site node's row statistics from its inputs: (the statistics, tensors to save for their backward, meta).
    The statistics are r (m,), or a gated site's (rg, ru, c) as the rows of one (3, m) tensor.

    ``WEIGHTS``: the dense weight(s), the statistics computed here; ``STATS``: the statistics themselves;
    ``LOW_RANK``: :func:`low_rank_inputs` (a LoRA-fed site: the statistics from the factors, in this node)."""
    if source == WEIGHTS:
        return (gated_row_stats(*inputs) if gated else row_stats(inputs[0])), inputs, None
    if source == STATS:
        return (torch.stack(inputs) if gated else inputs[0]), (), None
    return _low_rank_forward(*inputs)


def _stats_backward(source: str, saved: tuple, meta, grad: Tensor, n_inputs: int, gated: bool) -> tuple:
    """The gradients of a site node's statistics inputs from the statistics' gradient (shaped as the statistics)."""
    if source == WEIGHTS:
        return gated_row_stats_backward(*saved, grad) if gated else (row_stats_backward(saved[0], grad),)
    if source == STATS:
        return tuple(grad.unbind(0)) if gated else (grad,)
    dug, ddg, duu, ddu = _low_rank_backward(saved, meta, grad)
    return (None, None, dug, ddg, duu, ddu, *(None for _ in range(n_inputs - 6)))


class PlainSite(torch.autograd.Function):
    """A plain site as one node: p, or (a, p) with ``a`` passed through as the activation's output.

    ``stats`` are the dense weight (``source=WEIGHTS``: the row statistics are computed in this node), the row
    statistics r themselves (``STATS``), or a LoRA-fed weight's :func:`low_rank_inputs` (``LOW_RANK``: r from the
    factors, in this node). Kept for backward: z (or a, as the activation keeps), r, what r's backward needs.
    """

    @staticmethod
    def forward(ctx, z, a, spec, source, with_output, *stats):
        s = (z if spec.saved == "input" else a).detach()
        r, saved, ctx.stats_meta = _stats_forward(source, stats, gated=False)
        p = plain_forward(s, r, spec)
        ctx.save_for_backward(s, r, *saved)
        ctx.spec, ctx.source, ctx.with_output, ctx.z_dtype = spec, source, with_output, z.dtype
        if with_output:
            ctx.set_materialize_grads(False)
            return a, p
        return p

    @staticmethod
    def backward(ctx, *grads):
        grad_a, grad_p = grads if ctx.with_output else (None, grads[0])
        s, r, *saved = ctx.saved_tensors
        n_stats = len(ctx.needs_input_grad) - 5
        if grad_a is None and grad_p is None:
            return (None,) * (5 + n_stats)
        if grad_p is None:  # the penalty was not used (a layer recomputed by gradient checkpointing, eval)
            grad_p = torch.zeros(s.shape[:-1], dtype=r.dtype, device=s.device)
        grad_z, grad_r = plain_backward(s, r, grad_p, grad_a, ctx.z_dtype, ctx.spec)
        stat_grads = (None,) * n_stats
        if any(ctx.needs_input_grad[5:]):
            stat_grads = _stats_backward(ctx.source, saved, ctx.stats_meta, grad_r, n_stats, gated=False)
        return (grad_z, None, None, None, None, *stat_grads)


class GatedSite(torch.autograd.Function):
    """A gated site as one node: p, or (f(g) * u, p) where the gate's product is fused into the site.

    ``stats`` are (W_g, W_u) (``source=WEIGHTS``: the row statistics computed in this node), (rg, ru, c)
    (``STATS``), or :func:`low_rank_inputs` (``LOW_RANK``: LoRA-fed weights, the statistics from the factors in
    this node). Kept for backward: g (or f(g) for activations that keep their output), u, the row statistics
    and what their backward needs.
    """

    @staticmethod
    def forward(ctx, g, a, u, spec, source, product, *stats):
        s = g if spec.saved == "input" or a is None else a  # inputs, saved as they are (neither is an output)
        st, saved, ctx.stats_meta = _stats_forward(source, stats, gated=True)
        p, h = gated_forward(s, u, st, spec, product)
        ctx.save_for_backward(s, u, st, *saved)
        ctx.spec, ctx.source, ctx.product, ctx.dtypes = spec, source, product, (g.dtype, u.dtype)
        if product:
            ctx.set_materialize_grads(False)
            return h, p
        return p

    @staticmethod
    def backward(ctx, *grads):
        grad_h, grad_p = grads if ctx.product else (None, grads[0])
        s, u, st, *saved = ctx.saved_tensors
        n_stats = len(ctx.needs_input_grad) - 6
        if grad_h is None and grad_p is None:
            return (None,) * (6 + n_stats)
        if grad_p is None:
            grad_p = torch.zeros(s.shape[:-1], dtype=st.dtype, device=s.device)
        grad_g, grad_u, grad_st = gated_backward(s, u, st, grad_p, grad_h, ctx.dtypes, ctx.spec)
        stat_grads = (None,) * n_stats
        if any(ctx.needs_input_grad[6:]):
            stat_grads = _stats_backward(ctx.source, saved, ctx.stats_meta, grad_st, n_stats, gated=True)
        return (grad_g, None, grad_u, None, None, None, *stat_grads)


def plain_site(z: Tensor, a: Tensor, stats, spec: ActivationSpec, source: str = WEIGHTS, with_output: bool = True):
    """(a, p) (``with_output``) or p of a plain site: :class:`PlainSite`. ``stats``: the weight, (r,) or
    :func:`low_rank_inputs`, as ``source`` says."""
    stats = (stats,) if isinstance(stats, Tensor) else tuple(stats)
    return PlainSite.apply(z, a, spec, source, with_output, *stats)


def gated_site(g: Tensor, a: Tensor | None, u: Tensor, stats: tuple, spec: ActivationSpec, source: str = WEIGHTS,
               product: bool = False):  # fmt: skip
    """p, or (f(g) * u, p) with ``product``, of a gated site: :class:`GatedSite`."""
    return GatedSite.apply(g, a, u, spec, source, product, *stats)
