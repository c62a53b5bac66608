"""DREG on sharded models: FSDP2 (``torch.distributed.fsdp.fully_shard``) and DeepSpeed ZeRO-3.

FSDP2 gathers the weights of each sharded module (an "FSDP unit": a transformer block, the root) for its
forward and, by default (``reshard_after_forward=True``), frees them right after it. In backward it
gathers them again in a hook on the unit's **outputs** (it fires when their gradient arrives) and, in a
node on the unit's **inputs**, hands the weights' gradients to its reduce-scatter and frees the weights
once more. A DREG site's penalty leaves the unit by another way: it is recorded inside the unit's forward
and summed outside. Its backward therefore does not wait for the unit's output gradient: a gated site's
node (and, in a backward of the penalty alone, every site's) runs at the start of backward, and its row
statistics read the weight while its storage is freed (a segmentation fault on a CPU, garbage or an
illegal access on a GPU); the row statistics' gradient of the weight is not ordered before the unit's
reduce-scatter either. Two identity nodes fix both, with no copy:

- :class:`Tie` passes the unit's first output that requires grad and the penalties recorded in its
  forward through one node, before FSDP2's post-forward hook registers its pre-backward hook on that
  output. Autograd runs the node, and so everything of the penalty inside the unit, only once the output's
  gradient is in, and FSDP2's hook, now on the node's output, gathers the weights first. A backward of
  the penalty alone runs the node too (its output's gradient is then None): FSDP2's hook fires all the same.
- :class:`Gate` passes every weight the penalty reads (each parameter, before any arithmetic on it) with
  an edge to the layer's output: autograd runs the layer's own backward, which FSDP2's input node follows,
  only after every DREG node that reads the weight has given it its gradient.

ZeRO-3 gathers and frees weights **per layer** (every submodule with parameters), in the layer's own
forward hooks and, in backward, in nodes on the layer's outputs (gather) and inputs (release); a released
parameter's ``.data`` is an empty tensor. A gated site reads the gate's and the up projection's weights
together (``<W_g,i, W_u,i>``), after the gate's forward has released the gate's weight, and its backward
needs both again, which ZeRO-3 never gathers at the same time; no node that hooks can place runs between
one layer's gather and its release in backward either (that window holds the layer's own backward only).
So the fix above does not carry over, and DREG refuses ZeRO-3 models (:func:`check_zero3`) with that
reason and the alternatives (FSDP2, ZeRO-2).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - an older torch or one without distributed
    FSDPModule = None


class Gate(torch.autograd.Function):
    """``w`` unchanged (an alias, no copy); ``anchor`` (the layer's output) gets no gradient, only an edge.

    The edge makes the layer's backward wait for this node, and this node waits for every DREG node that
    read ``w``: the penalty's gradient of the weight is accumulated before the layer's own backward runs,
    and so before FSDP2's post-backward of the unit hands the weight's gradient to its reduce-scatter.
    """

    @staticmethod
    def forward(ctx, w, anchor):
        return w.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Tie(torch.autograd.Function):
    """(out, p_1 ... p_k) unchanged (aliases, no copy), as one node: the penalties' gradients pass only once
    the unit's output gradient is in, after FSDP2's pre-backward hook on ``out`` has gathered the weights."""

    @staticmethod
    def forward(ctx, out, *penalties):
        ctx.set_materialize_grads(False)
        return (out.detach(), *(p.detach() for p in penalties))

    @staticmethod
    def backward(ctx, *grads):
        return grads


def gate(w: Tensor, anchor) -> Tensor:
    """:class:`Gate` where it matters: a weight that gets a gradient, an anchor in the graph."""
    if not (isinstance(anchor, Tensor) and anchor.requires_grad and w.requires_grad and torch.is_grad_enabled()):
        return w
    return Gate.apply(w, anchor)


def fsdp2_owner(chain: list[nn.Module]) -> nn.Module | None:
    """The FSDP2 unit whose parameter group holds the weight of ``chain[0]`` (its ancestors follow): the
    nearest module of the chain that ``fully_shard`` was applied to."""
    if FSDPModule is None:
        return None
    for module in chain:
        if isinstance(module, FSDPModule):
            return module
    return None


def first_grad_tensor(output):
    """(the first tensor in ``output`` that requires grad, a function putting a replacement in its place),
    searching tensors, tuples, lists and mappings (ModelOutput) depth-first; (None, None) if there is none."""
    if isinstance(output, Tensor):
        return (output, lambda t: t) if output.requires_grad else (None, None)
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            found, put = first_grad_tensor(item)
            if found is not None:

                def replace(t, i=i, put=put):
                    items = list(output)
                    items[i] = put(t)
                    return items if isinstance(output, list) else (type(output)(*items) if hasattr(output, "_fields") else tuple(items))

                return found, replace
        return None, None
    if isinstance(output, Mapping):
        for key, item in output.items():
            found, put = first_grad_tensor(item)
            if found is not None:

                def replace(t, key=key, put=put):
                    output[key] = put(t)  # ModelOutput keeps its attribute in step
                    return output

                return found, replace
    return None, None


class Zero3Error(RuntimeError):
    """DREG was attached to (or called on) a model with DeepSpeed ZeRO-3 (partitioned) parameters."""


def check_zero3(model: nn.Module) -> None:
    """Raise :class:`Zero3Error` if ``model`` has DeepSpeed ZeRO-3 parameters (``ds_id``: ZeRO-1/2 add none)."""
    found = next(((n, p) for n, p in model.named_parameters() if hasattr(p, "ds_id")), None)
    if found is None:
        return
    raise Zero3Error(
        f"DREG does not support DeepSpeed ZeRO-3 (parameter {found[0]!r} is a ZeRO-3 parameter). ZeRO-3 gathers each "
        "layer's weight for that layer's own forward and backward only and frees it right after, while DREG's row "
        "statistics read a gated site's gate and up weights together (after the gate's forward has freed the gate's) "
        "and read them again in backward, where the two are never gathered at the same time: the penalty and its "
        "gradient would be wrong or crash. Use FSDP2 instead (accelerate fsdp_version: 2, or "
        "torch.distributed.fsdp.fully_shard, default reshard_after_forward=True included), or DeepSpeed ZeRO stage 2."
    )
