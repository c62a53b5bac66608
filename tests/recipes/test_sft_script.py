"""scripts/run_sft.py end to end, in-process (``hf_dreg.recipes.sft.main(argv)``), on tiny random GPT-2 (gelu_new) and
Gemma-2 (gated gelu_pytorch_tanh) checkpoints saved with the fixture tokenizer, on the fixture JSONL files in
TRL's three formats, with and without LoRA.

Compared against: the metrics ``main`` returned (the card's model-index, ``all_results.json``), ``exp(eval_loss)``
(perplexity), the checkpoint on disk before training (LoRA changes adapter weights only), the fixture files
(how many examples were trained on), and the messages of the errors (the flag or column and the fix).
"""

from __future__ import annotations

import json
import math

import pytest
import tiny_lm
import torch
import transformers as tf
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_dreg import DREGConfig
from hf_dreg.model_card import metric_results
from hf_dreg.recipes.data import DatasetArguments, load_splits
from hf_dreg.recipes.sft import main, parse_sft_args

FIXTURES = tiny_lm.FIXTURES
REPO = FIXTURES.parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    saved = {family: tiny_lm.save_model(root / family, family) for family in ("gpt2", "gemma2")}
    saved["no_template"] = tiny_lm.save_model(root / "no_template", "gpt2", chat_template=False)
    return saved


def _argv(model, out, fmt, *extra, validation=True):
    argv = [
        "--model_name_or_path", str(model), "--train_file", str(FIXTURES / f"sft_{fmt}_train.jsonl"),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--learning_rate", "1e-2", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--max_length", "32", "--seed", "0",
        "--dreg_lambda", "0.01", "--dreg_kernels", "eager",
    ]
    if validation:
        argv += ["--validation_file", str(FIXTURES / f"sft_{fmt}_validation.jsonl")]
    return argv + list(extra)


def _check_run(run, out, lora: bool):
    """What every run must have: the logs, the evaluation, the saved files and a card that loads."""
    trainer = run.trainer
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert steps, "no training step was logged"
    for entry in steps:  # DREG's entries beside TRL's own
        assert {"dreg", "task_loss", "mean_token_accuracy", "num_tokens", "entropy"} <= set(entry), entry
        assert math.isfinite(entry["dreg"]) and entry["dreg"] > 0
    metrics = run.eval_metrics
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    assert math.isfinite(metrics["eval_dreg"]) and metrics["eval_dreg"] > 0
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_loss"] == metrics["eval_loss"] and saved["perplexity"] == metrics["perplexity"]
    assert DREGConfig.from_pretrained(str(out)).dreg_lambda == 0.01
    if lora:
        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
        assert all("lora_" in key for key in load_file(str(out / "adapter_model.safetensors")))
    else:
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    card = ModelCard.load(out / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == metric_results(metrics)  # every metric of the model, as returned
    assert {"eval_loss", "perplexity", "eval_dreg", "eval_mean_token_accuracy"} <= set(results)
    assert {r.task_type for r in card.data.eval_results} == {"text-generation"}
    assert {"hf_dreg", "dreg", "trl", "sft"} <= set(card.data.tags)
    assert card.data.library_name == ("peft" if lora else "transformers")
    assert card.data.base_model is None  # a local folder is not a hub id
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)
    assert card.text.count("## Regularization (hf_dreg)") == 1
    assert trainer.dreg_sites and all(f"`{site.name}`" in card.text for site in trainer.dreg_sites)
    # TRL's template: a title and a base model, never "None" (the base is a local folder here)
    assert "Model Card for None" not in card.text and "huggingface.co/None" not in card.text
    assert "# Model Card for " in card.text
    return card


def _changed(before: dict, after: dict) -> set[str]:
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


