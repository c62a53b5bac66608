"""The report of a sweep: tables, paired Wilcoxon tests of DREG against each regularizer, ranks, plots, REPORT.md."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from hf_dreg.recipes.results_store import read_results


def load_frame(path: str | Path) -> pd.DataFrame:
    """One row per finished run: its axes, accuracy (clean and noisy), macro-F1 and wall time."""
    rows = []
    for record in read_results(path):
        if "axes" not in record:
            continue
        metrics = record.get("metrics", {})
        row = dict(record.get("axes", {}))
        row["regularizer"] = row.get("regularizer", record.get("regularizer", {}).get("name"))
        row["accuracy"] = metrics.get("eval_accuracy")
        row["macro_f1"] = metrics.get("eval_macro_f1")
        row["noisy_accuracy"] = metrics.get("eval_noisy_accuracy")
        row["train_accuracy"] = metrics.get("eval_train_accuracy")  # on the training examples, their labels
        row["gap"] = None if row["train_accuracy"] is None or row["accuracy"] is None else row["train_accuracy"] - row["accuracy"]
        row["modality"] = _modality(record)
        row["wall_time_s"] = record.get("wall_time_s")
        row["per_site_dreg"] = record.get("per_site_dreg", {})
        row["grad_ratios"] = record.get("grad_ratios") or []
        row["reg_lambdas"] = record.get("reg_lambdas") or []  # 'auto' calibrations: (step, lambda)
        row["reg_lambda"] = record.get("regularizer", {}).get("reg_lambda")
        row["cell"] = record["cell"]
        rows.append(row)
    return pd.DataFrame(rows)


def _modality(record: dict) -> str:
    """text or image: recorded by run_classification; older records are told apart by their model type."""
    recorded = record.get("data", {}).get("modality")
    if recorded:
        return recorded
    return "image" if record.get("config", {}).get("model_type") in ("vit", "deit") else "text"


def _fmt(mean, std) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if np.isfinite(std) else f"{100 * mean:.1f}"


def summary_table(frame: pd.DataFrame, by: list[str], value: str = "accuracy") -> pd.DataFrame:
    """Mean ± std (%, over the runs in each group) and the number of runs."""
    grouped = frame.dropna(subset=[value]).groupby(by)[value]
    table = pd.DataFrame({"mean ± std (%)": [_fmt(m, s) for m, s in zip(grouped.mean(), grouped.std())], "runs": grouped.size().values})
    table.index = grouped.mean().index
    return table


_NOT_AXES = (
    "accuracy", "macro_f1", "noisy_accuracy", "train_accuracy", "gap", "wall_time_s", "per_site_dreg", "cell", "modality",
    "grad_ratios", "reg_lambda", "reg_lambdas",
)


def pair_axes(frame: pd.DataFrame) -> list[str]:
    """Every axis of the grid (the columns that are not results)."""
    return [c for c in frame.columns if c not in _NOT_AXES]


def paired(frame: pd.DataFrame, value: str = "accuracy", axis: str = "regularizer", complete: bool = True) -> pd.DataFrame:
    """Cells (rows) x levels of ``axis`` (columns) of ``value``: only cells where every level finished, or with
    ``complete=False`` every cell (missing runs NaN), for comparisons that pair two levels at a time."""
    others = [c for c in pair_axes(frame) if c != axis]
    wide = frame.pivot_table(index=others, columns=axis, values=value, aggfunc="first")
    return wide.dropna() if complete else wide


def _signed_rank_p(diff: pd.Series) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences; nan when every pair ties (no test possible)."""
    from scipy.stats import wilcoxon

    return float(wilcoxon(diff).pvalue) if (diff != 0).any() else float("nan")


