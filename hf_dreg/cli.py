"""``hf-dreg``: command-line tools. ``hf-dreg scan MODEL`` lists a checkpoint's DREG sites."""

from __future__ import annotations

import argparse
import sys

from .sites import find_sites


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


def _scan(args) -> int:
    from transformers import AutoConfig, AutoModel

    from .models import resolve_checkpoint

    path = resolve_checkpoint(args.model)
    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_config(config) if args.from_config else AutoModel.from_pretrained(path)
    activations = args.activations.split(",") if "," in args.activations else args.activations
    print(scan_summary(model, activations=activations, exclude_modules=args.exclude_modules))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-dreg", description="DREG for Hugging Face Transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="List a checkpoint's DREG sites (name, kind, activation, feeding layers).")
    scan.add_argument("model", help="A hub model id, a local checkpoint folder, or 'packaged-minilm'.")
    scan.add_argument("--activations", default="gelu", help="'gelu' (default), 'all', or silu/relu/tanh (comma-separated).")
    scan.add_argument("--exclude_modules", nargs="*", default=None, help="Activation paths (or .suffix) to leave out.")
    scan.add_argument("--from_config", action="store_true", help="Build the model from its config only (no weights).")
    args = parser.parse_args(argv)
    try:
        return _scan(args)
    except (ValueError, OSError) as error:
        print(f"hf-dreg scan: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
