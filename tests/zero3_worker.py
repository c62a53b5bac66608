"""DREG and DeepSpeed ZeRO-3 on CPU: 2 gloo processes, ``DS_ACCELERATOR=cpu`` (tests/modeling/test_sharded.py).

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/zero3_worker.py OUT_DIR

A tiny Gemma under ZeRO-3 (every parameter partitioned): ``hf_dreg.attach`` after ``deepspeed.initialize``,
and attached before it, then a forward. Rank 0 writes ``OUT_DIR/zero3.json``: what each raised.
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import tiny_inputs, tiny_model  # noqa: E402

import hf_dreg  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "zero_force_ds_cpu_optimizer": False,
    "zero_allow_untested_optimizer": True,
}


def engine_of(model):
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=CONFIG)
    return engine


def outcome(call) -> str:
    try:
        call()
    except Exception as error:  # the test reads the kind of error
        return type(error).__name__
    return "no error"


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    found = {}
    engine = engine_of(tiny_model("gemma", seed=0))
    found["after"] = outcome(lambda: hf_dreg.attach(engine.module, kernels="eager"))
    model = tiny_model("gemma", seed=0)
    handle = hf_dreg.attach(model, kernels="eager")
    engine = engine_of(model)
    inputs = tiny_inputs(model, batch=2)
    found["before"] = outcome(lambda: engine(**inputs))
    handle.detach()
    if dist.get_rank() == 0:
        with open(os.path.join(sys.argv[1], "zero3.json"), "w") as f:
            json.dump(found, f)
    dist.barrier()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