def wilcoxon_against(frame: pd.DataFrame, reference: str = "dreg", value: str = "accuracy", axis: str = "regularizer") -> pd.DataFrame:
    """Wilcoxon signed-rank test of ``reference`` against each other level of ``axis``, paired by cell.

    Positive differences mean ``reference`` scored higher. Each pair of levels is tested on the cells where
    both finished, so a level run on fewer seeds (a partial sweep) does not shrink the other comparisons.
    """
    wide = paired(frame, value, axis, complete=False)
    rows = []
    if reference not in wide:
        return pd.DataFrame(rows)
    for other in wide.columns:
        if other == reference:
            continue
        diff = (wide[reference] - wide[other]).dropna()
        if diff.empty:
            continue
        rows.append(
            {
                "against": other,
                "pairs": len(diff),
                "mean diff (pts)": round(100 * diff.mean(), 2),
                "wins": int((diff > 0).sum()),
                "ties": int((diff == 0).sum()),
                "losses": int((diff < 0).sum()),
                "win rate": round(float((diff > 0).mean()), 3),
                "p (two-sided)": _signed_rank_p(diff),
            }
        )
    return pd.DataFrame(rows).set_index("against") if rows else pd.DataFrame(rows)


def dreg_levels(frame: pd.DataFrame) -> list[str]:
    """The regularizer levels that are DREG at another strength than the level ``dreg`` (named ``dreg_...``)."""
    return sorted(str(v) for v in frame["regularizer"].dropna().unique() if str(v).startswith("dreg_"))


def wilcoxon_by(frame: pd.DataFrame, by: str, reference: str = "dreg", value: str = "accuracy") -> pd.DataFrame:
    """``wilcoxon_against`` within each level of ``by``: rows are levels, cells 'mean diff (p)' per regularizer."""
    rows = {}
    for level, part in frame.groupby(by):
        tests = wilcoxon_against(part, reference, value)
        if tests.empty:
            continue
        rows[level] = {
            other: f"{t['mean diff (pts)']:+.2f} (p={t['p (two-sided)']:.3g}, n={int(t['pairs'])})" for other, t in tests.iterrows()
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def advantage_growth(
    frame: pd.DataFrame, reference: str = "dreg", value: str = "accuracy", size: str = "samples_per_class"
) -> pd.DataFrame:
    """Does ``reference``'s advantage over each regularizer grow as the training set shrinks?

    For every pair of cells that differ only in ``size``, the advantage (reference minus the other)
    at the smallest size minus the advantage at the largest, tested by Wilcoxon signed-rank against 0.
    Positive growth means the advantage is larger with less data.
    """
    wide = paired(frame, value, complete=False)  # each comparison on the cells where both levels finished
    if reference not in wide or size not in wide.index.names:
        return pd.DataFrame()
    levels = sorted(wide.index.get_level_values(size).unique(), key=float)
    if len(levels) < 2:
        return pd.DataFrame()
    small, large = levels[0], levels[-1]
    rows = []
    for other in wide.columns:
        if other == reference:
            continue
        by_size = (wide[reference] - wide[other]).unstack(size)[[small, large]].dropna()
        growth = by_size[small] - by_size[large]
        if growth.empty:
            continue
        rows.append(
            {
                "against": other,
                "pairs": len(growth),
                f"advantage at {small} (pts)": round(100 * by_size[small].mean(), 2),
                f"advantage at {large} (pts)": round(100 * by_size[large].mean(), 2),
                "growth (pts)": round(100 * growth.mean(), 2),
                "p (two-sided)": _signed_rank_p(growth),
            }
        )
    return pd.DataFrame(rows).set_index("against") if rows else pd.DataFrame()


def ranks_by(frame: pd.DataFrame, by: str, value: str = "accuracy") -> pd.DataFrame:
    """Mean rank (1 = best) of each regularizer within each level of ``by``."""
    rows = {level: mean_ranks(part, value) for level, part in frame.groupby(by)}
    return pd.DataFrame.from_dict(rows, orient="index").round(2)


def mean_ranks(frame: pd.DataFrame, value: str = "accuracy", axis: str = "regularizer") -> pd.Series:
    """Mean rank of each level of ``axis`` over paired cells (1 = best; ties share the average rank)."""
    wide = paired(frame, value, axis)
    return wide.rank(axis=1, ascending=False).mean().sort_values()


def _layer_of(site: str) -> int | None:
    numbers = re.findall(r"\.(\d+)\.", site)
    return int(numbers[0]) if numbers else None


def per_layer_dreg(frame: pd.DataFrame, axis: str = "regularizer") -> pd.DataFrame:
    """Mean final per-site DREG value by layer index (rows) and level of ``axis`` (columns), over data sets."""
    rows = []
    for _, run in frame.iterrows():
        for site, value in (run["per_site_dreg"] or {}).items():
            rows.append({axis: run[axis], "layer": _layer_of(site), "dreg": value})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).pivot_table(index="layer", columns=axis, values="dreg", aggfunc="mean")


