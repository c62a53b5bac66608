"""The model card of a run with DREG: one valid ``huggingface_hub.ModelCard`` for any base trainer.

The transformers ``Trainer`` and TRL's trainers each write ``README.md`` in their own
``create_model_card`` (different arguments, different templates). :func:`write_model_card` lets
the base trainer write its card, loads it back with ``ModelCard.load`` and completes it:

- metadata: ``tags`` with ``hf_dreg`` and the regularizer; the evaluation results as ``model-index``
  (``EvalResult`` entries, which the Hub renders), read from ``trainer.run_info["results"]`` or
  else from the last evaluation in ``trainer.state.log_history``; ``base_model`` when it is a hub
  id (never a local folder); ``datasets`` for a hub dataset; ``library_name`` (``peft`` for an
  adapter, else ``transformers``); ``pipeline_tag``;
- text: the DREG section (:func:`dreg_card_section`: regularizer, strength, sites table, data
  regime, results), replacing the one an earlier call wrote.

``trainer.run_info`` (a dict, optional) may hold ``model``, ``data`` (the data regime),
``results``, ``task`` (a pipeline tag) and ``dataset`` (``name``, ``type``, ``config``, ``split``,
``hub``): what the scripts know and the trainer does not.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

DREG_HEADING = "## Regularization (hf_dreg)"
# logged beside the metrics but not metrics of the model
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "num_tokens", "total_flos", "step", "examples")
# builders of local files: not hub datasets
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "pandas", "arrow", "generator", "imagefolder", "audiofolder", "webdataset", "npz")
# what a base trainer's create_model_card may take, besides tags (transformers' Trainer and TRL's trainers)
CARD_KWARGS = ("language", "license", "model_name", "finetuned_from", "tasks", "dataset_tags", "dataset", "dataset_args", "dataset_name")


def dreg_card_section(trainer) -> str:
    args = trainer.dreg_config
    lines = ["", DREG_HEADING, ""]
    lines.append(f"- regularizer: `{args.regularizer}`")
    used = args.strength
    strength = f"{used:.6g}" if isinstance(used, (int, float)) else "auto (not calibrated)"
    lines.append(f"- strength (dreg_lambda): `{strength}`")
    if args.auto_strength:
        lines.append(f"- calibrated with --dreg_lambda auto to a gradient ratio of `{args.dreg_target_ratio}`")
    for key, value in trainer.regularizer.describe().items():
        if key != "layers":
            lines.append(f"- {key}: `{value}`")
    sites = trainer.dreg_sites
    if sites:
        lines += ["", f"DREG sites ({len(sites)}):", "", "| site | kind | activation | feeding layer(s) |", "| --- | --- | --- | --- |"]
        lines += [f"| `{s.name}` | {s.kind} | {s.activation} | {', '.join(f'`{p}`' for p in s.inputs)} |" for s in sites]
    info = getattr(trainer, "run_info", {}) or {}
    if info.get("model"):
        lines += ["", f"Model: `{info['model']}`"]
    if info.get("data"):
        lines += ["", "Data regime:", ""]
        lines += [f"- {key}: `{value}`" for key, value in info["data"].items()]
    if info.get("results"):
        lines += ["", "Results:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in info["results"].items()]
    return "\n".join(lines) + "\n"


# ---- what the card says ---------------------------------------------------------------------------


def metric_results(metrics: dict) -> dict[str, float]:
    """The entries of ``metrics`` that measure the model (``eval_loss``, ``perplexity``, ``eval_dreg``,
    ``eval_accuracy``...): finite numbers, not timings, counters or the epoch."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and not key.endswith(NOT_METRICS)
    }


def evaluation_results(trainer) -> dict[str, float]:
    """The run's evaluation metrics: ``run_info["results"]``, else the last evaluation logged."""
    results = (getattr(trainer, "run_info", None) or {}).get("results")
    if not results:
        logged = [entry for entry in trainer.state.log_history if any(k.startswith("eval_") and k.endswith("loss") for k in entry)]
        results = {k: v for k, v in logged[-1].items() if k.startswith("eval_")} if logged else {}
    return metric_results(results)


def _base_model_class(model):
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return type(get_base() if callable(get_base) else model)


def _is_peft(model) -> bool:
    return callable(getattr(getattr(model, "module", model), "get_base_model", None)) and hasattr(model, "peft_config")


def infer_task(model) -> str | None:
    """The pipeline tag of the model's head (text-generation, text2text-generation, text-classification...)."""
    from transformers.modelcard import TASK_MAPPING

    name = _base_model_class(model).__name__
    found = None
    for task, mapping in TASK_MAPPING.items():  # the last match, as transformers' own card (BART: fill-mask, then text2text)
        if name in {n for v in mapping.values() for n in (v if isinstance(v, (list, tuple)) else [v])}:
            found = task
    return found


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name) or name.count("/") > 1


def base_model_id(trainer, finetuned_from: str | None = None) -> str | None:
    """The hub id the model was fine-tuned from, when it is one (a local folder is not)."""
    model = getattr(trainer.model, "module", trainer.model)
    candidates = [finetuned_from, (getattr(trainer, "run_info", None) or {}).get("model")]
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        candidates.append(getattr(next(iter(peft_config.values())), "base_model_name_or_path", None))
    candidates.append(getattr(getattr(model, "config", None), "_name_or_path", None))
    for name in candidates:
        if isinstance(name, str) and name and not _looks_local(name):
            return name
    return None


