"""The scripts' one argument parser: flags, a single YAML/JSON config file, or a dict, through HfArgumentParser."""

from __future__ import annotations

import dataclasses
import difflib
import sys

import yaml
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
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        check_config_keys(argv[0], dataclass_types)
        return parser.parse_yaml_file(argv[0]) if argv[0].endswith((".yaml", ".yml")) else parser.parse_json_file(argv[0])
    check_flags(parser, argv)
    return parser.parse_args_into_dataclasses(args=argv)


def _suggest(unknown: list[str], known: list[str], prefix: str = "") -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"{prefix}{name}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
    return ", ".join(parts)


def check_config_keys(path: str, dataclass_types: tuple) -> None:
    """A config file's keys that no dataclass has are an error naming each, with the closest valid key."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}  # JSON is YAML
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds one mapping of setting -> value, got {type(values).__name__}.")
    known = sorted({f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init})
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {_suggest(unknown, known)}. Fix the name, or remove the line.")


def check_flags(parser, argv: list[str]) -> None:
    """Command-line flags the parser does not know are an error naming each, with the closest valid flag."""
    known = sorted(option for option in parser._option_string_actions if option.startswith("--"))
    unknown = [token.split("=", 1)[0] for token in argv if token.startswith("--") and token.split("=", 1)[0] not in known]
    if unknown:
        names = [flag[2:] for flag in unknown]
        raise SystemExit(f"error: unknown flag(s) {_suggest(names, [k[2:] for k in known], prefix='--')}. See --help for every flag.")


def parse_finetuning_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, DREGTrainingArguments) from flags, or from one .yaml/.yml/.json file."""
    return parse_arguments(CLASSIFICATION_ARGUMENTS, argv)


def classification_arguments(flags: dict, extra: tuple = ()) -> tuple:
    """(ModelArguments, DataArguments, DREGTrainingArguments, *extra) from a dict of flags (a sweep's cell)."""
    return HfArgumentParser((*CLASSIFICATION_ARGUMENTS, *extra)).parse_dict(flags)
