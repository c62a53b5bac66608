"""Data, through ``datasets`` only: loading, column checks, few-shot subsets, label and input noise.

- ``load_file``: one local file (.jsonl/.json/.csv/.parquet, or .npz images), errors naming the flag.
- ``load_raw_datasets`` (classification): a hub dataset by name, local files, a folder of such files, or
  an image folder, as a ``DatasetDict`` with "train" and "validation".
- ``DatasetArguments``, ``load_splits`` (the generative scripts, ``run_sft.py`` and ``run_seq2seq.py``): a
  hub dataset or local files, train and evaluation splits after the seeded low-data selection.
- ``check_columns``: a clear error when a column the run needs is missing, naming the flag to fix it.
- ``select_samples_per_class``, ``apply_label_noise``: seeded few-shot subsets and symmetric label noise.
- ``add_text_noise``, ``add_image_noise``: seeded evaluation-time noise on the tensors the model sees.
- ``vader_lexicon_dataset``: an embedded sentiment data set (the VADER lexicon words), no download.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset

logger = logging.getLogger(__name__)

LABEL_NAMES_FILE = "labels.json"
# local file suffix -> datasets builder (npz: arrays 'images' and 'labels', read here)
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".npz": "npz"}
_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}

# ---- loading -------------------------------------------------------------------------------------


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    data_dir: str | None = None,
    label_column: str = "label",
) -> DatasetDict:
    """The raw data as a ``DatasetDict`` with at least "train" and "validation".

    Sources, first match wins:

    - ``dataset_name``: ``load_dataset(dataset_name, dataset_config_name, data_dir=data_dir)`` (the Hub).
    - ``train_file`` / ``validation_file`` / ``test_file``: local ``.jsonl``/``.json``/``.csv``
      (via ``load_dataset("json"/"csv")``) or ``.npz`` files with ``images`` (uint8, N x H x W or
      N x H x W x 3) and ``labels`` arrays, which become an ``image`` column (``datasets.Image``,
      PIL on access) and a ``label`` column.
    - ``data_dir`` holding ``train.*`` / ``validation.*`` (or ``dev.*``/``val.*``) / ``test.*``
      files of those formats: loaded as the files above.
    - any other ``data_dir``: ``load_dataset("imagefolder", data_dir=data_dir)``.

    A ``labels.json`` (a list of class names, index = label id) beside local files makes the label
    column a ``ClassLabel`` with those names. Without a "validation" split, the "test" split is
    used as validation (and kept as "test").
    """
    if dataset_name:
        raw = load_dataset(dataset_name, dataset_config_name, data_dir=data_dir)
    elif train_file or validation_file or test_file:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        raw = _load_files({split: Path(path) for split, path in files.items() if path}, label_column)
    elif data_dir:
        split_files = _find_split_files(Path(data_dir))
        if split_files:
            raw = _load_files(split_files, label_column)
        else:
            raw = load_dataset("imagefolder", data_dir=data_dir)
    else:
        raise ValueError("No data given: pass --dataset_name, --train_file/--validation_file, or --data_dir.")
    return _with_validation(DatasetDict(raw))


def _with_validation(raw: DatasetDict) -> DatasetDict:
    if "validation" not in raw and "test" in raw:
        logger.info("No validation split: the test split is used for validation.")
        raw["validation"] = raw["test"]
    missing = [split for split in ("train", "validation") if split not in raw]
    if missing:
        raise ValueError(
            f"The data has no {' or '.join(repr(s) for s in missing)} split (it has {sorted(raw)}); "
            "pass --train_file / --validation_file (or a data set that has both)."
        )
    return raw


def _find_split_files(folder: Path) -> dict[str, Path]:
    """``train.jsonl``, ``test.npz``, ``dev.csv``... in ``folder``, by split."""
    found = {}
    for split, stems in _SPLIT_STEMS.items():
        for stem in stems:
            matches = [folder / f"{stem}{suffix}" for suffix in FILE_BUILDERS if (folder / f"{stem}{suffix}").is_file()]
            if matches:
                found[split] = matches[0]
                break
    return found


def _load_files(files: dict[str, Path], label_column: str) -> DatasetDict:
    raw = DatasetDict({split: load_file(path, f"--{split}_file") for split, path in files.items()})
    names_file = next((p.parent / LABEL_NAMES_FILE for p in files.values() if (p.parent / LABEL_NAMES_FILE).is_file()), None)
    if names_file is not None:
        names = json.loads(names_file.read_text(encoding="utf-8"))
        for split, ds in raw.items():
            if label_column in ds.column_names and not isinstance(ds.features[label_column], ClassLabel):
                raw[split] = ds.cast_column(label_column, ClassLabel(names=names))
    return raw


def load_file(path: str | Path, flag: str = "--train_file") -> Dataset:
    """One local data file as a ``Dataset``; ``flag`` is the option that named it (for the error messages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file. Pass the path of an existing {'/'.join(FILE_BUILDERS)} file.")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{flag} {path}: unknown file format {path.suffix or '(no suffix)'!r}. Use one of "
            f"{', '.join(FILE_BUILDERS)} (.jsonl: one JSON object per line)."
        )
    if builder == "npz":
        return _load_npz(path)
    if builder in ("json", "csv") and _is_blank(path):
        raise ValueError(f"{flag} {path}: the file is empty (no examples). Pass a file with at least one example.")
    return load_dataset(builder, data_files={"data": str(path)}, split="data")