# ---- plots -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=120)
    _pyplot().close(fig)
    return name


def _plot_accuracy_vs_size(frame, folder: Path) -> str | None:
    if "samples_per_class" not in frame or frame["samples_per_class"].nunique() < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted(frame["samples_per_class"].unique(), key=lambda v: float(v))
    for reg, group in frame.groupby("regularizer"):
        means = [group[group["samples_per_class"] == k]["accuracy"].mean() * 100 for k in sizes]
        stds = [group[group["samples_per_class"] == k]["accuracy"].std() * 100 for k in sizes]
        ax.errorbar([float(k) for k in sizes], means, yerr=stds, marker="o", capsize=3, label=reg)
    ax.set_xscale("log")
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs training size (mean ± std over cells)")
    ax.legend(fontsize=8)
    return _save(fig, folder, "accuracy_vs_samples_per_class.png")


def _plot_ranks(ranks: pd.Series, folder: Path) -> str | None:
    if ranks.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh(list(ranks.index)[::-1], list(ranks.values)[::-1], color="tab:blue")
    ax.set_xlabel("mean rank over paired cells (1 = best)")
    ax.set_title(f"Mean ranks by {ranks.index.name or 'regularizer'}")
    return _save(fig, folder, "mean_ranks.png")


def _plot_per_layer(table: pd.DataFrame, folder: Path) -> str | None:
    if table.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for reg in table.columns:
        ax.plot(table.index, table[reg], marker="o", label=reg)
    ax.set_xticks(list(table.index))
    ax.set_xlabel("layer")
    ax.set_ylabel("per-site DREG value at the end of training")
    ax.set_title("Where the DREG pressure goes")
    ax.legend(fontsize=8)
    return _save(fig, folder, "per_layer_dreg.png")


def _plot_accuracy_vs_strength(frame, folder: Path, order: list[str], baseline: str) -> str | None:
    plt = _pyplot()
    datasets = sorted(frame["dataset"].unique()) if "dataset" in frame else [None]
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.2 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = frame if dataset is None else frame[frame["dataset"] == dataset]
        levels = [lv for lv in order if lv in set(part["strength"])]
        means = [100 * part[part["strength"] == lv]["accuracy"].mean() for lv in levels]
        stds = [100 * part[part["strength"] == lv]["accuracy"].std() for lv in levels]
        ax.errorbar(range(len(levels)), means, yerr=stds, marker="o", capsize=3)
        if baseline in levels:
            ax.axhline(means[levels.index(baseline)], color="gray", linestyle="--", label="plain")
        ax.set_xticks(range(len(levels)), levels, rotation=60, fontsize=7)
        ax.set_title(str(dataset), fontsize=9)
        ax.set_ylabel("accuracy (%)")
    fig.suptitle("Accuracy vs DREG strength (mean ± std over seeds; dashed: plain)", fontsize=10)
    return _save(fig, folder, "accuracy_vs_strength.png")


