"""``hf-dreg scan`` on tiny causal LMs and seq2seq models saved with save_pretrained.

The expected tables are written out by hand from each architecture's module layout (the activation
class is read from the model's own module); the scan must load the class the checkpoint was saved
from (site paths with the LM's prefixes), with and without weights (``--from_config``, on meta).
"""

import json

import pytest
import torch
import transformers as tf

from hf_dreg.cli import _build_from_config, main, model_class_for

_SIZES = dict(vocab_size=99, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0)


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_inner=24, activation_function="gelu_new"))


def _gemma2():
    config = tf.Gemma2Config(
        **_SIZES, hidden_size=16, intermediate_size=24, num_key_value_heads=2, head_dim=8, hidden_activation="gelu_pytorch_tanh"
    )
    return tf.Gemma2ForCausalLM(config)


def _t5():
    config = tf.T5Config(
        vocab_size=99, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
    )
    return tf.T5ForConditionalGeneration(config)


def _bart():
    config = tf.BartConfig(
        vocab_size=99, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=24, decoder_ffn_dim=24, activation_function="gelu", max_position_embeddings=32,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    return tf.BartForConditionalGeneration(config)


def _llama():
    config = tf.LlamaConfig(**_SIZES, hidden_size=16, intermediate_size=24, num_key_value_heads=2, hidden_act="silu")
    return tf.LlamaForCausalLM(config)


_BUILDERS = {"gpt2": _gpt2, "gemma2": _gemma2, "t5": _t5, "bart": _bart, "llama": _llama}
_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "gemma2": "Gemma2ForCausalLM",
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "llama": "LlamaForCausalLM",
}


def _expected(name, model):
    """(site, kind, activation class, width, feeding layers) rows, by hand."""
    modules = dict(model.named_modules())
    rows = []

    def add(site, kind, feeding):
        rows.append((site, kind, type(modules[site]).__name__, "24", ", ".join(feeding)))

    for i in range(2):
        if name == "gpt2":
            add(f"transformer.h.{i}.mlp.act", "plain", [f"transformer.h.{i}.mlp.c_fc"])
        elif name in ("gemma2", "llama"):
            p = f"model.layers.{i}.mlp"
            add(f"{p}.act_fn", "gated", [f"{p}.gate_proj", f"{p}.up_proj"])
        elif name == "bart":
            add(f"model.encoder.layers.{i}.activation_fn", "plain", [f"model.encoder.layers.{i}.fc1"])
    if name == "bart":
        rows += [(f"model.decoder.layers.{i}.activation_fn", "plain", "GELUActivation", "24", f"model.decoder.layers.{i}.fc1") for i in range(2)]
    if name == "t5":
        for part, layer in (("encoder", 1), ("decoder", 2)):
            for i in range(2):
                p = f"{part}.block.{i}.layer.{layer}.DenseReluDense"
                add(f"{p}.act", "gated", [f"{p}.wi_0", f"{p}.wi_1"])
    return rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    saved = {}
    for name, build in _BUILDERS.items():
        torch.manual_seed(0)
        model = build()
        model.save_pretrained(root / name)
        saved[name] = (root / name, model)
    return saved


def _table(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = [c for c in line.split("  ") if c.strip()]
        rows.append((*[c.strip() for c in cells[:4]], "  ".join(cells[4:]).strip()))
    return rows, lines


@pytest.mark.parametrize("name", ["gpt2", "gemma2", "t5", "bart"])
@pytest.mark.parametrize("from_config", [False, True])
def test_scan_lists_the_sites_of_lms_and_seq2seq_models(checkpoints, capsys, name, from_config):
    path, model = checkpoints[name]
    assert json.loads((path / "config.json").read_text())["architectures"] == [_CLASSES[name]]
    rc = main(["scan", str(path)] + (["--from_config"] if from_config else []))
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows, lines = _table(out)
    expected = _expected(name, model)
    assert rows == expected
    assert lines[0].startswith(f"{_CLASSES[name]} (model class from config.architectures)")
    kinds = {row[1] for row in expected}
    assert f"DREG sites: {len(expected)} ({len(expected)} {kinds.pop()})" in out
    assert f"hidden units: {24 * len(expected)}" in out
    if from_config:  # built without weights on the meta device, not randomly initialised
        built = _build_from_config(type(model), tf.AutoConfig.from_pretrained(path))
        assert all(p.is_meta for p in built.parameters())


def test_scan_without_architectures_falls_back_to_the_auto_classes(checkpoints, tmp_path, capsys):
    for name, auto in (("gpt2", "AutoModelForCausalLM"), ("t5", "AutoModelForSeq2SeqLM")):
        path, model = checkpoints[name]
        config = tf.AutoConfig.from_pretrained(path)
        config.architectures = None
        assert model_class_for(config) == (type(model), auto)
        config.save_pretrained(tmp_path / name)
        rc = main(["scan", str(tmp_path / name), "--from_config"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert _table(out)[0] == _expected(name, model)
        assert f"(model class from {auto})" in out


def test_scan_of_a_swiglu_model_names_the_flag(checkpoints, capsys):
    path, model = checkpoints["llama"]
    assert main(["scan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "SiLUActivation" in err
    assert "--dreg_activations silu" in err and "--activations silu" in err
    # and with that choice, its gated sites
    assert main(["scan", str(path), "--activations", "silu"]) == 0
    rows, _ = _table(capsys.readouterr().out)
    assert rows == _expected("llama", model)