def _is_blank(path: Path, chunk: int = 1 << 16) -> bool:
    """Whether a text file holds nothing but whitespace (read until its first other character)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _load_npz(path: Path) -> Dataset:
    with np.load(path) as arrays:
        missing = {"images", "labels"} - set(arrays.files)
        if missing:
            raise ValueError(f"{path} needs arrays 'images' and 'labels'; it lacks {sorted(missing)} (has {arrays.files}).")
        images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    features = Features({"image": Image(), "label": Value("int64")})
    return Dataset.from_dict({"image": list(images), "label": labels}, features=features)


# ---- checks --------------------------------------------------------------------------------------

_FLAG_BY_ROLE = {"label": "--label_column", "image": "--image_column", "text": "--text_column"}
_LABEL_NAMES = {"label", "labels", "class", "target", "fine_label", "coarse_label"}
_IMAGE_NAMES = {"image", "img", "images", "pixel_values", "picture"}


def _flag_for(column: str) -> str:
    if column.lower() in _LABEL_NAMES or "label" in column.lower():
        return _FLAG_BY_ROLE["label"]
    if column.lower() in _IMAGE_NAMES or "image" in column.lower():
        return _FLAG_BY_ROLE["image"]
    return _FLAG_BY_ROLE["text"]


def check_columns(
    ds: Dataset | DatasetDict, *columns: str, flags: dict[str, str] | None = None, split: str | None = None
) -> None:
    """Raise a ``ValueError`` naming a missing column, the columns there are, and the flag to fix it.

    The flag is guessed from the column name (label-like: ``--label_column``, image-like:
    ``--image_column``, otherwise ``--text_column``); ``flags={"sentence": "--text_column"}`` overrides.
    ``split`` names a single ``Dataset``'s split in the message (a ``DatasetDict`` names its own).
    """
    splits = ds.items() if isinstance(ds, DatasetDict) else [(split, ds)]
    for name, part in splits:
        for column in columns:
            if column not in part.column_names:
                where = f" in the {name!r} split" if name else ""
                flag = (flags or {}).get(column) or _flag_for(column)
                raise ValueError(
                    f"Column {column!r} not found{where}; the columns are {part.column_names}. "
                    f"Name the right one with {flag} <column>."
                )



# ---- the generative scripts' data (run_sft.py, run_seq2seq.py): a hub dataset or local files ----------


@dataclass
class DatasetArguments:
    """Which data to train and evaluate on (a hub dataset or local files), and how much of it."""

    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset id (or a local dataset folder)."})
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "The hub dataset's configuration name.", "aliases": ["--dataset_config"]},  # TRL's name for it
    )
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
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
        if not isinstance(raw, DatasetDict):
            raw = DatasetDict(train=raw)
        if args.dataset_train_split not in raw:
            raise ValueError(
                f"--dataset_train_split {args.dataset_train_split!r}: {args.dataset_name} has no such split "
                f"(it has {sorted(raw)})."
            )
        train = raw[args.dataset_train_split]
        record["source"] = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
        test_split = next((s for s in (args.dataset_test_split, "validation") if s in raw and s != args.dataset_train_split), None)
        if evaluate and test_split is not None:
            evaluation = raw[test_split]
            record["evaluation"] = f"split {test_split!r}"
            record["eval_split"] = test_split
    else:
        train = load_file(args.train_file, "--train_file")
        record["source"] = os.path.basename(args.train_file)
        if evaluate and args.validation_file:
            evaluation = load_file(args.validation_file, "--validation_file")
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
        return {"name": args.dataset_name, "type": args.dataset_name, "config": args.dataset_config_name, "split": split, "hub": True}
    evaluated = args.validation_file or args.train_file
    builder = FILE_BUILDERS.get(Path(evaluated).suffix.lower(), "json")
    return {"name": os.path.basename(evaluated), "type": builder, "split": split, "hub": False}


# ---- few-shot subsets and label noise ------------------------------------------------------------


def _class_ids(ds: Dataset, label_column: str, labels: np.ndarray) -> np.ndarray:
    feature = ds.features[label_column]
    if isinstance(feature, ClassLabel):
        return np.arange(feature.num_classes)
    return np.unique(labels)


def _class_name(ds: Dataset, label_column: str, class_id) -> str:
    feature = ds.features[label_column]
    if isinstance(feature, ClassLabel):
        return f"{int(class_id)} ({feature.int2str(int(class_id))!r})"
    return repr(class_id.item() if hasattr(class_id, "item") else class_id)


def select_samples_per_class(ds: Dataset, k: int, label_column: str = "label", seed: int = 0) -> Dataset:
    """A stratified subset with exactly ``k`` examples of every class, drawn with ``seed``, shuffled.

    Every class of a ``ClassLabel`` column counts (also one with no example); otherwise the classes
    are the label values present. Raises ``ValueError`` naming a class with fewer than ``k`` examples.
    """
    return ds.select(_per_class_indices(ds, k, label_column, seed).tolist())


def _per_class_indices(ds: Dataset, k: int, label_column: str, seed: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"samples per class must be >= 1, got {k}.")
    check_columns(ds, label_column)
    labels = np.asarray(ds[label_column])
    rng = np.random.default_rng(seed)
    chosen = []
    for class_id in _class_ids(ds, label_column, labels):
        members = np.flatnonzero(labels == class_id)
        if len(members) < k:
            raise ValueError(
                f"Class {_class_name(ds, label_column, class_id)} has {len(members)} examples, "
                f"fewer than the {k} per class asked for."
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    return rng.permutation(np.concatenate(chosen))


def apply_label_noise(ds: Dataset, p: float, label_column: str = "label", seed: int = 0) -> tuple[Dataset, int]:
    """Symmetric label noise: each label is flipped with probability ``p`` to one of the OTHER classes,
    uniformly. Returns ``(noisy dataset, number of flipped labels)``; seeded.

    Apply it to the training split only: that is the caller's job (validation and test labels must
    stay clean for the scores to mean anything).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label noise p must be in [0, 1], got {p}.")
    check_columns(ds, label_column)
    labels = np.asarray(ds[label_column])
    classes = _class_ids(ds, label_column, labels)
    if len(classes) < 2:
        raise ValueError(f"Label noise needs at least 2 classes, the data has {len(classes)}.")
    rng = np.random.default_rng(seed)
    flip = rng.random(len(labels)) < p
    position = np.searchsorted(classes, labels)  # class index of every label
    shifted = (position + rng.integers(1, len(classes), size=len(labels))) % len(classes)
    noisy = np.where(flip, classes[shifted], labels)

    def relabel(batch, indices):
        return {label_column: noisy[indices].tolist()}

    ds = ds.map(relabel, with_indices=True, batched=True, features=ds.features, desc="label noise")
    return ds, int(flip.sum())


