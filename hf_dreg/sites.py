"""Find the MLP activation sites of a model by following its data flow.

One probe forward pass on a tiny input records every layer call and every tensor operation
(a ``TorchFunctionMode``). A site is an activation module whose input is the output of a
Linear-like layer (or one chunk of it) and whose output, possibly multiplied by the output of a
sibling layer (a gate), reaches a layer that projects back to the width the MLP started from.
Nothing is decided from module names, so a pooler's tanh or a head's GELU, which do not project
back into the residual width, are not sites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .activations import UnsupportedActivationError, is_activation_module, is_supported, resolve_families, spec_for
from .layers import check_computes_linear, in_features, is_linear_like

PLAIN, GATED, FUSED_GATED = "plain", "gated", "fused_gated"


@dataclass(frozen=True)
class Site:
    """One MLP activation and the layer(s) feeding it.

    ``name`` is the activation module's dotted path; ``inputs`` the dotted paths of the feeding
    layer(s). ``gate``/``up`` say which feeding layer gives the activation's input (g, or z) and
    which gives the multiplier u of a gated MLP; ``*_chunk`` is (index, n_chunks) of a fused
    layer's output split on the last dimension. ``mask_key`` names the mask (an input of the
    model's forward) whose shape matches this site's positions, if any.
    """

    name: str
    kind: str
    activation: str
    inputs: tuple[str, ...]
    output: str
    width: int
    gate: str
    up: str | None = None
    gate_chunk: tuple[int, int] | None = None
    up_chunk: tuple[int, int] | None = None
    mask_key: str | None = None
    family: str = field(default="", compare=False)


class NoSitesError(ValueError):
    """The model has no MLP activation site for the chosen activations."""


_MUL_NAMES = {"mul", "__mul__", "__rmul__", "mul_"}
_SPLIT_NAMES = {"chunk", "split", "tensor_split", "unsafe_chunk", "unsafe_split"}


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _Recorder(TorchFunctionMode):
    """Records every torch call of the probe pass as (name, input tensors, output tensors)."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        ins = list(_tensors(args)) + list(_tensors(kwargs or {}))
        if ins:
            outs = list(out) if isinstance(out, (list, tuple)) and name in _SPLIT_NAMES else list(_tensors(out))
            self.events.append(("op", name, ins, outs))
        return out


def example_inputs(model: nn.Module, seq_len: int = 7, decoder_len: int = 5) -> dict[str, Tensor]:
    """A tiny input for the probe pass, built from the model's config (no tokenizer, no download)."""
    config = model.config
    param = next(model.parameters())
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        channels = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.randn(1, channels, size, size, device=param.device, dtype=param.dtype)}
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", 100) or 100
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(min(5, vocab - 1), min(vocab, 1000), (1, seq_len), generator=generator)
        inputs = {"input_ids": ids.to(param.device), "attention_mask": torch.ones_like(ids, device=param.device)}
    if getattr(config, "is_encoder_decoder", False):
        dec = torch.full((1, decoder_len), getattr(config, "decoder_start_token_id", 0) or 0, device=param.device)
        inputs["decoder_input_ids"] = dec
        inputs["decoder_attention_mask"] = torch.ones_like(dec)
    return inputs


def _mask_key(width_shape: tuple[int, ...], inputs: dict[str, Tensor]) -> str | None:
    for key in ("attention_mask", "decoder_attention_mask"):
        if key in inputs and tuple(inputs[key].shape) == width_shape:
            return key
    return None


def _matches(name: str, patterns) -> bool:
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_sites(model: nn.Module, activations="gelu", exclude_modules=None, inputs: dict | None = None) -> list[Site]:
    """Every MLP activation site of ``model`` for the chosen activations.

    Args:
        activations: ``"gelu"`` (the GELU family, default), ``"all"`` (every supported activation),
            or a family name or list of them (``"silu"``, ``"relu"``, ``"tanh"``).
        exclude_modules: sites to leave out, PEFT-style: a string is a full-match regex on the
            activation's path; a list matches exact paths or ``.suffix``.
        inputs: a probe input for the forward pass; built from the config when omitted.
    """
    families = resolve_families(activations)
    probe_inputs = inputs if inputs is not None else example_inputs(model)
    found, seen_classes = _probe(model, probe_inputs)
    sites = []
    for site in found:
        if _matches(site.name, exclude_modules):
            continue
        if families is None or site.family in families:
            sites.append(site)
    if families is None:
        unsupported = [s for s in sites if not s.family]
        if unsupported:
            spec_for_error = unsupported[0]
            raise UnsupportedActivationError(
                f"The MLP activation {spec_for_error.name!r} is of class {spec_for_error.activation!r}, "
                "which hf_dreg has no analytic derivative for. Exclude it with exclude_modules=[...] "
                "or choose activations that the model's MLPs use."
            )
    if not sites:
        mlp_classes = sorted({s.activation for s in found})
        raise NoSitesError(
            f"{type(model).__name__} has no MLP activation site for activations={activations!r}. "
            f"Its MLP activations are of class {mlp_classes or 'none'}; all activation modules it contains: "
            f"{sorted(seen_classes) or 'none'}. Pass activations='all' or the family its MLPs use "
            "('gelu', 'silu', 'relu', 'tanh')."
        )
    return sites


