"""Every script checks, from the model's config alone, that ``--dreg_activations`` takes the activation its MLPs use.

Fed what users feed: the entry points themselves (``scripts/run_text_classification.py`` and
``scripts/run_image_classification.py`` run in-process with their ``sys.argv``, one of them also as a process;
``main(argv)`` of the no_trainer and seq2seq recipes) on tiny SwiGLU Llama, ReLU BERT, ReLU ViT, ReLU T5 and
ReLU BART checkpoints with the default ``--dreg_activations gelu``. The checkpoint folders hold a config.json and
nothing else (no weights, no tokenizer): the error comes before anything else is read. One full Llama
checkpoint (weights and tokenizer) shows the same with the model's, the tokenizer's and the data's loading made
to fail. The output folder never exists afterwards. With the right family (or a regularizer without sites, or
strength 0) the check passes, and the run goes on to load what is not there.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_lm
import transformers as tf

from hf_dreg import DREGConfig
from hf_dreg.modeling.sites import NoSitesError
from hf_dreg.recipes.models import check_activations_before_loading, check_config_activations, config_activation, regularizer_uses_sites

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
FIXTURES = tiny_lm.FIXTURES
_SIZES = dict(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)


def _configs():
    return {
        "llama": tf.LlamaConfig(**_SIZES, num_key_value_heads=2, hidden_act="silu", pad_token_id=0),
        "bert": tf.BertConfig(**_SIZES, hidden_act="relu"),
        "vit": tf.ViTConfig(**{k: v for k, v in _SIZES.items() if k != "vocab_size"}, image_size=8, patch_size=4, num_channels=1, hidden_act="relu"),
        "t5": tf.T5Config(vocab_size=99, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, feed_forward_proj="relu", decoder_start_token_id=0),
        "bart": tf.BartConfig(vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                              encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32, activation_function="relu"),
    }


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """name -> a checkpoint folder with config.json alone."""
    root = tmp_path_factory.mktemp("config_only")
    folders = {}
    for name, config in _configs().items():
        config.save_pretrained(root / name)
        assert sorted(p.name for p in (root / name).iterdir()) == ["config.json"]
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": t.split()[0]}) + "\n" for t in ("good film", "bad film", "good play", "bad play")))
    return path


def _classification_argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--train_file", str(data), "--validation_file", str(data), "--output_dir", str(out),
            "--max_steps", "1", "--use_cpu", "--report_to", "none", "--dreg_kernels", "eager", *extra]


def _loading_fails(error) -> bool:
    """Past the check: the run failed on loading what the config-only folder does not hold (tokenizer or weights)."""
    return not isinstance(error, NoSitesError) and re.search(r"tokenizer|model\.safetensors", str(error)) is not None


def _run_script(script: str, argv, monkeypatch):
    """The script as `python scripts/<script> <argv>` runs it, in this process."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / script), *map(str, argv)])
    runpy.run_path(str(SCRIPTS / script), run_name="__main__")


