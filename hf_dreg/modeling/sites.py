"""Find the MLP activation sites of a model by following its data flow.

One probe forward pass on a tiny input records every layer call and every tensor operation
(a ``TorchFunctionMode``). A site is an activation module whose input is the output of a
Linear-like layer (or one chunk of it) and whose output, possibly multiplied by the output of a
sibling layer (a gate), reaches a layer that projects back to the width the MLP started from.
Nothing is decided from module names, so a pooler's tanh or a head's GELU, which do not project
back into the residual width, are not sites.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..ops.activations import UnsupportedActivationError, is_activation_module, is_supported, resolve_families, spec_for
from .fused_mlps import fused_mlp_spec, silent_activation_modules, unfused_forward
from .layers import UnsupportedLayerError, computes_linear, is_linear_like, not_linear_error, weight_rows, weight_shape

PLAIN, GATED, FUSED_GATED, FUSED_MLP = "plain", "gated", "fused_gated", "fused_mlp"


@dataclass(frozen=True)
class Site:
    """One MLP activation and the layer(s) feeding it.

    ``name`` is the activation module's dotted path (for a ``fused_mlp`` site, whose activation is no
    module, the MLP's: :mod:`hf_dreg.modeling.fused_mlps`); ``inputs`` the dotted paths of the feeding
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


class MetaProbeError(RuntimeError):
    """The probe forward pass could not run on a model whose weights are (partly) on the meta device."""


_META = torch.device("meta")
_CPU = torch.device("cpu")


def _is_meta_device(obj) -> bool:
    return (isinstance(obj, torch.device) and obj.type == "meta") or obj == "meta"


def _on_cpu(obj):
    return _CPU if _is_meta_device(obj) else obj


