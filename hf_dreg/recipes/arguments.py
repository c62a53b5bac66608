"""Parsing the scripts' arguments: flags, or a single YAML/JSON config file, through HfArgumentParser."""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from ..training_args import DREGTrainingArguments
from .classification import DataArguments
from .models import ModelArguments


def parse_finetuning_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, DREGTrainingArguments) from flags, or from one .yaml/.yml/.json file."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, DREGTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)
