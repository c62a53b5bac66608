"""The formulas of docs/definition.md, per position, with their hand-written backward.

Plain site (z = W x + b, a = f(z), W: (m, d)):

    p = (1/m) sum_i f'(z_i)^2 r_i,                      r_i = ||W_i||^2

Gated site (g = W_g x, u = W_u x, a = f(g) * u):

    p = (1/m) sum_i [ f'(g_i)^2 u_i^2 rg_i + f(g_i)^2 ru_i + 2 f'(g_i) u_i f(g_i) c_i ]
    rg_i = ||W_g,i||^2,  ru_i = ||W_u,i||^2,  c_i = <W_g,i, W_u,i>

Each function returns p for every position (a tensor of shape z.shape[:-1]); masking and averaging
over positions and sites happen in :mod:`hf_dreg.modeling.hooks`. The backward is analytic (f''), so there
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
- the row statistics: one pass over the weights forward, one backward (:func:`hf_dreg.ops.functions.row_stats`,
  :func:`hf_dreg.ops.functions.gated_row_stats`);
- the gradients of the row statistics, a sum over positions, are a matrix-vector product on a CPU (see
  :func:`_weighted_col_sums`): a transient buffer of 1 (plain) or 3 (gated) x positions x m values
  during each site's backward.

- the host: each site is one compiled region forward and one backward (the row statistics and the
  site's node traced together, end of :mod:`hf_dreg.ops.functions`). On a GPU a transformer's training step is mostly
  bound by the host issuing kernels, so the number of calls per site, not the arithmetic, is what DREG
  costs there (docs/cost.md).

Where a bf16/fp16 activation's output is only a rounding of f(z), everything comes from z instead
(computed in float32), as before the pair path existed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .activations import ActivationSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DREG's statistics and penalty are computed in: float32 at least."""
    if dtype is torch.float32 or dtype is torch.float64:  # the common case without an operator call (promote_types is one)
        return dtype
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