class _Recorder(TorchFunctionMode):
    """Records every torch call of the probe pass as (name, input tensors, output tensors).

    On a meta model (``meta=True``) it also keeps a real CPU *twin* of every meta tensor that is a
    function of the probe inputs and buffers alone (masks, position ids; never of a weight), computed
    alongside. A data-dependent call on such a meta tensor (``bool(mask.all())``, ``pad_id in ids``,
    ``.item()``), which meta tensors cannot answer, gets the twin's exact answer instead.
    """

    def __init__(self, events, meta: bool = False):
        super().__init__()
        self.events = events
        self.meta = meta
        self.paused = False
        self.twins: dict[int, tuple[Tensor, Tensor]] = {}  # id(meta tensor) -> (meta tensor, its real twin)

    @contextlib.contextmanager
    def pause(self):
        """Neither record nor twin (hf_dreg's own reads inside the hooks)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was

    def add_twin(self, meta: Tensor, real: Tensor) -> None:
        self.twins[id(meta)] = (meta, real)

    def _twin(self, t: Tensor):
        if not t.is_meta:
            return t
        entry = self.twins.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        out = self._call_meta(func, args, kwargs, ins) if self.meta else func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if ins:
            outs = list(out) if isinstance(out, (list, tuple)) and name in _SPLIT_NAMES else list(_tensors(out))
            self.events.append(("op", name, ins, outs))
        return out

    def _call_meta(self, func, args, kwargs, ins):
        leaves = pytree.tree_leaves((args, kwargs))
        if not any(t.is_meta for t in ins) and not any(_is_meta_device(x) for x in leaves if isinstance(x, (str, torch.device))):
            return func(*args, **kwargs)
        real = _NONE = object()
        twins = [self._twin(t) for t in ins]
        if all(t is not None for t in twins):
            lookup = {id(t): twin for t, twin in zip(ins, twins)}
            real_args, real_kwargs = pytree.tree_map(
                lambda x: lookup.get(id(x), x) if isinstance(x, Tensor) else _on_cpu(x) if isinstance(x, (str, torch.device)) else x,
                (args, kwargs),
            )
            try:
                real = func(*real_args, **real_kwargs)
            except Exception:
                real = _NONE
        try:
            out = func(*args, **kwargs)
        except Exception:
            if real is _NONE:
                raise
            # a data-dependent call on meta tensors (a bool, an item, a data-dependent shape): the twins know it
            out = pytree.tree_map(lambda x: x.to(_META) if isinstance(x, Tensor) else x, real)
        if real is not _NONE:
            out_leaves, real_leaves = pytree.tree_leaves(out), pytree.tree_leaves(real)
            if len(out_leaves) == len(real_leaves):
                for o, r in zip(out_leaves, real_leaves):
                    if isinstance(o, Tensor) and o.is_meta and isinstance(r, Tensor):
                        self.add_twin(o, r)
        else:
            name = getattr(func, "__name__", "")
            if args and isinstance(args[0], Tensor) and (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))):
                self.twins.pop(id(args[0]), None)  # written in place with values no twin has
        return out


def example_inputs(model: nn.Module, seq_len: int = 7, decoder_len: int = 5, device=None) -> dict[str, Tensor]:
    """A tiny input for the probe pass, built from the config (no tokenizer, no download).

    On ``device`` (default: the device of the model's first parameter; ``meta`` works too).
    """
    config = model.config
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        channels = getattr(config, "num_channels", 3)
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(1, channels, size, size, generator=generator, dtype=param.dtype)
        inputs = {"pixel_values": pixels.to(device)}
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", 100) or 100
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(min(5, vocab - 1), min(vocab, 1000), (1, seq_len), generator=generator)
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if getattr(config, "is_encoder_decoder", False):
        dec = torch.full((1, decoder_len), getattr(config, "decoder_start_token_id", 0) or 0)
        inputs["decoder_input_ids"] = dec.to(device)
        inputs["decoder_attention_mask"] = torch.ones_like(dec).to(device)
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

    One probe forward pass (in eval mode, without gradients) follows the data flow. Every weight is
    read inside its own layer's forward (a forward hook that runs before the layer's other forward
    hooks), where FSDP and ZeRO-3 have materialised it: the layer shapes that decide whether an
    activation feeds a projection back to the MLP's width, and a numerical check that each feeding
    layer computes ``x @ W.T + b`` with the weight the penalty will read.

    A model whose weights are on the ``meta`` device (FSDP's ``fsdp_cpu_ram_efficient_loading``
    leaves ranks > 0 so until the weights are broadcast) is probed on ``meta``: shapes propagate
    and meta tensors are distinct objects, so the sites found are the same as for the real model;
    only the numerical check is skipped there (meta tensors have no values). Buffers that are not
    on ``meta`` are swapped for meta copies during the probe and restored after it.

    Args:
        activations: ``"gelu"`` (the GELU family, default), ``"all"`` (every supported activation),
            or a family name or list of them (``"silu"``, ``"relu"``, ``"tanh"``).
        exclude_modules: sites to leave out, PEFT-style: a string is a full-match regex on the
            activation's path; a list matches exact paths or ``.suffix``.
        inputs: a probe input for the forward pass; built from the config when omitted.

    Raises:
        NoSitesError: no site for the chosen activations (the message lists the classes found).
        UnsupportedActivationError: ``activations="all"`` and an MLP activation has no analytic derivative.
        UnsupportedLayerError: a site is fed by a PEFT adapter layer whose weight is not base + delta.
        MetaProbeError: the model is (partly) on ``meta`` and its forward cannot run there.
    """
    families = resolve_families(activations)
    meta = _has_meta(model)
    if inputs is not None:
        probe_inputs = inputs
    else:
        probe_inputs = example_inputs(model, device="cpu" if meta else None)
    found, seen_classes, layers, called = _probe(model, probe_inputs, meta)
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
        used = ",".join(sorted({s.family for s in found if s.family}))
        if used:
            fix = (f"Its MLPs use the {used!r} family: choose it with --dreg_activations {used} (the scripts, "
                   f"DREGTrainingArguments), DREGConfig(dreg_activations={used!r}) in Python, or "
                   f"hf_dreg.attach(model, activations={used!r}); 'all' takes every supported activation.")
        else:
            fix = ("Choose the family its MLPs use ('gelu', 'silu', 'relu', 'tanh', or 'all') with --dreg_activations "
                   "(the scripts), DREGConfig(dreg_activations=...) in Python, or hf_dreg.attach(model, activations=...).")
        silent = silent_activation_modules(model, called)
        if not found and silent:
            fix = (f"Its activation modules never run in its forward ({', '.join(silent[:3])}{', ...' if len(silent) > 3 else ''}): "
                   "its MLPs compute the activation inside a fused function (a kernel patch such as Liger Kernel's or "
                   "Unsloth's) that no hook can see. hf_dreg takes Liger's LigerGEGLUMLP and LigerSwiGLUMLP as they are; "
                   "for any other fused MLP, load the model without that patch for DREG (TRL: use_liger_kernel=False, "
                   "or apply_liger_kernel_to_*(swiglu=False, geglu=False) keeping Liger's other kernels).")
        raise NoSitesError(
            f"{type(model).__name__} has no MLP activation site for activations={activations!r}. "
            f"Its MLP activations are of class {mlp_classes or 'none'}; all activation modules it contains: "
            f"{sorted(seen_classes) or 'none'}. {fix}"
        )
    _check_feeding_layers(model, sites, layers)
    return sites


def _has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


@dataclass
class _Layer:
    """What the probe read inside one Linear-like layer's forward."""

    out_features: int
    in_features: int
    computes_linear: bool | None  # None: not checked (meta tensors have no values)
    error: Exception | None = None  # an unsupported adapter layer: raised if it feeds a site


def _read_layer(module: nn.Module, ins: list, outs: list) -> _Layer:
    out_features, in_features = weight_shape(module)
    try:
        w = weight_rows(module)
    except UnsupportedLayerError as error:
        return _Layer(out_features, in_features, None, error)
    ok = computes_linear(module, w, ins[0], outs[0]) if ins and outs else None
    return _Layer(out_features, in_features, ok)


@contextlib.contextmanager
def _buffers_on_meta(model: nn.Module, recorder: _Recorder):
    """Swap every buffer that is not on meta for a meta copy, twinned to a copy of its values."""
    swapped, copies = [], {}
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is None or buf.is_meta:
                continue
            if id(buf) not in copies:
                copies[id(buf)] = buf.to(_META)
                recorder.add_twin(copies[id(buf)], buf.detach().clone())
            swapped.append((module, key, buf))
            module._buffers[key] = copies[id(buf)]
    try:
        yield
    finally:
        for module, key, buf in swapped:
            module._buffers[key] = buf


def _probe(model: nn.Module, inputs: dict, meta: bool = False) -> tuple[list[Site], set[str], dict[str, "_Layer"], set[str]]:
    """(the sites, the activation classes seen, what was read in each Linear-like layer, the modules that returned)."""
    names = {module: name for name, module in model.named_modules()}
    events: list = []
    layers: dict[str, _Layer] = {}
    recorder = _Recorder(events, meta=meta)
    handles = []

    def on_call(module, args, kwargs):
        events.append(("call", names[module], list(_tensors(args)) + list(_tensors(kwargs)), []))

    def on_return(module, args, kwargs, output):
        name = names[module]
        ins, outs = list(_tensors(args)) + list(_tensors(kwargs)), list(_tensors(output))
        events.append(("return", name, ins, outs))
        if is_linear_like(module):
            with recorder.pause():  # hf_dreg's own reads are not part of the model's data flow
                layer = _read_layer(module, ins, outs)
            if name not in layers:
                layers[name] = layer
            elif layer.computes_linear is False:
                layers[name].computes_linear = False

    fused = {module: spec for module in names if (spec := fused_mlp_spec(module)) is not None}
    fused_inputs: dict[str, Tensor] = {}
    own_forwards = []
    for module, spec in fused.items():  # the probe runs the product unfused (Liger's kernel may not run here, e.g. on meta)
        own_forwards.append((module, module.__dict__.get("forward")))
        module.forward = unfused_forward(module, spec)
        handles.append(module.register_forward_pre_hook(lambda m, args: fused_inputs.setdefault(names[m], args[0])))
    activation_classes = set()
    for module, name in names.items():
        linear = is_linear_like(module)
        act = is_activation_module(module)
        if act:
            activation_classes.add(type(module).__name__)
        if linear or act:
            handles.append(module.register_forward_pre_hook(on_call, with_kwargs=True))
            # first among the forward hooks: before any hook that frees the weights (ZeRO-3 releases them in one)
            handles.append(module.register_forward_hook(on_return, with_kwargs=True, prepend=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (_buffers_on_meta(model, recorder) if meta else contextlib.nullcontext()):
            if meta:
                inputs = {k: _meta_input(v, recorder) for k, v in inputs.items()}
            with recorder:
                try:
                    model(**inputs)
                except Exception as error:
                    if not meta:
                        raise
                    raise _meta_error(model, error) from error
    finally:
        model.train(was_training)
        _reshard_fsdp2(model)
        for h in handles:
            h.remove()
        for module, own in own_forwards:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
    sites = _sites_from_events(model, names, events, inputs, layers)
    sites += [_fused_mlp_site(names[m], spec, fused_inputs[names[m]], inputs, layers) for m, spec in fused.items() if names[m] in fused_inputs]
    called = {name for kind, name, _, _ in events if kind == "return"}
    return sites, activation_classes, layers, called


def _reshard_fsdp2(model: nn.Module) -> None:
    """After the probe, every FSDP2 unit holds its sharded parameters again: FSDP2 keeps the root's gathered after
    a forward (for the backward that follows in training), and ``model.parameters()`` would give those instead."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _fused_mlp_site(name: str, spec, x: Tensor, inputs, layers) -> Site:
    prefix = f"{name}." if name else ""
    gate = layers.get(prefix + "gate_proj")
    return Site(
        name=name,
        kind=FUSED_MLP,
        activation=f"fused {spec.name}",
        inputs=(prefix + "gate_proj", prefix + "up_proj"),
        output=prefix + "down_proj",
        width=gate.out_features if gate is not None else 0,
        gate=prefix + "gate_proj",
        up=prefix + "up_proj",
        mask_key=_mask_key(tuple(x.shape[:-1]), inputs),
        family=spec.family,
    )


def _meta_input(value, recorder: _Recorder):
    if not isinstance(value, Tensor) or value.is_meta:
        return value
    moved = value.to(_META)
    recorder.add_twin(moved, value.detach().clone())
    return moved


def _meta_error(model: nn.Module, error: Exception) -> MetaProbeError:
    params = list(model.parameters())
    n_meta = sum(p.is_meta for p in params)
    where = "all of its parameters are" if n_meta == len(params) else f"{n_meta} of its {len(params)} parameter tensors are"
    return MetaProbeError(
        f"find_sites could not run its probe forward pass of {type(model).__name__} on the meta device: {where} "
        f"on 'meta' (no values), and the forward failed with {type(error).__name__}: {error}. "
        "FSDP's fsdp_cpu_ram_efficient_loading leaves the weights of ranks > 0 on 'meta' until they are "
        "broadcast from rank 0. Build the model on one device, or set fsdp_cpu_ram_efficient_loading: false "
        "(or attach DREG after the weights are materialised)."
    )


def _sites_from_events(model, names, events, inputs, layers) -> list[Site]:
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
        site = _follow(name, modules, ins[0], outs[0], events[index + 1 :], origin, layer_input, layers, inputs)
        if site is not None:
            sites.append(site)
    shared = [s.name for s in sites if calls[s.name] > 1]
    if shared:
        raise ValueError(
            f"The activation module(s) {shared} are called more than once per forward (shared between layers). "
            "hf_dreg needs one activation module per MLP: give each layer its own, or exclude them."
        )
    return sites


def _check_feeding_layers(model: nn.Module, sites: list[Site], layers: dict) -> None:
    """What the probe found inside each chosen site's feeding layers: an unsupported adapter, or a
    layer that does not compute x @ W.T + b with the weight hf_dreg reads."""
    modules = dict(model.named_modules())
    for site in sites:
        for path in dict.fromkeys(site.inputs):
            layer = layers[path]
            if layer.error is not None:
                raise UnsupportedLayerError(f"The layer {path!r} feeds the DREG site {site.name!r}: {layer.error}") from layer.error
            if layer.computes_linear is False:
                raise not_linear_error(path, modules[path])


def _follow(name, modules, z, a, later_events, origin, layer_input, layers, inputs) -> Site | None:
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
    if consumer is None or consumer not in layers:
        return None
    width = z.shape[-1]
    d_in = layers[gate].in_features
    if layers[consumer].in_features != width or layers[consumer].out_features != d_in:
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
