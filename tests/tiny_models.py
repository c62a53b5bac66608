"""Tiny random models of every supported family, built from config (no download)."""

from __future__ import annotations

import torch
import transformers as tf

_TEXT = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)


def _config(name: str, act: str | None = None):
    if name == "bert":
        return tf.BertConfig(**_TEXT, hidden_act=act or "gelu", num_labels=3), tf.BertForSequenceClassification
    if name == "roberta":
        return tf.RobertaConfig(**_TEXT, hidden_act=act or "gelu", num_labels=3), tf.RobertaForSequenceClassification
    if name == "electra":
        cfg = tf.ElectraConfig(**_TEXT, embedding_size=16, hidden_act=act or "gelu", num_labels=3)
        return cfg, tf.ElectraForSequenceClassification
    if name == "deberta-v2":
        return tf.DebertaV2Config(**_TEXT, hidden_act=act or "gelu", num_labels=3), tf.DebertaV2ForSequenceClassification
    if name == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=99, dim=16, n_layers=2, n_heads=2, hidden_dim=24, activation=act or "gelu", num_labels=3)
        return cfg, tf.DistilBertForSequenceClassification
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_inner=24, activation_function=act or "gelu_new", num_labels=3, pad_token_id=0)
        return cfg, tf.GPT2ForSequenceClassification
    if name == "vit":
        cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, hidden_act=act or "gelu", num_labels=3)
        return cfg, tf.ViTForImageClassification
    if name == "deit":
        cfg = tf.DeiTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, hidden_act=act or "gelu", num_labels=3)
        return cfg, tf.DeiTForImageClassification
    if name == "t5":
        cfg = tf.T5Config(vocab_size=99, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, feed_forward_proj="gated-" + (act or "gelu"), decoder_start_token_id=0, pad_token_id=0)
        return cfg, tf.T5ForConditionalGeneration
    if name == "llama":
        cfg = tf.LlamaConfig(**_TEXT, num_key_value_heads=2, hidden_act=act or "silu", num_labels=3, pad_token_id=0)
        return cfg, tf.LlamaForSequenceClassification
    if name == "gemma":
        cfg = tf.GemmaConfig(**_TEXT, num_key_value_heads=2, head_dim=8, hidden_activation=act or "gelu_pytorch_tanh", num_labels=3, pad_token_id=0)
        return cfg, tf.GemmaForSequenceClassification
    if name == "modernbert":
        cfg = tf.ModernBertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, hidden_activation=act or "gelu", num_labels=3, pad_token_id=0, global_attn_every_n_layers=1)
        return cfg, tf.ModernBertForSequenceClassification
    raise KeyError(name)


FAMILIES = ["bert", "roberta", "electra", "deberta-v2", "distilbert", "gpt2", "vit", "deit", "t5", "llama", "gemma", "modernbert"]
EXPECTED_KIND = {"t5": "gated", "llama": "gated", "gemma": "gated", "modernbert": "fused_gated"}


def tiny_model(name: str, act: str | None = None, dtype=torch.float32, seed: int = 0):
    config, cls = _config(name, act)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    return model


def tiny_inputs(model, batch: int = 3, seq: int = 6, pad: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    config = model.config
    if model.main_input_name == "pixel_values":
        return {"pixel_values": torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=g).to(model.dtype)}
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for row in range(1, batch):
            mask[row, seq - row :] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, 99, (batch, 4), generator=g)
    return inputs
