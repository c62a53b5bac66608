"""The layers that feed an activation: plain Linear, GPT-2's Conv1D, and PEFT adapters around them.

A site's penalty needs the weight rows of the feeding layer (one row per hidden unit). This module is
the one place that knows how each layer stores them.

PEFT adapters are supported where the adapter layer's forward is exactly ``x @ (W + sum of deltas).T + b``
with ``delta = get_delta_weight(adapter)`` for every active adapter: LoRA (``peft.tuners.lora.layer.Linear``,
without a LoRA variant such as DoRA), AdaLoRA (``SVDLinear``), LoHa and LoKr (their ``Linear``, with
``rank_dropout=0`` and ``module_dropout=0``: both make the training forward a random re-weighting of the
delta that no single weight describes). Every other PEFT layer around a Linear (IA3, BOFT/OFT, VeRA,
quantized LoRA layers...) is refused by name with :class:`UnsupportedLayerError` when it feeds a site.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..ops.formulas import compute_dtype
from ..ops.low_rank import LowRankRows


class UnsupportedLayerError(ValueError):
    """A layer feeding a DREG site whose effective weight hf_dreg cannot read exactly (a PEFT adapter type)."""


# the PEFT layer classes whose forward is base(x) + sum over active adapters of x @ get_delta_weight(adapter).T
_EXACT_ADAPTERS = {
    "LoRA": ("peft.tuners.lora.layer", "Linear"),
    "AdaLoRA": ("peft.tuners.adalora.layer", "SVDLinear"),
    "LoHa": ("peft.tuners.loha.layer", "Linear"),
    "LoKr": ("peft.tuners.lokr.layer", "Linear"),
}
_LORA_VARIANT_NAMES = {"DoraLinearVariant": "DoRA"}
_TUNER_NAMES = {"ia3": "IA3", "lora": "LoRA", "vera": "VeRA", "boft": "BOFT", "oft": "OFT", "fourierft": "FourierFT", "vblora": "VB-LoRA"}


def _peft_class(module_name: str, name: str):
    """A PEFT class if PEFT is imported (no PEFT layer can exist otherwise), else None."""
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (or anything with ``base_layer`` and ``get_delta_weight``) wrapping a layer."""
    if getattr(module, "base_layer", None) is None:
        return False
    tuner = _peft_class("peft.tuners.tuners_utils", "BaseTunerLayer")
    return (tuner is not None and isinstance(module, tuner)) or hasattr(module, "get_delta_weight")


def base_of(module: nn.Module) -> nn.Module:
    """The innermost layer under any adapter wrappers (the module itself when it is not wrapped)."""
    while is_adapter_layer(module):
        module = module.base_layer
    return module


def is_linear_like(module: nn.Module) -> bool:
    """A layer computing x @ W.T + b that can feed an activation (an adapter wrapper counts as its base)."""
    return isinstance(base_of(module), (nn.Linear, Conv1D))


def adapter_kind(module: nn.Module) -> str | None:
    """'LoRA', 'AdaLoRA', 'LoHa' or 'LoKr' for a supported adapter layer; None for any other layer."""
    for kind, (module_name, name) in _EXACT_ADAPTERS.items():
        cls = _peft_class(module_name, name)
        if cls is not None and isinstance(module, cls):
            return kind
    return None