def _probe(model: nn.Module, inputs: dict) -> tuple[list[Site], set[str]]:
    names = {module: name for name, module in model.named_modules()}
    events: list = []
    handles = []

    def on_call(module, args, kwargs):
        events.append(("call", names[module], list(_tensors(args)) + list(_tensors(kwargs)), []))

    def on_return(module, args, kwargs, output):
        events.append(("return", names[module], list(_tensors(args)) + list(_tensors(kwargs)), list(_tensors(output))))

    activation_classes = set()
    for module, name in names.items():
        linear = is_linear_like(module)
        act = is_activation_module(module)
        if act:
            activation_classes.add(type(module).__name__)
        if linear or act:
            handles.append(module.register_forward_pre_hook(on_call, with_kwargs=True))
            handles.append(module.register_forward_hook(on_return, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _Recorder(events):
            model(**inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return _sites_from_events(model, names, events, inputs), activation_classes


def _sites_from_events(model, names, events, inputs) -> list[Site]:
    modules = {name: module for module, name in names.items()}
    # origin of each tensor: (layer path, chunk) for outputs of Linear-like layers and their chunks
    origin: dict[int, tuple[str, tuple[int, int] | None]] = {}
    layer_input: dict[str, Tensor] = {}
    keep = []  # keep every tensor alive so that ids stay unique
    for kind, name, ins, outs in events:
        keep.append((ins, outs))
        if kind == "return" and is_linear_like(modules[name]) and outs:
            origin[id(outs[0])] = (name, None)
            layer_input.setdefault(name, ins[0])
        elif kind == "op" and name in _SPLIT_NAMES and len(ins) >= 1 and id(ins[0]) in origin:
            src, chunk = origin[id(ins[0])]
            n = len(outs)
            if chunk is None and n > 1 and all(o.shape[-1] * n == ins[0].shape[-1] for o in outs):
                for i, o in enumerate(outs):
                    origin[id(o)] = (src, (i, n))

    sites, calls = [], {}
    for index, (kind, name, ins, outs) in enumerate(events):
        if kind != "return" or not is_activation_module(modules[name]):
            continue
        calls[name] = calls.get(name, 0) + 1
        if not ins or id(ins[0]) not in origin:
            continue
        site = _follow(name, modules, ins[0], outs[0], events[index + 1 :], origin, layer_input, inputs)
        if site is not None:
            sites.append(site)
    shared = [s.name for s in sites if calls[s.name] > 1]
    if shared:
        raise ValueError(
            f"The activation module(s) {shared} are called more than once per forward (shared between layers). "
            "hf_dreg needs one activation module per MLP: give each layer its own, or exclude them."
        )
    for site in sites:
        for path in set(site.inputs):
            check_computes_linear(path, modules[path], layer_input[path], _layer_output(events, path))
    return sites


def _layer_output(events, path):
    for kind, name, _, outs in events:
        if kind == "return" and name == path:
            return outs[0]
    raise KeyError(path)


def _follow(name, modules, z, a, later_events, origin, layer_input, inputs) -> Site | None:
    """Follow the activation's output to the layer that consumes it, noting a gating multiplication."""
    gate, gate_chunk = origin[id(z)]
    reach = {id(a)}
    up = up_chunk = None
    consumer = None
    for kind, op, ins, outs in later_events:
        hit = [t for t in ins if id(t) in reach]
        if not hit:
            continue
        if kind == "call" and is_linear_like(modules[op]):
            consumer = op
            break
        if kind != "op":
            continue
        if op in _MUL_NAMES and up is None:
            others = [t for t in ins if id(t) not in reach and id(t) in origin]
            if others:
                up, up_chunk = origin[id(others[0])]
        reach.update(id(t) for t in outs)
    if consumer is None:
        return None
    width = z.shape[-1]
    d_in = in_features(modules[gate])
    if in_features(modules[consumer]) != width or _out_features(modules[consumer]) != d_in:
        return None  # not an MLP: the activation does not feed a projection back to the block's width
    if gate_chunk is not None:
        if up is None or up != gate or up_chunk is None:
            return None
        kind = FUSED_GATED
    elif up is not None:
        if up_chunk is not None or layer_input.get(up) is not layer_input.get(gate):
            return None
        kind = GATED
    else:
        kind = PLAIN
    module = modules[name]
    family = spec_for(module).family if is_supported(module) else ""
    feeding = (gate,) if up in (None, gate) else (gate, up)
    return Site(
        name=name,
        kind=kind,
        activation=type(module).__name__,
        inputs=feeding,
        output=consumer,
        width=width,
        gate=gate,
        up=up,
        gate_chunk=gate_chunk,
        up_chunk=up_chunk,
        mask_key=_mask_key(tuple(z.shape[:-1]), inputs),
        family=family,
    )


def _out_features(module: nn.Module) -> int:
    from .layers import weight_rows

    return weight_rows(module).shape[0]
