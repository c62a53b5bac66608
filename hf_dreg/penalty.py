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

What it costs (on a CPU the activation's transcendental function, evaluated once per element and pass,
is most of it; on a GPU memory traffic is):

- forward: f' from z and the activation's own output a (``ActivationSpec.pair``: no tanh or sigmoid
  again, one exp instead of erf and exp for the exact GELU), fused with the row-sum into p, one pass;
- backward of a plain site: :class:`PlainSiteActivation` is both the activation's output and p, so its
  backward computes the activation's own gradient and the penalty's in one pass over z, instead of the
  activation's own backward kernel plus the penalty's plus the sum of the two gradients;
- backward of a gated site: one pass over (g, a, u), with a kept only where the gate's product keeps it
  anyway (u requires grad), else over (g, u) evaluating f once; the activation's own backward and the
  sums of the gradients of g and u stay as they are;
- the row statistics: one pass over the weights forward, one backward (:func:`row_stats`,
  :func:`gated_row_stats`);
- the gradients of the row statistics, a sum over positions, are a matrix-vector product on a CPU (see
  :func:`_weighted_col_sums`): a transient buffer of 1 (plain) or 3 (gated) x positions x m values
  during each site's backward.

- the host: each site is one compiled region forward and one backward (the row statistics and the
  site's node traced together, end of this module). On a GPU a transformer's training step is mostly
  bound by the host issuing kernels, so the number of calls per site, not the arithmetic, is what DREG
  costs there (README, "Cost").

Where a bf16/fp16 activation's output is only a rounding of f(z), everything comes from z instead
(computed in float32), as before the pair path existed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.utils import logging

from .activations import ActivationSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ---- the elementwise math: one forward and one backward function per site kind --------------------
# Written as plain functions of tensors so torch.compile can fuse each into one kernel. ``spec`` is the
# activation (None for the row statistics). Every function computes in the dtype of its row statistics.


def _basis(spec: ActivationSpec, s: Tensor, dtype: torch.dtype):
    """(f, f', f'') from the tensor saved by ``spec`` (z or a)."""
    x = s.to(dtype)
    return spec.value(x), spec.first(x), spec.second(x)


def _pair(spec: ActivationSpec, z: Tensor, a: Tensor, dtype: torch.dtype):
    """(f, f', f'') from z and a = f(z) (``spec.pair``: no transcendental function where it can)."""
    return spec.pair(z.to(dtype), a.to(dtype))


def _weighted_col_sums(weight: Tensor, *terms: Tensor) -> list[Tensor]:
    """sum over positions n of weight_n * term_n,i, for every unit i and term, as one matrix product.

    On a CPU a sum over the leading (position) axis, written as a reduction, is compiled into a loop
    that walks down the columns: one cache line per position and column block, page-crossing strides,
    latency-bound. Materialising the terms side by side, (positions, terms x m), and multiplying by the
    weights streams through memory instead (a transient buffer of that size during the backward).
    """
    m = terms[0].shape[-1]
    if terms[0].device.type != "cpu":  # a GPU reduces along columns well (and without the extra buffer)
        w = weight.unsqueeze(-1)
        return [(w * t).reshape(-1, m).sum(0) for t in terms]
    stacked = torch.stack(terms, dim=-2).reshape(-1, len(terms) * m)
    return list(torch.mm(weight.reshape(1, -1), stacked).reshape(len(terms), m).unbind(0))


def _plain_p(d1, r):
    return (d1 * d1 * r).sum(-1) / d1.shape[-1]


def _gated_p(f, d1, v, rg, ru, c):
    q = d1 * v
    return (q * (q * rg + 2.0 * f * c) + f * f * ru).sum(-1) / f.shape[-1]


def _derivatives(spec, s, a, dtype):
    """(f, f', f'') from the saved tensor s, or from (s = z, a = f(z)) when a is given."""
    return _basis(spec, s, dtype) if a is None else _pair(spec, s, a, dtype)


def plain_forward(spec: ActivationSpec, s: Tensor, r: Tensor, a: Tensor | None = None) -> Tensor:
    """p of a plain site from s (z or f(z), as ``spec`` keeps), or from z and a = f(z) when a is given."""
    return _plain_p(_derivatives(spec, s, a, r.dtype)[1], r)


def plain_backward(spec: ActivationSpec, s: Tensor, r: Tensor, grad_p: Tensor) -> tuple[Tensor, Tensor]:
    _, d1, d2 = _basis(spec, s, r.dtype)
    weight = grad_p / s.shape[-1]
    grad_z = weight.unsqueeze(-1) * (2.0 * d1 * d2 * r)
    return grad_z, _weighted_col_sums(weight, d1 * d1)[0]


def activation_backward(spec: ActivationSpec, s: Tensor, grad_a: Tensor, dtype: torch.dtype) -> Tensor:
    """The activation's own backward, grad_a * f'(z), in the compute dtype."""
    return grad_a.to(dtype) * _basis(spec, s, dtype)[1]


def plain_activation_backward(spec, s, r, grad_a, grad_p) -> tuple[Tensor, Tensor]:
    """grad_z of a = f(z) and of p(z) together, in one pass over z, and grad_r."""
    _, d1, d2 = _basis(spec, s, r.dtype)
    weight = grad_p / s.shape[-1]
    grad_z = grad_a.to(r.dtype) * d1 + weight.unsqueeze(-1) * (2.0 * d1 * d2 * r)
    return grad_z, _weighted_col_sums(weight, d1 * d1)[0]


def gated_forward(spec: ActivationSpec, s: Tensor, u: Tensor, rg: Tensor, ru: Tensor, c: Tensor, a: Tensor | None = None) -> Tensor:
    """p of a gated site from s (g or f(g)) and u, or from g, a = f(g) and u when a is given."""
    f, d1, _ = _derivatives(spec, s, a, rg.dtype)
    return _gated_p(f, d1, u.to(rg.dtype), rg, ru, c)


def _gated_grads(f, d1, d2, v, rg, ru, c, grad_p):
    """With q = f' u and e = q rg + f c:  dp/dg = (2/m)(f'' u e + f' (f ru + q c)),  dp/du = (2/m) f' e."""
    weight = grad_p * (2.0 / f.shape[-1])
    k = weight.unsqueeze(-1)
    q = d1 * v
    e = q * rg + f * c
    grad_g = k * (d2 * v * e + d1 * (f * ru + q * c))
    grad_u = k * d1 * e
    grad_rg, grad_ru, grad_c = _weighted_col_sums(weight, 0.5 * q * q, 0.5 * f * f, q * f)
    return grad_g, grad_u, grad_rg, grad_ru, grad_c


def gated_backward(spec, s, u, rg, ru, c, grad_p, a=None):
    f, d1, d2 = _derivatives(spec, s, a, rg.dtype)
    return _gated_grads(f, d1, d2, u.to(rg.dtype), rg, ru, c, grad_p)


def row_stats_forward(spec, w: Tensor) -> Tensor:
    w = w.to(compute_dtype(w.dtype))
    return (w * w).sum(-1)


def row_stats_backward(spec, w: Tensor, grad_r: Tensor) -> Tensor:
    return (2.0 * w.to(grad_r.dtype) * grad_r.unsqueeze(-1)).to(w.dtype)


def gated_row_stats_forward(spec, w_g: Tensor, w_u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dtype = compute_dtype(w_g.dtype)
    x, y = w_g.to(dtype), w_u.to(dtype)
    return (x * x).sum(-1), (y * y).sum(-1), (x * y).sum(-1)


def gated_row_stats_backward(spec, w_g, w_u, grad_rg, grad_ru, grad_c) -> tuple[Tensor, Tensor]:
    x, y = w_g.to(grad_rg.dtype), w_u.to(grad_rg.dtype)
    grad_rg, grad_ru, grad_c = (t.unsqueeze(-1) for t in (grad_rg, grad_ru, grad_c))
    return (2.0 * x * grad_rg + y * grad_c).to(w_g.dtype), (2.0 * y * grad_ru + x * grad_c).to(w_u.dtype)


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


def _bound(fn, spec):
    """``fn`` with ``spec`` bound, as a function with a code object of its own.

    Dynamo keeps its compiled graphs (and counts recompilations against ``recompile_limit``) per code
    object: one shared wrapper would pool every kernel and activation into one budget of 8.
    """

    def kernel(*args):
        return fn(spec, *args)

    kernel.__code__ = kernel.__code__.replace(co_name=f"dreg_{fn.__name__}_{len(_COMPILED)}")
    return kernel


_UNTRACEABLE: set = set()  # whole-site functions this torch could not compile as one region


def _kernel(fn, spec: ActivationSpec, fused: bool, parts=None):
    """``fn`` bound to ``spec``, compiled into one fused kernel when ``fused``.

    Falls back to the same math in eager mode only where the machine cannot compile (no C++
    compiler, no triton, no dynamo on this Python); any other error of the compiled kernel propagates,
    except for a whole site (``parts`` given: the same values by a simpler route). Tracing autograd
    Functions into one region needs a recent dynamo (torch 2.11 refuses a Function that returns one of
    its inputs, as the activation's node does), so where it fails the site takes that route, saying so
    once per kind of site.
    """
    if not fused or _FUSION_FAILED:
        return lambda *args: fn(spec, *args)
    key = (fn, spec)
    if key not in _COMPILED:
        from torch._dynamo import is_dynamo_supported

        if not is_dynamo_supported():
            _disable_fusion("torch.compile is not supported on this platform")
            return lambda *args: fn(spec, *args)
        # A compiled region's backward is compiled lazily, during the first backward, and with donated buffers it
        # refuses retain_graph=True, which the gradient-ratio measurement and 'auto' need. The setting is global
        # (read when that backward compiles): it costs other compiled backwards the reuse of their saved buffers.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        _COMPILED[key] = torch.compile(_bound(fn, spec), dynamic=True, fullgraph=True)
    compiled = _COMPILED[key]

    def run(*args):
        if _FUSION_FAILED:
            return fn(spec, *args)
        if parts is not None and fn in _UNTRACEABLE:
            return parts(*args)
        try:
            return compiled(*args)
        except Exception as error:
            cause = missing_compiler(error)
            if cause is None and parts is not None:
                _UNTRACEABLE.add(fn)
                first_line = (str(error).strip().splitlines() or [""])[0]
                logger.warning(
                    f"hf_dreg: torch {torch.__version__} cannot compile a whole DREG site as one region "
                    f"({fn.__name__}; {type(error).__name__}: {first_line[:200]}); using a simpler route: "
                    "the same values, more host time per step on a GPU."
                )
                return parts(*args)
            if cause is None:
                raise
            first_line = (str(cause).strip().splitlines() or [""])[0]
            _disable_fusion(f"{type(cause).__name__}: {first_line}")
            return fn(spec, *args)

    return run


# ---- autograd ------------------------------------------------------------------------------------


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
