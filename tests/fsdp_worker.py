"""DREG under FSDP2 (``fully_shard``, its default ``reshard_after_forward=True``): 2 gloo processes on CPU.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR CASE [CASE ...]

A CASE is ``family:kernels:when[:keep]`` (family ``bert``, ``gemma``, ``llama``, ``gemma-lora``; kernels
``eager``, ``compiled``, ``triton``; when ``before``/``after``: attach before or after sharding; ``keep``:
``reshard_after_forward=False``). Each case builds a tiny float64 model, shards every transformer block
and the root with ``fully_shard`` (default resharding unless ``keep``), and on 8 texts of unequal length (4 per process, each process padded to its own
longest) computes

- the gradient of DREG's penalty alone (the step's penalty over the 8 texts: ``num_positions`` is the
  global count), and
- the weights after two SGD steps on task loss + lambda * penalty,

against one process without sharding on the same 8 texts (computed on rank 0, the same code). Rank 0
writes ``OUT_DIR/results.json``: per case, the relative differences and the DREG share of the update
(the same training at lambda 0 against it).
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import tiny_model  # noqa: E402

import hf_dreg  # noqa: E402

LENGTHS = [12, 3, 10, 7, 2, 11, 5, 9]  # rank 0 gets the first 4, rank 1 the last 4
SEQ = 12
LAMBDA = {"bert": 3.0, "gemma": 100.0, "llama": 100.0, "gemma-lora": 3.0}
LR = 0.5
ACTIVATIONS = {"bert": "gelu", "gemma": "gelu", "gemma-lora": "gelu", "llama": "silu"}
BLOCKS = ("BertLayer", "GemmaDecoderLayer", "LlamaDecoderLayer")


def build(family: str) -> nn.Module:
    base = "gemma" if family == "gemma-lora" else family
    model = tiny_model(base, dtype=torch.float64, seed=0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if family == "gemma-lora":
        import peft

        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
        with torch.no_grad():  # lora_B starts at zero: give every adapter a sizable delta
            g = torch.Generator().manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def texts():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (len(LENGTHS), SEQ), generator=g)
    mask = (torch.arange(SEQ)[None] < torch.tensor(LENGTHS)[:, None]).long()
    labels = torch.randint(0, 3, (len(LENGTHS),), generator=g)
    return ids * mask, mask, labels


def batch(rows) -> dict:
    ids, mask, labels = texts()
    ids, mask, labels = ids[rows], mask[rows], labels[rows]
    longest = int(mask.sum(1).max())  # each process pads to its own longest text
    return {"input_ids": ids[:, :longest], "attention_mask": mask[:, :longest], "labels": labels}


def shard(model: nn.Module, keep: bool = False) -> None:
    from torch.distributed.fsdp import fully_shard

    options = {"reshard_after_forward": False} if keep else {}  # else FSDP2's default, True
    for module in model.modules():
        if type(module).__name__ in BLOCKS:
            fully_shard(module, **options)
    fully_shard(model, **options)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run(family: str, kernels: str, when: str, rows, world: int, sharded: bool, strength: float | None = None, keep: bool = False) -> dict:
    """The penalty's gradient, then two SGD steps: {"penalty_grad", "weights", "initial", "dreg_share"}."""
    strength = LAMBDA[family] if strength is None else strength
    model = build(family)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    handle = None
    if sharded and when == "before":
        handle = hf_dreg.attach(model, activations=ACTIVATIONS[family], kernels=kernels)
    if sharded:
        shard(model, keep)
    if handle is None:
        handle = hf_dreg.attach(model, activations=ACTIVATIONS[family], kernels=kernels)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if sharded:  # attach's probe forward leaves no unit holding its gathered parameters (FSDP2 keeps the root's)
        assert all(type(p).__name__ == "DTensor" for p in params.values()), [n for n, p in params.items() if type(p).__name__ != "DTensor"]
    total = float(texts()[1].sum())  # the valid positions of all 8 texts
    inputs = batch(rows)
    scale = world  # FSDP2 averages the gradients over processes; each process' share of the sum is scaled back

    def losses():
        out = model(**inputs)
        return out.loss, scale * handle.penalty(num_positions=total)

    _, penalty = losses()
    penalty.backward()
    penalty_grad = {n: full(p.grad) for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD(list(params.values()), lr=LR)
    for _ in range(2):
        task, penalty = losses()
        (task + strength * penalty).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    handle.detach()
    return {"penalty_grad": penalty_grad, "weights": {n: full(p) for n, p in params.items()}, "initial": initial}


def relative(a: dict, b: dict, base: dict | None = None) -> float:
    num = den = 0.0
    for k in b:
        x, y = a[k].double(), b[k].double()
        if base is not None:
            x, y = x - base[k].double(), y - base[k].double()
        num += float((x - y).norm()) ** 2
        den += float(y.norm()) ** 2
    return math.sqrt(num / den) if den else float("inf")


def main() -> None:
    out_dir, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = len(LENGTHS) // world
    results = {}
    for case in cases:
        family, kernels, when, *keep = case.split(":")
        got = run(family, kernels, when, list(range(rank * per, (rank + 1) * per)), world, sharded=True, keep=keep == ["keep"])
        if rank == 0:
            ref = run(family, kernels, when, list(range(len(LENGTHS))), 1, sharded=False)
            plain = run(family, kernels, when, list(range(len(LENGTHS))), 1, sharded=False, strength=0.0)
            missing = sorted(set(ref["penalty_grad"]) - set(got["penalty_grad"]))
            results[case] = {
                "penalty_grad": relative(got["penalty_grad"], ref["penalty_grad"]) if not missing else float("inf"),
                "missing_grads": missing,
                "weights_after_2_steps": relative(got["weights"], ref["weights"], ref["initial"]),
                # how much DREG moves the weights: ||update - update at lambda 0|| / ||update||
                "dreg_share_of_update": relative(plain["weights"], ref["weights"], ref["initial"]),
            }
        dist.barrier()
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
