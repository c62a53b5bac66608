"""The scripts' one argument parser: flags, a single YAML/JSON config file, or a dict, through HfArgumentParser."""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from ..training_args import DREGTrainingArguments
from .classification import DataArguments
from .models import ModelArguments

CLASSIFICATION_ARGUMENTS = (ModelArguments, DataArguments, DREGTrainingArguments)


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """One instance of each of ``dataclass_types`` from flags, or from one .yaml/.yml/.json file (``argv``, default
    the command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def parse_finetuning_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, DREGTrainingArguments) from flags, or from one .yaml/.yml/.json file."""
    return parse_arguments(CLASSIFICATION_ARGUMENTS, argv)


def classification_arguments(flags: dict, extra: tuple = ()) -> tuple:
    """(ModelArguments, DataArguments, DREGTrainingArguments, *extra) from a dict of flags (a sweep's cell)."""
    return HfArgumentParser((*CLASSIFICATION_ARGUMENTS, *extra)).parse_dict(flags)
