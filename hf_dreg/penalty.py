"""The math of ../shared/DREG.md, per position, with its hand-written backward.

Plain site (z = W x + b, a = f(z), W: (m, d)):

    p = (1/m) sum_i f'(z_i)^2 r_i,                      r_i = ||W_i||^2

Gated site (g = W_g x, u = W_u x, a = f(g) * u):

    p = (1/m) sum_i [ f'(g_i)^2 u_i^2 rg_i + f(g_i)^2 ru_i + 2 f'(g_i) u_i f(g_i) c_i ]
    rg_i = ||W_g,i||^2,  ru_i = ||W_u,i||^2,  c_i = <W_g,i, W_u,i>

Each function returns p for every position (a tensor of shape z.shape[:-1]); masking and averaging
over positions and sites happen in :mod:`hf_dreg.attach`. The backward is analytic (f''), so there
is no double backward, and the only tensors kept for it are the ones the model already keeps (z or
a, u) plus the row statistics (size m). All arithmetic is in float32 (float64 for float64 inputs),
whatever the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.utils import logging

from .activations import ActivationSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def row_stats(w: Tensor) -> Tensor:
    """||W_i||^2 for every row i, in the compute dtype."""
    w = w.to(compute_dtype(w.dtype))
    return (w * w).sum(-1)


def row_dots(w_a: Tensor, w_b: Tensor) -> Tensor:
    """<W_a,i, W_b,i> for every row i, in the compute dtype."""
    dtype = compute_dtype(w_a.dtype)
    return (w_a.to(dtype) * w_b.to(dtype)).sum(-1)


# ---- the elementwise math: one forward and one backward function per site kind --------------------
# Written as plain functions of tensors so torch.compile can fuse each into one kernel.


def plain_forward(spec: ActivationSpec, s: Tensor, r: Tensor) -> Tensor:
    d1 = spec.first(s.to(r.dtype))
    return (d1 * d1 * r).sum(-1) / s.shape[-1]


def plain_backward(spec: ActivationSpec, s: Tensor, r: Tensor, grad_p: Tensor) -> tuple[Tensor, Tensor]:
    m = s.shape[-1]
    x = s.to(r.dtype)
    d1 = spec.first(x)
    gp = grad_p.unsqueeze(-1) / m
    grad_z = gp * (2.0 * d1 * spec.second(x) * r)
    grad_r = (gp * d1 * d1).reshape(-1, m).sum(0)
    return grad_z, grad_r


def gated_forward(spec: ActivationSpec, s: Tensor, u: Tensor, rg: Tensor, ru: Tensor, c: Tensor) -> Tensor:
    x, v = s.to(rg.dtype), u.to(rg.dtype)
    f, d1 = spec.value(x), spec.first(x)
    per_unit = d1 * d1 * v * v * rg + f * f * ru + 2.0 * d1 * v * f * c
    return per_unit.sum(-1) / s.shape[-1]


def gated_backward(spec, s, u, rg, ru, c, grad_p):
    m = s.shape[-1]
    x, v = s.to(rg.dtype), u.to(rg.dtype)
    f, d1, d2 = spec.value(x), spec.first(x), spec.second(x)
    gp = grad_p.unsqueeze(-1) / m
    grad_g = gp * (2.0 * d1 * d2 * v * v * rg + 2.0 * f * d1 * ru + 2.0 * c * v * (d2 * f + d1 * d1))
    grad_u = gp * (2.0 * d1 * d1 * v * rg + 2.0 * d1 * f * c)
    grad_rg = (gp * d1 * d1 * v * v).reshape(-1, m).sum(0)
    grad_ru = (gp * f * f).reshape(-1, m).sum(0)
    grad_c = (gp * 2.0 * d1 * v * f).reshape(-1, m).sum(0)
    return grad_g, grad_u, grad_rg, grad_ru, grad_c


# ---- fusion: the same functions, compiled once per activation ------------------------------------

_COMPILED: dict = {}
_FUSION_FAILED = False
logger = logging.get_logger(__name__)


def _no_compiler_errors() -> tuple[type, ...]:
    """What torch.compile raises when this machine has no working compiler or backend for it."""
    from torch._inductor import exc

    return (exc.InvalidCxxCompiler, exc.CppCompileError, exc.TritonMissing, exc.GPUTooOldForTriton)


def missing_compiler(error: BaseException) -> BaseException | None:
    """The "no compiler / no backend" error behind ``error``, if that is what it is.

    Inductor raises those directly or wrapped (``BackendCompilerFailed``/``InductorError`` keep the
    original as ``inner_exception``; ``raise ... from`` keeps it as ``__cause__``). Anything else, a
    genuine bug included, gives None.
    """
    kinds = _no_compiler_errors()
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return error
        error = getattr(error, "inner_exception", None) or error.__cause__
    return None


def _disable_fusion(reason: str) -> None:
    """Turn fusion off for the process (the compiler is missing for every kernel), saying so once."""
    global _FUSION_FAILED
    if not _FUSION_FAILED:
        logger.warning(f"hf_dreg: fused DREG kernels unavailable ({reason}); using eager math.")
    _FUSION_FAILED = True


def _kernel(fn, spec: ActivationSpec, fused: bool):
    """``fn`` bound to ``spec``, compiled into one fused kernel when ``fused``.

    Falls back to the same math in eager mode only where the machine cannot compile (no C++
    compiler, no triton, no dynamo on this Python); any other error of the compiled kernel propagates.
    """
    if not fused or _FUSION_FAILED:
        return lambda *args: fn(spec, *args)
    key = (fn, spec)
    if key not in _COMPILED:
        from torch._dynamo import is_dynamo_supported

        if not is_dynamo_supported():
            _disable_fusion("torch.compile is not supported on this platform")
            return lambda *args: fn(spec, *args)
        _COMPILED[key] = torch.compile(lambda *args: fn(spec, *args), dynamic=True, fullgraph=True)
    compiled = _COMPILED[key]

    def run(*args):
        if _FUSION_FAILED:
            return fn(spec, *args)
        try:
            return compiled(*args)
        except Exception as error:
            cause = missing_compiler(error)
            if cause is None:
                raise
            first_line = (str(cause).strip().splitlines() or [""])[0]
            _disable_fusion(f"{type(cause).__name__}: {first_line}")
            return fn(spec, *args)

    return run


# ---- autograd ------------------------------------------------------------------------------------


class PlainSitePenalty(torch.autograd.Function):
    """p(z) for a plain site. ``z`` carries the gradient; ``s`` (z or f(z), detached) is what is kept."""

    @staticmethod
    def forward(ctx, z, r, s, spec, fused):
        with torch.autocast(z.device.type, enabled=False):
            p = _kernel(plain_forward, spec, fused)(s, r)
        ctx.save_for_backward(s, r)
        ctx.spec, ctx.fused, ctx.z_dtype = spec, fused, z.dtype
        return p

    @staticmethod
    def backward(ctx, grad_p):
        s, r = ctx.saved_tensors
        grad_z, grad_r = _kernel(plain_backward, ctx.spec, ctx.fused)(s, r, grad_p.to(r.dtype))
        return grad_z.to(ctx.z_dtype), grad_r, None, None, None


class GatedSitePenalty(torch.autograd.Function):
    """p(g, u) for a gated site. ``g``, ``u`` carry gradients; ``s`` (g or f(g), detached) is kept with u."""

    @staticmethod
    def forward(ctx, g, u, rg, ru, c, s, spec, fused):
        with torch.autocast(g.device.type, enabled=False):
            p = _kernel(gated_forward, spec, fused)(s, u, rg, ru, c)
        ctx.save_for_backward(s, u, rg, ru, c)
        ctx.spec, ctx.fused, ctx.dtypes = spec, fused, (g.dtype, u.dtype)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        s, u, rg, ru, c = ctx.saved_tensors
        grads = _kernel(gated_backward, ctx.spec, ctx.fused)(s, u, rg, ru, c, grad_p.to(rg.dtype))
        grad_g, grad_u, grad_rg, grad_ru, grad_c = grads
        return grad_g.to(ctx.dtypes[0]), grad_u.to(ctx.dtypes[1]), grad_rg, grad_ru, grad_c, None, None, None


def plain_site_penalty(z: Tensor, a: Tensor, r: Tensor, spec: ActivationSpec, fused: bool = False) -> Tensor:
    """Per-position penalty of a plain site from its pre-activation z, output a and row norms r."""
    s = (z if spec.saved == "input" else a).detach()
    return PlainSitePenalty.apply(z, r, s, spec, fused)


def gated_site_penalty(g, a, u, rg, ru, c, spec: ActivationSpec, fused: bool = False) -> Tensor:
    """Per-position penalty of a gated site from g (the activation's input), a = f(g), u and row stats."""
    s = (g if spec.saved == "input" else a).detach()
    return GatedSitePenalty.apply(g, u, rg, ru, c, s, spec, fused)
