"""The DREG section of a model card: regularizer, strength, sites, data regime and results."""

from __future__ import annotations


def dreg_card_section(trainer) -> str:
    args = trainer.dreg_config
    lines = ["", "## Regularization (hf_dreg)", ""]
    lines.append(f"- regularizer: `{args.regularizer}`")
    strength = f"{args.reg_lambda:.6g}" if isinstance(args.reg_lambda, float) else str(args.reg_lambda)
    lines.append(f"- strength (reg_lambda): `{strength}`")
    if getattr(args, "dreg_lambda", None) == "auto" and args.regularizer == "dreg":
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
        lines += [f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in info["results"].items()]
    return "\n".join(lines) + "\n"
