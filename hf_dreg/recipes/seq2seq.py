"""Fine-tuning an encoder-decoder (T5, BART...) with DREG: the logic behind ``scripts/run_seq2seq.py``.

Arguments (``parse_seq2seq_args``): :class:`Seq2SeqModelArguments`, :class:`Seq2SeqDataArguments`
(the data flags of :class:`~hf_dreg.recipes.data.DatasetArguments` plus ``--source_column``,
``--target_column``, ``--source_prefix``, ``--max_source_length``, ``--max_target_length``),
``transformers.Seq2SeqTrainingArguments`` and :class:`~hf_dreg.DREGConfig`, as flags or as one
YAML/JSON file. ``run_seq2seq`` trains ``hf_dreg.with_dreg(Seq2SeqTrainer)`` with
``DataCollatorForSeq2Seq``, evaluates (``eval_loss``, ``perplexity``, ``eval_dreg``; with
``--predict_with_generate`` also ``eval_chrf``, ``eval_rougeL``, ``eval_exact_match``,
``eval_gen_len`` on the generated text, with the metrics packaged in :mod:`hf_dreg.metrics`, offline),
saves the model, the metrics and the model card, and with ``--push_to_hub`` pushes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import transformers as tf

from ..config import DREGConfig
from ..metrics import load_metric
from ..trainer import with_dreg
from .arguments import parse_arguments
from .data import DatasetArguments, check_columns, dataset_card_info, load_splits
from .models import check_activations_before_loading, regularizer_uses_sites
from .train_and_save import train_evaluate_save

logger = tf.utils.logging.get_logger(__name__)


@dataclass
class Seq2SeqModelArguments:
    """Which encoder-decoder to fine-tune."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "A hub model id or a local checkpoint folder."})
    model_revision: str = field(default="main", metadata={"help": "The model's revision (branch, tag or commit)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Another tokenizer (default: the model's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code from the hub."})


@dataclass
class Seq2SeqDataArguments(DatasetArguments):
    """The data flags plus the source/target columns, the T5 task prefix and the lengths."""

    source_column: str = field(default="source", metadata={"help": "The input text column."})
    target_column: str = field(default="target", metadata={"help": "The output text column."})
    source_prefix: str | None = field(
        default=None, metadata={"help": "Prepended to every source (T5 style task prefix, e.g. 'summarize: ')."}
    )
    max_source_length: int = field(default=512, metadata={"help": "Truncate sources to this many tokens."})
    max_target_length: int = field(
        default=128, metadata={"help": "Truncate targets to this many tokens (and generate at most this many by default)."}
    )


def parse_seq2seq_args(argv: list[str] | None = None):
    """(Seq2SeqModelArguments, Seq2SeqDataArguments, Seq2SeqTrainingArguments, DREGConfig) from flags or one .yaml/.json file."""
    return parse_arguments((Seq2SeqModelArguments, Seq2SeqDataArguments, tf.Seq2SeqTrainingArguments, DREGConfig), argv)


def generation_metrics(tokenizer):
    """A ``compute_metrics`` for ``predict_with_generate``: chrF, ROUGE-L, exact match and the mean generated length."""
    chrf, rouge_l = load_metric("chrf"), load_metric("rouge_l")

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        texts = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        references = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "chrf": chrf.compute(predictions=texts, references=references)["score"],
            "rougeL": rouge_l.compute(predictions=texts, references=references)["rougeL"],
            "exact_match": float(np.mean([t == r for t, r in zip(texts, references)])),
            "gen_len": float(np.mean(np.count_nonzero(predictions != tokenizer.pad_token_id, axis=1))),
        }

    return compute_metrics


@dataclass
class Seq2SeqRun:
    """What ``run_seq2seq`` did: the trainer, and the train and evaluation metrics it reported and saved."""

    trainer: object
    train_metrics: dict
    eval_metrics: dict


def _features(ds, data_args, tokenizer):
    prefix = data_args.source_prefix or ""

    def tokenize(batch):
        sources = [prefix + text for text in batch[data_args.source_column]]
        inputs = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        targets = tokenizer(text_target=batch[data_args.target_column], max_length=data_args.max_target_length, truncation=True)
        inputs["labels"] = targets["input_ids"]
        return inputs

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")


def run_seq2seq(model_args: Seq2SeqModelArguments, data_args: Seq2SeqDataArguments, training_args, dreg_config: DREGConfig) -> Seq2SeqRun:
    """Train with ``with_dreg(Seq2SeqTrainer)``, evaluate, save model, metrics and card (and push)."""
    if not model_args.model_name_or_path:
        raise ValueError("Pass --model_name_or_path (a hub model id or a local checkpoint folder).")
    name = model_args.model_name_or_path
    common = dict(revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code)
    if regularizer_uses_sites(dreg_config):  # from the config: before any weight, data or output folder
        check_activations_before_loading(name, dreg_config.dreg_activations, (tf.AutoModelForSeq2SeqLM,), **common)
    seed = training_args.seed if training_args.data_seed is None else training_args.data_seed
    train, evaluation, record = load_splits(data_args, seed)
    needed = {data_args.source_column: "--source_column", data_args.target_column: "--target_column"}
    check_columns(train, *needed, flags=needed, split="training")
    if evaluation is not None:
        check_columns(evaluation, *needed, flags=needed, split="evaluation")

    tokenizer = tf.AutoTokenizer.from_pretrained(model_args.tokenizer_name or name, **common)
    tf.set_seed(training_args.seed)
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(name, **common)
    if model.config.model_type in ("t5", "mt5", "umt5") and not data_args.source_prefix:
        logger.warning("A T5 model without --source_prefix: T5 checkpoints expect a task prefix such as 'summarize: '.")
    if not training_args.predict_with_generate and evaluation is not None:
        logger.warning("Without --predict_with_generate the evaluation reports the loss only (no chrF, ROUGE-L, exact match).")
    record = {"format": "source-target", "source_prefix": data_args.source_prefix, **record}

    features = _features(train, data_args, tokenizer)
    eval_features = _features(evaluation, data_args, tokenizer) if evaluation is not None else None
    trainer = with_dreg(tf.Seq2SeqTrainer)(
        model=model,
        args=training_args,
        train_dataset=features,
        eval_dataset=eval_features,
        processing_class=tokenizer,
        data_collator=tf.DataCollatorForSeq2Seq(tokenizer, model=model, pad_to_multiple_of=8 if training_args.fp16 else None),
        compute_metrics=generation_metrics(tokenizer) if training_args.predict_with_generate else None,
        dreg_config=dreg_config,
    )
    trainer.run_info = {"model": name, "data": record, "task": "text2text-generation", "dataset": dataset_card_info(data_args, record)}

    max_length = training_args.generation_max_length or data_args.max_target_length
    card_kwargs = {"dataset": data_args.dataset_name} if data_args.dataset_name else {}
    train_metrics, eval_metrics = train_evaluate_save(
        trainer, training_args, len(train), len(evaluation) if evaluation is not None else None,
        eval_kwargs={"max_length": max_length, "num_beams": training_args.generation_num_beams}, card_kwargs=card_kwargs,
    )
    return Seq2SeqRun(trainer, train_metrics, eval_metrics)


def main(argv: list[str] | None = None) -> Seq2SeqRun:
    return run_seq2seq(*parse_seq2seq_args(argv))
