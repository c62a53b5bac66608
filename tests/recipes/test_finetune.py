"""End to end on ../shared/data: the fine-tuning function behind the scripts, the model card, push_to_hub, scan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import LOGGED, make_args, plain_sites, task_and_dreg_by_hand
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_dreg.cli import main as cli_main
from hf_dreg.recipes.arguments import parse_finetuning_args
from hf_dreg.recipes.classification import DataArguments, prepare_splits, run_classification
from hf_dreg.recipes.models import ModelArguments

REPO = Path(__file__).resolve().parents[2]


def _args(tmp_path, **extra):
    return make_args(tmp_path, **{"max_steps": 2, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 64, **extra})


def _scratch_bert(**extra):
    return ModelArguments(model_type="bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_seq_length=32, **extra)


def test_text_end_to_end_with_label_and_eval_noise(shared_data, tmp_path):
    data = DataArguments(data_dir=str(shared_data / "trec6"), samples_per_class=3, max_eval_samples=40, label_noise=0.5, eval_noise=0.3)
    args = _args(tmp_path)
    results = run_classification(_scratch_bert(), data, args)
    metrics = results["metrics"]
    for key in ("eval_accuracy", "eval_macro_f1", "eval_noisy_accuracy", "eval_noisy_macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # eval_dreg is the penalty of the 40 evaluation texts (one batch of 64), recomputed by hand on the trained model
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").double().eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    splits, _ = prepare_splits(data, seed=args.seed)
    batch = tok(list(splits["validation"]["text"]), truncation=True, max_length=32, padding=True, return_tensors="pt")
    assert len(splits["validation"]) == 40 and (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        _, expected = task_and_dreg_by_hand(model, "bert", dict(batch), sites=plain_sites("bert", layers=1))
    assert metrics["eval_dreg"] == pytest.approx(float(expected), rel=LOGGED)
    assert results["data"]["train_examples"] == 18 and results["data"]["eval_examples"] == 40
    assert results["data"]["labels_flipped"] > 0
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["data_label_noise"] == 0.5 and saved["data_labels_flipped"] == results["data"]["labels_flipped"]
    assert "eval_noisy_accuracy" in saved
    # training accuracy: the trained model on the 18 training texts, scored against the (noisy) labels it trained on
    train = tok(list(splits["train"]["text"]), truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**train).logits.argmax(-1)
    expected_train = (predicted == torch.tensor(splits["train"]["label"])).double().mean().item()
    assert metrics["eval_train_accuracy"] == pytest.approx(expected_train)


def test_label_noise_touches_the_training_split_only(shared_data):
    clean, _ = prepare_splits(DataArguments(data_dir=str(shared_data / "sst2"), samples_per_class=20, max_eval_samples=30), seed=0)
    noisy, regime = prepare_splits(
        DataArguments(data_dir=str(shared_data / "sst2"), samples_per_class=20, max_eval_samples=30, label_noise=0.4), seed=0
    )
    assert clean["validation"]["label"] == noisy["validation"]["label"]
    changed = sum(a != b for a, b in zip(clean["train"]["label"], noisy["train"]["label"]))
    assert changed == regime["labels_flipped"] > 0


def test_image_end_to_end_from_scratch_vit(shared_data, tmp_path):
    model = ModelArguments(model_type="vit", hidden_act="relu", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=7)
    data = DataArguments(data_dir=str(shared_data / "mnist"), samples_per_class=2, max_eval_samples=32, eval_noise=0.5)
    results = run_classification(model, data, _args(tmp_path, dreg_activations="all"))
    assert results["regularizer"]["activations"] == ["ReLU"]
    assert "eval_noisy_accuracy" in results["metrics"] and "eval_dreg" in results["metrics"]


def test_k_shot_larger_than_a_class_is_an_error_naming_the_class(shared_data):
    with pytest.raises(ValueError, match="ABBR"):
        prepare_splits(DataArguments(data_dir=str(shared_data / "trec6"), samples_per_class=100), seed=0)


def test_missing_column_is_an_error_naming_the_flag(shared_data):
    with pytest.raises(ValueError, match="--text_column"):
        prepare_splits(DataArguments(data_dir=str(shared_data / "sst2"), text_column="sentence"), seed=0)


def test_model_card_records_the_regularizer_sites_regime_and_results_and_push_uploads(shared_data, tmp_path, monkeypatch):
    import huggingface_hub

    uploads = []

    class FakeCommit:
        commit_url = "https://huggingface.co/fake/commit"
        oid = "0" * 40

    def fake_upload_folder(self, *args, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploads.append({"repo_id": kwargs["repo_id"], "files": sorted(p.name for p in folder.iterdir())})
        return FakeCommit()

    # stub the hub client at the network boundary only
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    data = DataArguments(data_dir=str(shared_data / "sst2"), samples_per_class=4, max_eval_samples=16, label_noise=0.25)
    args = _args(tmp_path, push_to_hub=True, hub_model_id="someone/dreg-test", hub_strategy="end")
    run_classification(_scratch_bert(), data, args)
    card = (tmp_path / "out" / "README.md").read_text()
    for expected in ("regularizer: `dreg`", "strength (dreg_lambda)", "0.00316228", "DREG sites (1)", "intermediate.dense", "samples_per_class: `4`", "label_noise: `0.25`", "eval_accuracy"):
        assert expected in card, expected
    assert uploads and uploads[-1]["repo_id"] == "someone/dreg-test"
    assert {"README.md", "model.safetensors", "config.json", "all_results.json"} <= set(uploads[-1]["files"])


def test_scripts_accept_a_yaml_config_with_every_regularizer_flag(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_type: bert\ndata_dir: x\noutput_dir: o\nregularizer: spectral_norm\ndreg_lambda: 0.5\nspectral_power_iterations: 2\nuse_cpu: true\n")
    model, data, training = parse_finetuning_args([str(config)])
    assert model.model_type == "bert" and training.regularizer == "spectral_norm" and training.dreg_lambda == 0.5
    model, data, training = parse_finetuning_args(
        ["--model_name_or_path", "m", "--output_dir", "o", "--dreg_lambda", "0.1", "--samples_per_class", "16", "--label_noise", "0.2", "--use_cpu"]
    )
    assert training.dreg_lambda == 0.1 and data.samples_per_class == 16 and data.label_noise == 0.2


def test_script_runs_from_the_command_line(shared_data, tmp_path):
    command = [
        sys.executable, str(REPO / "scripts" / "run_text_classification.py"),
        "--model_type", "bert", "--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--intermediate_size", "32", "--train_file", str(shared_data / "sst2" / "train.jsonl"),
        "--validation_file", str(shared_data / "sst2" / "test.jsonl"), "--max_train_samples", "16", "--max_eval_samples", "16",
        "--output_dir", str(tmp_path / "cli"), "--max_steps", "1", "--use_cpu", "--report_to", "none", "--dreg_kernels", "eager",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "cli" / "all_results.json").is_file()


def test_scan_lists_sites_and_totals(minilm_path, capsys):
    assert cli_main(["scan", minilm_path]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.5.intermediate.intermediate_act_fn" in out and "plain" in out
    assert "DREG sites: 6 (6 plain)" in out and "hidden units: 9,216" in out


def test_scan_explains_a_model_without_sites(minilm_path, capsys):
    assert cli_main(["scan", minilm_path, "--activations", "silu"]) == 2
    assert "GELUActivation" in capsys.readouterr().err