# ---- the classification scripts (Trainer) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, model, model_class, family",
    [
        ("run_text_classification.py", "llama", "LlamaForSequenceClassification", "silu"),
        ("run_text_classification.py", "bert", "BertForSequenceClassification", "relu"),
        ("run_image_classification.py", "vit", "ViTForImageClassification", "relu"),
    ],
)
def test_classification_scripts_name_the_family_before_loading(script, model, model_class, family, config_only, text_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(NoSitesError) as error:
        _run_script(script, _classification_argv(config_only[model], text_data, out), monkeypatch)
    message = str(error.value)
    assert f"{model_class}'s MLPs use {family} (its config: hidden_act='{family}')" in message
    assert "--dreg_activations gelu finds no DREG sites" in message and f"Pass --dreg_activations {family} " in message
    assert not out.exists()


def test_text_classification_script_as_a_process(config_only, text_data, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPTS / "run_text_classification.py"), *_classification_argv(config_only["llama"], text_data, out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # this checkout's hf_dreg
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "NoSitesError: LlamaForSequenceClassification's MLPs use silu" in done.stderr and "Pass --dreg_activations silu " in done.stderr
    assert not out.exists()


def test_from_scratch_hidden_act_is_checked_before_the_data(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--model_type", "bert", "--hidden_act", "tanh", "--data_dir", str(tmp_path / "no_such_data"), "--output_dir", str(out), "--use_cpu"]
    with pytest.raises(NoSitesError, match=r"BertForSequenceClassification's MLPs use tanh .*Pass --dreg_activations tanh "):
        _run_script("run_text_classification.py", argv, monkeypatch)
    assert not out.exists()


def test_a_full_checkpoint_is_refused_before_its_weights_tokenizer_or_data_are_read(tmp_path, monkeypatch):
    """A complete Llama checkpoint (weights, tokenizer): the weights, the tokenizer and the data are never read."""
    from hf_dreg.recipes import classification

    folder = tmp_path / "llama"
    tiny_lm.save_tokenizer(folder)
    tf.LlamaForSequenceClassification(_configs()["llama"]).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def never(*args, **kwargs):
        raise AssertionError("read before the activation check")

    monkeypatch.setattr(tf.PreTrainedModel, "from_pretrained", never)
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", never)
    monkeypatch.setattr(classification, "prepare_splits", never)
    out = tmp_path / "out"
    with pytest.raises(NoSitesError, match=r"LlamaForSequenceClassification's MLPs use silu .*Pass --dreg_activations silu "):
        _run_script("run_text_classification.py", _classification_argv(folder, tmp_path / "unread.jsonl", out), monkeypatch)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra",
    [["--dreg_activations", "silu"], ["--dreg_activations", "gelu,silu"], ["--dreg_activations", "all"], ["--dreg_lambda", "0"], ["--regularizer", "igpen"]],
)
def test_the_check_passes_with_the_family_or_without_sites(extra, config_only, text_data, tmp_path, monkeypatch):
    """Past the check, the run goes on to the loading (here of a tokenizer that is not there)."""
    out = tmp_path / "out"
    with pytest.raises(Exception) as error:
        _run_script("run_text_classification.py", _classification_argv(config_only["llama"], text_data, out, *extra), monkeypatch)
    assert _loading_fails(error.value), error.value


def test_spectral_norm_acts_on_the_sites_too(config_only, text_data, tmp_path, monkeypatch):
    with pytest.raises(NoSitesError, match=r"Pass --dreg_activations relu "):
        _run_script("run_text_classification.py", _classification_argv(config_only["bert"], text_data, tmp_path / "out", "--regularizer", "spectral_norm"), monkeypatch)


# ---- the no_trainer script ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, model_class, family", [("llama", "LlamaForSequenceClassification", "silu"), ("bert", "BertForSequenceClassification", "relu")])
def test_no_trainer_script_names_the_family_before_loading(model, model_class, family, config_only, text_data, tmp_path):
    from hf_dreg.recipes.classification_no_trainer import main

    out = tmp_path / "out"
    with pytest.raises(NoSitesError) as error:
        main(["--model_name_or_path", str(config_only[model]), "--train_file", str(text_data), "--output_dir", str(out)])
    message = str(error.value)
    assert f"{model_class}'s MLPs use {family}" in message and f"Pass --dreg_activations {family} " in message
    assert not out.exists()
    with pytest.raises(Exception) as error:  # the right family: on to the loading
        main(["--model_name_or_path", str(config_only[model]), "--train_file", str(text_data), "--output_dir", str(out), "--dreg_activations", family])
    assert _loading_fails(error.value), error.value


# ---- the seq2seq script --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, says", [("t5", "T5ForConditionalGeneration's MLPs use relu (its config: dense_act_fn='relu')"),
                    ("bart", "BartForConditionalGeneration's MLPs use relu (its config: activation_function='relu')")]
)
def test_seq2seq_script_names_the_family_before_loading(model, says, config_only, tmp_path):
    from hf_dreg.recipes.seq2seq import main

    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(config_only[model]), "--train_file", str(FIXTURES / "seq2seq_train.jsonl"), "--output_dir", str(out),
            "--max_steps", "1", "--use_cpu", "--report_to", "none"]
    with pytest.raises(NoSitesError) as error:
        main(argv)
    assert says in str(error.value) and "Pass --dreg_activations relu " in str(error.value)
    assert not out.exists()
    with pytest.raises(Exception) as error:
        main([*argv, "--dreg_activations", "relu"])
    assert _loading_fails(error.value), error.value


# ---- the helper ------------------------------------------------------------------------------------------------------


def test_config_activation_reads_every_key_and_stays_silent_when_unsure():
    configs = _configs()
    assert config_activation(configs["llama"]) == ("silu", "hidden_act", "silu")
    assert config_activation(configs["t5"]) == ("relu", "dense_act_fn", "relu")
    assert config_activation(tf.T5Config(feed_forward_proj="gated-gelu"))[0] == "gelu"
    assert config_activation(tf.GemmaConfig())[0] == "gelu"  # gelu_pytorch_tanh
    assert config_activation(tf.GPT2Config())[0] == "gelu"  # gelu_new
    assert config_activation(configs["bart"]) == ("relu", "activation_function", "relu")
    odd = tf.PretrainedConfig(hidden_act="silu", activation_function="relu")  # keys that disagree
    for silent in (tf.LlavaConfig(), tf.DistilBertConfig(), tf.PretrainedConfig(hidden_act="mish"), tf.PretrainedConfig(), odd):
        assert config_activation(silent) is None
        check_config_activations(silent, "gelu")


def test_check_passes_for_the_family_and_names_it_otherwise():
    llama = _configs()["llama"]
    for ok in ("silu", "swish", "gelu,silu", ["silu"], "all"):
        check_config_activations(llama, ok)
    with pytest.raises(NoSitesError, match=r"--dreg_activations gelu,tanh finds no DREG sites in them\. Pass --dreg_activations silu "):
        check_config_activations(llama, "gelu,tanh", (tf.AutoModelForCausalLM,))
    check_activations_before_loading(str(Path("no") / "such" / "checkpoint"), "gelu")  # a config that does not load: silent


def test_regularizer_uses_sites():
    assert regularizer_uses_sites(DREGConfig()) and regularizer_uses_sites(DREGConfig(dreg_lambda="auto"))
    assert regularizer_uses_sites(DREGConfig(regularizer="spectral_norm"))
    assert not regularizer_uses_sites(DREGConfig(dreg_lambda=0))
    assert not regularizer_uses_sites(DREGConfig(regularizer="spectral_norm", dreg_lambda=0))
    for other in ("none", "weight_decay", "igpen", "jacobian"):
        assert not regularizer_uses_sites(DREGConfig(regularizer=other))
