"""Exact on the batches the Trainer really builds: its own collators, texts of unequal length.

Each test trains one SGD step and compares updates (the update is -lr * gradient):
- accumulation (2 x 4) against one batch of 8, where the padding differs (each micro-batch is padded
  to its own longest text), so a penalty averaged per micro-batch, or one that counted padding, would
  differ;
- a DREG trainer at lambda 0 against its base trainer;
- for models whose task loss is not exact under accumulation, the DREG share of the update
  (update at lambda minus update at lambda 0) against the full batch's, or against a reference
  computed by hand with ``hf_dreg.attach`` on the collated micro-batches.
"""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import (
    classification_data,
    clone,
    difference,
    lm_data,
    make_args,
    relative_difference,
    seq2seq_data,
    sgd,
    tiny_text_model,
    tokenizer,
    update_of,
)
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
)

import hf_dreg
from hf_dreg import DREGConfig, DREGTrainer, with_dreg

LAMBDA = 100.0  # large, so that the DREG share of the update is large and a wrong normalisation shows
EXACT = 1e-5


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _dreg(tmp_path, name, batch, accumulation, dreg_lambda, **kwargs):
    args = make_args(
        tmp_path / name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        dreg_lambda=dreg_lambda, **sgd(learning_rate=1.0),
    )  # fmt: skip
    return lambda model: DREGTrainer(model=model, args=args, **kwargs)


def _plain(tmp_path, name, batch, accumulation, **kwargs):
    args = make_args(tmp_path / name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **sgd(learning_rate=1.0))
    return lambda model: Trainer(model=model, args=args, **kwargs)


# ---- DataCollatorWithPadding (the Trainer's own, from processing_class) ------------------------------


def test_padding_collator_batches_are_normalised_over_the_whole_step(tmp_path, tok):
    """BERT classifier, processing_class=tokenizer: the Trainer pads with DataCollatorWithPadding (BatchEncoding)."""
    data = classification_data(tok)
    model = tiny_text_model("bert", tok.vocab_size)
    common = dict(train_dataset=data, processing_class=tok)

    full = update_of(_dreg(tmp_path, "8x1", 8, 1, LAMBDA, **common), clone(model))
    accumulated = update_of(_dreg(tmp_path, "4x2", 4, 2, LAMBDA, **common), clone(model))
    task_only = update_of(_dreg(tmp_path, "8x1-0", 8, 1, 0.0, **common), clone(model))
    assert relative_difference(full, task_only) > 0.1  # DREG is a large part of the update: the test has power
    assert relative_difference(accumulated, full) < EXACT


def test_padding_collator_lambda_zero_is_the_plain_trainer_and_fixes_ignored_loss_kwargs(tmp_path, tok):
    """BERT accepts num_items_in_batch and ignores it: the plain Trainer's 2 x 4 update is twice the full batch's."""
    data = classification_data(tok)
    model = tiny_text_model("bert", tok.vocab_size)
    common = dict(train_dataset=data, processing_class=tok)

    plain_full = update_of(_plain(tmp_path, "plain-8x1", 8, 1, **common), clone(model))
    dreg_full = update_of(_dreg(tmp_path, "dreg-8x1", 8, 1, 0.0, **common), clone(model))
    assert relative_difference(dreg_full, plain_full) < 1e-6  # no accumulation: the plain Trainer is exact

    plain_accumulated = update_of(_plain(tmp_path, "plain-4x2", 4, 2, **common), clone(model))
    dreg_accumulated = update_of(_dreg(tmp_path, "dreg-4x2", 4, 2, 0.0, **common), clone(model))
    assert relative_difference(dreg_accumulated, plain_full) < EXACT
    ratio = relative_difference(plain_accumulated, {n: 2 * u for n, u in plain_full.items()})
    assert ratio < 0.05, "the plain Trainer's update at 2 x 4 should be about twice the full batch's (the bug fixed)"


# ---- DataCollatorForLanguageModeling: a causal LM that honours num_items_in_batch ---------------------


def test_causal_lm_keeps_its_own_normalisation_and_dreg_is_exact(tmp_path, tok):
    data = lm_data(tok)
    model = tiny_text_model("gpt2", tok.vocab_size)
    common = dict(train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))

    plain_full = update_of(_plain(tmp_path, "plain-8x1", 8, 1, **common), clone(model))
    plain_accumulated = update_of(_plain(tmp_path, "plain-4x2", 4, 2, **common), clone(model))
    assert relative_difference(plain_accumulated, plain_full) < 1e-6  # the plain Trainer is exact here
    dreg_zero = update_of(_dreg(tmp_path, "dreg0-4x2", 4, 2, 0.0, **common), clone(model))
    assert relative_difference(dreg_zero, plain_accumulated) < 1e-6  # lambda 0 is the plain Trainer

    full = update_of(_dreg(tmp_path, "dreg-8x1", 8, 1, LAMBDA, **common), clone(model))
    accumulated = update_of(_dreg(tmp_path, "dreg-4x2", 4, 2, LAMBDA, **common), clone(model))
    assert relative_difference(full, plain_full) > 0.1
    assert relative_difference(accumulated, full) < EXACT


