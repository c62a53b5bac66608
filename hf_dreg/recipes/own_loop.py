"""What the ``*_no_trainer`` recipes share: their common flags, the optimizer, the steps' micro-batches, saving.

The own-loop contract itself (:func:`hf_dreg.count_positions`, ``handle.penalty(num_positions=...)``) is the
library's; this module only holds the loop's plumbing, in the style of transformers' ``*_no_trainer.py``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm.auto import tqdm

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def add_loop_arguments(parser: argparse.ArgumentParser, learning_rate: float, model_help: str) -> None:
    """The flags every own-loop recipe takes (model, files, batches, optimizer, DREG, output, hub)."""
    parser.add_argument("--model_name_or_path", required=True, help=model_help)
    parser.add_argument("--train_file", required=True, help="Training data: .jsonl/.json/.csv/.parquet.")
    parser.add_argument("--validation_file", default=None, help="Evaluation data (same formats).")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--max_length", type=int, default=128, help="Truncate the texts to this many tokens.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=32)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=learning_rate)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True, help="Shuffle the training data each epoch.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_dtype", choices=list(DTYPES), default="float32", help="The model's dtype.")
    parser.add_argument("--dreg_lambda", type=float, default=10**-2.5, help="DREG strength (0: plain training).")
    parser.add_argument("--dreg_activations", default="gelu", help="Which activations are DREG sites: gelu, silu, relu, tanh or all.")
    parser.add_argument("--dreg_kernels", default="auto", choices=["auto", "triton", "compiled", "eager"], help="DREG's kernel family.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to --hub_model_id.")
    parser.add_argument("--hub_model_id", default=None)


def check_loop_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.gradient_accumulation_steps < 1 or args.per_device_train_batch_size < 1:
        parser.error("--gradient_accumulation_steps and --per_device_train_batch_size must be >= 1.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (the repository to upload to).")
    return args


def make_accelerator(args):
    """An Accelerator that syncs every ``--gradient_accumulation_steps`` micro-batches.

    The step's micro-batches are drawn before the first one runs (to count their positions), so the end of the
    data loader comes early: accelerate must sync every G micro-batches, not at the loader's end.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    plugin = GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False)
    return Accelerator(gradient_accumulation_plugin=plugin)


def make_optimizer(args, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)


def optimizer_steps(loader, accumulation: int, max_steps: int):
    """The micro-batches of each optimizer step, ``accumulation`` of them, over epochs until ``max_steps`` steps;
    an epoch's incomplete last step is dropped, so that every step has the same accumulation."""
    step = 0
    while step < max_steps:
        batches = iter(loader)
        while step < max_steps:
            micro = [b for b in (next(batches, None) for _ in range(accumulation)) if b is not None]
            if len(micro) < accumulation:
                break
            step += 1
            yield micro


class StepLog:
    """Every optimizer step's task loss (and DREG share) as ``all_results.json``'s ``log_history``, with the
    progress bar (on the local main process)."""

    def __init__(self, max_steps: int, accelerator):
        self.entries: list[dict] = []
        self.bar = tqdm(total=max_steps, desc="train", disable=not accelerator.is_local_main_process)

    def add(self, task_loss: float, dreg=None) -> None:
        entry = {"step": len(self.entries) + 1, "task_loss": task_loss}
        if dreg is not None:
            entry["dreg_share"] = float(dreg.detach())
        self.entries.append(entry)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{task_loss:.4g}")

    def close(self) -> list[dict]:
        self.bar.close()
        return self.entries


def save_and_push(accelerator, model, tokenizer, args, results: dict, message: str) -> None:
    """The model (a plain transformers checkpoint), its tokenizer and ``all_results.json`` in ``--output_dir``;
    uploaded to ``--hub_model_id`` with ``--push_to_hub``. Main process only."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator.unwrap_model(model).save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.hub_model_id, exist_ok=True)
        api.upload_folder(folder_path=args.output_dir, repo_id=args.hub_model_id, commit_message=message)
