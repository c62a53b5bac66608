"""Train a tiny BERT with DREGTrainer for a few steps; run under torchrun for the 2-process test.

``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR 4`` trains with 2
processes x 4 examples per step; :func:`train` called in-process with ``per_device_batch=8`` trains
the same global batches on one process. Rank 0 writes ``log_history.json`` and ``weights.pt``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from tiny_models import tiny_model
from torch import nn

from hf_dreg import DREGTrainer, DREGTrainingArguments

N_EXAMPLES = 16  # two global batches of 8
SEQ = 12
# long sequences in the first half of each global batch, short ones in the second: with 2 processes
# the ranks see very different numbers of valid positions.
LENGTHS = [12, 11, 10, 12, 3, 2, 4, 5, 9, 12, 8, 11, 2, 6, 3, 4]


def tiny_bert(seed: int = 0):
    model = tiny_model("bert", seed=seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def padded_dataset(lengths=LENGTHS, seq: int = SEQ, seed: int = 0, num_labels: int = 3) -> Dataset:
    """Pre-padded token ids with a different number of valid positions per example."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(3, 99, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    labels = torch.randint(0, num_labels, (len(lengths),), generator=g)
    return Dataset.from_dict({"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def collated_dataset():
    """Unpadded tokenized texts of unequal length: the Trainer pads them with DataCollatorWithPadding (BatchEncoding)."""
    from trainer_helpers import classification_data, tokenizer

    tok = tokenizer()
    word_counts = [30, 21, 12, 17, 1, 6, 3, 9, 25, 2, 14, 8, 1, 33, 4, 7]
    return tok, classification_data(tok, word_counts)


def initial_model(collator: bool = False):
    if not collator:
        return tiny_bert()
    from trainer_helpers import tiny_text_model, tokenizer

    return tiny_text_model("bert", tokenizer().vocab_size)


def train(out_dir: str, per_device_batch: int, steps: int = 2, collator: bool = False, **overrides):
    args = DREGTrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=steps,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        dreg_lambda=1.0,
        dreg_kernels="eager",
        train_sampling_strategy="sequential",
        use_cpu=overrides.pop("use_cpu", True),
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **overrides,
    )
    if collator:
        tok, data = collated_dataset()
        extra = {"processing_class": tok}
    else:
        data, extra = padded_dataset(), {}
    model = initial_model(collator)
    trainer = DREGTrainer(model=model, args=args, train_dataset=data, **extra)
    trainer.train()
    weights = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    return trainer, weights


def main() -> None:
    out_dir, batch = sys.argv[1], int(sys.argv[2])
    collator = len(sys.argv) > 3 and sys.argv[3] == "collator"
    trainer, weights = train(os.path.join(out_dir, "run"), batch, collator=collator)
    if trainer.args.process_index == 0:
        with open(os.path.join(out_dir, "log_history.json"), "w") as f:
            json.dump({"world_size": trainer.args.world_size, "log_history": trainer.state.log_history}, f)
        torch.save(weights, os.path.join(out_dir, "weights.pt"))


if __name__ == "__main__":
    main()