@pytest.fixture(scope="module")
def gpt2_text_run(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2_text") / "out"
    return main(_argv(checkpoints["gpt2"], out, "text")), out


def test_gpt2_language_modeling_full_finetune(checkpoints, gpt2_text_run):
    run, out = gpt2_text_run
    card = _check_run(run, out, lora=False)
    assert run.trainer.dreg_config.dreg_lambda == 0.01 and len(run.trainer.dreg_sites) == 2
    assert "language modeling" in card.text and "sft_text_validation.jsonl" in card.text
    before = tf.AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"]).state_dict()
    after = tf.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys() and "transformer.h.0.mlp.c_fc.weight" in _changed(before, after)


def test_gemma2_prompt_completion_with_lora_changes_adapters_only(checkpoints, tmp_path):
    out = tmp_path / "out"
    run = main(_argv(checkpoints["gemma2"], out, "prompt_completion", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                     "--lora_target_modules", "gate_proj", "up_proj", "down_proj"))
    _check_run(run, out, lora=True)
    trainer = run.trainer
    row = trainer.train_dataset[0]  # TRL's default: loss on the completion only (the prompt's labels are -100)
    prompt_length = len(trainer.processing_class(row["prompt"])["input_ids"])
    assert row["labels"][:prompt_length] == [-100] * prompt_length
    assert row["labels"][prompt_length:] == row["input_ids"][prompt_length:] and len(row["input_ids"]) > prompt_length
    original = tf.AutoModelForCausalLM.from_pretrained(checkpoints["gemma2"]).state_dict()
    trained = {
        name.replace(".base_layer", ""): value
        for name, value in trainer.model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert trained.keys() == original.keys() and not _changed(original, trained)  # the base model is untouched
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero: the adapters trained


def test_gemma2_messages_with_max_train_samples_trains_on_exactly_those(checkpoints, tmp_path):
    out = tmp_path / "out"
    argv = _argv(checkpoints["gemma2"], out, "messages", "--max_train_samples", "8", "--validation_split_percentage", "25",
                 "--max_steps", "-1", "--num_train_epochs", "1", validation=False)
    run = main(argv)
    _check_run(run, out, lora=False)
    trainer = run.trainer
    # 25% of the 32 examples held out, 8 of the other 24 drawn: one epoch of 8 at batch 4 is 2 steps
    assert len(trainer.train_dataset) == 8 and len(trainer.eval_dataset) == 8
    assert trainer.state.global_step == 2 and run.train_metrics["train_examples"] == 8
    data = trainer.run_info["data"]
    assert data["format"] == "conversational" and data["train_available"] == 24 and data["train_examples"] == 8
    # the texts trained on are those load_splits draws for this seed, rendered with the chat template
    train, _, _ = load_splits(DatasetArguments(train_file=str(FIXTURES / "sft_messages_train.jsonl"), max_train_samples=8,
                                               validation_split_percentage=25), seed=0)
    tokenizer = trainer.processing_class
    expected = sorted(tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False))["input_ids"] for row in train)
    trained = sorted(row["input_ids"] for row in trainer.train_dataset)
    assert trained == expected


def test_gpt2_messages_with_lora_from_one_yaml_file_and_push_to_hub(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub

    uploads = []

    class FakeCommit:
        commit_url = "https://huggingface.co/fake/commit"
        oid = "0" * 40

    def fake_upload_folder(self, *args, **kwargs):
        folder = tmp_path / "out"
        uploads.append({"repo_id": kwargs["repo_id"], "files": sorted(p.name for p in folder.iterdir()),
                        "card": (folder / "README.md").read_text()})
        return FakeCommit()

    # the hub client stubbed at the network boundary only
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    config = tmp_path / "sft.yaml"
    config.write_text(
        "\n".join(
            [
                f"model_name_or_path: {checkpoints['gpt2']}",
                f"train_file: {FIXTURES / 'sft_messages_train.jsonl'}",
                f"validation_file: {FIXTURES / 'sft_messages_validation.jsonl'}",
                f"output_dir: {tmp_path / 'out'}",
                "use_peft: true", "lora_r: 4", "lora_alpha: 8", "lora_target_modules: [c_attn, c_fc]",
                "max_steps: 2", "per_device_train_batch_size: 4", "logging_steps: 1", "learning_rate: 1.0e-2",
                "save_strategy: 'no'", "report_to: none", "use_cpu: true", "disable_tqdm: true", "max_length: 32",
                "dreg_lambda: 0.01", "dreg_kernels: eager",
                "push_to_hub: true", "hub_model_id: someone/dreg-sft-test", "hub_strategy: end",
            ]
        )
        + "\n"
    )
    run = main([str(config)])
    card = _check_run(run, tmp_path / "out", lora=True)
    assert run.trainer.run_info["data"]["format"] == "conversational"
    assert uploads and uploads[-1]["repo_id"] == "someone/dreg-sft-test"
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "dreg_config.json", "all_results.json"} <= set(uploads[-1]["files"])
    assert ModelCard(uploads[-1]["card"]).data.eval_results == card.data.eval_results  # the card pushed is the final one


def test_card_takes_the_base_model_and_hub_dataset_given(gpt2_text_run):
    run, out = gpt2_text_run  # after test_gpt2_language_modeling_full_finetune checked its own card
    run.trainer.create_model_card(model_name="tiny-sft", finetuned_from="openai-community/gpt2", dataset_name="stanfordnlp/imdb")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "openai-community/gpt2" and card.data.datasets == ["stanfordnlp/imdb"]
    assert card.data.model_name == "tiny-sft"
    assert {r.dataset_type for r in card.data.eval_results} == {"stanfordnlp/imdb"}
    assert card.text.count("## Regularization (hf_dreg)") == 1  # written twice, one DREG section
    with pytest.raises(TypeError, match="unexpected keyword"):
        run.trainer.create_model_card(dataset_nmae="typo")


