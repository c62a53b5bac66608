"""Supervised fine-tuning of a causal LM with DREG, TRL's way: the logic behind ``scripts/run_sft.py``.

Arguments (``parse_sft_args``): :class:`~hf_dreg.recipes.data.DatasetArguments`, ``trl.SFTConfig``,
``trl.ModelConfig`` (``--model_name_or_path``, ``--dtype``, the LoRA flags ``--use_peft --lora_r
--lora_alpha --lora_target_modules ...``) and :class:`~hf_dreg.DREGConfig`, as flags, as one YAML
file (the only argument) or as ``--config file.yaml`` (``trl.TrlParser``; flags override it).

Data in TRL's formats: ``{"text": ...}`` (language modeling), ``{"prompt": ..., "completion": ...}``
(loss on the completion only, TRL's default), ``{"messages": [...]}`` (conversational; the
tokenizer needs a chat template). ``run_sft`` trains ``hf_dreg.with_dreg(SFTTrainer)``, evaluates
(``eval_loss``, ``perplexity = exp(eval_loss)``, ``eval_dreg``), saves the model, the metrics and
the model card, and with ``--push_to_hub`` pushes them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import transformers as tf

from ..config import DREGConfig
from .arguments import check_config_keys, check_flags
from .data import DatasetArguments, dataset_card_info, load_splits
from .models import check_activations_before_loading, regularizer_uses_sites
from .train_and_save import train_evaluate_save

try:
    from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config
    from trl.data_utils import is_conversational
except ImportError as error:  # trl is an optional extra
    raise ImportError("hf_dreg.recipes.sft (scripts/run_sft.py) needs TRL: pip install 'hf_dreg[trl]'.") from error

from ..trainer import with_dreg

logger = tf.utils.logging.get_logger(__name__)

LANGUAGE_MODELING, PROMPT_COMPLETION, CONVERSATIONAL = "language modeling", "prompt-completion", "conversational"
FORMATS_HELP = (
    'run_sft.py reads TRL\'s formats: {"text": ...} (language modeling; another column with --dataset_text_field), '
    '{"prompt": ..., "completion": ...} (loss on the completion only), or {"messages": [{"role": ..., "content": ...}, ...]} '
    "(conversational, needs a chat template)."
)


def parse_sft_args(argv: list[str] | None = None) -> tuple[DatasetArguments, SFTConfig, ModelConfig, DREGConfig]:
    """(DatasetArguments, SFTConfig, ModelConfig, DREGConfig) from flags, one .yaml/.json file, or ``--config``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    types = (DatasetArguments, SFTConfig, ModelConfig, DREGConfig)
    parser = TrlParser(types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        check_config_keys(argv[0], types)
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", argv[0]]
    flags = list(argv)
    if "--config" in flags:  # TRL's own option: the YAML file, then flags that override it
        at = flags.index("--config")
        check_config_keys(flags[at + 1], types)
        del flags[at : at + 2]
    check_flags(parser, flags)
    return parser.parse_args_and_config(args=argv)


def data_format(ds, split: str, text_field: str) -> str:
    """Which of TRL's formats ``ds`` is in; an error naming the columns and the formats otherwise."""
    columns = ds.column_names
    if "messages" in columns:
        return CONVERSATIONAL
    if "prompt" in columns and "completion" in columns:
        return PROMPT_COMPLETION
    if "prompt" in columns or "completion" in columns:
        present, absent = ("prompt", "completion") if "prompt" in columns else ("completion", "prompt")
        raise ValueError(
            f"The {split} data has a {present!r} column but no {absent!r} column (its columns are {columns}): "
            f'prompt-completion data needs both, {{"prompt": ..., "completion": ...}}. {FORMATS_HELP}'
        )
    if text_field in columns:
        return LANGUAGE_MODELING
    raise ValueError(f"Unknown data format: the {split} data has the columns {columns}. {FORMATS_HELP}")


def _check_chat_template(train, tokenizer, training_args, model_name: str) -> None:
    if len(train) and is_conversational(train[0]) and tokenizer.chat_template is None and not training_args.chat_template_path:
        raise ValueError(
            f"The training data is conversational (lists of messages) but the tokenizer of {model_name} has no chat "
            "template. Pass --chat_template_path (a .jinja file, or a tokenizer that has one), or use a model whose "
            "tokenizer has a chat template."
        )


@dataclass
class SFTRun:
    """What ``run_sft`` did: the trainer, and the train and evaluation metrics it reported and saved."""

    trainer: object
    train_metrics: dict
    eval_metrics: dict


def run_sft(data_args: DatasetArguments, training_args: SFTConfig, model_args: ModelConfig, dreg_config: DREGConfig) -> SFTRun:
    """Train with ``with_dreg(SFTTrainer)``, evaluate, save model, metrics and card (and push)."""
    if not model_args.model_name_or_path:
        raise ValueError("Pass --model_name_or_path (a hub model id or a local checkpoint folder).")
    name = model_args.model_name_or_path
    if regularizer_uses_sites(dreg_config):  # from the config: before any weight, data or output folder
        check_activations_before_loading(
            name, dreg_config.dreg_activations, (tf.AutoModelForCausalLM,),
            revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
        )
    seed = training_args.seed if training_args.data_seed is None else training_args.data_seed
    train, evaluation, record = load_splits(data_args, seed)
    fmt = data_format(train, "training", training_args.dataset_text_field)
    if evaluation is not None and data_format(evaluation, "evaluation", training_args.dataset_text_field) != fmt:
        raise ValueError(f"The training data is {fmt} data but the evaluation data is not: give both in the same format.")
    record = {"format": fmt, **record}

    tokenizer = tf.AutoTokenizer.from_pretrained(
        name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    _check_chat_template(train, tokenizer, training_args, name)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    peft_config = get_peft_config(model_args)
    tf.set_seed(training_args.seed)  # the LoRA initialisation

    trainer = with_dreg(SFTTrainer)(
        model=name,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=get_quantization_config(model_args),
        dreg_config=dreg_config,
    )
    if peft_config is not None:
        record["lora"] = f"r={model_args.lora_r}, alpha={model_args.lora_alpha}, targets={model_args.lora_target_modules}"
    trainer.run_info = {"model": name, "data": record, "task": "text-generation", "dataset": dataset_card_info(data_args, record)}

    card_kwargs = {"dataset_name": data_args.dataset_name} if data_args.dataset_name else {}
    train_metrics, eval_metrics = train_evaluate_save(
        trainer, training_args, len(train), len(evaluation) if evaluation is not None else None, card_kwargs=card_kwargs
    )
    return SFTRun(trainer, train_metrics, eval_metrics)


def main(argv: list[str] | None = None) -> SFTRun:
    return run_sft(*parse_sft_args(argv))
