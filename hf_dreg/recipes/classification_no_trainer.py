"""Text classification with DREG in your own loop on accelerate, in the style of transformers' ``*_no_trainer.py``.

``Accelerator`` with ``gradient_accumulation_steps``, ``accelerator.accumulate``, a progress bar, and DREG through
the own-loop contract: the step's valid positions counted with :func:`hf_dreg.count_positions` (summed over the
processes), every micro-batch adding ``handle.penalty(num_positions=...)`` scaled back by the accumulation steps
and processes that accelerate and DDP divide by. Behind ``scripts/run_text_classification_no_trainer.py``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import transformers as tf
from tqdm.auto import tqdm

from ..modeling.hooks import attach
from ..modeling.positions import count_positions
from .data import check_columns, load_file
from .models import check_activations_before_loading, resolve_checkpoint

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A hub id, a local checkpoint, or 'packaged-minilm'.")
    parser.add_argument("--train_file", required=True, help="Training data: .jsonl/.json/.csv/.parquet.")
    parser.add_argument("--validation_file", default=None, help="Evaluation data (same formats); accuracy is reported.")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_length", type=int, default=128, help="Truncate the texts to this many tokens.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=32)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True, help="Shuffle the training data each epoch.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_dtype", choices=list(DTYPES), default="float32", help="The model's dtype.")
    parser.add_argument("--dreg_lambda", type=float, default=10**-2.5, help="DREG strength (0: plain training).")
    parser.add_argument("--dreg_activations", default="gelu", help="Which activations are DREG sites: gelu, silu, relu, tanh or all.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to --hub_model_id.")
    parser.add_argument("--hub_model_id", default=None)
    args = parser.parse_args(argv)
    if args.gradient_accumulation_steps < 1 or args.per_device_train_batch_size < 1:
        parser.error("--gradient_accumulation_steps and --per_device_train_batch_size must be >= 1.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (the repository to upload to).")
    return args


def _encoded(path: str, flag: str, args, tokenizer, label2id: dict | None):
    data = load_file(path, flag)
    if len(data) == 0:
        raise ValueError(f"{flag} {path}: the file has no examples.")
    check_columns(data, args.text_column, args.label_column, split="training" if flag == "--train_file" else "evaluation")
    if label2id is None:
        label2id = {label: i for i, label in enumerate(sorted(set(data[args.label_column]), key=str))}

    def encode(batch):
        out = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_length)
        out["labels"] = [label2id[label] for label in batch[args.label_column]]
        return out

    return data.map(encode, batched=True, remove_columns=data.column_names), label2id


def train(args: argparse.Namespace) -> dict:
    """Train and (with a validation file) evaluate; returns the metrics and the number of optimizer steps."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    checkpoint = resolve_checkpoint(args.model_name_or_path)
    if args.dreg_lambda > 0:  # from the config: before any weight, data or output folder
        check_activations_before_loading(checkpoint, args.dreg_activations, (tf.AutoModelForSequenceClassification,))
    # the step's micro-batches are drawn before the first one runs (to count their positions), so the end of the
    # data loader comes early: accelerate must sync every G micro-batches, not at the loader's end
    plugin = GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin)
    set_seed(args.seed)
    tokenizer = tf.AutoTokenizer.from_pretrained(checkpoint)
    with accelerator.main_process_first():
        train_data, label2id = _encoded(args.train_file, "--train_file", args, tokenizer, None)
        eval_data = _encoded(args.validation_file, "--validation_file", args, tokenizer, label2id)[0] if args.validation_file else None
    model = tf.AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=len(label2id), id2label={i: str(label) for label, i in label2id.items()},
        label2id={str(label): i for label, i in label2id.items()}, dtype=DTYPES[args.torch_dtype],
    )
    handle = attach(model, activations=args.dreg_activations) if args.dreg_lambda > 0 else None  # on the model itself
    collator = tf.DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(train_data, batch_size=args.per_device_train_batch_size, shuffle=args.shuffle, collate_fn=collator)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, len(loader) // args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # accelerate divides each micro-batch's loss by the accumulation steps and DDP averages over processes:
    # the DREG shares (each site's sum / the step's valid positions) are scaled back by both
    scale = args.gradient_accumulation_steps * accelerator.num_processes
    bar = tqdm(total=max_steps, desc="train", disable=not accelerator.is_local_main_process)
    logged = []
    step = 0
    model.train()
    while step < max_steps:
        batches = iter(loader)
        while step < max_steps:
            micro = [b for b in (next(batches, None) for _ in range(args.gradient_accumulation_steps)) if b is not None]
            if len(micro) < args.gradient_accumulation_steps:
                break  # an epoch's incomplete last step is dropped: every step has the same accumulation
            counts = {}
            if handle is not None:
                counts = {kind: accelerator.reduce(n, "sum") for kind, n in count_positions(micro, accelerator.device).items()}
            for batch in micro:
                with accelerator.accumulate(model):
                    task = model(**batch).loss
                    loss = task
                    if handle is not None:
                        dreg = handle.penalty(num_positions=counts)
                        loss = task + args.dreg_lambda * scale * dreg
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
            step += 1
            entry = {"step": step, "task_loss": float(task.detach())}
            if handle is not None:
                entry["dreg_share"] = float(dreg.detach())
            logged.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['task_loss']:.4g}")
    bar.close()
    if handle is not None:
        handle.detach()  # the saved model is a plain transformers checkpoint
    metrics = {"train_steps": step}
    if eval_data is not None:
        model.eval()
        eval_loader = accelerator.prepare(torch.utils.data.DataLoader(eval_data, batch_size=args.per_device_eval_batch_size, collate_fn=collator))
        correct = total = 0
        with torch.no_grad():
            for batch in eval_loader:
                predictions, labels = accelerator.gather_for_metrics((model(**batch).logits.argmax(-1), batch["labels"]))
                correct += int((predictions == labels).sum())
                total += len(labels)
        metrics["eval_accuracy"] = correct / max(total, 1)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump({**metrics, "dreg_lambda": args.dreg_lambda, "log_history": logged}, f, indent=2)
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(args.hub_model_id, exist_ok=True)
            api.upload_folder(folder_path=args.output_dir, repo_id=args.hub_model_id, commit_message="DREG fine-tuning (no Trainer)")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    metrics = train(parse_args(argv))
    print(json.dumps(metrics))
    return metrics