# ---- DataCollatorForSeq2Seq: T5 (gated-gelu) and BART, decoder positions from the labels -------------


def _seq2seq(tmp_path, name, batch, accumulation, dreg_lambda=None, **kwargs):
    args = make_args(
        tmp_path / name, cls=Seq2SeqTrainingArguments, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, **sgd(learning_rate=1.0),
    )  # fmt: skip
    if dreg_lambda is None:
        return lambda model: Seq2SeqTrainer(model=model, args=args, **kwargs)
    config = DREGConfig(dreg_lambda=dreg_lambda, dreg_kernels="eager")
    return lambda model: with_dreg(Seq2SeqTrainer)(model=model, args=args, dreg_config=config, **kwargs)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_dreg_share_is_exact_under_accumulation(tmp_path, tok, kind):
    data = seq2seq_data(tok)
    model = tiny_text_model(kind, tok.vocab_size)
    common = dict(train_dataset=data, data_collator=DataCollatorForSeq2Seq(tok, model=model))

    base_full = update_of(_seq2seq(tmp_path, "base-8x1", 8, 1, **common), clone(model))
    zero_full = update_of(_seq2seq(tmp_path, "zero-8x1", 8, 1, 0.0, **common), clone(model))
    assert relative_difference(zero_full, base_full) < 1e-6  # lambda 0 is Seq2SeqTrainer

    share_full = difference(update_of(_seq2seq(tmp_path, "dreg-8x1", 8, 1, LAMBDA, **common), clone(model)), zero_full)
    zero_accumulated = update_of(_seq2seq(tmp_path, "zero-4x2", 4, 2, 0.0, **common), clone(model))
    accumulated = update_of(_seq2seq(tmp_path, "dreg-4x2", 4, 2, LAMBDA, **common), clone(model))
    share_accumulated = difference(accumulated, zero_accumulated)
    assert relative_difference(share_full, zero_full) > 0.1
    assert relative_difference(share_accumulated, share_full) < EXACT


def test_seq2seq_decoder_positions_are_the_labelled_ones(tok):
    """No decoder_attention_mask from DataCollatorForSeq2Seq: the decoder's valid positions are labels != -100."""
    data = seq2seq_data(tok)
    model = tiny_text_model("t5", tok.vocab_size)
    batch = DataCollatorForSeq2Seq(tok, model=model)([data[i] for i in range(4)])
    assert "decoder_attention_mask" not in batch
    with hf_dreg.attach(model, kernels="eager") as handle:
        model(**batch)
        decoder = [(s, t, n) for s, t, n in handle.site_sums() if s.mask_key == "decoder_attention_mask"]
        assert decoder
        labelled = int(batch["labels"].ne(-100).sum())
        assert all(int(n) == labelled for _, _, n in decoder)
        assert labelled < batch["labels"].numel()  # there is padding to leave out


# ---- DataCollatorWithFlattening: padding-free batches (position_ids, no mask) ------------------------


def test_padding_free_batches_count_every_token_of_the_step(tmp_path, tok):
    data = lm_data(tok)
    model = tiny_text_model("gpt2", tok.vocab_size)
    collator = DataCollatorWithFlattening()
    common = dict(train_dataset=data, data_collator=collator)
    zero = update_of(_dreg(tmp_path, "zero", 4, 2, 0.0, **common), clone(model))
    share = difference(update_of(_dreg(tmp_path, "dreg", 4, 2, LAMBDA, **common), clone(model)), zero)

    # by hand: the step's DREG is every site's penalty summed over both flattened micro-batches, over all tokens
    reference = clone(model)
    micro_batches = [collator([data[i] for i in range(start, start + 4)]) for start in (0, 4)]
    assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 for b in micro_batches)
    sums, tokens = {}, 0
    with hf_dreg.attach(reference, kernels="eager") as handle:
        for batch in micro_batches:
            # use_cache=False as in training: with a cache, GPT-2 does not split the packed sequences
            reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            for site, total, _ in handle.site_sums():
                sums[site.name] = sums.get(site.name, 0.0) + total
            tokens += batch["input_ids"].numel()
    penalty = torch.stack([total / tokens for total in sums.values()]).mean()
    (LAMBDA * penalty).backward()
    expected = {n: -1.0 * p.grad for n, p in reference.named_parameters() if p.grad is not None}
    share = {n: share[n] for n in expected}
    assert relative_difference(share, expected) < EXACT


# ---- BatchEncoding is what the Trainer's collators return -------------------------------------------


def test_positions_are_counted_from_batch_encodings(tok):
    from hf_dreg.modeling.positions import count_positions

    data = classification_data(tok)
    batch = tok.pad([data[i] for i in range(4)], return_tensors="pt")
    assert not isinstance(batch, dict)  # a BatchEncoding: a Mapping, not a dict
    counts = count_positions([batch, tok.pad([data[i] for i in range(4, 8)], return_tensors="pt")], "cpu")
    expected = sum(len(data[i]["input_ids"]) for i in range(8))
    assert float(counts["attention_mask"]) == expected
