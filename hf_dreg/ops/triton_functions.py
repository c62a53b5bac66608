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


def gated_row_stats(w_g: Tensor, w_u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    w_g, w_u = _rows(w_g, w_g.shape[-1]), _rows(w_u, w_u.shape[-1])
    dtype = compute_dtype(w_g.dtype)
    rg, ru, c = (torch.empty(w_g.shape[0], dtype=dtype, device=w_g.device) for _ in range(3))
    block = tk.block_size(w_g.shape[1])
    tk.gated_row_stats_kernel[(w_g.shape[0],)](w_g, w_u, rg, ru, c, w_g.stride(0), w_u.stride(0), w_g.shape[1], BLOCK=block)
    return rg, ru, c


def gated_row_stats_backward(w_g, w_u, grad_rg, grad_ru, grad_c) -> tuple[Tensor, Tensor]:
    w_g, w_u = _rows(w_g, w_g.shape[-1]), _rows(w_u, w_u.shape[-1])
    grad_g, grad_u = torch.empty_like(w_g), torch.empty_like(w_u)
    block = tk.block_size(w_g.shape[1])
    grid = (w_g.shape[0], -(-w_g.shape[1] // block))
    tk.gated_row_stats_backward_kernel[grid](
        w_g, w_u, grad_rg.contiguous(), grad_ru.contiguous(), grad_c.contiguous(), grad_g, grad_u,
        w_g.stride(0), w_u.stride(0), grad_g.stride(0), grad_u.stride(0), w_g.shape[1], BLOCK=block,
    )  # fmt: skip
    return grad_g, grad_u


# ---- the sites' passes -----------------------------------------------------------------------------


def plain_forward(s: Tensor, r: Tensor, spec: ActivationSpec) -> Tensor:
    m = s.shape[-1]
    flat = _rows(s, m)
    p = torch.empty(flat.shape[0], dtype=r.dtype, device=s.device)
    if flat.shape[0]:
        tk.plain_forward_kernel[(flat.shape[0],)](flat, r, p, flat.stride(0), m, **_act(spec), BLOCK=tk.block_size(m, FORWARD_BLOCK))
    return p.reshape(s.shape[:-1])


def plain_backward(s, r, grad_p, grad_a, z_dtype, spec) -> tuple[Tensor, Tensor]:
    m = s.shape[-1]
    flat = _rows(s, m)
    n = flat.shape[0]
    grad_z = torch.empty((n, m), dtype=z_dtype, device=s.device)
    programs = _grid_rows(n)
    part = torch.empty((programs, m), dtype=r.dtype, device=s.device)
    block = tk.block_size(m, BACKWARD_BLOCK)
    ga = _rows(grad_a, m) if grad_a is not None else flat  # a placeholder pointer where HAS_GA is off
    tk.plain_backward_kernel[(programs, -(-m // block))](
        flat, r, grad_p.reshape(-1).contiguous(), ga, grad_z, part, n, m, flat.stride(0), ga.stride(0), grad_z.stride(0),
        HAS_GA=grad_a is not None, **_act(spec), ROWS=ROWS, BLOCK=block,
    )  # fmt: skip
    return grad_z.reshape(s.shape), part.sum(0)


def gated_forward(s, u, rg, ru, c, spec, product: bool) -> tuple[Tensor, Tensor | None]:
    m = s.shape[-1]
    flat, uf = _rows(s, m), _rows(u, m)
    n = flat.shape[0]
    p = torch.empty(n, dtype=rg.dtype, device=s.device)
    h = torch.empty((n, m), dtype=u.dtype, device=s.device) if product else None
    if n:
        out = h if product else uf  # a placeholder pointer where HAS_H is off
        tk.gated_forward_kernel[(n,)](
            flat, uf, rg, ru, c, p, out, flat.stride(0), uf.stride(0), out.stride(0), m,
            HAS_H=product, **_act(spec), BLOCK=tk.block_size(m, FORWARD_BLOCK),
        )  # fmt: skip
    return p.reshape(s.shape[:-1]), (h.reshape(u.shape) if product else None)


def gated_backward(s, u, rg, ru, c, grad_p, grad_h, dtypes, spec):
    m = s.shape[-1]
    flat, uf = _rows(s, m), _rows(u, m)
    n = flat.shape[0]
    grad_g = torch.empty((n, m), dtype=dtypes[0], device=s.device)
    grad_u = torch.empty((n, m), dtype=dtypes[1], device=s.device)
    programs = _grid_rows(n)
    part = torch.empty((3, programs, m), dtype=rg.dtype, device=s.device)
    block = tk.block_size(m, BACKWARD_BLOCK)
    gh = _rows(grad_h, m) if grad_h is not None else uf
    tk.gated_backward_kernel[(programs, -(-m // block))](
        flat, uf, rg, ru, c, grad_p.reshape(-1).contiguous(), gh, grad_g, grad_u, part, n, m, programs,
        flat.stride(0), uf.stride(0), gh.stride(0), grad_g.stride(0), grad_u.stride(0),
        HAS_GH=grad_h is not None, **_act(spec), ROWS=ROWS, BLOCK=block,
    )  # fmt: skip
    grad_rg, grad_ru, grad_c = part.sum(1).unbind(0)
    return grad_g.reshape(s.shape), grad_u.reshape(u.shape), grad_rg, grad_ru, grad_c


# ---- a LoRA-fed site's row statistics, from the factors ---------------------------------------------


LOW_RANK_ROWS = 32  # rows of the weights per program of the low-rank statistics' kernels


def _unit_rows(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _low_rank_forward(g0, u0, ug, dg, uu, du, scale_g, scale_u, *base_stats):
    """The row statistics [r] or [rg, ru, c] of :class:`LowRankStats`, with what their backward needs:
    (statistics, tensors to save, meta)."""
    dtype = base_stats[0].dtype
    bases = (g0,) if u0 is None else (g0, u0)
    downs = [d for d in (dg, du) if d is not None]
    D = _to(downs[0], dtype) if len(downs) == 1 else torch.cat([_to(d, dtype) for d in downs])
    dt = _to(D, g0.dtype).t()
    ys = [torch.mm(b, dt if b.dtype == g0.dtype else _to(D, b.dtype).t()) for b in bases]  # (out, T), in the bases' dtype
    G = torch.mm(D, D.t())
    ug, uu = _unit_rows(ug), _unit_rows(uu)
    n_rows, gated = g0.shape[0], u0 is not None
    out = [torch.empty(n_rows, dtype=dtype, device=g0.device) for _ in range(3 if gated else 1)]
    yu, ru, c = (ys[1], out[1], out[2]) if gated else (ys[0], out[0], out[0])  # placeholders where not gated
    s0u, s0c = (base_stats[1], base_stats[2]) if gated else (base_stats[0], base_stats[0])
    ranks = (0 if ug is None else ug.shape[1], 0 if uu is None else uu.shape[1])
    flags = dict(GATED=gated, HAS_G=ug is not None, HAS_U=uu is not None)
    factors = (ys[0] if ug is None else ug, ys[0] if uu is None else uu)  # placeholder pointers where absent
    if n_rows:
        tk.low_rank_stats_kernel[(-(-n_rows // LOW_RANK_ROWS),)](
            ys[0], yu, *factors, G, base_stats[0], s0u, s0c, out[0], ru, c,
            n_rows, D.shape[0], *ranks, float(scale_g), float(scale_u),
            ys[0].stride(0), yu.stride(0), factors[0].stride(0), factors[1].stride(0),
            **flags, ROWS=LOW_RANK_ROWS, BLOCK_T=tk.block_size(D.shape[0]),
        )  # fmt: skip
    meta = (gated, ranks, (scale_g, scale_u), flags, tuple(None if d is None else d.dtype for d in (dg, du)))
    return out, (*bases, ug, uu, D, G, *ys), meta


def _low_rank_backward(saved, meta, grads) -> tuple:
    """(grad ug, grad dg, grad uu, grad du) of :func:`_low_rank_forward` from the statistics' gradients (None: zero)."""
    gated, ranks, scales, flags, down_dtypes = meta
    bases, (ug, uu, D, G), ys = saved[: 1 + gated], saved[1 + gated : 5 + gated], saved[5 + gated :]
    n_rows, rank_t, dtype = bases[0].shape[0], D.shape[0], G.dtype
    grads = [torch.zeros(n_rows, dtype=dtype, device=D.device) if g is None else g.contiguous() for g in grads]
    grg, gru, gc = grads if gated else (grads[0], grads[0], grads[0])
    dus = [None if u is None else torch.empty_like(u) for u in (ug, uu)]
    dys = [torch.empty((n_rows, rank_t), dtype=b.dtype, device=D.device) for b in bases]  # in the bases' dtype
    programs = -(-n_rows // LOW_RANK_ROWS)
    part = torch.empty((programs, rank_t, rank_t), dtype=dtype, device=D.device)
    yu, dyu = (ys[1], dys[1]) if gated else (ys[0], dys[0])
    factors = (ys[0] if ug is None else ug, ys[0] if uu is None else uu)
    outs = (dys[0] if ug is None else dus[0], dys[0] if uu is None else dus[1])
    if n_rows:
        tk.low_rank_stats_backward_kernel[(programs,)](
            ys[0], yu, *factors, G, grg, gru, gc, *outs, dys[0], dyu, part,
            n_rows, rank_t, *ranks, float(scales[0]), float(scales[1]),
            ys[0].stride(0), yu.stride(0), factors[0].stride(0), factors[1].stride(0),
            outs[0].stride(0), outs[1].stride(0), dys[0].stride(0), dyu.stride(0),
            **flags, ROWS=LOW_RANK_ROWS, BLOCK_T=tk.block_size(rank_t),
        )  # fmt: skip
    grad_D = torch.mm(part.sum(0), D)  # through G = D D^T
    for b, dy in zip(bases, dys):  # through Y_j = B_j D^T
        grad_D = torch.addmm(grad_D, dy.t(), b) if b.dtype == dtype else grad_D + _to(torch.mm(dy.t(), b), dtype)
    grad_dg = None if ug is None else _to(grad_D[: ranks[0]], down_dtypes[0])
    grad_du = None if uu is None else _to(grad_D[ranks[0] :], down_dtypes[1])
    return dus[0], grad_dg, dus[1], grad_du


class LowRankStats(torch.autograd.Function):
    """The row statistics of a site's LoRA-fed weights as one node: r (plain) or (rg, ru, c) (gated).

    A site reads n = 1 or 2 weights W_j = B_j + s_j U_j D_j (U_j = ``lora_B``, D_j = ``lora_A``, s_j the
    adapter's scaling; a dense weight has no factors). Torch takes the products that pass over a base,
    Y_j = B_j D^T with D the present D_j stacked, and G = D D^T; one kernel each way does the rest per row
    (:func:`~hf_dreg.ops.triton_kernels.low_rank_stats_kernel`). The bases are frozen: their own statistics
    ``base_stats`` come in, computed once per version of the bases (:func:`frozen_bases_stats`). Kept for
    backward: the bases (parameters), the factors, Y and G: (out, T) and (T, T) tensors, never an (out, in) one.
    A site's own node (``source=LOW_RANK``) runs the same passes inside it, without this node.
    """

    @staticmethod
    def forward(ctx, g0, u0, ug, dg, uu, du, scale_g, scale_u, *base_stats):
        out, saved, ctx.meta = _low_rank_forward(g0, u0, ug, dg, uu, du, scale_g, scale_u, *base_stats)
        ctx.save_for_backward(*saved)
        return tuple(out) if u0 is not None else out[0]

    @staticmethod
    def backward(ctx, *grads):
        dug, ddg, duu, ddu = _low_rank_backward(ctx.saved_tensors, ctx.meta, grads)
        return None, None, dug, ddg, duu, ddu, None, None, *(None for _ in grads)


def frozen_bases_stats(w_gate, w_up=None) -> tuple[Tensor, ...]:
    """The frozen bases' own row statistics, (r,) or (rg, ru, c), in the statistics' dtype, no gradient."""
    from .low_rank import rows_base, stats_dtype

    dtype = stats_dtype(w_gate, *(() if w_up is None else (w_up,)))
    with torch.no_grad():
        stats = (row_stats(rows_base(w_gate)),) if w_up is None else gated_row_stats(rows_base(w_gate), rows_base(w_up))
        return tuple(_to(t, dtype) for t in stats)


def low_rank_inputs(w_gate, w_up=None, base_stats=None) -> tuple:
    """The inputs of :class:`LowRankStats` (and of a site node with ``source=LOW_RANK``) for a site's weights,
    at least one of them :class:`~hf_dreg.ops.low_rank.LowRankRows` with a frozen base. ``base_stats``, the
    bases' own (:func:`frozen_bases_stats`), is computed when not given."""
    from .low_rank import LowRankRows, rows_base

    if base_stats is None:
        base_stats = frozen_bases_stats(w_gate, w_up)
    args = []
    for w in (w_gate, w_up):
        if isinstance(w, LowRankRows):
            up, scale = w.up, w.scale
            if base_stats[0].dtype == torch.float64 and scale != 1.0:  # a kernel's float argument is a float32
                up, scale = up * scale, 1.0
            args.append((up, w.down, scale))
        else:
            args.append((None, None, 1.0))
    (ug, dg, sg), (uu, du, su) = args
    u0 = None if w_up is None else rows_base(w_up)
    return (rows_base(w_gate), u0, ug, dg, uu, du, sg, su, *base_stats)


def low_rank_stats(w_gate, w_up=None, base_stats=None):
    """The row statistics of :func:`low_rank_inputs`' weights as one :class:`LowRankStats` node: r (``w_up``
    None) or (rg, ru, c)."""
    return LowRankStats.apply(*low_rank_inputs(w_gate, w_up, base_stats))


# ---- the autograd Functions --------------------------------------------------------------------------


WEIGHTS, STATS, LOW_RANK = "weights", "stats", "low_rank"  # what a site node's statistics inputs are


def _stats_forward(source: str, inputs: tuple, gated: bool) -> tuple[tuple, tuple, object]:
    """A site node's row statistics from its inputs: (the statistics, tensors to save for their backward, meta).

    ``WEIGHTS``: the dense weight(s), the statistics computed here; ``STATS``: the statistics themselves;
    ``LOW_RANK``: :func:`low_rank_inputs` (a LoRA-fed site: the statistics from the factors, in this node)."""
    if source == WEIGHTS:
        return ((row_stats(inputs[0]),) if not gated else gated_row_stats(*inputs)), inputs, None
    if source == STATS:
        return inputs, (), None
    out, saved, meta = _low_rank_forward(*inputs)
    return tuple(out), saved, meta


def _stats_backward(source: str, saved: tuple, meta, grads: tuple, n_inputs: int, gated: bool) -> tuple:
    """The gradients of a site node's statistics inputs from the statistics' gradients."""
    if source == WEIGHTS:
        return (row_stats_backward(saved[0], grads[0]),) if not gated else gated_row_stats_backward(*saved, *grads)
    if source == STATS:
        return tuple(grads)
    dug, ddg, duu, ddu = _low_rank_backward(saved, meta, grads)
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
        (r,), saved, ctx.stats_meta = _stats_forward(source, stats, gated=False)
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
            stat_grads = _stats_backward(ctx.source, saved, ctx.stats_meta, (grad_r,), n_stats, gated=False)
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
        s = (g if spec.saved == "input" or a is None else a).detach()
        (rg, ru, c), saved, ctx.stats_meta = _stats_forward(source, stats, gated=True)
        p, h = gated_forward(s, u.detach(), rg, ru, c, spec, product)
        ctx.save_for_backward(s, u.detach(), rg, ru, c, *saved)
        ctx.spec, ctx.source, ctx.product, ctx.dtypes = spec, source, product, (g.dtype, u.dtype)
        if product:
            ctx.set_materialize_grads(False)
            return h, p
        return p

    @staticmethod
    def backward(ctx, *grads):
        grad_h, grad_p = grads if ctx.product else (None, grads[0])
        s, u, rg, ru, c, *saved = ctx.saved_tensors
        n_stats = len(ctx.needs_input_grad) - 6
        if grad_h is None and grad_p is None:
            return (None,) * (6 + n_stats)
        if grad_p is None:
            grad_p = torch.zeros(s.shape[:-1], dtype=rg.dtype, device=s.device)
        grad_g, grad_u, *grad_stats = gated_backward(s, u, rg, ru, c, grad_p, grad_h, ctx.dtypes, ctx.spec)
        stat_grads = (None,) * n_stats
        if any(ctx.needs_input_grad[6:]):
            stat_grads = _stats_backward(ctx.source, saved, ctx.stats_meta, grad_stats, n_stats, gated=True)
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
