"""``hf-dreg``: command-line tools. ``hf-dreg scan MODEL`` lists a checkpoint's DREG sites.

The checkpoint is loaded with the class it was saved from (``config.architectures``: a causal LM, a
seq2seq LM, a classifier...), so the site paths are those a trainer of that model sees.
"""

from __future__ import annotations

import argparse
import sys

from .modeling.sites import find_sites


def scan_summary(model, activations="gelu", exclude_modules=None) -> str:
    """A table of the model's DREG sites and the totals, like PEFT's trainable-parameter summary."""
    sites = find_sites(model, activations=activations, exclude_modules=exclude_modules)
    modules = dict(model.named_modules())
    rows = [("site", "kind", "activation", "width", "feeding layer(s)")]
    rows += [(s.name, s.kind, s.activation, str(s.width), ", ".join(s.inputs)) for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    feeding = {p for s in sites for p in s.inputs}
    feeding_params = sum(p.numel() for path in feeding for p in modules[path].parameters())
    total_params = sum(p.numel() for p in model.parameters())
    kinds = {}
    for s in sites:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    lines.append("")
    lines.append(
        f"DREG sites: {len(sites)} ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) || "
        f"hidden units: {sum(s.width for s in sites):,} || feeding-layer params: {feeding_params:,} || "
        f"all params: {total_params:,} || feeding%: {100 * feeding_params / total_params:.4f}"
    )
    return "\n".join(lines)


_FALLBACK_AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForImageClassification",
    "AutoModel",
)


def model_class_for(config):
    """The class a checkpoint was saved from (``config.architectures``), else the first Auto class that knows
    the config (causal LM, seq2seq LM, sequence classification, image classification, base model).

    Returns (class, how it was chosen)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls, "config.architectures"
    for auto_name in _FALLBACK_AUTO_CLASSES:
        auto = getattr(transformers, auto_name)
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)], auto_name
    raise ValueError(
        f"No transformers model class for config {type(config).__name__} (model_type={config.model_type!r}): "
        "neither config.architectures nor the Auto classes name one."
    )


def _build_from_config(cls, config):
    """The model without weights: on the meta device (no memory, no init); for real if it cannot be probed there."""
    import torch

    from .modeling.sites import MetaProbeError, find_sites

    with torch.device("meta"):
        model = cls(config)
    try:
        find_sites(model, activations="all")
    except MetaProbeError:
        return cls(config)
    except ValueError:
        pass  # no site, an unsupported activation...: scan_summary says it
    return model


def _other_families(model) -> list[str]:
    """The supported activation families the model's MLP sites use (for the hint when none was chosen)."""
    try:
        return sorted({s.family for s in find_sites(model, activations="all") if s.family})
    except ValueError:
        return []


def _scan(args) -> int:
    from transformers import AutoConfig

    from .modeling.sites import NoSitesError
    from .recipes.models import resolve_checkpoint

    path = resolve_checkpoint(args.model)
    config = AutoConfig.from_pretrained(path)
    cls, chosen_by = model_class_for(config)
    model = _build_from_config(cls, config) if args.from_config else cls.from_pretrained(path)
    activations = args.activations.split(",") if "," in args.activations else args.activations
    try:
        summary = scan_summary(model, activations=activations, exclude_modules=args.exclude_modules)
    except NoSitesError as error:
        chosen = activations if isinstance(activations, list) else [activations]
        families = [f for f in _other_families(model) if f not in chosen]
        if families:
            choice = ",".join(families)
            raise NoSitesError(
                f"{error}\nIts MLP sites use the {' and '.join(families)} family: scan them with --activations {choice}, "
                f"and train with DREG on them with --dreg_activations {choice}."
            ) from error
        raise
    print(f"{cls.__name__} (model class from {chosen_by})")
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-dreg", description="DREG for Hugging Face Transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="List a checkpoint's DREG sites (name, kind, activation, feeding layers).")
    scan.add_argument("model", help="A hub model id, a local checkpoint folder, or 'packaged-minilm'.")
    scan.add_argument("--activations", default="gelu", help="'gelu' (default), 'all', or silu/relu/tanh (comma-separated).")
    scan.add_argument("--exclude_modules", nargs="*", default=None, help="Activation paths (or .suffix) to leave out.")
    scan.add_argument(
        "--from_config", action="store_true", help="Build the model from its config only, on the meta device (no weights, no memory)."
    )
    args = parser.parse_args(argv)
    try:
        return _scan(args)
    except (ValueError, OSError) as error:
        print(f"hf-dreg scan: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