def _describe(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _active_adapters(module: nn.Module, kind: str) -> list[str]:
    """The adapters the forward adds (PEFT skips active names the layer does not hold)."""
    if module.disable_adapters or module.merged:
        return []
    held = module.lora_A.keys() if kind in ("LoRA", "AdaLoRA") else module._available_adapters
    return [a for a in module.active_adapters if a in held]


def check_supported(module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` unless weight_rows(module) is exactly what its forward uses."""
    if not is_adapter_layer(module):
        return
    kind = adapter_kind(module)
    if kind is None:
        tuner = type(module).__module__.split(".")
        label = tuner[2] if len(tuner) > 2 and tuner[:2] == ["peft", "tuners"] else "adapter"
        label = _TUNER_NAMES.get(label, label.upper() if label != "adapter" else label)
        raise UnsupportedLayerError(
            f"DREG supports LoRA, AdaLoRA, LoHa and LoKr adapters on Linear layers; the {label} layer "
            f"{_describe(module)} is not supported: use LoraConfig, or leave this layer out of the adapter's "
            "target_modules, or exclude its site with exclude_modules=[...]."
        )
    if not isinstance(base_of(module), nn.Linear) and not (kind in ("LoRA", "AdaLoRA") and isinstance(base_of(module), Conv1D)):
        raise UnsupportedLayerError(
            f"DREG supports {kind} adapters on nn.Linear layers only; {_describe(module)} wraps a "
            f"{type(base_of(module)).__name__}: use LoraConfig."
        )
    for adapter in _active_adapters(module, kind):
        if kind in ("LoRA", "AdaLoRA"):
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is not None or getattr(module, "use_dora", {}).get(adapter, False):
                name = type(variant).__name__ if variant is not None else "DoraLinearVariant"
                label = _LORA_VARIANT_NAMES.get(name, name)
                raise UnsupportedLayerError(
                    f"DREG does not support {label} adapters yet (layer {_describe(module)}, adapter {adapter!r}): "
                    "its forward is not the base weight plus a delta weight. Use plain LoRA."
                )
        else:
            for setting in ("rank_dropout", "module_dropout"):
                value = getattr(module, setting, {}).get(adapter, 0.0)
                if value:
                    raise UnsupportedLayerError(
                        f"DREG supports {kind} adapters only with {setting}=0 (layer {_describe(module)}, adapter "
                        f"{adapter!r} has {setting}={value}): in training it re-weights the delta at random, so no "
                        f"single weight is what the layer computes. Set {setting}=0 in the {kind}Config."
                    )


def _read(t: Tensor) -> Tensor:
    return t


def _stored_weight(module: nn.Module, read=_read) -> Tensor:
    """The effective weight in the innermost layer's storage layout (Conv1D: (in, out))."""
    if not is_adapter_layer(module):
        return read(module.weight)
    check_supported(module)
    kind = adapter_kind(module)
    weight = _stored_weight(module.base_layer, read)
    for adapter in _active_adapters(module, kind):
        weight = weight + read(module.get_delta_weight(adapter))
    return weight


def weight_rows(module: nn.Module, read=_read) -> Tensor:
    """The effective weight as (out_features, in_features): row i feeds hidden unit i.

    Read it inside the layer's own forward (a forward hook), so that sharded weights (FSDP, ZeRO-3)
    are materialised when read. For a PEFT adapter layer the active, unmerged adapters are added, so
    the penalty is that of the layer as it computes, and its gradient reaches the adapters. Raises
    :class:`UnsupportedLayerError` for adapter types whose forward is not base + delta (see the module doc).

    ``read`` is applied to every parameter read (and to each adapter's delta weight, which PEFT computes
    from its own parameters); the identity by default (see :func:`penalty_weight_rows`).
    """
    return _as_rows(base_of(module), _stored_weight(module, read))


def penalty_weight_rows(module: nn.Module, read=_read) -> Tensor | LowRankRows:
    """:func:`weight_rows` as the penalty reads it: a LoRA layer's as its factors, never formed.

    For a LoRA layer (``peft.tuners.lora.layer.Linear``) with active adapters on a plain base layer the
    rows are :class:`~hf_dreg.ops.low_rank.LowRankRows`: the base weight, ``lora_B`` and ``lora_A`` with the
    adapter's scaling apart (one active adapter), or ``scaling * lora_B`` of every active adapter and their
    ``lora_A``, stacked; :mod:`hf_dreg.ops.low_rank` computes the row statistics
    from them without the dense (out, in) weight. Any other layer gives :func:`weight_rows`.

    ``read`` is applied to every parameter as it is read, before any arithmetic on it (the identity by
    default): under FSDP2 :class:`~hf_dreg.modeling.hooks.DREGHandle` passes each parameter through a node
    that orders the penalty's gradient of it before the layer's own backward.
    """
    adapters = _checked_lora_adapters(module)
    if not adapters:
        return weight_rows(module, read)
    key = _rows_key(module, adapters) if read is _read else None
    if key is not None:
        cached = _LORA_ROWS.get(module)
        if cached is not None and _same(cached[0], key):
            return cached[1]
    base = _as_rows(module.base_layer, read(module.base_layer.weight))
    dtype = compute_dtype(torch.promote_types(base.dtype, module.lora_B[adapters[0]].weight.dtype))
    scaling = module.scaling[adapters[0]]
    if len(adapters) == 1 and isinstance(scaling, (int, float)):  # the usual case: no stacking, the scaling kept apart
        up = _in_dtype(read(module.lora_B[adapters[0]].weight), dtype)
        down = _in_dtype(read(module.lora_A[adapters[0]].weight), dtype)
        rows = LowRankRows(base, up, down, float(scaling))
        if key is not None and all(t is k for t, k in zip((base, up, down), key[1:4])):  # the parameters themselves
            _LORA_ROWS[module] = (key, rows)
        return rows
    ups = [_in_dtype(read(module.lora_B[a].weight), dtype) * module.scaling[a] for a in adapters]
    downs = [_in_dtype(read(module.lora_A[a].weight), dtype) for a in adapters]
    return LowRankRows(base, torch.cat(ups, dim=1), torch.cat(downs, dim=0))


_LORA_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (_rows_key, its LowRankRows)


def _rows_key(module: nn.Module, adapters: list[str]) -> tuple | None:
    """What a LoRA layer's :class:`LowRankRows` depend on, read from the modules' own dicts (no ``__getattr__``):
    the active adapter, the base weight, ``lora_B``'s and ``lora_A``'s weights (the Parameter objects: their values
    and ``.data`` are read through them), the scaling and the weights' dtypes. None where the rows are not kept between calls: several
    adapters, or inside a torch.compile trace (a weakly keyed cache must not enter its guards)."""
    if len(adapters) != 1 or torch.compiler.is_compiling():
        return None
    (adapter,) = adapters
    try:
        base = module._modules["base_layer"]._parameters["weight"]
        up = module._modules["lora_B"]._modules[adapter]._parameters["weight"]
        down = module._modules["lora_A"]._modules[adapter]._parameters["weight"]
    except (KeyError, AttributeError, TypeError):
        return None
    return (adapter, base, up, down, module.scaling[adapter], base.dtype, up.dtype, down.dtype)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] is b[1] and a[2] is b[2] and a[3] is b[3] and a[4:] == b[4:]


def _in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


_LORA_CHECKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (its adapter state, the adapters)


def _adapter_state(module: nn.Module) -> tuple:
    """What a LoRA layer's adapter checks depend on: its active adapters, its adapters, which are merged, whether
    adapters are disabled. Read from the attributes behind PEFT's properties where they are (``_active_adapter``,
    ``merged_adapters``, ``_disable_adapters``: a step reads each feeding layer once, and the properties cost
    microseconds), through the properties elsewhere."""
    d = module.__dict__
    lora_a = module._modules.get("lora_A")
    if lora_a is not None and "_active_adapter" in d and "merged_adapters" in d and "_disable_adapters" in d:
        active = d["_active_adapter"]
        return (active if isinstance(active, str) else tuple(active), tuple(lora_a._modules), tuple(d["merged_adapters"]),
                d["_disable_adapters"])  # fmt: skip
    return (tuple(module.active_adapters), tuple(module.lora_A.keys()), module.merged, module.disable_adapters)


def _checked_lora_adapters(module: nn.Module) -> list[str] | None:
    """The active adapters of a LoRA layer on a plain base, checked as supported; None for any other layer.

    Read at every forward (a training step reads each feeding layer once): the check runs again only when the
    layer's adapter state (active, held, merged, disabled) has changed since the last read.
    """
    state = None
    # not inside a torch.compile trace: there the checks are traced into guards on the layer's attributes, and a
    # lookup in this weak-keyed cache would put its entries, which die with their modules, into the guards
    if module._modules.get("lora_A") is not None and not torch.compiler.is_compiling():
        state = _adapter_state(module)
        cached = _LORA_CHECKS.get(module)
        if cached is not None and cached[0] == state:
            return cached[1]
    if not is_adapter_layer(module) or adapter_kind(module) != "LoRA" or is_adapter_layer(module.base_layer):
        return None
    check_supported(module)
    adapters = _active_adapters(module, "LoRA")
    if state is not None:
        _LORA_CHECKS[module] = (state, adapters)
    return adapters


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of the innermost layer, from its weight's shape (no adapter math)."""
    base = base_of(module)
    shape = tuple(base.weight.shape)
    return (shape[1], shape[0]) if isinstance(base, Conv1D) else (shape[0], shape[1])


def _as_rows(module: nn.Module, weight: Tensor) -> Tensor:
    return weight.t() if isinstance(module, Conv1D) else weight


def bias_of(module: nn.Module) -> Tensor | None:
    """The effective bias: the base layer's, plus LoRA's ``lora_B`` bias (``lora_bias=True``) when active."""
    bias = base_of(module).bias
    if is_adapter_layer(module) and adapter_kind(module) in ("LoRA", "AdaLoRA"):
        for adapter in _active_adapters(module, adapter_kind(module)):
            extra = getattr(module.lora_B[adapter], "bias", None)
            if isinstance(extra, Tensor):
                bias = extra * module.scaling[adapter] if bias is None else bias + extra * module.scaling[adapter]
    return bias


def computes_linear(module: nn.Module, w: Tensor, x: Tensor, out: Tensor) -> bool | None:
    """Whether out == x @ w.T + b up to the rounding of ``out``'s dtype; None where there are no values (meta).

    The reference is computed in float32 (float64 for float64) and may differ from ``out`` by the
    rounding of a product summed in ``out``'s dtype: at most a few units of its precision (at least
    1e-3, for TF32 matmuls) times sum_k |x_k| |w_ik| + |b_i|. A bf16 LoRA layer, which adds its float32
    adapters' output to the bf16 base output, passes; a layer computing with other weights does not.
    """
    bias = bias_of(module)
    if any(t.is_meta for t in (w, x, out)) or (bias is not None and bias.is_meta):
        return None
    with torch.no_grad():
        dtype = compute_dtype(torch.promote_types(w.dtype, x.dtype))
        x, w = x.to(dtype), w.to(dtype)
        b = None if bias is None else bias.to(dtype)
        expected = torch.nn.functional.linear(x, w, b)
        if expected.shape != out.shape:
            return False
        scale = torch.nn.functional.linear(x.abs(), w.abs(), None if b is None else b.abs())
        eps = max(torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0, 1e-3)
        return bool(((out.to(dtype) - expected).abs() <= 4 * eps * scale + 1e-6).all())


def not_linear_error(name: str, module: nn.Module) -> ValueError:
    return ValueError(
        f"The layer {name!r} ({type(module).__name__}) feeds an activation but does not compute "
        "x @ W.T + b with the weight hf_dreg reads (a quantized or custom layer?). "
        "Exclude its site with exclude_modules=[...]."
    )