@pytest.mark.parametrize(
    "change, error, message",
    [
        (("--train_file", "missing.jsonl"), FileNotFoundError, r"--train_file missing\.jsonl: no such file"),
        (("--train_file", str(FIXTURES / "README.md")), ValueError, r"--train_file .*unknown file format '\.md'.*\.jsonl"),
        (("--validation_file", "nowhere.jsonl"), FileNotFoundError, r"--validation_file nowhere\.jsonl: no such file"),
        (("--dataset_text_field", "content"), ValueError, r"columns \['text'\].*--dataset_text_field"),
        (("--train_file", str(FIXTURES / "seq2seq_train.jsonl")), ValueError, r"Unknown data format.*\['source', 'target'\].*\"prompt\""),
    ],
)
def test_bad_inputs_are_errors_naming_the_flag_and_the_fix(checkpoints, tmp_path, change, error, message):
    argv = _argv(checkpoints["gpt2"], tmp_path / "out", "text")
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(error, match=message):
        main(argv)


def test_prompt_without_completion_and_messages_without_chat_template_are_errors(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": row}) + "\n" for row in ["where is the cat ?", "where is the dog ?"]))
    with pytest.raises(ValueError, match=r"'prompt' column but no 'completion' column"):
        main(_argv(checkpoints["gpt2"], tmp_path / "a", "text", "--train_file", str(prompts), validation=False))
    with pytest.raises(ValueError, match=r"no chat template.*--chat_template_path"):
        main(_argv(checkpoints["no_template"], tmp_path / "b", "messages"))
    with pytest.raises(ValueError, match=r"--dataset_name .*--train_file"):
        main(["--model_name_or_path", str(checkpoints["gpt2"]), "--output_dir", str(tmp_path / "c")])


def test_sft_lora_yaml_config_parses(tmp_path):
    # the shipped config asks for bf16, which this CPU machine refuses: parse it with --config and one override
    data, training, model, dreg = parse_sft_args(["--config", str(REPO / "configs" / "sft_lora.yaml"), "--use_cpu", "true"])
    assert model.model_name_or_path == "google/gemma-2-2b" and model.use_peft and model.lora_target_modules == "all-linear"
    assert data.dataset_name == "trl-lib/Capybara" and data.max_train_samples == 2000
    assert dreg.regularizer == "dreg" and dreg.dreg_lambda == 0.01 and dreg.reg_ratio_interval == 50
    assert training.activation_checkpointing and training.gradient_checkpointing_kwargs in (None, {"use_reentrant": False})
    assert training.chat_template_path == "google/gemma-2-2b-it" and training.bf16
    # flags override the file; one YAML file alone is accepted too
    data, training, model, dreg = parse_sft_args(["--config", str(REPO / "configs" / "sft_lora.yaml"), "--use_cpu", "true", "--dreg_lambda", "auto"])
    assert dreg.dreg_lambda == "auto"
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\ntrain_file: t.jsonl\noutput_dir: o\nuse_cpu: true\nregularizer: spectral_norm\ndreg_lambda: 0.5\n")
    data, training, model, dreg = parse_sft_args([str(config)])
    assert data.train_file == "t.jsonl" and dreg.regularizer == "spectral_norm" and dreg.dreg_lambda == 0.5


def test_load_splits_draws_a_seeded_subset():
    args = DatasetArguments(train_file=str(FIXTURES / "sft_text_train.jsonl"), max_train_samples=8, validation_split_percentage=0)
    first, evaluation, record = load_splits(args, seed=0)
    again, _, _ = load_splits(args, seed=0)
    other, _, _ = load_splits(args, seed=1)
    assert evaluation is None and record["train_examples"] == 8 and record["train_available"] == 32
    assert first["text"] == again["text"] and first["text"] != other["text"]
    lines = [json.loads(line)["text"] for line in (FIXTURES / "sft_text_train.jsonl").read_text().splitlines()]
    assert set(first["text"]) <= set(lines)


def test_an_activation_the_sites_do_not_take_fails_before_loading(checkpoints, tmp_path):
    """A ReLU GPT-2 with the default --dreg_activations gelu: the error names the flag and the family before any
    weight is loaded, and no output folder is left behind."""
    import shutil

    import transformers as tf

    from hf_dreg.modeling.sites import NoSitesError

    model = tmp_path / "relu_gpt2"
    shutil.copytree(checkpoints["gpt2"], model)
    config = tf.AutoConfig.from_pretrained(model)
    config.activation_function = "relu"
    config.save_pretrained(model)
    (model / "model.safetensors").unlink()  # were the weights read, this run would fail differently
    out = tmp_path / "out"
    with pytest.raises(NoSitesError, match=r"GPT2LMHeadModel's MLPs use relu \(its config: activation_function='relu'\); --dreg_activations gelu "
                       r"finds no DREG sites in them\. Pass --dreg_activations relu "):
        main(_argv(model, out, "text"))
    assert not out.exists()
