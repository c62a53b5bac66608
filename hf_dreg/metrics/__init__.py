"""Evaluation metrics shipped inside the package, so that they load offline with ``evaluate``.

Each metric is an ``evaluate`` module folder (``metrics/<name>/<name>.py``): accuracy and f1
computed with scikit-learn, chrf (chrF/chrF++, sacreBLEU's statistics) and rouge_l (ROUGE-L,
rouge_score's tokenization) implemented here; ``load_metric(name)`` is ``evaluate.load`` of that
folder, never the Hub.
"""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = ("accuracy", "f1", "chrf", "rouge_l")


def metric_path(name: str) -> str:
    """The folder of a packaged metric module."""
    if name not in AVAILABLE:
        raise ValueError(f"Unknown packaged metric {name!r}; available: {', '.join(AVAILABLE)}.")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the packaged metric ``name`` ('accuracy', 'f1', 'chrf', 'rouge_l'); works offline."""
    return evaluate.load(metric_path(name), **kwargs)


def classification_metrics():
    """A ``compute_metrics(eval_pred)`` for the Trainer reporting ``accuracy`` and ``macro_f1``.

    ``eval_pred`` is the Trainer's ``EvalPrediction`` (or a ``(logits, labels)`` pair); logits may
    be a tuple whose first item holds the class scores.
    """
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        labels = np.asarray(labels)
        return {
            "accuracy": accuracy.compute(predictions=predictions, references=labels)["accuracy"],
            "macro_f1": f1.compute(predictions=predictions, references=labels, average="macro")["f1"],
        }

    return compute_metrics


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy (inf when it overflows)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


__all__ = ["AVAILABLE", "METRICS_DIR", "classification_metrics", "load_metric", "metric_path", "perplexity"]
