"""hf_dreg.metrics: the packaged evaluate modules load offline and agree with scikit-learn."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction

from hf_dreg.metrics import METRICS_DIR, classification_metrics, load_metric, metric_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _random(n=200, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, n), rng.integers(0, classes, n)


def test_modules_are_packaged_files():
    for name in ("accuracy", "f1"):
        assert (METRICS_DIR / name / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="available: accuracy, f1"):
        metric_path("bleu")


def test_accuracy_matches_sklearn():
    predictions, references = _random()
    metric = load_metric("accuracy")
    assert metric.compute(predictions=predictions, references=references) == {
        "accuracy": pytest.approx(accuracy_score(references, predictions))
    }
    weights = np.linspace(0.1, 1.0, len(references))
    result = metric.compute(predictions=predictions, references=references, sample_weight=weights)
    assert result["accuracy"] == pytest.approx(accuracy_score(references, predictions, sample_weight=weights))
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 2, 0], normalize=False)["accuracy"] == 3


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_f1_matches_sklearn(average):
    predictions, references = _random(seed=1)
    result = load_metric("f1").compute(predictions=predictions, references=references, average=average)
    assert result["f1"] == pytest.approx(f1_score(references, predictions, average=average))


def test_f1_binary_and_per_class():
    metric = load_metric("f1")
    assert metric.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0]) == {"f1": 0.5}
    assert metric.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0], pos_label=0)["f1"] == pytest.approx(2 / 3)
    per_class = metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 2, 1, 0, 0, 1], average=None)["f1"]
    np.testing.assert_allclose(per_class, [0.8, 0.0, 0.0])


def test_multilabel_config():
    metric = load_metric("f1", config_name="multilabel")
    result = metric.compute(predictions=[[0, 1, 1], [1, 1, 0]], references=[[0, 1, 1], [0, 1, 0]], average="macro")
    assert result["f1"] == pytest.approx(2 / 3)


def test_classification_metrics_for_the_trainer():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(300, 3))
    labels = rng.integers(0, 3, 300)
    compute_metrics = classification_metrics()
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    predictions = logits.argmax(-1)
    assert set(result) == {"accuracy", "macro_f1"}
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert compute_metrics(((logits, logits), labels)) == result  # models that return extra outputs
