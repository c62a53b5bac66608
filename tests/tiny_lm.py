"""Tiny language models and an offline word-level tokenizer for the script tests (no download).

``save_tokenizer`` trains a ``tokenizers`` WordLevel tokenizer on the fixture files (every word of
every string in them), wraps it in ``PreTrainedTokenizerFast`` with ``<pad>``/``<s>``/``</s>``/
``<unk>`` and a small chat template, and saves it; ``save_model`` saves a tiny random GPT-2,
Gemma-2, T5 or BART built from a config whose special-token ids match it, beside the tokenizer, so
that ``--model_name_or_path <folder>`` works like a hub checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
EXTRA_WORDS = ["summarize:"]  # the seq2seq tests' T5-style source prefix
PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def fixture_texts() -> list[str]:
    """Every string in every fixture JSONL file, and the extra words (the tokenizer's training text)."""
    texts = list(EXTRA_WORDS)
    for path in sorted(FIXTURES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts.extend(_strings(json.loads(line)))
    return texts


def save_tokenizer(folder, chat_template: bool = True) -> tf.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(fixture_texts(), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    from tokenizers import decoders

    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (PAD, BOS, EOS)
    fast.save_pretrained(folder)
    return fast


def tiny_config(family: str, vocab_size: int):
    ids = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=64,
                             activation_function="gelu_new", **ids), tf.GPT2LMHeadModel
    if family == "gemma2":
        return tf.Gemma2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                               hidden_activation="gelu_pytorch_tanh", sliding_window=16, **ids), tf.Gemma2ForCausalLM
    if family == "t5":
        return tf.T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                           num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=PAD, **ids), tf.T5ForConditionalGeneration
    if family == "bart":
        return tf.BartConfig(vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                             activation_function="gelu", decoder_start_token_id=EOS, forced_eos_token_id=EOS, **ids), tf.BartForConditionalGeneration
    raise KeyError(family)


def save_model(folder, family: str, chat_template: bool = True, seed: int = 0) -> Path:
    """A tiny random ``family`` model and the fixture tokenizer, saved in ``folder`` (returned)."""
    folder = Path(folder)
    tokenizer = save_tokenizer(folder, chat_template=chat_template)
    config, cls = tiny_config(family, len(tokenizer))
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.max_length = 16
    model.save_pretrained(folder)
    return folder
