"""scripts/run_text_classification_no_trainer.py: DREG in your own accelerate loop is exact. One optimizer step on
8 texts of unequal lengths: 2 micro-batches x 4 (accumulation) and 2 processes x 4 (gloo DDP) give the weights
of 1 x 8, in float64 with SGD; at lambda 0 the run differs from DREG's (the test can see the penalty)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import WORD_COUNTS_8, run_two_processes, saved_weights, texts, tokenizer, update_gap
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_text_classification_no_trainer.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tokenizer()
    folder = tmp_path_factory.mktemp("no_trainer")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rows = [{"text": t, "label": ["neg", "pos", "neutral"][i % 3]} for i, t in enumerate(texts(WORD_COUNTS_8))]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _flags(setup, out, batch, accumulation, dreg_lambda=0.5):
    return ["--model_name_or_path", str(setup / "model"), "--train_file", str(setup / "train.jsonl"), "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation), "--max_train_steps", "1",
            "--optimizer", "sgd", "--learning_rate", "0.5", "--torch_dtype", "float64", "--no-shuffle", "--dreg_lambda", str(dreg_lambda),
            "--dreg_activations", "all"]


def _weights(folder):
    return saved_weights(folder, AutoModelForSequenceClassification)


def _run(flags):
    from hf_dreg.recipes.classification_no_trainer import main

    return main(flags)


def test_accumulation_and_one_batch_give_the_same_step(setup, tmp_path):
    init = _weights(setup / "model")
    _run(_flags(setup, tmp_path / "full", 8, 1))
    _run(_flags(setup, tmp_path / "accumulated", 4, 2))
    _run(_flags(setup, tmp_path / "plain", 8, 1, dreg_lambda=0))
    full, accumulated, plain = (_weights(tmp_path / n) for n in ("full", "accumulated", "plain"))
    assert update_gap(accumulated, full, init) < 1e-10
    assert update_gap(plain, full, init) > 1e-4  # DREG moved the weights
    log = json.loads((tmp_path / "accumulated" / "all_results.json").read_text())
    assert log["train_steps"] == 1 and "dreg_share" in log["log_history"][0]


def test_two_processes_give_the_step_of_one(setup, tmp_path):
    init = _weights(setup / "model")
    _run(_flags(setup, tmp_path / "full", 8, 1))
    run_two_processes(SCRIPT, _flags(setup, tmp_path / "ddp", 4, 1), port=29533)
    assert update_gap(_weights(tmp_path / "ddp"), _weights(tmp_path / "full"), init) < 1e-10


def test_an_empty_training_file_is_an_error_naming_it(setup, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    flags = _flags(setup, tmp_path / "out", 4, 1)
    flags[flags.index("--train_file") + 1] = str(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"--train_file .*empty\.jsonl: the file is empty"):
        _run(flags)
    assert not (tmp_path / "out").exists()
