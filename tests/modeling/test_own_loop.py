"""Your own training loop: ``handle.penalty(num_positions=N)`` with ``hf_dreg.count_positions`` is exact under
accumulation. Two micro-batches of 4 texts of unequal lengths (each padded to its own longest by the
Trainer's padding collator) give the penalty and the gradient of one batch of 8, in float64."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import WORD_COUNTS_8, classification_data, lm_data, tokenizer
from transformers import BertConfig, BertForSequenceClassification, DataCollatorForLanguageModeling, DataCollatorWithPadding, GPT2Config, GPT2LMHeadModel

import hf_dreg


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _bert(tok):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(config).double()


def _gpt2(tok):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double()


def _grads(model, values):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(sum(values), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_micro_batch_shares_add_up_to_the_full_batch(tok, family):
    model = _bert(tok) if family == "bert" else _gpt2(tok)
    data = classification_data(tok) if family == "bert" else lm_data(tok)
    collate = DataCollatorWithPadding(tok) if family == "bert" else DataCollatorForLanguageModeling(tok, mlm=False)
    rows = [data[i] for i in range(len(WORD_COUNTS_8))]
    full, halves = collate(rows), [collate(rows[:4]), collate(rows[4:])]
    assert halves[0]["input_ids"].shape[1] != halves[1]["input_ids"].shape[1]  # padded to different lengths
    with hf_dreg.attach(model, activations="all", kernels="eager") as handle:
        model(**{k: v for k, v in full.items() if k != "labels"})
        expected = handle.penalty()
        counts = hf_dreg.count_positions(halves)
        assert float(counts["attention_mask"]) == float(full["attention_mask"].sum())
        shares = []
        for batch in halves:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            shares.append(handle.penalty(num_positions=counts))
        shares_by_number = []
        for batch in halves:  # one kind of position: a plain number works too
            model(**{k: v for k, v in batch.items() if k != "labels"})
            shares_by_number.append(handle.penalty(num_positions=int(counts["attention_mask"])))
        # the obvious loop (a mean of micro-batch means) is not the batch's penalty
        means = []
        for batch in halves:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            means.append(handle.penalty())
    assert torch.allclose(sum(shares), expected, rtol=1e-12, atol=0), (float(sum(shares)), float(expected))
    assert torch.allclose(sum(shares_by_number), expected, rtol=1e-12, atol=0)
    assert abs(float(sum(means) / 2 - expected)) > 1e-6 * abs(float(expected))


def test_gradients_of_the_shares_are_the_full_batch_gradient(tok):
    model = _bert(tok)
    data = classification_data(tok)
    collate = DataCollatorWithPadding(tok)
    rows = [data[i] for i in range(8)]
    full, halves = collate(rows), [collate(rows[:4]), collate(rows[4:])]
    with hf_dreg.attach(model, activations="all", kernels="eager") as handle:
        model(**{k: v for k, v in full.items() if k != "labels"})
        expected = _grads(model, [handle.penalty()])
        counts = hf_dreg.count_positions(halves)
        accumulated = None
        for batch in halves:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            grads = _grads(model, [handle.penalty(num_positions=counts)])
            accumulated = grads if accumulated is None else [a + g for a, g in zip(accumulated, grads)]
    scale = max(float(e.abs().max()) for e in expected)  # (attention key biases: 0 up to rounding, 1e-25 here)
    worst = max(float((a - e).abs().max()) for a, e in zip(accumulated, expected)) / scale
    assert worst < 1e-10, worst


def test_bad_counts_are_errors_naming_the_fix(tok):
    model = _bert(tok)
    batch = DataCollatorWithPadding(tok)([classification_data(tok)[i] for i in range(2)])
    with hf_dreg.attach(model, activations="all", kernels="eager") as handle:
        model(**{k: v for k, v in batch.items() if k != "labels"})
        with pytest.raises(ValueError, match="no count of 'attention_mask' positions.*count_positions"):
            handle.penalty(num_positions={"decoder_attention_mask": 5})
        model(**{k: v for k, v in batch.items() if k != "labels"})
        with pytest.raises(ValueError, match=">= 1"):
            handle.penalty(num_positions=0)
