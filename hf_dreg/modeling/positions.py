"""Which positions of a batch are valid tokens: the one definition used to mask and to count DREG.

A site's positions are either the encoder/decoder-only tokens (``attention_mask``) or the decoder
tokens of an encoder-decoder model (``decoder_attention_mask``). The batches come from the Trainer's
collators, which return ``BatchEncoding`` (a ``Mapping``, not a ``dict``), so anything that maps
names to tensors is accepted:

- ``attention_mask``: the batch's own mask; a batch without one (padding-free batches of
  ``DataCollatorWithFlattening`` or TRL's ``padding_free``, with ``position_ids``) has every token
  of ``input_ids`` (or ``inputs_embeds``) valid.
- ``decoder_attention_mask``: the batch's own; else the positions with a label (``labels != -100``:
  ``DataCollatorForSeq2Seq`` pads labels with -100 and builds no decoder mask); else every token of
  ``decoder_input_ids``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

MASK_KEYS = ("attention_mask", "decoder_attention_mask")
IGNORE_INDEX = -100


def _tensor(batch: Mapping, key: str) -> Tensor | None:
    value = batch.get(key) if isinstance(batch, Mapping) else None
    return value if isinstance(value, Tensor) else None


def _every_position(tokens: Tensor | None, embeds: bool = False) -> Tensor | None:
    if tokens is None:
        return None
    shape = tokens.shape[:-1] if embeds else tokens.shape
    return torch.ones(shape, dtype=torch.long, device=tokens.device)


def position_mask(batch: Mapping, key: str) -> Tensor | None:
    """The 0/1 mask of the valid positions that ``key`` stands for in ``batch``; None if it has none of them."""
    mask = _tensor(batch, key)
    if mask is not None:
        return mask
    if key == "attention_mask":
        ids = _tensor(batch, "input_ids")
        return _every_position(ids) if ids is not None else _every_position(_tensor(batch, "inputs_embeds"), embeds=True)
    if key == "decoder_attention_mask":
        labels, decoder_ids = _tensor(batch, "labels"), _tensor(batch, "decoder_input_ids")
        if labels is not None and labels.dim() == 2 and (decoder_ids is None or decoder_ids.shape == labels.shape):
            return labels.ne(IGNORE_INDEX).long()
        if decoder_ids is not None:
            return _every_position(decoder_ids)
        return _every_position(_tensor(batch, "decoder_inputs_embeds"), embeds=True)
    raise KeyError(f"Unknown position kind {key!r}: expected one of {MASK_KEYS}.")


def position_masks(batch: Mapping) -> dict[str, Tensor]:
    """Every kind of position ``batch`` has, with its mask of valid positions."""
    masks = {}
    for key in MASK_KEYS:
        mask = position_mask(batch, key)
        if mask is not None:
            masks[key] = mask
    return masks


def count_positions(batches, device=None) -> dict[str, Tensor]:
    """Valid positions of each kind summed over ``batches`` (the micro-batches of one optimizer step).

    ``{"attention_mask": N}`` (and ``"decoder_attention_mask"`` for encoder-decoder models): the count
    :meth:`hf_dreg.DREGHandle.penalty` takes as ``num_positions``. A kind is counted only when every
    micro-batch has it, so that a step's count never misses one. Under DDP, sum each count over the
    processes (``accelerator.reduce(count, "sum")``). ``device``: of the counts (default: the masks').
    """
    counts = {}
    for key in MASK_KEYS:
        masks = [position_mask(b, key) for b in batches]
        if not masks or any(m is None for m in masks):
            continue
        counts[key] = sum(m.sum() for m in masks).to(device=device or masks[0].device, dtype=torch.float32)
    return counts