def dataset_info(trainer, dataset_name=None) -> dict:
    """The data the model was evaluated on: the hub ``dataset_name`` given, ``run_info["dataset"]``, or the datasets' builder."""
    if isinstance(dataset_name, (list, tuple)):
        dataset_name = dataset_name[0] if dataset_name else None
    if dataset_name:
        return {"name": dataset_name, "type": dataset_name, "hub": True}
    given = (getattr(trainer, "run_info", None) or {}).get("dataset")
    if given:
        return dict(given)
    ds = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    info = getattr(ds, "info", None)
    builder = getattr(info, "builder_name", None)
    if builder and builder not in LOCAL_BUILDERS:
        name = getattr(info, "dataset_name", None) or builder
        return {"name": name, "type": name, "config": getattr(info, "config_name", None), "split": str(getattr(ds, "split", "") or "") or None, "hub": True}
    if builder:
        return {"name": f"local {builder} files", "type": builder, "hub": False}
    return {"name": "custom data", "type": "custom", "hub": False}


def card_eval_results(results: dict[str, float], task: str, dataset: dict) -> list[EvalResult]:
    """One ``EvalResult`` per metric: type ``loss``/``perplexity``/``dreg``... named by its key (``eval_loss``)."""
    return [
        EvalResult(
            task_type=task,
            dataset_type=str(dataset.get("type") or dataset.get("name")),
            dataset_name=str(dataset.get("name") or dataset.get("type")),
            dataset_config=dataset.get("config"),
            dataset_split=dataset.get("split"),
            metric_type=key.removeprefix("eval_"),
            metric_name=key,
            metric_value=value,
        )
        for key, value in results.items()
    ]


def _without_dreg_section(text: str) -> str:
    start = text.find(DREG_HEADING)
    if start < 0:
        return text
    end = text.find("\n## ", start + len(DREG_HEADING))
    return text[:start].rstrip("\n") + ("\n" + text[end:] if end >= 0 else "\n")


def _unique(items) -> list:
    return list(dict.fromkeys(i for i in items if i))


# ---- writing ----------------------------------------------------------------------------------------


def write_model_card(trainer, base_create_model_card, *args, tags=None, **kwargs) -> ModelCard | None:
    """The base trainer's card in ``output_dir/README.md``, completed as described above (process zero only).

    ``base_create_model_card`` is the base class's bound ``create_model_card``; it gets the
    arguments its signature takes (``model_name``, ``dataset_name``, ``finetuned_from``...), the
    others are used here (``finetuned_from`` and ``dataset``/``dataset_name`` for any trainer).
    """
    accepted = inspect.signature(base_create_model_card).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = set(kwargs) - set(CARD_KWARGS) - (set() if takes_any else set(accepted))
    if unknown:
        raise TypeError(f"create_model_card() got unexpected keyword argument(s) {sorted(unknown)}; it takes {', '.join(CARD_KWARGS)}, tags.")
    if not trainer.is_world_process_zero():
        return None
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    dreg_tags = ["hf_dreg", trainer.dreg_config.regularizer]
    info = getattr(trainer, "run_info", None) or {}
    dataset = dataset_info(trainer, kwargs.get("dataset_name") or kwargs.get("dataset"))
    base_kwargs = {k: v for k, v in kwargs.items() if takes_any or k in accepted}
    if "dataset" in accepted and not base_kwargs.get("dataset") and info.get("dataset") and not dataset.get("hub"):
        base_kwargs["dataset"] = dataset["name"]  # transformers' card: "trained on the <file> dataset" (no hub link)
    if "model_name" in accepted and not base_kwargs.get("model_name"):
        base_kwargs["model_name"] = Path(trainer.args.output_dir).name or "model"  # TRL's title: not "Model Card for None"
    base_create_model_card(*args, tags=_unique(tags + dreg_tags), **base_kwargs)

    path = Path(trainer.args.output_dir) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\n---\n")
    data = card.data
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    task = info.get("task") or (kwargs.get("tasks") if isinstance(kwargs.get("tasks"), str) else None) or infer_task(model)
    base_model = base_model_id(trainer, kwargs.get("finetuned_from"))
    local_base = [t for t in (data.tags or []) if t.startswith("base_model:") and _looks_local(t.split(":")[-1])]

    data.tags = _unique([t for t in (data.tags or []) if t not in local_base] + tags + dreg_tags)
    data.library_name = "peft" if _is_peft(model) else "transformers"
    data.base_model = base_model  # None drops a local folder the base trainer (or PEFT) wrote
    if task:
        data.pipeline_tag = task
    for key in ("language", "license"):
        if kwargs.get(key):
            setattr(data, key, kwargs[key])
    if dataset.get("hub"):
        data.datasets = _unique((data.datasets if isinstance(data.datasets, list) else [data.datasets]) + [dataset["type"]])
    results = evaluation_results(trainer)
    data.model_name = kwargs.get("model_name") or data.model_name or Path(trainer.args.output_dir).name or "model"
    data.eval_results = card_eval_results(results, task or "other", dataset) if results else None

    if "[None](https://huggingface.co/None)" in card.text:  # TRL's template when the base model is a local folder
        local = info.get("model") or getattr(getattr(model, "config", None), "_name_or_path", "") or "a local model"
        named = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{local}`"
        card.text = card.text.replace("[None](https://huggingface.co/None)", named)
    card.text = _without_dreg_section(card.text).rstrip("\n") + "\n" + dreg_card_section(trainer)
    card.save(path)
    return card
