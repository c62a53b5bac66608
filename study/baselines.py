"""Competent plain baselines: model size, steps and learning rate chosen on a validation split of the training pool.

``run_selection(config)`` (behind ``study/select_baselines.py``) trains the plain model (regularizer
``none``) of every (data set, setting) cell of a selection config and appends one record per cell to a
resumable JSONL. Nothing here reads a data set's evaluation (test) file:

- the training pool is the data set's **training file only** (:func:`load_training_pool`);
- the training subset is the one the factorial sweep trains on (``select_samples_per_class`` with the
  same seed, then the same label noise): :func:`selection_splits`;
- the validation split is carved, stratified by class, from the pool's **other** training examples, so
  it is disjoint from the subset (:func:`carve_validation`); its labels are never made noisy.

The steps axis costs one run: every cell trains to its longest ``eval_at`` step under
``lr_scheduler_type: constant_with_warmup`` and is evaluated (training and validation accuracy) at each
``eval_at`` step. Under a constant schedule the step-k checkpoint is a k-step run in learning rate and batch
order (neither depends on ``max_steps``), so each checkpoint is a point of the steps axis. Not bit for bit: every
evaluation draws from torch's global generator (a DataLoader's base seed), which also draws the shuffling of the
later epochs and the dropout masks (BERT's 0.1): equal in distribution, with about the spread of another seed.

:func:`choose` picks per data set, among all checkpoints: those within one binomial standard error of the
best validation accuracy; of these, those at the plateau (training accuracy >= ``plateau_train_acc`` and no
later checkpoint of the run more than one standard error better), and of those the cheapest (training seconds),
then the best validation accuracy. When none is at the plateau: the candidate closest to it (highest training
accuracy), then the best validation accuracy. :func:`pixel_logreg` is the pixel logistic-regression reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers as tf
import yaml
from datasets import Dataset, DatasetDict, load_dataset

from hf_dreg.recipes.data import _find_split_files, _load_files, _per_class_indices, apply_label_noise, check_columns
from hf_dreg.recipes.provenance import versions
from hf_dreg.recipes.results_store import append_result, read_results

from .sweep import Cell, expand_grid

SELECTION_KEYS = ("eval_at", "validation_size")  # flags of a cell that are not run arguments
PLATEAU_TRAIN_ACC = 0.99


# ---- data: the training pool only ----------------------------------------------------------------


def load_training_pool(data_args) -> Dataset:
    """The data set's training examples, and nothing else (never its validation or test file)."""
    label = data_args.label_column
    if data_args.dataset_name:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, data_dir=data_args.data_dir, split="train")
    if data_args.train_file:
        return _load_files({"train": Path(data_args.train_file)}, label)["train"]
    if data_args.data_dir:
        train = _find_split_files(Path(data_args.data_dir)).get("train")
        if train is None:
            raise ValueError(f"{data_args.data_dir} has no train.* file: the selection needs a training file.")
        return _load_files({"train": train}, label)["train"]
    raise ValueError("No training data given: pass data_dir, train_file or dataset_name.")


