"""Analytic derivatives of the activations transformers uses in its MLPs.

Every supported activation class maps to an :class:`ActivationSpec`: the value f, the first derivative f'
and the second derivative f'', each written as a function of the one tensor the penalty keeps for
backward. For GELU and SiLU that is the pre-activation z, which PyTorch already saves for the
activation's own backward; for ReLU and tanh it is the output a = f(z), which is what PyTorch saves
for them. Keeping the same tensor the model keeps is what makes the penalty free in memory.

Where the penalty has both z and a = f(z) at hand (the forward of every site; the backward of a gated
site, whose output the gate's product keeps anyway), ``pair`` gives f, f' and f'' from the two without
evaluating the activation's transcendental function again: f(z)/z is Phi(z) for GELU, sigmoid(alpha z)
for SiLU/QuickGELU and (1 + tanh(.))/2 for the tanh GELUs. On a CPU those transcendental passes, not
memory traffic, are most of the penalty's cost. In float64 the two routes agree to rounding; in float32
a = f(z) has lost the last digits of 1 - tanh(.) in the far tails, so f' and f'' from the pair are off
there by a few float32 ulps of f (at most 3e-6 and 2e-5 absolute, for the tanh GELU near z = 4.7). The
penalty uses the pair only for float32/float64 outputs, never for a bf16/fp16 rounding of f(z).

The table is keyed on classes, never on config strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from transformers import activations as hf_act

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


@dataclass(frozen=True)
class ActivationSpec:
    """f, f' and f'' of one activation, as functions of the tensor saved for backward.

    ``saved`` is ``"input"`` (the functions take z) or ``"output"`` (they take a = f(z)).
    ``family`` groups activations for the ``activations=`` choice ("gelu" or the name itself).
    ``pair`` (optional): ``(z, a) -> (f, f', f'')`` from z and the activation's own output a = f(z),
    exact for any a equal to f(z) up to rounding; None where a does not determine them (clipped GELU).
    """

    name: str
    family: str
    saved: str
    value: Callable[[Tensor], Tensor]
    first: Callable[[Tensor], Tensor]
    second: Callable[[Tensor], Tensor]
    pair: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    kernel: tuple = ()  # (code, K, LOW, HIGH) of the Triton kernels (hf_dreg.ops.triton_kernels); () = none


def _ratio(a: Tensor, z: Tensor) -> Tensor:
    """a / z = f(z) / z for the GELU/SiLU family, with its limit 1/2 where |z| is too small to divide by.

    Below sqrt(tiny) the true ratio is 1/2 to within |z| * 0.4 (far below the dtype's resolution), and
    a = f(z) may have lost digits to underflow.
    """
    small = z.abs() < torch.finfo(z.dtype).tiny ** 0.5
    return torch.where(small, 0.5, a / torch.where(small, 1.0, z))


def _gelu_exact() -> ActivationSpec:
    def cdf(z):
        return 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))

    def pdf(z):
        return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI

    def pair(z, a):  # Phi(z) = a / z: one exp instead of erf and exp
        phi = pdf(z)
        return a, _ratio(a, z) + z * phi, phi * (2.0 - z * z)

    return ActivationSpec(
        name="gelu",
        family="gelu",
        saved="input",
        value=lambda z: z * cdf(z),
        first=lambda z: cdf(z) + z * pdf(z),
        second=lambda z: pdf(z) * (2.0 - z * z),
        pair=pair,
        kernel=(0, 0.0, 0.0, 0.0),
    )


def _gelu_tanh(k: float = _SQRT_2_OVER_PI) -> ActivationSpec:
    """0.5 z (1 + tanh(k (z + c z^3))): NewGELU, FastGELU, AccurateGELU, GELUTanh, nn.GELU('tanh')."""
    c = _GELU_CUBIC

    def inner(z):
        return k * (z + c * z * z * z)

    def first(z):
        t = torch.tanh(inner(z))
        du = k * (1.0 + 3.0 * c * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du

    def second(z):
        t = torch.tanh(inner(z))
        sech2 = 1.0 - t * t
        du = k * (1.0 + 3.0 * c * z * z)
        ddu = 6.0 * k * c * z
        return sech2 * du + 0.5 * z * (sech2 * ddu - 2.0 * t * sech2 * du * du)

    def pair(z, a):  # w = a / z = (1 + t) / 2: no tanh
        w = _ratio(a, z)
        sech2 = 4.0 * w * (1.0 - w)
        du = k * (1.0 + 3.0 * c * z * z)
        ddu = 6.0 * k * c * z
        first = w + 0.5 * z * sech2 * du
        second = sech2 * du + 0.5 * z * sech2 * (ddu - 2.0 * (2.0 * w - 1.0) * du * du)
        return a, first, second

    return ActivationSpec(
        name="gelu_tanh",
        family="gelu",
        saved="input",
        value=lambda z: 0.5 * z * (1.0 + torch.tanh(inner(z))),
        first=first,
        second=second,
        pair=pair,
        kernel=(1, k, 0.0, 0.0),
    )


def _sigmoid_linear(alpha: float, name: str, family: str) -> ActivationSpec:
    """z * sigmoid(alpha z): SiLU (alpha = 1) and QuickGELU (alpha = 1.702)."""

    def first(z):
        s = torch.sigmoid(alpha * z)
        return s + alpha * z * s * (1.0 - s)

    def second(z):
        s = torch.sigmoid(alpha * z)
        return alpha * s * (1.0 - s) * (2.0 + alpha * z * (1.0 - 2.0 * s))

    def pair(z, a):  # sigmoid(alpha z) = a / z: no exp
        s = _ratio(a, z)
        ds = alpha * s * (1.0 - s)
        return a, s + z * ds, ds * (2.0 + alpha * z * (1.0 - 2.0 * s))

    return ActivationSpec(
        name=name,
        family=family,
        saved="input",
        value=lambda z: z * torch.sigmoid(alpha * z),
        first=first,
        second=second,
        pair=pair,
        kernel=(2, alpha, 0.0, 0.0),
    )


def _clipped_gelu(low: float, high: float) -> ActivationSpec:
    """clip(gelu(z), low, high): f' and f'' are GELU's where the clip is inactive, 0 elsewhere."""
    base = _gelu_exact()

    def inside(z):
        a = base.value(z)
        return ((a > low) & (a < high)).to(z.dtype)

    return ActivationSpec(
        name="gelu_clipped",
        family="gelu",
        saved="input",
        value=lambda z: torch.clamp(base.value(z), low, high),
        first=lambda z: base.first(z) * inside(z),
        second=lambda z: base.second(z) * inside(z),
        kernel=(5, 0.0, float(low), float(high)),
    )


def _from_output(first, second):
    return lambda z, a: (a, first(a), second(a))


_RELU_FIRST = lambda a: (a > 0).to(a.dtype)  # noqa: E731
_RELU_SECOND = lambda a: torch.zeros_like(a)  # noqa: E731
_TANH_FIRST = lambda a: 1.0 - a * a  # noqa: E731
_TANH_SECOND = lambda a: -2.0 * a * (1.0 - a * a)  # noqa: E731

_RELU = ActivationSpec(
    name="relu",
    family="relu",
    saved="output",
    value=lambda a: a,
    first=_RELU_FIRST,
    second=_RELU_SECOND,
    pair=_from_output(_RELU_FIRST, _RELU_SECOND),
    kernel=(3, 0.0, 0.0, 0.0),
)

_TANH = ActivationSpec(
    name="tanh",
    family="tanh",
    saved="output",
    value=lambda a: a,
    first=_TANH_FIRST,
    second=_TANH_SECOND,
    pair=_from_output(_TANH_FIRST, _TANH_SECOND),
    kernel=(4, 0.0, 0.0, 0.0),
)

_GELU = _gelu_exact()
_GELU_TANH = _gelu_tanh()
_SILU = _sigmoid_linear(1.0, "silu", "silu")
_QUICK_GELU = _sigmoid_linear(1.702, "quick_gelu", "gelu")


def _nn_gelu(module: nn.GELU) -> ActivationSpec:
    return _GELU_TANH if module.approximate == "tanh" else _GELU


def _hf_gelu_tanh(module) -> ActivationSpec:
    return _GELU_TANH


# activation class -> spec, or a function of the module instance returning the spec
DERIVATIVES: dict[type, ActivationSpec | Callable[[nn.Module], ActivationSpec]] = {
    hf_act.GELUActivation: _GELU,
    nn.GELU: _nn_gelu,
    hf_act.NewGELUActivation: _GELU_TANH,
    hf_act.AccurateGELUActivation: _GELU_TANH,
    hf_act.GELUTanh: _hf_gelu_tanh,
    hf_act.FastGELUActivation: _gelu_tanh(0.7978845608),
    hf_act.QuickGELUActivation: _QUICK_GELU,
    hf_act.ClippedGELUActivation: lambda m: _clipped_gelu(m.min, m.max),
    hf_act.SiLUActivation: _SILU,
    nn.SiLU: _SILU,
    nn.ReLU: _RELU,
    nn.Tanh: _TANH,
}

FAMILIES = ("gelu", "silu", "relu", "tanh")


def spec_for(module: nn.Module) -> ActivationSpec:
    """The derivative spec of an activation module; a clear error for a class with none."""
    for cls in type(module).__mro__:
        if cls in DERIVATIVES:
            entry = DERIVATIVES[cls]
            return entry if isinstance(entry, ActivationSpec) else entry(module)
    raise UnsupportedActivationError(
        f"hf_dreg has no analytic derivative for the activation class {type(module).__name__!r}. "
        f"Supported classes: {', '.join(sorted(c.__name__ for c in DERIVATIVES))}. "
        "Exclude the module (exclude_modules=...) or choose activations that the model's MLPs use."
    )


def is_supported(module: nn.Module) -> bool:
    return any(cls in DERIVATIVES for cls in type(module).__mro__)


def is_activation_module(module: nn.Module) -> bool:
    """Whether a module is an activation (supported or not): torch's activation classes and transformers'."""
    if is_supported(module):
        return True
    mod = type(module).__module__
    return mod in ("torch.nn.modules.activation", "transformers.activations") and not isinstance(
        module, (nn.MultiheadAttention, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin)
    )


class UnsupportedActivationError(ValueError):
    """An activation class that hf_dreg has no analytic derivative for."""


def resolve_families(activations) -> frozenset[str] | None:
    """Normalise the ``activations=`` choice: "gelu", "all", a family name, or a list of them.

    Returns the set of families, or None for "all".
    """
    if activations is None or activations == "all":
        return None
    names = [activations] if isinstance(activations, str) else list(activations)
    out = set()
    for name in names:
        key = name.lower() if isinstance(name, str) else name
        if key == "all":
            return None
        if key == "swish":
            key = "silu"
        if key not in FAMILIES:
            raise ValueError(
                f"Unknown activation choice {name!r}: use 'gelu' (the GELU family, default), 'all', "
                f"or any of {', '.join(FAMILIES)}."
            )
        out.add(key)
    return frozenset(out)