def ratio_points(frame: pd.DataFrame, value: str = "accuracy") -> pd.DataFrame:
    """One row per run with a measured gradient ratio: its level, median ratio and ``value`` minus plain's.

    The level is the regularizer (with its strength when the grid has a strength axis); plain is the run of
    regularizer ``none`` (or strength ``0``) in the same cell, i.e. with every other axis equal. The ratio
    is ||grad lambda*R|| / ||grad task||, the median of the run's measurements; for an 'auto' strength the
    steps where it was calibrated (``reg_lambdas``), which record the target, are left out.
    """
    if "grad_ratios" not in frame or value not in frame:
        return pd.DataFrame()
    level_axes = [a for a in ("regularizer", "strength") if a in frame and frame[a].nunique() > 1]
    if not level_axes:
        return pd.DataFrame()
    others = [c for c in pair_axes(frame) if c not in ("regularizer", "strength")]
    is_plain = pd.Series(False, index=frame.index)
    if "regularizer" in level_axes:
        is_plain |= frame["regularizer"].astype(str) == "none"
    if "strength" in level_axes:
        is_plain |= frame["strength"].astype(str) == "0"
    plain = frame[is_plain].drop_duplicates(subset=others).set_index(others)[value] if others else None
    rows = []
    for _, run in frame[~is_plain].iterrows():
        calibrated = {step for step, _ in run.get("reg_lambdas") or []}  # those steps record the target, not a measurement
        ratios = [r[1] for r in run["grad_ratios"] if r and r[0] not in calibrated and r[1] is not None and r[1] > 0]
        if not ratios or pd.isna(run[value]):
            continue
        key = tuple(run[c] for c in others)
        key = key[0] if len(key) == 1 else key
        if plain is None or key not in plain.index:
            continue
        level = " ".join(str(run[a]) for a in level_axes)
        rows.append({"level": level, "regularizer": run.get("regularizer"), "ratio": float(np.median(ratios)),
                     "difference": 100 * (run[value] - plain.loc[key])})
    return pd.DataFrame(rows)


