"""The autograd Functions of a DREG site: the formulas of :mod:`hf_dreg.ops.formulas` as graph nodes.

``RowStats``/``GatedRowStats`` give the weights' row statistics; ``PlainSitePenalty``, ``PlainSiteActivation``
(the activation's output and the penalty as one node) and ``GatedSitePenalty`` give each position's penalty,
with hand-written backwards. Every elementwise function runs through :mod:`hf_dreg.ops.kernels` (compiled
where the machine can, else eager, the same values). The ``*_from_weight(s)`` entry points trace the row
statistics and the site's node together as one compiled region.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .activations import ActivationSpec
from .formulas import (
    activation_backward,
    compute_dtype,
    gated_backward,
    gated_forward,
    gated_row_stats_backward,
    gated_row_stats_forward,
    plain_activation_backward,
    plain_backward,
    plain_forward,
    row_stats_backward,
    row_stats_forward,
)
from .kernels import kernel as _kernel


def _use_pair(spec: ActivationSpec, z: Tensor, a: Tensor | None) -> bool:
    """Whether f, f', f'' may come from (z, a): a is f(z) at full precision (not a bf16/fp16 rounding of it)."""
    return (
        spec.pair is not None
        and a is not None
        and a.dtype == z.dtype
        and a.shape == z.shape
        and a.dtype in (torch.float32, torch.float64)
    )


class RowStats(torch.autograd.Function):
    """||W_i||^2 for every row i, in the compute dtype; one pass forward, one backward."""

    @staticmethod
    def forward(ctx, w, fused):
        ctx.save_for_backward(w)
        ctx.fused = fused
        return _kernel(row_stats_forward, None, fused)(w)

    @staticmethod
    def backward(ctx, grad_r):
        (w,) = ctx.saved_tensors
        return _kernel(row_stats_backward, None, ctx.fused)(w, grad_r), None


class GatedRowStats(torch.autograd.Function):
    """(||W_g,i||^2, ||W_u,i||^2, <W_g,i, W_u,i>) for every row i: one pass over both weights each way."""

    @staticmethod
    def forward(ctx, w_g, w_u, fused):
        ctx.save_for_backward(w_g, w_u)
        ctx.fused = fused
        return _kernel(gated_row_stats_forward, None, fused)(w_g, w_u)

    @staticmethod
    def backward(ctx, grad_rg, grad_ru, grad_c):
        w_g, w_u = ctx.saved_tensors
        grad_g, grad_u = _kernel(gated_row_stats_backward, None, ctx.fused)(w_g, w_u, grad_rg, grad_ru, grad_c)
        return grad_g, grad_u, None


def row_stats(w: Tensor, fused: bool = False) -> Tensor:
    """||W_i||^2 for every row i, in the compute dtype."""
    return RowStats.apply(w, fused)


def row_dots(w_a: Tensor, w_b: Tensor) -> Tensor:
    """<W_a,i, W_b,i> for every row i, in the compute dtype."""
    dtype = compute_dtype(w_a.dtype)
    return (w_a.to(dtype) * w_b.to(dtype)).sum(-1)


