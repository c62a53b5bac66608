"""Gated MLPs whose product DREG's kernels compute: Liger Kernel's fused MLPs, and transformers' own.

``liger_kernel.transformers.apply_liger_kernel_to_*`` (and TRL's ``use_liger_kernel=True``) give a gated
MLP the forward ``down_proj(LigerGELUMulFunction.apply(gate_proj(x), up_proj(x)))``: f(g) * u is one
fused kernel and the model's activation module, if it still has one, never runs, so there is nothing
for DREG's activation hook to see. The MLPs listed here are recognised by their forward function
(whether the class was replaced before the model was built or the forward bound to an existing
instance), without importing liger_kernel. Such an MLP is a site of kind ``fused_mlp``; while DREG is
attached its forward (this instance only, put back by ``detach()``) computes the product and the
penalty in one node of hf_dreg's own kernels (:func:`hf_dreg.ops.triton_functions.gated_site` with
``product=True`` on a GPU), in place of Liger's function.

transformers' own gated MLP (LlamaMLP, GemmaMLP, Gemma2MLP, Qwen2MLP, MistralMLP and their copies in most
decoder models) computes the same ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with its activation a
module. Under the ``triton`` family DREG gives such an MLP the same forward (:func:`is_transformers_gated_mlp`
says which: its forward's bytecode is that expression's): the activation, the product and the penalty are
then one node, one kernel each way, instead of the model's two elementwise operators and DREG's node.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ops.activations import _GELU_TANH, _SILU, ActivationSpec, is_activation_module

# (module, qualified name) of the forward function -> the activation its fused product computes
FUSED_MLP_FORWARDS: dict[tuple[str, str], ActivationSpec] = {
    ("liger_kernel.transformers.geglu", "LigerGEGLUMLP.forward"): _GELU_TANH,  # Liger's GEGLU is the tanh GELU
    ("liger_kernel.transformers.swiglu", "LigerSwiGLUMLP.forward"): _SILU,
}

_LAYERS = ("gate_proj", "up_proj", "down_proj")


def _forward_key(module: nn.Module) -> tuple[str | None, str | None]:
    fn = getattr(module.forward, "__func__", None)
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def fused_mlp_spec(module: nn.Module) -> ActivationSpec | None:
    """The activation of a known fused gated MLP (its forward is one of :data:`FUSED_MLP_FORWARDS`), else None."""
    spec = FUSED_MLP_FORWARDS.get(_forward_key(module))
    if spec is None or not all(isinstance(getattr(module, name, None), nn.Module) for name in _LAYERS):
        return None
    return spec


def _transformers_gated_forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _transformers_gated_forward_returned(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_GATED_FORWARD_CODES = tuple(f.__code__ for f in (_transformers_gated_forward, _transformers_gated_forward_returned))


def is_transformers_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module``'s forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, the gated MLP
    transformers copies into its decoder models (compared by bytecode and names, so a subclass, a decorated or
    an edited forward is not one) and its four parts are modules."""
    code = getattr(getattr(module.forward, "__func__", None), "__code__", None)
    if code is None or not any(
        code.co_code == ref.co_code and code.co_names == ref.co_names and code.co_argcount == ref.co_argcount
        and not code.co_freevars for ref in _GATED_FORWARD_CODES
    ):  # fmt: skip
        return False
    return all(isinstance(getattr(module, name, None), nn.Module) for name in (*_LAYERS, "act_fn"))


def unfused_activation(spec: ActivationSpec):
    """The activation of a fused MLP as torch's function (what the product computes, unfused)."""
    if spec is _GELU_TANH:
        return lambda g: F.gelu(g, approximate="tanh")
    if spec is _SILU:
        return F.silu
    raise ValueError(f"no fused MLP computes {spec.name!r}")


def unfused_forward(module: nn.Module, spec: ActivationSpec):
    """``module``'s forward with the product unfused (torch's functions): what the site finder's probe runs."""
    act = unfused_activation(spec)

    def forward(x):
        return module.down_proj(act(module.gate_proj(x)) * module.up_proj(x))

    return forward


def silent_activation_modules(model: nn.Module, called: set[str]) -> list[str]:
    """Paths of MLP activation modules that the probe never saw run (their MLP's forward bypasses them)."""
    out = []
    for name, module in model.named_modules():
        if name and name not in called and is_activation_module(module):
            out.append(f"{name} ({type(module).__name__}, in {type(model.get_submodule(name.rpartition('.')[0] or '')).__name__})")
    return out
