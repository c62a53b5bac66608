"""The model card of any wrapped trainer (``DREGTrainerMixin.create_model_card``, ``hf_dreg.model_card``).

A tiny BERT classifier with the transformers Trainer (``DREGTrainer``), with and without a LoRA adapter, and the
classification script's card (on ../shared/data, skipped without it). Every card is read back with
``huggingface_hub.ModelCard.load`` and compared with the metrics ``trainer.evaluate()`` returned.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from tiny_models import tiny_model
from transformers import Trainer

from hf_dreg import DREGTrainingArguments, with_dreg
from hf_dreg.metrics import classification_metrics
from hf_dreg.model_card import DREG_HEADING, metric_results


def _data(n: int = 16, seq: int = 6, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "input_ids": torch.randint(3, 99, (n, seq), generator=g).tolist(),
        "attention_mask": [[1] * seq] * n,
        "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
    })


def _args(tmp_path, **extra):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, logging_steps=1, use_cpu=True,
                  report_to=[], disable_tqdm=True, save_strategy="no", dreg_kernels="eager", seed=0)
    return DREGTrainingArguments(**{**values, **extra})


def _trained(tmp_path, model=None, **extra):
    trainer = with_dreg(Trainer)(model=model or tiny_model("bert"), args=_args(tmp_path, **extra), train_dataset=_data(),
                                 eval_dataset=_data(seed=1), compute_metrics=classification_metrics())
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    return trainer, metrics


def test_trainer_card_has_the_evaluation_as_model_index_the_tags_and_the_sites(tmp_path):
    trainer, metrics = _trained(tmp_path)
    trainer.create_model_card(model_name="tiny-bert-dreg", language="en", license="apache-2.0")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == metric_results(metrics)  # read from the log: eval_loss, eval_accuracy, eval_macro_f1, eval_dreg
    assert {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_dreg"} == set(results)
    assert {r.metric_type for r in card.data.eval_results} == {"loss", "accuracy", "macro_f1", "dreg"}
    assert {r.task_type for r in card.data.eval_results} == {"text-classification"}
    assert {r.dataset_type for r in card.data.eval_results} == {"custom"}  # in-memory data: no hub id is claimed
    assert card.data.model_name == "tiny-bert-dreg" and card.data.language == "en" and card.data.license == "apache-2.0"
    assert {"hf_dreg", "dreg", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.base_model is None and not card.data.datasets
    assert card.text.count(DREG_HEADING) == 1 and "Training hyperparameters" in card.text  # the Trainer's own text kept
    assert trainer.dreg_sites and all(f"`{site.name}`" in card.text for site in trainer.dreg_sites)
    # a second card (push_to_hub writes one more) replaces the DREG section and keeps the tags given
    trainer.create_model_card(tags="extra")
    again = ModelCard.load(tmp_path / "out" / "README.md")
    assert again.text.count(DREG_HEADING) == 1 and "extra" in again.data.tags
    assert {r.metric_name: r.metric_value for r in again.data.eval_results} == results


def test_card_of_another_regularizer_and_a_lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["query", "intermediate.dense"], task_type="SEQ_CLS"))
    trainer, metrics = _trained(tmp_path, model=model, regularizer="spectral_norm")
    trainer.create_model_card(finetuned_from="google-bert/bert-base-uncased", dataset="stanfordnlp/sst2")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "peft"  # PEFT wrote a card when the adapter was saved; one card remains
    assert {"hf_dreg", "spectral_norm"} <= set(card.data.tags) and "dreg" not in card.data.tags
    assert card.data.base_model == "google-bert/bert-base-uncased" and card.data.datasets == ["stanfordnlp/sst2"]
    assert not any(t.startswith("base_model:") and "/tmp" in t for t in card.data.tags)
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == metric_results(metrics)
    assert "eval_spectral_norm" in metric_results(metrics) and "regularizer: `spectral_norm`" in card.text


def test_classification_script_card_loads(shared_data, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_dreg.recipes.classification import DataArguments, run_classification
    from hf_dreg.recipes.models import ModelArguments

    class FakeCommit:
        commit_url = "https://huggingface.co/fake/commit"
        oid = "0" * 40

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *a, **k: FakeCommit())
    model = ModelArguments(model_type="bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_seq_length=32)
    data = DataArguments(data_dir=str(shared_data / "sst2"), samples_per_class=4, max_eval_samples=16)
    results = run_classification(model, data, _args(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="someone/x", hub_strategy="end"))
    card = ModelCard.load(tmp_path / "out" / "README.md")
    expected = metric_results({k: v for k, v in results["metrics"].items() if k.startswith("eval")})
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == expected
    assert {"eval_accuracy", "eval_dreg"} <= set(expected) and {"hf_dreg", "dreg"} <= set(card.data.tags)
    assert "samples_per_class: `4`" in card.text and card.text.count(DREG_HEADING) == 1
