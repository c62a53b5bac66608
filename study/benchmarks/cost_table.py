"""docs/cost.md's cost table, in Markdown, from the JSON that study/benchmarks/overhead.py writes.

    python study/benchmarks/cost_table.py study/results/cost/overhead.json [more.json ...]

Only ratios against plain training are printed (time, CPU time, memory): absolute times depend on the
machine and on what else runs on it. Each shape's line gives its 1-minute load average before and after
its timed rounds, and the notes say what each column measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAMES = {"none": "none (noise floor)", "jacobian": "jacobian (1 projection)"}
COLUMNS = [
    ("time_ratio", "time / plain"),
    ("time_ratio_interval", "90 % interval"),
    ("cpu_ratio", "CPU time / plain"),
    ("saved_ratio", "saved for backward"),
    ("peak_ratio", "peak allocated, step"),
    ("rss_step_ratio", "peak RSS, step"),
]
NOTES = (
    "time: median over the rounds of the regularizer's step / the plain step of the same round (wall clock; "
    "forward + backward + AdamW), with a 90 % bootstrap interval of that median; CPU time: the same with the "
    "process's CPU time; none: a second plain model (the noise floor). saved for backward: unique storages autograd keeps until the final backward "
    "(parameters excluded). peak allocated, step: the highest allocation during a step above the level "
    "before it (CPU: profiler events; CUDA: max_memory_allocated). peak RSS, step: the resident-set high-water "
    "mark of one step above the resident set before it, in a fresh process per shape and regularizer."
)


def _ratio(row: dict, key: str, bold: bool) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    text = f"{value[0]:.2f}-{value[1]:.2f}" if isinstance(value, list) else f"{value:.3f}x"
    return f"**{text}**" if bold else text


def _size(result: dict) -> str:
    return f"{result['batch']} x {result['seq']}, {result['steps']} rounds"


def table(data: dict) -> str:
    """Markdown: one row per shape and regularizer, then one line per shape (load, device), then notes."""
    results = data["results"]
    meta = data.get("meta", {})
    lines = [
        "| shape (batch x seq, rounds) | regularizer | " + " | ".join(title for _, title in COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for result in results:
        first = True
        for name, row in result["regularizers"].items():
            bold = name.partition("@")[0] == "dreg"
            label = f"{result['label']} ({_size(result)})" if first else ""
            shown = NAMES.get(name, name)
            shown = f"**{shown}**" if bold else shown
            cells = [_ratio(row, key, bold) for key, _ in COLUMNS]
            lines.append(f"| {label} | {shown} | ".replace("|  |", "| |") + " | ".join(cells) + " |")
            first = False
    lines.append("")
    device = meta.get("device", "cpu")
    threads = meta.get("threads")
    where = f"{device}, {meta.get('dtype', 'float32')}" + (f", {threads} thread(s)" if device == "cpu" and threads else "")
    if meta.get("torch_compile"):
        where += f", every model's forward through torch.compile (torch_compile=True, backend {meta['torch_compile']})"
    lines.append(f"Measured on {where}; 1-minute load average before -> after each shape's timed rounds:")
    lines.append("")
    for result in results:
        before, after = result.get("load_before"), result.get("load_after")
        load = f"{before[0]:.2f} -> {after[0]:.2f}" if before and after else "not recorded"
        sites = result.get("dreg_sites")
        extra = f", {sites} DREG sites" if sites else ""
        trainable = result.get("trainable_parameters")
        total = result.get("parameters")
        if trainable and total and trainable != total:
            extra += f", {trainable / total:.2%} of the parameters trained"
        lines.append(f"- {result['label']} ({result['batch']} x {result['seq']}): load {load}{extra}")
    lines += ["", NOTES]
    if any(not r.get("fused", True) for r in results):
        lines.append("Note: fused kernels unavailable: the DREG numbers are for eager math.")
    untraceable = sorted({name for r in results for name in r.get("untraceable_regions", [])})
    if untraceable:
        lines.append(f"Note: this torch could not trace {', '.join(untraceable)} as one region: those sites ran a simpler route.")
    if any(r.get("recompiles_timed") for r in results):
        lines.append("Note: torch.compile recompiled during the timed steps.")
    return "\n".join(lines)


def merge(paths) -> dict:
    """The results of several JSON files, in order; the first file's meta."""
    merged = {"meta": {}, "results": []}
    for path in paths:
        data = json.loads(Path(path).read_text())
        merged["meta"] = merged["meta"] or data.get("meta", {})
        merged["results"] += data["results"]
    return merged


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="overhead.py output file(s)")
    args = parser.parse_args(argv)
    text = table(merge(args.json))
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
