"""Data of the generative scripts (``run_sft.py``, ``run_seq2seq.py``): a hub dataset or local files.

``DatasetArguments`` are the flags both scripts share (TRL's names for the hub: ``--dataset_name``,
``--dataset_config``, ``--dataset_train_split``, ``--dataset_test_split``); ``load_splits`` returns
the train and evaluation splits after the seeded low-data selection, and a record of what was
done (the model card's data regime). Every mistake is an error that names the flag and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

# local file suffix -> datasets builder
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DatasetArguments:
    """Which data to train and evaluate on (a hub dataset or local files), and how much of it."""

    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset id (or a local dataset folder)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "The hub dataset's training split."})
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "The hub dataset's evaluation split (a 'validation' split is used when this one is absent)."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training data: .jsonl (one JSON object per line), .json, .csv or .parquet."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation data (same formats)."})
    validation_split_percentage: float = field(
        default=5,
        metadata={
            "help": "Without a validation file (or hub evaluation split): hold out this percentage of the training "
            "data for evaluation (seeded; 0 = no evaluation)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many examples (low-data runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a seeded subset of this size."})

    def __post_init__(self):
        if self.dataset_name and (self.train_file or self.validation_file):
            raise ValueError(
                "Pass either --dataset_name (a hub dataset) or --train_file/--validation_file (local files), not both."
            )
        if not self.dataset_name and not self.train_file:
            raise ValueError(
                "No training data: pass --dataset_name <hub dataset id> or --train_file <file.jsonl> "
                "(one JSON object per line)."
            )
        for flag in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be >= 1 (or left out to use every example), got {value}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}.")


def _load_file(path: str, flag: str) -> Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file. Pass the path of an existing .jsonl/.json/.csv/.parquet file.")
    builder = FILE_BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise ValueError(
            f"{flag} {path}: unknown file format {Path(path).suffix or '(no suffix)'!r}. Use one of "
            f"{', '.join(FILE_BUILDERS)} (.jsonl: one JSON object per line)."
        )
    return load_dataset(builder, data_files={"data": path}, split="data")


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def load_splits(args: DatasetArguments, seed: int, evaluate: bool = True) -> tuple[Dataset, Dataset | None, dict]:
    """(train, evaluation or None, record) after the seeded selection of ``max_train_samples``/``max_eval_samples``.

    Evaluation data: ``--validation_file``; else the hub dataset's ``--dataset_test_split`` (or its
    "validation" split); else ``--validation_split_percentage`` of the training data, held out
    before the training subset is drawn. ``evaluate=False`` loads no evaluation data.
    """
    record: dict = {}
    evaluation = None
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config)
        if not isinstance(raw, DatasetDict):
            raw = DatasetDict(train=raw)
        if args.dataset_train_split not in raw:
            raise ValueError(
                f"--dataset_train_split {args.dataset_train_split!r}: {args.dataset_name} has no such split "
                f"(it has {sorted(raw)})."
            )
        train = raw[args.dataset_train_split]
        record["source"] = args.dataset_name + (f" ({args.dataset_config})" if args.dataset_config else "")
        test_split = next((s for s in (args.dataset_test_split, "validation") if s in raw and s != args.dataset_train_split), None)
        if evaluate and test_split is not None:
            evaluation = raw[test_split]
            record["evaluation"] = f"split {test_split!r}"
            record["eval_split"] = test_split
    else:
        train = _load_file(args.train_file, "--train_file")
        record["source"] = os.path.basename(args.train_file)
        if evaluate and args.validation_file:
            evaluation = _load_file(args.validation_file, "--validation_file")
            record["evaluation"] = os.path.basename(args.validation_file)
            record["eval_split"] = "validation"
    if evaluate and evaluation is None and args.validation_split_percentage > 0:
        parts = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
        train, evaluation = parts["train"], parts["test"]
        record["evaluation"] = f"{args.validation_split_percentage:g}% of the training data, held out"
        record["eval_split"] = f"{args.dataset_train_split if args.dataset_name else 'train'} (held out)"
    if len(train) == 0:
        raise ValueError(f"The training data ({record['source']}) has no examples.")
    record["train_available"] = len(train)
    train = _subset(train, args.max_train_samples, seed)
    record["max_train_samples"] = args.max_train_samples
    record["train_examples"] = len(train)
    if evaluation is not None:
        evaluation = _subset(evaluation, args.max_eval_samples, seed)
        record["eval_examples"] = len(evaluation)
    return train, evaluation, record


def dataset_card_info(args: DatasetArguments, record: dict) -> dict:
    """What the model card says about the data: the hub id (or the file) and the evaluation split."""
    split = record.get("eval_split")
    if args.dataset_name:
        return {"name": args.dataset_name, "type": args.dataset_name, "config": args.dataset_config, "split": split, "hub": True}
    evaluated = args.validation_file or args.train_file
    builder = FILE_BUILDERS.get(Path(evaluated).suffix.lower(), "json")
    return {"name": os.path.basename(evaluated), "type": builder, "split": split, "hub": False}


def check_columns(ds: Dataset, split: str, needed: dict[str, str]) -> None:
    """``needed``: column -> the flag that names it. Raise naming the missing column, those there are, and the flag."""
    for column, flag in needed.items():
        if column not in ds.column_names:
            raise ValueError(
                f"Column {column!r} not found in the {split} data; its columns are {ds.column_names}. "
                f"Name the right one with {flag} <column>."
            )
