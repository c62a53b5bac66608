"""Causal-LM fine-tuning with DREG in your own loop on accelerate, in the style of transformers' ``run_clm_no_trainer.py``.

Both terms of the loss are exact under accumulation and DDP on texts of unequal length:

- the task loss: each micro-batch's token loss summed and divided by the target tokens of the whole step
  (``num_items_in_batch``, which transformers' causal LMs honour; the Trainer counts it the same way, over
  ``labels[..., 1:]``), so the micro-batches' losses add up to the step's mean token loss;
- DREG: each site's sum over the micro-batch's valid positions divided by the step's valid positions
  (:func:`hf_dreg.count_positions`, ``handle.penalty(num_positions=...)``).

Both counts are summed over the processes, and both terms are scaled back by the accumulation steps and
processes that accelerate and DDP divide by. Behind ``scripts/run_clm_no_trainer.py``.
"""

from __future__ import annotations

import argparse
import json
import math

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
    add_loop_arguments(parser, learning_rate=2e-5, model_help="A hub id or a local checkpoint of a causal LM.")
    return check_loop_arguments(parser, parser.parse_args(argv))


def _encoded(path: str, flag: str, args, tokenizer):
    data = load_file(path, flag)
    if len(data) == 0:
        raise ValueError(f"{flag} {path}: the file has no examples.")
    check_columns(data, args.text_column, split="training" if flag == "--train_file" else "evaluation")

    def encode(batch):
        return tokenizer(batch[args.text_column], truncation=True, max_length=args.max_length)

    return data.map(encode, batched=True, remove_columns=data.column_names)


def target_tokens(batches) -> torch.Tensor:
    """The tokens a causal LM's loss is taken over in these micro-batches: labels after the first, not -100."""
    return sum(batch["labels"][..., 1:].ne(-100).sum() for batch in batches)


def train(args: argparse.Namespace) -> dict:
    """Train and (with a validation file) evaluate the mean token loss and perplexity; returns the metrics."""
    from accelerate.utils import set_seed

    checkpoint = resolve_checkpoint(args.model_name_or_path)
    if args.dreg_lambda > 0:  # from the config: before any weight, data or output folder
        check_activations_before_loading(checkpoint, args.dreg_activations, (tf.AutoModelForCausalLM,))
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    tokenizer = tf.AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of both terms
    with accelerator.main_process_first():
        train_data = _encoded(args.train_file, "--train_file", args, tokenizer)
        eval_data = _encoded(args.validation_file, "--validation_file", args, tokenizer) if args.validation_file else None
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[args.torch_dtype])
    # on the model itself, before accelerate wraps it
    handle = attach(model, activations=args.dreg_activations, kernels=args.dreg_kernels) if args.dreg_lambda > 0 else None
    collator = tf.DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels = input ids, -100 on padding
    loader = torch.utils.data.DataLoader(train_data, batch_size=args.per_device_train_batch_size, shuffle=args.shuffle, collate_fn=collator)
    optimizer = make_optimizer(args, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, len(loader) // args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scale = args.gradient_accumulation_steps * accelerator.num_processes  # what accelerate and DDP divide by
    log = StepLog(max_steps, accelerator)
    dreg = None
    model.train()
    for micro in optimizer_steps(loader, args.gradient_accumulation_steps, max_steps):
        items = accelerator.reduce(target_tokens(micro).to(accelerator.device), "sum")
        counts = {}
        if handle is not None:
            counts = {kind: accelerator.reduce(n, "sum") for kind, n in count_positions(micro, accelerator.device).items()}
        task_share = 0.0
        for batch in micro:
            with accelerator.accumulate(model):
                task = model(**batch, num_items_in_batch=items).loss  # this micro-batch's share of the step's mean
                loss = task
                if handle is not None:
                    dreg = handle.penalty(num_positions=counts)
                    loss = task + args.dreg_lambda * dreg
                accelerator.backward(loss * scale)
                optimizer.step()
                optimizer.zero_grad()
            task_share += float(task.detach())
        if accelerator.num_processes > 1:  # the step's mean token loss over every process's tokens
            task_share = float(accelerator.reduce(torch.tensor(task_share, device=accelerator.device), "sum"))
        log.add(task_share, dreg)
    logged = log.close()
    if handle is not None:
        handle.detach()  # the saved model is a plain transformers checkpoint
    metrics = {"train_steps": len(logged)}
    if eval_data is not None:
        model.eval()
        eval_loader = accelerator.prepare(torch.utils.data.DataLoader(eval_data, batch_size=args.per_device_eval_batch_size, collate_fn=collator))
        total = tokens = 0.0
        with torch.no_grad():
            for batch in eval_loader:
                n = target_tokens([batch])
                summed = model(**batch, num_items_in_batch=torch.ones((), device=accelerator.device)).loss  # the batch's summed token loss
                total += float(accelerator.reduce(summed.detach().float(), "sum"))
                tokens += float(accelerator.reduce(n.to(accelerator.device).float(), "sum"))
        metrics["eval_loss"] = total / max(tokens, 1.0)
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    results = {**metrics, "dreg_lambda": args.dreg_lambda, "log_history": logged}
    save_and_push(accelerator, model, tokenizer, args, results, "DREG causal-LM fine-tuning (no Trainer)")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    metrics = train(parse_args(argv))
    print(json.dumps(metrics))
    return metrics
