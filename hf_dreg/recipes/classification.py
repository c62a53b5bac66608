"""Fine-tune (or train from scratch) a classifier with a regularizer: the function behind the scripts and the sweep.

``run_classification(model_args, data_args, training_args)`` loads the data through ``datasets``,
applies the low-data options (k examples per class, a cap, symmetric label noise on the training
split), builds the model, trains with :class:`DREGTrainer`, evaluates on clean and noisy inputs,
writes ``all_results.json`` and returns the results.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field

import torch
import transformers as tf
from datasets import DatasetDict

from ..metrics import classification_metrics
from ..modeling.diagnostics import per_site_dreg
from ..modeling.sites import NoSitesError
from ..trainer import DREGTrainer
from ..training_args import DREGTrainingArguments
from .data import (
    apply_label_noise,
    check_columns,
    load_raw_datasets,
    select_samples_per_class,
)
from .featurize import Featurizer, is_image_data
from .models import ModelArguments, check_model_arguments
from .provenance import code_revision

logger = tf.utils.logging.get_logger(__name__)


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and the low-data / noisy regime."""

    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.jsonl, .json, .csv, .npz)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file (same formats)."})
    data_dir: str | None = field(default=None, metadata={"help": "A folder with train.*/test.* files, or an imagefolder."})
    text_column: str = field(default="text", metadata={"help": "Text: the input column."})
    image_column: str = field(default="image", metadata={"help": "Images: the input column."})
    label_column: str = field(default="label", metadata={"help": "The label column."})
    samples_per_class: int | None = field(default=None, metadata={"help": "Train on k examples per class (stratified, seeded)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap the training set (after samples_per_class)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a seeded subset of this size."})
    label_noise: float = field(default=0.0, metadata={"help": "Flip each training label to another class with this probability."})
    eval_noise: float = field(
        default=0.0,
        metadata={
            "help": "Also evaluate on noisy inputs: images get Gaussian pixel noise of this std; text tokens are "
            "replaced by random vocabulary tokens with this probability. Reported as eval_noisy_*."
        },
    )


def prepare_splits(data_args: DataArguments, seed: int) -> tuple[DatasetDict, dict]:
    """Raw train/validation splits after the low-data options, and a record of what was done."""
    raw = load_raw_datasets(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_file,
        data_args.validation_file,
        data_dir=data_args.data_dir,
        label_column=data_args.label_column,
    )
    input_column = data_args.image_column if is_image_data(raw["train"], data_args) else data_args.text_column
    for split in ("train", "validation"):
        check_columns(raw[split], input_column, data_args.label_column)
    train, evaluation = raw["train"], raw["validation"]
    if data_args.samples_per_class:
        train = select_samples_per_class(train, data_args.samples_per_class, data_args.label_column, seed)
    if data_args.max_train_samples is not None and data_args.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(data_args.max_train_samples))
    flipped = 0
    if data_args.label_noise > 0:
        train, flipped = apply_label_noise(train, data_args.label_noise, data_args.label_column, seed)
    if data_args.max_eval_samples is not None and data_args.max_eval_samples < len(evaluation):
        evaluation = evaluation.shuffle(seed=0).select(range(data_args.max_eval_samples))
    regime = {
        "modality": "image" if input_column == data_args.image_column else "text",
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "samples_per_class": data_args.samples_per_class,
        "label_noise": data_args.label_noise,
        "labels_flipped": flipped,
        "eval_noise": data_args.eval_noise,
    }
    return DatasetDict(train=train, validation=evaluation), regime


def _per_site_values(trainer, model, dataset, collator, training_args, max_batches: int = 8) -> dict[str, float]:
    """Per-site DREG of the trained model on (up to ``max_batches`` of) the evaluation data."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=training_args.per_device_eval_batch_size, collate_fn=collator)
    batches = itertools.islice(loader, max_batches)
    try:
        return per_site_dreg(model, batches, activations=training_args.dreg_activation_list,
                             exclude_modules=training_args.dreg_exclude_modules)
    except NoSitesError:
        return {}


def run_classification(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DREGTrainingArguments,
    save: bool = True,
    quiet: bool = False,
) -> dict:
    """Train, evaluate (clean and, with eval_noise, noisy) and save; returns metrics and the run's record.

    The record includes the per-site DREG value of the trained model on the evaluation data (measured
    for every regularizer, so the report can compare where the pressure went). ``save=False`` (the
    sweep) writes no model or results files; ``quiet=True`` prints no log lines.
    """
    check_model_arguments(model_args, training_args)  # from the config: before any weight, data or output folder
    seed = training_args.seed if training_args.data_seed is None else training_args.data_seed  # subsets and noise
    tf.set_seed(training_args.seed)
    splits, regime = prepare_splits(data_args, seed)
    featurizer = Featurizer(model_args, data_args, splits["train"])
    model = featurizer.model_init()
    features = DatasetDict({name: featurizer.features(split) for name, split in splits.items()})
    processor, collator = featurizer.processor, featurizer.collator
    trainer = DREGTrainer(
        model=model,
        args=training_args,
        train_dataset=features["train"],
        eval_dataset=features["validation"],
        processing_class=processor,
        data_collator=collator,
        compute_metrics=classification_metrics(),
    )
    if quiet:
        trainer.remove_callback(tf.trainer_callback.PrinterCallback)
    trainer.run_info = {"data": regime, "model": model_args.model_name_or_path or f"{model_args.model_type} from scratch"}
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    metrics.update(trainer.evaluate())
    # the training examples themselves (clean, with the labels trained on): training accuracy, for the gap
    metrics.update(trainer.evaluate(features["train"], metric_key_prefix="eval_train"))
    if data_args.eval_noise > 0:
        noisy = featurizer.features(splits["validation"], data_args.eval_noise, seed)
        metrics.update(trainer.evaluate(noisy, metric_key_prefix="eval_noisy"))
    site_values = _per_site_values(trainer, model, features["validation"], collator, training_args)
    # every measurement, also those made after the last logging step (logging_steps > max_steps logs none)
    ratios = [[step, ratio] for step, ratio in trainer.reg_grad_ratios]
    results = {
        "metrics": metrics,
        "per_site_dreg": site_values,
        "grad_ratios": ratios,
        "reg_lambdas": [[step, value] for step, value in trainer.reg_lambdas],  # every 'auto' calibration
        "regularizer": {
            "name": training_args.regularizer,
            "reg_lambda": training_args.strength,  # the lambda used: the calibrated value under --dreg_lambda auto
            "dreg_lambda": training_args.dreg_lambda,
            **trainer.regularizer.describe(),
        },
        **trainer.run_info,
        "code": code_revision(),
    }
    trainer.run_info["results"] = {k: v for k, v in metrics.items() if k.startswith("eval")}
    if not save:
        return results
    trainer.save_model()
    trainer.save_metrics("all", {**metrics, **{f"data_{k}": v for k, v in regime.items() if v is not None}})
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "run_config.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return results