def ratio_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Where each regularizer sat, from ``ratio_points``: the runs' median gradient ratios (their median and
    10-90 % range) and accuracy minus plain, one row per level.

    Levels that logged no ratio (weight decay: AdamW's decoupled decay is no loss term) have no row.
    """
    if points.empty:
        return pd.DataFrame()
    grouped = points.groupby("level")["ratio"]
    return pd.DataFrame({
        "runs": grouped.size(),
        "median ratio": grouped.median().map(lambda r: f"{r:.2g}"),
        "10-90 % of runs": [f"{lo:.2g} - {hi:.2g}" for lo, hi in zip(grouped.quantile(0.1), grouped.quantile(0.9))],
        "accuracy - plain (pts, mean)": points.groupby("level")["difference"].mean().map(lambda d: f"{d:+.2f}"),
    })


def _ratio_sections(frame: pd.DataFrame) -> list[str]:
    """The ratio table beside the accuracy-against-ratio plot, and which levels the plot cannot show."""
    points = ratio_points(frame)
    table = ratio_summary(points)
    if table.empty:
        return []
    plain = {"none", "0"}
    levels = {str(v) for v in frame["regularizer"].dropna().unique()} - plain
    missing = sorted(levels - set(points["regularizer"].astype(str)))
    lines = [
        "## Where each regularizer sat: gradient ratio ||grad lambda*R|| / ||grad task||",
        "",
        "Per run, the median of its logged ratios (calibration steps of an 'auto' strength left out); then the median "
        "and the 10-90 % range over runs, and the mean accuracy difference to plain in the same cell. The plot "
        "`accuracy_vs_gradient_ratio.png` shows every run.",
        "",
        _md(table, disable_numparse=True),  # as formatted: tabulate would strip '+2.00' to '2'
        "",
    ]
    if missing:
        lines += [
            f"Not in the table or the plot (no gradient ratio logged): {', '.join(f'`{m}`' for m in missing)}. "
            "Weight decay has none: AdamW's decoupled decay is not a term of the loss.",
            "",
        ]
    return lines


def _plot_accuracy_vs_ratio(frame: pd.DataFrame, folder: Path) -> str | None:
    """Accuracy minus plain's (same cell) against the run's median gradient ratio, one colour per regularizer."""
    values = [("accuracy", "clean")] + ([("noisy_accuracy", "noisy inputs")] if frame["noisy_accuracy"].notna().any() else [])
    panels = [(ratio_points(frame, value), label) for value, label in values]
    if all(points.empty for points, _ in panels):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (points, label) in zip(axes[0], panels):
        colour = "regularizer" if points["regularizer"].nunique() > 1 else "level"  # one regularizer: its strengths
        for reg, part in points.groupby(colour):
            ax.scatter(part["ratio"], part["difference"], s=12, alpha=0.6, label=str(reg))
        ax.axhline(0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("gradient ratio ||grad lambda*R|| / ||grad task|| (median over the run)")
        ax.set_ylabel(f"accuracy - plain, same cell (points, {label})")
        ax.legend(fontsize=8)
    fig.suptitle("Accuracy against gradient ratio, every regularizer and strength", fontsize=10)
    return _save(fig, folder, "accuracy_vs_gradient_ratio.png")


def strength_sections(frame: pd.DataFrame, folder: Path, baseline: str = "0") -> list[str]:
    """Accuracy by strength per dataset, the plot, and the paired test of every strength against plain."""
    order = list(dict.fromkeys(frame["strength"]))
    table = summary_table(frame, ["dataset", "strength"])["mean ± std (%)"].unstack("strength")
    table = table[[lv for lv in order if lv in table.columns]]
    tests = wilcoxon_against(frame, reference=baseline, axis="strength")
    lines = ["## Accuracy by DREG strength", "", _md(table), ""]
    lines += ["## Each strength against plain (Wilcoxon signed-rank, paired by dataset and seed)", ""]
    if not tests.empty:
        # the test is symmetric; the table reads from each strength's side: this minus plain
        tests = tests.assign(**{"mean diff (pts)": -tests["mean diff (pts)"], "wins": tests["losses"], "losses": tests["wins"]})
        tests["win rate"] = (tests["wins"] / tests["pairs"]).round(3)
        tests.index.name = "strength"
        lines += ["`mean diff` is this strength minus plain, in points: positive means the strength beat plain training.", ""]
        lines += [_md(tests), ""]
        means = frame[frame["strength"] != baseline].groupby("strength")["accuracy"].mean()
        best = means.idxmax()
        row = tests.loc[best]
        corrected = min(1.0, row["p (two-sided)"] * len(tests)) if np.isfinite(row["p (two-sided)"]) else float("nan")
        lines += [
            f"Best strength on average: `{best}` ({100 * means[best]:.1f}%); against plain the mean difference is "
            f"{row['mean diff (pts)']:+.2f} points (p = {row['p (two-sided)']:.3g}, {int(row['pairs'])} pairs; "
            f"chosen after looking at {len(tests)} strengths, so Bonferroni p = {corrected:.3g}).",
            "",
        ]
    if frame["noisy_accuracy"].notna().any():
        noisy = summary_table(frame, ["dataset", "strength"], "noisy_accuracy")["mean ± std (%)"].unstack("strength")
        lines += ["### On noisy evaluation inputs", "", _md(noisy[[lv for lv in order if lv in noisy.columns]]), ""]
    ratios = ratio_table(frame)
    if not ratios.empty:
        lines += [
            "### Where each strength sits: gradient ratio ||grad lambda*R|| / ||grad task loss||",
            "",
            "Median over seeds of the ratio measured at the first step -> at the last measurement of the run "
            "(auto: the calibrated lambda, median over seeds, in brackets).",
            "",
            _md(ratios[[lv for lv in order if lv in ratios.columns]]),
            "",
        ]
    plot = _plot_accuracy_vs_strength(frame, folder, order, baseline)
    return lines + [f"![{plot}]({plot})", ""]


def ratio_table(frame: pd.DataFrame) -> pd.DataFrame:
    """dataset x strength: median first and last measured gradient ratio (and the lambda that auto chose)."""
    rows = []
    for (dataset, strength), part in frame.groupby(["dataset", "strength"]):
        measured = [r for r in part["grad_ratios"] if r]
        if not measured:
            continue
        first = np.median([r[0][1] for r in measured])
        last = np.median([r[-1][1] for r in measured])
        text = f"{first:.2g} -> {last:.2g}"
        if str(strength).startswith("auto"):
            text += f" [lambda {np.median(part['reg_lambda'].astype(float)):.3g}]"
        rows.append({"dataset": dataset, "strength": strength, "ratio": text})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).set_index(["dataset", "strength"])["ratio"].unstack("strength")


# ---- the report --------------------------------------------------------------------------------


def _md(table: pd.DataFrame, **tabulate) -> str:
    return table.to_markdown(**tabulate) if not table.empty else "_no data_"


def partial_levels(frame: pd.DataFrame, axis: str = "regularizer") -> list[str]:
    """Levels of ``axis`` with at most half the finished runs of the most complete level (a sweep stopped part-way
    through them). A level missing a few runs stays: the ranks then drop those cells instead."""
    counts = frame.groupby(axis).size()
    return sorted(str(level) for level in counts[counts <= counts.max() / 2].index)


def _without_partial_levels(frame: pd.DataFrame, axis: str = "regularizer") -> tuple[pd.DataFrame, list[str]]:
    """The runs to rank (ranks need every level in a cell) and the partial levels left out of them."""
    partial = partial_levels(frame, axis)
    return frame[~frame[axis].astype(str).isin(partial)], partial


def _subset_sections(frame: pd.DataFrame) -> list[str]:
    """DREG against each regularizer and the ranks within each activation, modality and training size.

    The ranks leave out the partial levels (ranks need every level in a cell); the paired tests keep them.
    """
    sections = []
    if "hidden_act" in frame and frame["hidden_act"].nunique() > 1 and frame["modality"].nunique() > 1:
        frame = frame.assign(activation_modality=frame["hidden_act"] + " / " + frame["modality"])
    ranked, _ = _without_partial_levels(frame)
    values = [("accuracy", "clean")] + ([("noisy_accuracy", "noisy inputs")] if frame["noisy_accuracy"].notna().any() else [])
    axes = (
        ("hidden_act", "activation"),
        ("modality", "modality"),
        ("activation_modality", "activation and modality"),
        ("samples_per_class", "training size"),
    )
    for axis, label in axes:
        if axis not in frame or frame[axis].nunique() < 2:
            continue
        sections += [f"## By {label}", ""]
        for value, regime in values:
            tests = wilcoxon_by(frame, axis, value=value)
            if not tests.empty:
                sections += [f"DREG minus each regularizer, {regime} (points, Wilcoxon p, pairs):", "", _md(tests), ""]
            sections += [f"Mean ranks, {regime}:", "", _md(ranks_by(ranked, axis, value)), ""]
    if "samples_per_class" in frame and frame["samples_per_class"].nunique() > 1:
        for reference in ["dreg", *dreg_levels(frame)]:  # the seed's strength, then each acting one (dreg_auto_r0.1, ...)
            name = "DREG" if reference == "dreg" else f"DREG as `{reference}`"
            for value, regime in values:
                growth = advantage_growth(frame, reference=reference, value=value)
                if not growth.empty:
                    sections += [
                        f"Does {name}'s advantage grow as data shrinks? ({regime}; the advantage is {name} minus the "
                        "other, growth is the advantage at the smallest size minus at the largest, paired by data set "
                        "and seed, Wilcoxon signed-rank):",
                        "",
                        _md(growth),
                        "",
                    ]
    return sections


def write_report(results: str | Path, folder: str | Path, title: str = "Sweep report") -> Path:
    """Write REPORT.md and its PNG plots into ``folder``; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = load_frame(results)
    if frame.empty:
        raise ValueError(f"{results} holds no finished run yet.")
    sections = [f"# {title}", "", f"Runs: {len(frame)} finished (from `{results}`).", ""]
    sections += ["## Accuracy by regularizer", "", _md(summary_table(frame, ["regularizer"])), ""]
    if frame["train_accuracy"].notna().any():
        fit = pd.DataFrame({
            "training accuracy (%)": summary_table(frame, ["regularizer"], "train_accuracy")["mean ± std (%)"],
            "gap: training - evaluation (points)": summary_table(frame, ["regularizer"], "gap")["mean ± std (%)"],
        })
        sections += ["## Fit: training accuracy and the generalisation gap", "", _md(fit), ""]
    for axis, label in (("hidden_act", "activation"), ("dataset", "dataset"), ("samples_per_class", "training size (per class)")):
        if axis in frame and frame[axis].nunique() > 1:
            table = summary_table(frame, [axis, "regularizer"])["mean ± std (%)"].unstack("regularizer")
            sections += [f"## Accuracy by {label}", "", _md(table), ""]
    if frame["noisy_accuracy"].notna().any():
        clean = summary_table(frame, ["regularizer"], "accuracy")["mean ± std (%)"]
        noisy = summary_table(frame, ["regularizer"], "noisy_accuracy")["mean ± std (%)"]
        sections += ["## Clean vs noisy evaluation inputs", "", _md(pd.DataFrame({"clean": clean, "noisy inputs": noisy})), ""]
    if "strength" in frame and frame["strength"].nunique() > 1:
        sections += strength_sections(frame, folder)
    if frame["regularizer"].nunique() > 1:
        tests = wilcoxon_against(frame)
        sections += [
            "## DREG against each regularizer (Wilcoxon signed-rank, paired by cell)",
            "",
            "`mean diff` is DREG minus the other regularizer, in points: positive means DREG scored higher.",
            "",
            _md(tests),
            "",
        ]
        if frame["noisy_accuracy"].notna().any():
            sections += ["### On noisy evaluation inputs", "", _md(wilcoxon_against(frame, value="noisy_accuracy")), ""]
        for level in dreg_levels(frame):  # DREG at its other strengths (e.g. dreg_auto_r0.1), each against all
            sections += [f"## DREG as `{level}` against each regularizer (Wilcoxon signed-rank, paired by cell)", ""]
            sections += [_md(wilcoxon_against(frame, reference=level)), ""]
            if frame["noisy_accuracy"].notna().any():
                sections += ["### On noisy evaluation inputs", "", _md(wilcoxon_against(frame, reference=level, value="noisy_accuracy")), ""]
    rank_axis = "strength" if "strength" in frame and frame["regularizer"].nunique() == 1 else "regularizer"
    ranked, partial = _without_partial_levels(frame, rank_axis)
    ranks = mean_ranks(ranked, axis=rank_axis)
    rank_table = ranks.rename("clean").to_frame()
    if frame["noisy_accuracy"].notna().any():
        rank_table["noisy inputs"] = mean_ranks(ranked, "noisy_accuracy", axis=rank_axis)
    sections += ["## Mean ranks (1 = best)", ""]
    if partial:
        sections += [
            f"Over the {len(paired(ranked, axis=rank_axis))} cells where every level finished, leaving out the levels "
            f"with at most half the runs of the others: {', '.join(f'`{p}`' for p in partial)} (their paired tests are "
            "above, on the cells where they ran).",
            "",
        ]
    sections += [_md(rank_table.round(2)), ""]
    if frame["regularizer"].nunique() > 1:
        sections += _subset_sections(frame)
    layers = per_layer_dreg(frame, rank_axis)
    plots = [
        _plot_accuracy_vs_size(frame, folder),
        _plot_ranks(ranks, folder),
        _plot_per_layer(layers, folder),
        _plot_accuracy_vs_ratio(frame, folder),
    ]
    sections += ["## Plots", ""] + [f"![{p}]({p})" for p in plots if p] + [""]
    if frame["regularizer"].nunique() > 1:
        sections += _ratio_sections(frame)
    if not layers.empty:
        sections += ["## Per-layer DREG value at the end of training", "", _md(layers.round(5)), ""]
    path = folder / "REPORT.md"
    path.write_text("\n".join(sections))
    return path


USAGE = """Write the report of a sweep: python -m study.report study/results/low_data/results.jsonl [--output study/results/low_data]"""


def main():
    parser = argparse.ArgumentParser(description=USAGE)
    parser.add_argument("results", help="The sweep's results JSONL.")
    parser.add_argument("--output", default=None, help="Folder for REPORT.md and the plots (default: beside the JSONL).")
    parser.add_argument("--title", default="Sweep report")
    args = parser.parse_args()
    folder = args.output or str(Path(args.results).parent)
    print(write_report(args.results, folder, title=args.title))


if __name__ == "__main__":
    main()
