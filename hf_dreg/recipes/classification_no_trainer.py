"""Text classification with DREG in your own loop on accelerate, in the style of transformers' ``*_no_trainer.py``.

``Accelerator`` with ``gradient_accumulation_steps``, ``accelerator.accumulate``, a progress bar, and DREG through
the own-loop contract: the step's valid positions counted with :func:`hf_dreg.count_positions` (summed over the
processes), every micro-batch adding ``handle.penalty(num_positions=...)`` scaled back by the accumulation steps
and processes that accelerate and DDP divide by. Behind ``scripts/run_text_classification_no_trainer.py``.
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers as tf

from ..modeling.hooks import attach
from ..modeling.positions import count_positions
from .data import check_columns, load_file
from .models import check_activations_before_loading, resolve_checkpoint
from .own_loop import (
    DTYPES,
    StepLog,
    add_loop_arguments,
    check_loop_arguments,
    make_accelerator,
    make_optimizer,
    optimizer_steps,
    save_and_push,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_arguments(parser, learning_rate=5e-5, model_help="A hub id, a local checkpoint, or 'packaged-minilm'.")
    parser.add_argument("--label_column", default="label")
    return check_loop_arguments(parser, parser.parse_args(argv))


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
    from accelerate.utils import set_seed

    checkpoint = resolve_checkpoint(args.model_name_or_path)
    if args.dreg_lambda > 0:  # from the config: before any weight, data or output folder
        check_activations_before_loading(checkpoint, args.dreg_activations, (tf.AutoModelForSequenceClassification,))
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    tokenizer = tf.AutoTokenizer.from_pretrained(checkpoint)
    with accelerator.main_process_first():
        train_data, label2id = _encoded(args.train_file, "--train_file", args, tokenizer, None)
        eval_data = _encoded(args.validation_file, "--validation_file", args, tokenizer, label2id)[0] if args.validation_file else None
    model = tf.AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=len(label2id), id2label={i: str(label) for label, i in label2id.items()},
        label2id={str(label): i for label, i in label2id.items()}, dtype=DTYPES[args.torch_dtype],
    )
    # on the model itself, before accelerate wraps it
    handle = attach(model, activations=args.dreg_activations, kernels=args.dreg_kernels) if args.dreg_lambda > 0 else None
    collator = tf.DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(train_data, batch_size=args.per_device_train_batch_size, shuffle=args.shuffle, collate_fn=collator)
    optimizer = make_optimizer(args, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, len(loader) // args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # accelerate divides each micro-batch's loss by the accumulation steps and DDP averages over processes:
    # the DREG shares (each site's sum / the step's valid positions) are scaled back by both
    scale = args.gradient_accumulation_steps * accelerator.num_processes
    log = StepLog(max_steps, accelerator)
    dreg = None
    model.train()
    for micro in optimizer_steps(loader, args.gradient_accumulation_steps, max_steps):
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
        log.add(float(task.detach()), dreg)
    logged = log.close()
    if handle is not None:
        handle.detach()  # the saved model is a plain transformers checkpoint
    metrics = {"train_steps": len(logged)}
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
    results = {**metrics, "dreg_lambda": args.dreg_lambda, "log_history": logged}
    save_and_push(accelerator, model, tokenizer, args, results, "DREG fine-tuning (no Trainer)")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    metrics = train(parse_args(argv))
    print(json.dumps(metrics))
    return metrics
