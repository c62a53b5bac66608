"""The layers that feed an activation: plain Linear, GPT-2's Conv1D, and PEFT adapters around them.

A site's penalty needs the weight rows of the feeding layer (one row per hidden unit). This module is
the one place that knows how each layer stores them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """A layer computing x @ W.T + b that can feed an activation (an adapter wrapper counts as its base)."""
    base = getattr(module, "base_layer", None)
    if base is not None and hasattr(module, "get_delta_weight"):
        return is_linear_like(base)
    return isinstance(module, (nn.Linear, Conv1D))


def weight_rows(module: nn.Module) -> Tensor:
    """The effective weight as (out_features, in_features): row i feeds hidden unit i.

    Read it inside the layer's own forward (a forward hook), so that sharded weights (FSDP, ZeRO-3)
    are materialised when read. For a PEFT LoRA layer the active, unmerged adapters are added, so the
    penalty is that of the layer as it computes, and its gradient reaches the adapters.
    """
    base = getattr(module, "base_layer", None)
    if base is not None and hasattr(module, "get_delta_weight"):
        if getattr(module, "use_dora", {}) and any(module.use_dora.get(a, False) for a in module.active_adapters):
            raise NotImplementedError(
                f"DREG does not support DoRA adapters yet (layer {type(module).__name__}); use plain LoRA."
            )
        weight = base.weight
        if not module.disable_adapters and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter)
        return _as_rows(base, weight)
    return _as_rows(module, module.weight)


def _as_rows(module: nn.Module, weight: Tensor) -> Tensor:
    return weight.t() if isinstance(module, Conv1D) else weight


def bias_of(module: nn.Module) -> Tensor | None:
    base = getattr(module, "base_layer", module)
    return base.bias


def in_features(module: nn.Module) -> int:
    return weight_rows(module).shape[1]


def check_computes_linear(name: str, module: nn.Module, x: Tensor, out: Tensor) -> None:
    """Verify by data flow that out == x @ W.T + b for the weight hf_dreg will read."""
    with torch.no_grad():
        w = weight_rows(module)
        expected = torch.nn.functional.linear(x.to(w.dtype), w, bias_of(module))
        if not torch.allclose(expected.float(), out.float(), rtol=1e-3, atol=1e-4):
            raise ValueError(
                f"The layer {name!r} ({type(module).__name__}) feeds an activation but does not compute "
                "x @ W.T + b with the weight hf_dreg reads (a quantized or custom layer?). "
                "Exclude its site with exclude_modules=[...]."
            )
