"""The one small interface every regularizer of the study implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

TaskLoss = Callable[[nn.Module, dict], tuple[Tensor, Any]]


@dataclass
class StepInfo:
    """How the current optimizer step is split: accumulation steps, processes, valid positions per mask."""

    accumulation_steps: int = 1
    processes: int = 1
    positions: dict[str, Tensor] = field(default_factory=dict)
    optimizer_step: int = 0
    masks: dict[str, Tensor] | None = None  # this micro-batch's valid positions (hf_dreg.modeling.positions.position_masks)
    # when the task loss is normalised over the step's items: their count (divided by the processes the
    # Trainer multiplies by), so that loss * example_scale is the sum of the per-example losses
    example_scale: Tensor | float | None = None


@dataclass
class Penalty:
    """One micro-batch's regularizer output.

    ``term`` is added to the loss times the strength (None: nothing to add); it is normalised so that
    summing it over the micro-batches of a step, divided by the accumulation steps, and averaging over
    processes gives the step's penalty (the convention of a per-batch mean loss). ``value`` is what is
    logged under the regularizer's name; ``extra`` are further named values to log.
    """

    term: Tensor | None = None
    value: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)
    # evaluation: per logged name, (sum over valid positions, their count) of every site, shape (2, sites):
    # summed over the evaluated batches before dividing, so the value is that of the whole evaluated data
    parts: dict[str, Tensor] = field(default_factory=dict)


class Regularizer:
    """Computes the task loss (through ``task_loss``) and its own penalty for one micro-batch."""

    name = "none"
    default_strength = 0.0  # the documented dreg_lambda when none is given
    needs_outputs = False  # whether compute() reads the model outputs (logits) of the task loss

    @classmethod
    def build(cls, model: nn.Module, config, seed: int = 0) -> "Regularizer":
        """This regularizer for ``model`` under ``config`` (a DREGConfig); ``seed`` for random projections."""
        return cls(model, config)

    def activate(self, model: nn.Module) -> None:
        """Install what the regularizer needs during the trainer's loops (hooks); nothing by default."""

    def deactivate(self) -> None:
        """Remove what ``activate`` installed: outside the loops the model computes nothing extra."""

    def compute(self, model: nn.Module, inputs: dict, task_loss: TaskLoss, step: StepInfo):
        loss, outputs = task_loss(model, inputs)
        return loss, outputs, Penalty()

    def describe(self) -> dict:
        """What a model card or results file should record about this regularizer."""
        return {}


def needs_double_backward(model: nn.Module, name: str, logger) -> None:
    """Fused attention kernels have no double backward: switch the model to eager attention, saying so."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if config is None or current in (None, "eager"):
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"The {name} regularizer needs double backward, which the attention implementation {current!r} "
            "does not support; load the model with attn_implementation='eager'."
        )
    model.set_attn_implementation("eager")
    logger.warning(f"{name}: switched attention from {current!r} to 'eager', which supports double backward.")


def model_inputs_with_grad(model: nn.Module, inputs: dict) -> tuple[dict, Tensor]:
    """The inputs with their differentiable input made explicit: token embeddings for text, pixels for images."""
    inputs = dict(inputs)
    if "pixel_values" in inputs:
        x = inputs["pixel_values"].detach().requires_grad_(True)
        inputs["pixel_values"] = x
        return inputs, x
    if "inputs_embeds" in inputs:
        x = inputs["inputs_embeds"]
    elif "input_ids" in inputs:
        # not detached: the task loss and the penalty must still train the token embeddings through x
        x = model.get_input_embeddings()(inputs.pop("input_ids"))
    else:
        raise ValueError(
            f"Cannot find the model input to differentiate: expected pixel_values, input_ids or inputs_embeds "
            f"in the batch, got {sorted(inputs)}."
        )
    if not x.requires_grad:  # frozen embeddings (PEFT) or given embeddings: differentiate w.r.t. them anyway
        x = x.detach().requires_grad_(True)
    inputs["inputs_embeds"] = x
    return inputs, x


def batch_mean_of_squares(g: Tensor) -> Tensor:
    """Mean over examples of the squared norm of each example's slice."""
    return g.pow(2).reshape(g.shape[0], -1).sum(-1).mean()


def logits_of(outputs) -> Tensor:
    logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError("The jacobian regularizer needs model outputs with `logits`.")
    return logits