def gated_row_stats(w_gate: Tensor, w_up: Tensor, fused: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(row_stats(w_gate), row_stats(w_up), row_dots(w_gate, w_up)) in one pass over the two weights."""
    return GatedRowStats.apply(w_gate, w_up, fused)


class PlainSitePenalty(torch.autograd.Function):
    """p(z) for a plain site. ``z`` carries the gradient; ``s`` (z or f(z), detached) is what is kept.

    ``a`` (detached, or None) is the activation's output, used in the forward only (``spec.pair``).
    """

    @staticmethod
    def forward(ctx, z, r, s, a, spec, fused):
        with torch.autocast(z.device.type, enabled=False):
            if _use_pair(spec, z, a):
                p = _kernel(plain_forward, spec, fused)(z.detach(), r, a)
            else:
                p = _kernel(plain_forward, spec, fused)(s, r)
        ctx.save_for_backward(s, r)
        ctx.spec, ctx.fused, ctx.z_dtype = spec, fused, z.dtype
        return p

    @staticmethod
    def backward(ctx, grad_p):
        s, r = ctx.saved_tensors
        grad_z, grad_r = _kernel(plain_backward, ctx.spec, ctx.fused)(s, r, grad_p.to(r.dtype))
        return grad_z.to(ctx.z_dtype), grad_r, None, None, None, None


class PlainSiteActivation(torch.autograd.Function):
    """The activation's output a = f(z) and the site's p(z), as one node of the graph.

    ``a`` comes in already computed by the activation module and goes out with the same values; the
    node's backward gives z the activation's own gradient (grad_a f'(z)) plus the penalty's, in one pass
    over z, and gives ``a`` none, so the activation's own backward kernel does not run. Kept for backward:
    z (or a, for activations that keep their output), which the activation keeps anyway, and r.
    """

    @staticmethod
    def forward(ctx, z, a, r, spec, fused):
        s = (z if spec.saved == "input" else a).detach()
        with torch.autocast(z.device.type, enabled=False):
            if _use_pair(spec, z, a):
                p = _kernel(plain_forward, spec, fused)(z.detach(), r, a.detach())
            else:
                p = _kernel(plain_forward, spec, fused)(s, r)
        ctx.save_for_backward(s, r)
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.fused, ctx.z_dtype = spec, fused, z.dtype
        return a, p

    @staticmethod
    def backward(ctx, grad_a, grad_p):
        s, r = ctx.saved_tensors
        spec, fused = ctx.spec, ctx.fused
        grad_r = None
        if grad_p is None and grad_a is None:
            return None, None, None, None, None
        if grad_p is None:  # the penalty was not used (a layer recomputed by gradient checkpointing, eval)
            grad_z = _kernel(activation_backward, spec, fused)(s, grad_a, r.dtype)
        elif grad_a is None:  # only the penalty is differentiated
            grad_z, grad_r = _kernel(plain_backward, spec, fused)(s, r, grad_p.to(r.dtype))
        else:
            grad_z, grad_r = _kernel(plain_activation_backward, spec, fused)(s, r, grad_a, grad_p.to(r.dtype))
        return grad_z.to(ctx.z_dtype), None, grad_r, None, None


class GatedSitePenalty(torch.autograd.Function):
    """p(g, u) for a gated site. ``g``, ``u`` carry gradients.

    Kept for backward: (g, a = f(g), u) where the gate's product keeps a anyway (u requires grad) and
    ``spec.pair`` applies, else ``s`` (g or f(g), detached) and u; plus the row statistics.
    """

    @staticmethod
    def forward(ctx, g, u, rg, ru, c, s, a, spec, fused):
        pair = _use_pair(spec, g, a)
        with torch.autocast(g.device.type, enabled=False):
            if pair:
                p = _kernel(gated_forward, spec, fused)(g.detach(), u.detach(), rg, ru, c, a)
            else:
                p = _kernel(gated_forward, spec, fused)(s, u.detach(), rg, ru, c)
        ctx.pair = pair and u.requires_grad
        if ctx.pair:
            ctx.save_for_backward(g.detach(), a, u, rg, ru, c)
        else:
            ctx.save_for_backward(s, u, rg, ru, c)
        ctx.spec, ctx.fused, ctx.dtypes = spec, fused, (g.dtype, u.dtype)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        if ctx.pair:
            g, a, u, rg, ru, c = ctx.saved_tensors
            grads = _kernel(gated_backward, ctx.spec, ctx.fused)(g, u, rg, ru, c, grad_p.to(rg.dtype), a)
        else:
            s, u, rg, ru, c = ctx.saved_tensors
            grads = _kernel(gated_backward, ctx.spec, ctx.fused)(s, u, rg, ru, c, grad_p.to(rg.dtype))
        grad_g, grad_u, grad_rg, grad_ru, grad_c = grads
        return grad_g.to(ctx.dtypes[0]), grad_u.to(ctx.dtypes[1]), grad_rg, grad_ru, grad_c, None, None, None, None


def plain_site_penalty(z: Tensor, a: Tensor, r: Tensor, spec: ActivationSpec, fused: bool = False) -> Tensor:
    """Per-position penalty of a plain site from its pre-activation z, output a and row norms r."""
    s = (z if spec.saved == "input" else a).detach()
    return PlainSitePenalty.apply(z, r, s, a.detach(), spec, fused)


def plain_site_activation(z: Tensor, a: Tensor, r: Tensor, spec: ActivationSpec, fused: bool = False) -> tuple[Tensor, Tensor]:
    """(a, p) of a plain site: use the returned ``a`` as the activation's output (see :class:`PlainSiteActivation`)."""
    return PlainSiteActivation.apply(z, a, r, spec, fused)


def gated_site_penalty(g, a, u, rg, ru, c, spec: ActivationSpec, fused: bool = False) -> Tensor:
    """Per-position penalty of a gated site from g (the activation's input), a = f(g), u and row stats."""
    s = (g if spec.saved == "input" else a).detach()
    return GatedSitePenalty.apply(g, u, rg, ru, c, s, a.detach(), spec, fused)


# ---- a whole site as one compiled region ---------------------------------------------------------
# The functions above as separate compiled kernels cost a site four compiled calls and four autograd
# nodes per step (the row statistics and the site's node, each way). On a GPU a training step of a
# transformer is mostly bound by the host issuing kernels, and each compiled call's host-side cost
# (dynamo's guards, the AOT wrapper, the autograd node) was most of what DREG added to a step. Traced
# together, the row statistics and the site's node are one compiled call forward and one backward: the
# same autograd Functions, with the same saved tensors and hand-written backwards, inlined into one graph.


def _plain_site_activation_whole(spec, z, a, w):
    return PlainSiteActivation.apply(z, a, RowStats.apply(w, False), spec, False)


def _plain_site_penalty_whole(spec, z, a, w):
    s = (z if spec.saved == "input" else a).detach()
    return PlainSitePenalty.apply(z, RowStats.apply(w, False), s, a.detach(), spec, False)


def _gated_site_penalty_whole(spec, g, a, u, w_g, w_u):
    rg, ru, c = GatedRowStats.apply(w_g, w_u, False)
    s = (g if spec.saved == "input" else a).detach()
    return GatedSitePenalty.apply(g, u, rg, ru, c, s, a.detach(), spec, False)


def plain_site_activation_from_weight(z: Tensor, a: Tensor, w: Tensor, spec: ActivationSpec, fused: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`plain_site_activation` with the row statistics of the dense weight ``w`` computed in the same region."""

    def penalty_only(z, a, w):  # the activation's output stays its own node (its own backward runs)
        return a, plain_site_penalty_from_weight(z, a, w, spec, fused)

    return _kernel(_plain_site_activation_whole, spec, fused, penalty_only)(z, a, w)


def plain_site_penalty_from_weight(z: Tensor, a: Tensor, w: Tensor, spec: ActivationSpec, fused: bool = False) -> Tensor:
    """:func:`plain_site_penalty` with the row statistics of the dense weight ``w`` computed in the same region."""

    def parts(z, a, w):
        return plain_site_penalty(z, a, row_stats(w, fused), spec, fused)

    return _kernel(_plain_site_penalty_whole, spec, fused, parts)(z, a, w)


def gated_site_penalty_from_weights(g, a, u, w_g: Tensor, w_u: Tensor, spec: ActivationSpec, fused: bool = False) -> Tensor:
    """:func:`gated_site_penalty` with the row statistics of the dense weights computed in the same region."""

    def parts(g, a, u, w_g, w_u):
        return gated_site_penalty(g, a, u, *gated_row_stats(w_g, w_u, fused), spec, fused)

    return _kernel(_gated_site_penalty_whole, spec, fused, parts)(g, a, u, w_g, w_u)