# ---- evaluation-time input noise -----------------------------------------------------------------


def add_text_noise(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    p: float,
    vocab_size: int,
    special_ids: Sequence[int],
    generator: torch.Generator,
) -> torch.Tensor:
    """A copy of ``input_ids`` where each non-special, non-padding token is replaced with probability
    ``p`` by a token drawn uniformly from the vocabulary's non-special tokens. Seeded by ``generator``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"text noise p must be in [0, 1], got {p}.")
    device = generator.device
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    eligible = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    draw = torch.rand(input_ids.shape, generator=generator, device=device).to(input_ids.device)
    replace = eligible & (draw < p)
    allowed = torch.arange(vocab_size, device=input_ids.device)
    allowed = allowed[~torch.isin(allowed, special.to(allowed.dtype))]
    picks = torch.randint(len(allowed), input_ids.shape, generator=generator, device=device).to(input_ids.device)
    return torch.where(replace, allowed[picks].to(input_ids.dtype), input_ids)


def add_image_noise(pixel_values: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``pixel_values`` plus Gaussian noise of standard deviation ``std`` (in the units of the
    normalized pixel values the model sees). Seeded by ``generator``; returns a new tensor."""
    if std < 0:
        raise ValueError(f"image noise std must be >= 0, got {std}.")
    noise = torch.randn(pixel_values.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return pixel_values + std * noise.to(device=pixel_values.device, dtype=pixel_values.dtype)


# ---- the embedded VADER data set -----------------------------------------------------------------

VADER_LABELS = ["negative", "positive"]
_WORD = re.compile(r"[A-Za-z]{2,}(?:[-' ][A-Za-z]+)*")


def read_vader_lexicon() -> list[tuple[str, float]]:
    """``(token, mean rating)`` for every entry of ``vader_lexicon.txt`` shipped by ``vaderSentiment``.

    Each line: token, mean of ten human ratings in [-4, 4], their standard deviation, the ratings.
    """
    text = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    entries = []
    for line in text.splitlines():
        fields = line.strip("\r\n").split("\t")
        if len(fields) >= 2 and fields[0]:
            entries.append((fields[0], float(fields[1])))
    return entries


def vader_lexicon_dataset(seed: int = 0, threshold: float = 1.5, validation_per_class: int = 300) -> DatasetDict:
    """Word-level sentiment from the human-rated VADER lexicon (Hutto & Gilbert, ICWSM 2014; MIT).

    Only word entries are kept: letters, optionally joined by a hyphen, apostrophe or space
    ("cover-up", "can't stand"), starting with two letters; emoticons and tokens with digits or
    symbols (":-)", "x-d", "h8") are skipped. A token listed twice (a few, e.g. "lol", are rated
    among the emoticons and again among the words) keeps its later rating. A word rated
    ``>= threshold`` is positive (1), ``<= -threshold`` negative (0); words in between are dropped.
    "validation" holds ``validation_per_class`` words of each class (seeded, stratified); "train"
    the rest, shuffled. Columns: ``text``, ``label`` (ClassLabel ["negative", "positive"]) and
    ``rating`` (the mean human rating).
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 (words rated within +-threshold are dropped), got {threshold}.")
    words = {token: rating for token, rating in read_vader_lexicon() if _WORD.fullmatch(token)}  # last wins
    rows = [(token, int(rating > 0), rating) for token, rating in words.items() if abs(rating) >= threshold]
    features = Features({"text": Value("string"), "label": ClassLabel(names=VADER_LABELS), "rating": Value("float32")})
    full = Dataset.from_dict(
        {"text": [r[0] for r in rows], "label": [r[1] for r in rows], "rating": [r[2] for r in rows]},
        features=features,
    )
    held_out = _per_class_indices(full, validation_per_class, "label", seed)
    train_ids = np.setdiff1d(np.arange(len(full)), held_out)
    train = full.select(np.random.default_rng(seed).permutation(train_ids).tolist())
    return DatasetDict({"train": train, "validation": full.select(held_out.tolist())})


__all__ = [
    "DatasetArguments",
    "add_image_noise",
    "add_text_noise",
    "apply_label_noise",
    "check_columns",
    "dataset_card_info",
    "load_file",
    "load_raw_datasets",
    "load_splits",
    "read_vader_lexicon",
    "select_samples_per_class",
    "vader_lexicon_dataset",
]