def carve_validation(labels: np.ndarray, exclude: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` examples of the pool, not in ``exclude``, with the class proportions of the rest (seeded)."""
    from sklearn.model_selection import train_test_split

    rest = np.setdiff1d(np.arange(len(labels)), exclude)
    if size >= len(rest):
        raise ValueError(f"A validation split of {size} needs more than the {len(rest)} training examples left over.")
    _, held_out = train_test_split(rest, test_size=size, stratify=labels[rest], random_state=seed)
    return np.sort(held_out)


def selection_splits(data_args, seed: int, validation_size: int) -> tuple[DatasetDict, dict]:
    """``train`` (the factorial's training subset, label noise included) and ``validation`` (carved, clean)."""
    pool = load_training_pool(data_args)
    label = data_args.label_column
    check_columns(pool, label)
    labels = np.asarray(pool[label])
    if data_args.samples_per_class:
        train_ids = _per_class_indices(pool, data_args.samples_per_class, label, seed)  # as select_samples_per_class
        validation_ids = carve_validation(labels, train_ids, validation_size, seed)
    else:
        validation_ids = carve_validation(labels, np.array([], dtype=int), validation_size, seed)
        train_ids = np.setdiff1d(np.arange(len(pool)), validation_ids)
    train = pool.select(train_ids.tolist())
    if data_args.max_train_samples is not None and data_args.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(data_args.max_train_samples))  # as prepare_splits
    clean_train = train
    flipped = 0
    if data_args.label_noise > 0:
        train, flipped = apply_label_noise(train, data_args.label_noise, label, seed)
    splits = DatasetDict(train=train, validation=pool.select(validation_ids.tolist()))
    if flipped:
        splits["train_clean"] = clean_train
    info = {
        "pool_examples": len(pool),
        "train_examples": len(train),
        "validation_examples": len(validation_ids),
        "validation_class_counts": {str(c): int(n) for c, n in zip(*np.unique(labels[validation_ids], return_counts=True))},
        "labels_flipped": flipped,
        "train_ids_sha": _ids_digest(train_ids),
        "validation_ids_sha": _ids_digest(validation_ids),
    }
    return splits, info


def _ids_digest(ids) -> str:
    import hashlib

    return hashlib.sha1(np.asarray(sorted(int(i) for i in ids), dtype=np.int64).tobytes()).hexdigest()[:12]


# ---- one cell ------------------------------------------------------------------------------------


class Checkpoints(tf.TrainerCallback):
    """Evaluates at the steps of ``eval_at`` and keeps the training seconds up to each (evaluation time excluded)."""

    def __init__(self, eval_at):
        self.eval_at = set(eval_at)
        self.train_seconds: dict[int, float] = {}
        self.metrics: dict[int, dict] = {}
        self._start = self._eval_started = None
        self._eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._eval_started is not None:
            self._eval_seconds += time.perf_counter() - self._eval_started
            self._eval_started = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.eval_at:
            now = time.perf_counter()
            self.train_seconds[state.global_step] = round(now - self._start - self._eval_seconds, 2)
            self._eval_started = now
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metrics.setdefault(state.global_step, {}).update(metrics or {})


class FeatureCache:
    """The features of each data set's splits, built once per process (they do not depend on the model size)."""

    def __init__(self):
        self._cache = {}

    def get(self, model_args, data_args, seed: int, validation_size: int):
        from hf_dreg.recipes.featurize import Featurizer

        key = (data_args.data_dir, data_args.train_file, data_args.dataset_name, data_args.samples_per_class,
               data_args.max_train_samples, data_args.label_noise, seed, validation_size, model_args.model_type,
               model_args.max_seq_length, model_args.tokenizer_name)  # fmt: skip
        if key not in self._cache:
            splits, info = selection_splits(data_args, seed, validation_size)
            featurizer = Featurizer(model_args, data_args, splits["train"])
            features = {name: featurizer.features(split) for name, split in splits.items()}
            self._cache[key] = (featurizer, features, info)
        return self._cache[key]


def parse_cell(flags: dict):
    """(ModelArguments, DataArguments, DREGTrainingArguments, eval_at, validation_size) of a cell's flags."""
    from hf_dreg.recipes.arguments import classification_arguments

    flags = dict(flags)
    eval_at = sorted(int(s) for s in flags.pop("eval_at"))
    validation_size = int(flags.pop("validation_size", 500))
    flags.update(max_steps=max(eval_at), eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True)
    flags.setdefault("output_dir", "unused")
    model_args, data_args, training_args = classification_arguments(flags)
    if training_args.regularizer != "none":
        raise ValueError(f"The selection trains the plain baseline only; this cell has regularizer={training_args.regularizer!r}.")
    return model_args, data_args, training_args, eval_at, validation_size


def run_selection_cell(cell: Cell, cache: FeatureCache | None = None) -> dict:
    """Train one plain cell to its last ``eval_at`` step; its record has the curve of every checkpoint."""
    import tempfile

    from hf_dreg.recipes.tune import ClassificationMetrics
    from hf_dreg.trainer import DREGTrainer

    cache = cache or FeatureCache()
    start = time.perf_counter()
    model_args, data_args, training_args, eval_at, validation_size = parse_cell(cell.flags)
    seed = training_args.seed if training_args.data_seed is None else training_args.data_seed
    featurizer, features, info = cache.get(model_args, data_args, seed, validation_size)
    featurizer.model_args = model_args  # the cell's size (the cached featurizer may come from another cell)
    checkpoints = Checkpoints(eval_at)
    with tempfile.TemporaryDirectory(prefix="hf_dreg_select_") as tmp:
        training_args.output_dir = tmp
        tf.set_seed(training_args.seed)
        trainer = DREGTrainer(
            model=featurizer.model_init(), args=training_args, train_dataset=features["train"],
            eval_dataset={name: f for name, f in features.items()}, processing_class=featurizer.processor,
            data_collator=featurizer.collator, compute_metrics=ClassificationMetrics(), callbacks=[checkpoints],
        )  # fmt: skip
        trainer.remove_callback(tf.trainer_callback.PrinterCallback)
        trainer.train()
    curve = []
    for step in eval_at:
        m = checkpoints.metrics.get(step, {})
        point = {
            "step": step,
            "train_seconds": checkpoints.train_seconds.get(step),
            "train_accuracy": m.get("eval_train_accuracy"),
            "val_accuracy": m.get("eval_validation_accuracy"),
            "val_macro_f1": m.get("eval_validation_macro_f1"),
            "train_loss": m.get("eval_train_loss"),
            "val_loss": m.get("eval_validation_loss"),
        }
        if "eval_train_clean_accuracy" in m:
            point["train_clean_accuracy"] = m["eval_train_clean_accuracy"]
        if point["train_accuracy"] is not None and point["val_accuracy"] is not None:
            point["gap"] = point["train_accuracy"] - point["val_accuracy"]
        curve.append(point)
    return {
        "cell": cell.id,
        "axes": dict(cell.key),
        "config": dict(cell.flags),
        "data": info,
        "curve": curve,
        "final": curve[-1],
        "wall_time_s": round(time.perf_counter() - start, 2),
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ---- the selection config and its run -------------------------------------------------------------


@dataclass
class SelectionConfig:
    """``base`` (flags of every cell), ``datasets`` and ``settings`` (lists of dicts with a ``name``; a setting's
    ``datasets`` list limits it to those data sets), ``results`` (the JSONL)."""

    base: dict
    datasets: list
    settings: list
    results: str
    name: str = "select_baselines"
    report: str | None = None
    competent_config: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path) -> "SelectionConfig":
        raw = yaml.safe_load(Path(path).read_text())
        known = {"base", "datasets", "settings", "results", "name", "report", "competent_config"}
        return cls(**{k: v for k, v in raw.items() if k in known}, extra={k: v for k, v in raw.items() if k not in known})

    def cells(self) -> list[Cell]:
        from .sweep import SweepConfig

        settings = [{k: v for k, v in s.items() if k != "datasets"} for s in self.settings]
        cells = expand_grid(SweepConfig(base=self.base, grid={"dataset": self.datasets, "setting": settings}, results=self.results))
        only = {s["name"]: s.get("datasets") for s in self.settings}
        return [c for c in cells if only[dict(c.key)["setting"]] is None or dict(c.key)["dataset"] in only[dict(c.key)["setting"]]]


def run_selection(config: SelectionConfig, datasets=None, settings=None, limit=None, threads: int = 1, progress=True) -> list[dict]:
    """Run every unfinished cell (optionally only these data sets / settings); each finished one is appended."""
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    done = {r["cell"] for r in read_results(config.results)}
    todo = [c for c in config.cells() if c.id not in done
            and (datasets is None or dict(c.key)["dataset"] in datasets) and (settings is None or dict(c.key)["setting"] in settings)]  # fmt: skip
    todo = todo[:limit] if limit is not None else todo
    cache, written = FeatureCache(), []
    for cell in tqdm(todo, desc=config.name, unit="run", disable=not progress):
        record = run_selection_cell(cell, cache)
        append_result(config.results, record)
        written.append(record)
    return written


# ---- the choice ----------------------------------------------------------------------------------


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def choose(records: list[dict], plateau_train_acc: float = PLATEAU_TRAIN_ACC) -> dict:
    """The chosen checkpoint of one data set's records (see the module docstring), with the reasons."""
    points = []
    for r in records:
        n = r["data"]["validation_examples"]
        for i, p in enumerate(r["curve"]):
            if p.get("val_accuracy") is None:
                continue
            later = [q["val_accuracy"] for q in r["curve"][i + 1 :] if q.get("val_accuracy") is not None]
            points.append({**p, "setting": r["axes"]["setting"], "record": r, "n": n, "later_best": max(later, default=None)})
    if not points:
        raise ValueError("No evaluated checkpoint to choose from.")
    best = max(points, key=lambda p: p["val_accuracy"])
    se = standard_error(best["val_accuracy"], best["n"])
    near = [p for p in points if p["val_accuracy"] >= best["val_accuracy"] - se]
    for p in near:
        p["plateau"] = p["train_accuracy"] >= plateau_train_acc and (p["later_best"] is None or p["later_best"] <= p["val_accuracy"] + se)
    at_plateau = [p for p in near if p["plateau"]]
    if at_plateau:
        chosen = min(at_plateau, key=lambda p: (p["train_seconds"] or 0.0, -p["val_accuracy"]))
    else:  # nothing within one SE has fitted its training set: the one closest to it
        chosen = max(near, key=lambda p: (p["train_accuracy"], p["val_accuracy"]))
    strip = lambda p: {k: v for k, v in p.items() if k not in ("record", "later_best")}  # noqa: E731
    return {
        "chosen": strip(chosen),
        "best": strip(best),
        "standard_error": se,
        "candidates": len(near),
        "at_plateau": len(at_plateau),
        "config": chosen["record"]["config"],
    }


def choose_all(records: list[dict], plateau_train_acc: float = PLATEAU_TRAIN_ACC) -> dict[str, dict]:
    by_dataset: dict[str, list] = {}
    for r in records:
        by_dataset.setdefault(r["axes"]["dataset"], []).append(r)
    return {name: choose(rs, plateau_train_acc) for name, rs in by_dataset.items()}


# ---- the pixel logistic-regression reference ------------------------------------------------------


def _pixels(ds: Dataset, column: str = "image") -> np.ndarray:
    """Raw pixels scaled to [-1, 1] as the ViT's processor does ((x/255 - 0.5) / 0.5), one row per image."""
    x = np.stack([np.asarray(img, dtype=np.float32) for img in ds[column]]) / 255.0
    return ((x - 0.5) / 0.5).reshape(len(ds), -1)


def pixel_logreg(train: Dataset, evaluations: dict[str, Dataset], C: float = 0.1, label_column: str = "label") -> dict[str, float]:
    """Accuracy of scikit-learn's LogisticRegression (``C``) on raw normalised pixels, fit on ``train``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=2000)
    model.fit(_pixels(train), np.asarray(train[label_column]))
    return {name: float((model.predict(_pixels(ds)) == np.asarray(ds[label_column])).mean()) for name, ds in evaluations.items()}
