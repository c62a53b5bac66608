"""scripts/run_clm_no_trainer.py: a causal LM with DREG in your own accelerate loop is exact. One SGD step on 8 texts
of unequal lengths (padded, -100 labels on the padding): 2 micro-batches x 4 (accumulation) and 2 processes x 4
(gloo DDP) give the weights of 1 x 8, in float64, for the task loss (num_items_in_batch) and DREG together; at
lambda 0 the step differs (the test can see the penalty), and the task alone is exact too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import WORD_COUNTS_8, run_two_processes, saved_weights, texts, tokenizer, update_gap
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_clm_no_trainer.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tokenizer()
    folder = tmp_path_factory.mktemp("clm_no_trainer")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, pad_token_id=tok.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rows = [{"text": t} for t in texts(WORD_COUNTS_8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _flags(setup, out, batch, accumulation, dreg_lambda=0.5):
    return ["--model_name_or_path", str(setup / "model"), "--train_file", str(setup / "train.jsonl"), "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation), "--max_train_steps", "1",
            "--optimizer", "sgd", "--learning_rate", "0.5", "--torch_dtype", "float64", "--no-shuffle", "--dreg_lambda", str(dreg_lambda),
            "--dreg_kernels", "eager"]  # fmt: skip


def _weights(folder):
    return saved_weights(folder, AutoModelForCausalLM)


def _run(flags):
    from hf_dreg.recipes.causal_lm_no_trainer import main

    return main(flags)


def test_accumulation_and_one_batch_give_the_same_step(setup, tmp_path):
    init = _weights(setup / "model")
    for name, batch, accumulation, strength in (("full", 8, 1, 0.5), ("accumulated", 4, 2, 0.5), ("plain", 8, 1, 0), ("plain2x4", 4, 2, 0)):
        _run(_flags(setup, tmp_path / name, batch, accumulation, dreg_lambda=strength))
    full, accumulated, plain, plain2x4 = (_weights(tmp_path / n) for n in ("full", "accumulated", "plain", "plain2x4"))
    assert update_gap(accumulated, full, init) < 1e-10
    assert update_gap(plain2x4, plain, init) < 1e-10  # the task loss alone: num_items_in_batch over the step
    assert update_gap(plain, full, init) > 1e-4  # DREG moved the weights
    log = json.loads((tmp_path / "accumulated" / "all_results.json").read_text())
    full_log = json.loads((tmp_path / "full" / "all_results.json").read_text())
    assert log["train_steps"] == 1 and "dreg_share" in log["log_history"][0]
    # transformers' causal-LM loss is taken in float32 (logits.float()): its sums are float32's
    assert log["log_history"][0]["task_loss"] == pytest.approx(full_log["log_history"][0]["task_loss"], rel=1e-6)


def test_the_loss_is_the_step_mean_and_evaluation_reports_perplexity(setup, tmp_path):
    """The logged task loss is the mean token loss of the 8 texts (by hand), and a validation file gives perplexity."""
    import math

    flags = _flags(setup, tmp_path / "run", 4, 2, dreg_lambda=0) + ["--validation_file", str(setup / "train.jsonl"), "--learning_rate", "0.0"]
    metrics = _run(flags)
    tok = tokenizer()
    model = AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float64)
    total = tokens = 0.0
    for text in texts(WORD_COUNTS_8):
        encoded = tok(text, truncation=True, max_length=128, return_tensors="pt")  # with its token_type_ids, as the script
        ids = encoded["input_ids"]
        logits = model(**encoded).logits[0, :-1].float()  # as transformers' loss takes it
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        tokens += ids.shape[1] - 1
    log = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert log["log_history"][0]["task_loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)  # float32 sums: 1e-6


def test_two_processes_give_the_step_of_one(setup, tmp_path):
    init = _weights(setup / "model")
    _run(_flags(setup, tmp_path / "full", 8, 1))
    run_two_processes(SCRIPT, _flags(setup, tmp_path / "ddp", 4, 1), port=29537)
    assert update_gap(_weights(tmp_path / "ddp"), _weights(tmp_path / "full"), init) < 1e-10
