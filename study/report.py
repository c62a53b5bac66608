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


# ---- the statistics a reviewer asks for (issue 24): intervals, power, Holm, data-set level, failed runs ----

# Classes of each data set, for records that hold neither class counts nor a balanced-sampling size.
NUM_CLASSES = {"sst2": 2, "ag_news": 4, "trec6": 6, "sms_spam": 2, "mnist": 10, "fashion_mnist": 10, "cifar10": 10,
               "mnist_noisy_labels": 10}
COMPARATORS = ("none", "weight_decay")


def majority_share(record: dict) -> float | None:
    """The share of the majority class in a run's training split, from its record.

    In order: class counts in the record's ``data`` (``class_counts`` / ``train_class_counts``, a dict or a list);
    else balanced sampling (``samples_per_class`` of ``train_examples``: the largest class holds
    ``samples_per_class``); else 1 / the data set's number of classes (``NUM_CLASSES``). None when none is known.
    With label noise the flipped labels move the counts a little; the share is that of the sampled labels.
    """
    data = record.get("data", {}) or {}
    config = record.get("config", {}) or {}
    for key in ("train_class_counts", "class_counts"):
        counts = data.get(key)
        if counts:
            values = list(counts.values()) if isinstance(counts, dict) else list(counts)
            if sum(values) > 0:
                return max(values) / sum(values)
    per_class = data.get("samples_per_class", config.get("samples_per_class"))
    examples = data.get("train_examples")
    if per_class and examples:
        return min(1.0, float(per_class) / float(examples))
    dataset = record.get("axes", {}).get("dataset")
    classes = data.get("num_classes") or config.get("num_labels") or NUM_CLASSES.get(str(dataset))
    return 1.0 / classes if classes else None


def majority_shares(path: str | Path) -> dict[str, float]:
    """cell -> the majority-class share of its training split (``majority_share``), for every run that has one."""
    shares = {}
    for record in read_results(path):
        share = majority_share(record)
        if "cell" in record and share is not None:
            shares[record["cell"]] = share
    return shares


def failed_to_train(frame: pd.DataFrame, shares: dict[str, float], margin: float = 0.0) -> pd.Series:
    """True for a run whose training accuracy is at or below its training split's majority-class share (plus
    ``margin``): it did not learn even the training set, a training failure rather than a regularizer's trade-off."""
    if "train_accuracy" not in frame or "cell" not in frame:
        return pd.Series(False, index=frame.index)
    share = frame["cell"].map(shares).astype(float)
    train = frame["train_accuracy"].astype(float)
    return (train <= share + margin + 1e-9).fillna(False).astype(bool)


def failure_table(frame: pd.DataFrame, failed: pd.Series) -> pd.DataFrame:
    """(regularizer, data set) with at least one failed run: failed runs, runs, their training and evaluation
    accuracy (%, mean)."""
    if not failed.any():
        return pd.DataFrame()
    if "dataset" not in frame:  # a grid without a data-set axis: one data set
        frame = frame.assign(dataset="(the data set)")
    rows = []
    for (reg, dataset), part in frame.groupby(["regularizer", "dataset"]):
        bad = part[failed.loc[part.index]]
        if bad.empty:
            continue
        others = [a for a in pair_axes(frame) if a not in ("regularizer", "dataset") and frame[a].nunique() > 1]
        where = ", ".join(" ".join(f"{a}={r[a]}" for a in others) for _, r in bad.iterrows()) if others else ""
        rows.append({"regularizer": reg, "dataset": dataset, "failed runs": len(bad), "runs": len(part),
                     "training accuracy (%)": round(100 * bad["train_accuracy"].mean(), 1),
                     "evaluation accuracy (%)": round(100 * bad["accuracy"].mean(), 1), "failed cells": where})
    return pd.DataFrame(rows).set_index(["regularizer", "dataset"])


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p values (nan stays nan and does not count in the family)."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    running = 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided one-sample (paired) t test at ``alpha`` detects with
    ``power``, for differences of standard deviation ``sd`` over ``n`` pairs: exact, by the noncentral t."""
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    if n < 2 or not np.isfinite(sd) or sd <= 0:
        return float("nan")
    df = n - 1
    crit = t.ppf(1 - alpha / 2, df)

    def shortfall(effect):
        nc = effect * np.sqrt(n) / sd
        reached = nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc)
        return (1.0 if np.isnan(reached) else reached) - power  # nan: nc so large that the power is 1

    high = (crit + t.ppf(power, df)) * sd / np.sqrt(n)  # the t approximation, then widened until it brackets
    while shortfall(high) < 0:
        high *= 2
    return float(brentq(shortfall, 1e-9 * sd, high, xtol=1e-12 * sd))


def _one_sample(diff: np.ndarray) -> dict:
    """Mean, 95 % t interval, t p and Wilcoxon p (scipy default) of differences, and the MDE at 80 % power."""
    from scipy.stats import t, ttest_1samp, wilcoxon

    diff = np.asarray(diff, dtype=float)
    n = len(diff)
    mean = float(diff.mean()) if n else float("nan")
    sd = float(diff.std(ddof=1)) if n > 1 else float("nan")
    if n > 1 and sd > 1e-9 * max(1.0, abs(mean)):
        half = t.ppf(0.975, n - 1) * sd / np.sqrt(n)
        t_p = float(ttest_1samp(diff, 0.0).pvalue)
    else:  # no spread: the interval is the point, and it excludes 0 unless the mean is 0
        half = 0.0 if n > 1 else float("nan")
        t_p = (0.0 if abs(mean) > 1e-9 else float("nan")) if n > 1 else float("nan")
    w_p = float(wilcoxon(diff).pvalue) if n > 0 and (np.abs(diff) > 1e-9).any() else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "t_p": t_p, "wilcoxon_p": w_p,
            "mde": min_detectable_effect(sd, n)}


def paired_statistics(frame: pd.DataFrame, comparators=COMPARATORS, value: str = "accuracy",
                      exclude_cells=()) -> pd.DataFrame:
    """Every DREG level (regularizers named ``dreg...``) against each comparator, paired by cell (every other axis
    equal: seed, data set, activation), in points (value x 100).

    Cell level: pairs, mean difference (DREG minus the comparator), its 95 % t interval, the paired t p, the Wilcoxon
    signed-rank p (scipy default, zeros dropped), Holm's adjustment of the Wilcoxon p across the DREG levels (one
    family per comparator), the SD of the differences and the minimum detectable effect (MDE, two-sided paired t,
    alpha 0.05, 80 % power, noncentral t). Data-set level: the mean difference of each data set over its cells,
    then the same one-sample tests across data sets (Holm on their t p). Runs in ``exclude_cells`` (failed to train)
    drop the pairs that hold them; ``dropped`` counts those pairs.
    """
    levels = sorted(str(v) for v in frame["regularizer"].dropna().unique() if str(v).startswith("dreg"))
    present = [c for c in comparators if c in set(frame["regularizer"].astype(str))]
    if not levels or not present:
        return pd.DataFrame()
    kept = frame.copy()
    kept.loc[kept["cell"].isin(set(exclude_cells)), value] = np.nan
    wide_all = paired(frame, value, complete=False)
    wide = paired(kept, value, complete=False)
    rows = []
    for other in present:
        for level in levels:
            every = (wide_all[level] - wide_all[other]).dropna() if level in wide_all else pd.Series(dtype=float)
            diff = 100 * (wide[level] - wide[other]).dropna() if level in wide else pd.Series(dtype=float)
            if diff.empty:
                continue
            diff = diff.round(10)  # points of a 500-item test set: equal differences tie exactly
            cells = _one_sample(diff.to_numpy())
            by_dataset = (diff.groupby(level="dataset").mean() if "dataset" in diff.index.names else diff).round(10)
            sets = _one_sample(by_dataset.to_numpy())
            rows.append({"level": level, "against": other, "pairs": cells["n"], "dropped": len(every) - cells["n"],
                         "mean": cells["mean"], "low": cells["low"], "high": cells["high"], "sd": cells["sd"],
                         "t p": cells["t_p"], "wilcoxon p": cells["wilcoxon_p"], "mde": cells["mde"],
                         "data sets": sets["n"], "set mean": sets["mean"], "set low": sets["low"],
                         "set high": sets["high"], "set t p": sets["t_p"], "set wilcoxon p": sets["wilcoxon_p"],
                         "set mde": sets["mde"]})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["holm p"] = np.nan
    table["set holm p"] = np.nan
    for other, part in table.groupby("against"):
        table.loc[part.index, "holm p"] = holm(part["wilcoxon p"])
        table.loc[part.index, "set holm p"] = holm(part["set t p"])
    table["verdict"] = [verdict(row) for _, row in table.iterrows()]
    return table.set_index(["level", "against"])


def verdict(row) -> str:
    """What a row of ``paired_statistics`` showed, worded by the cell-level 95 % interval: a gain or a loss when it
    excludes 0, else the largest gain it leaves open; qualified when the Holm or the data-set-level test disagrees."""
    mean, low, high = row["mean"], row["low"], row["high"]
    if not np.isfinite(mean) or not np.isfinite(low):
        return "too few pairs for a test"
    interval = f"95% CI {low:+.2f}..{high:+.2f}"
    if low > 0 or high < 0:
        text = f"{'gain' if mean > 0 else 'loss'} of {abs(mean):.2f} points ({interval})"
        doubts = []
        if not row["holm p"] < 0.05:
            doubts.append(f"Holm p {row['holm p']:.2g}")
        if not row["set t p"] < 0.05:
            doubts.append(f"data-set level p {row['set t p']:.2g}, {int(row['data sets'])} sets")
        return text + (f"; not robust ({', '.join(doubts)})" if doubts else "")
    sets = f"; data-set level up to {row['set high']:+.2f}" if np.isfinite(row.get("set high", np.nan)) else ""
    return f"no gain larger than {high:.2f} points shown ({interval}{sets}; MDE {row['mde']:.2f})"


def _p(p: float) -> str:
    return f"{p:.3g}" if np.isfinite(p) else "nan"


def _statistics_tables(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cell-level and the data-set-level Markdown tables of ``paired_statistics``, as formatted text."""
    ci = lambda lo, hi: f"{lo:+.2f}..{hi:+.2f}"  # noqa: E731
    cells = pd.DataFrame({
        "DREG level": table.index.get_level_values("level"),
        "against": table.index.get_level_values("against"),
        "pairs": table["pairs"].astype(int).astype(str),
        "mean diff (pts)": table["mean"].map(lambda v: f"{v:+.2f}"),
        "95% CI (t)": [ci(lo, hi) for lo, hi in zip(table["low"], table["high"])],
        "SD (pts)": table["sd"].map(lambda v: f"{v:.2f}"),
        "t p": table["t p"].map(_p),
        "Wilcoxon p": table["wilcoxon p"].map(_p),
        "Holm p (Wilcoxon)": table["holm p"].map(_p),
        "MDE 80% (pts)": table["mde"].map(lambda v: f"{v:.2f}"),
        "verdict": table["verdict"],
    }, index=table.index)
    sets = pd.DataFrame({
        "DREG level": table.index.get_level_values("level"),
        "against": table.index.get_level_values("against"),
        "data sets": table["data sets"].astype(int).astype(str),
        "mean diff (pts)": table["set mean"].map(lambda v: f"{v:+.2f}"),
        "95% CI (t)": [ci(lo, hi) for lo, hi in zip(table["set low"], table["set high"])],
        "t p": table["set t p"].map(_p),
        "Wilcoxon p": table["set wilcoxon p"].map(_p),
        "Holm p (t)": table["set holm p"].map(_p),
        "MDE 80% (pts)": table["set mde"].map(lambda v: f"{v:.2f}"),
    }, index=table.index)
    cells, sets = cells.reset_index(drop=True), sets.reset_index(drop=True)
    return cells, sets


def statistics_sections(frame: pd.DataFrame, results: str | Path | None = None, shares: dict | None = None) -> list[str]:
    """The report's section of issue 24: runs that failed to train, then every DREG level against none and weight
    decay with intervals, Holm, the data-set-level test and the MDE, read without the failed runs."""
    if not {"cell", "regularizer", "dataset", "train_accuracy", "accuracy"} <= set(frame.columns):
        return []  # a sweep without data sets (or without training accuracy): nothing of this section applies
    if shares is None:
        shares = majority_shares(results) if results is not None else {}
    failed = failed_to_train(frame, shares)
    table = paired_statistics(frame, exclude_cells=set(frame.loc[failed, "cell"]))
    if table.empty and not failed.any():
        return []
    lines = ["## What the design shows: intervals, power, Holm, data-set level (issue 24)", ""]
    pairing = ", ".join(a for a in pair_axes(frame) if a != "regularizer")
    lines += [
        "Method: a run failed to train when its training accuracy is at or below the majority-class share of its "
        "training split (balanced sampling: 1 / classes); pairs holding such a run are left out of the "
        "regularizer-effect reading below. Differences are DREG minus the comparator in accuracy points, paired by "
        f"cell ({pairing}); 95 % intervals from the t distribution; Wilcoxon signed-rank p as scipy "
        "computes it (two-sided, zero differences dropped); Holm's adjustment across the DREG levels, one family per "
        "comparator; MDE: the smallest true difference a two-sided paired t test at alpha 0.05 detects with 80 % "
        "power, from the observed SD of the differences and the number of pairs (noncentral t, exact). Cells of one "
        "data set share their test items (within a seed), so the data-set-level test (each data set's mean difference over its "
        "cells, then tested across data sets) is the one free of pseudo-replication. Differences are rounded to "
        "1e-10 points before ranking, so equal differences (whole test items) tie in the Wilcoxon ranks; "
        "the older tables below rank float noise, hence p values there that differ a little from these.",
        "",
    ]
    fails = failure_table(frame, failed)
    lines += [f"### Runs that failed to train: {int(failed.sum())} of {len(frame)}", ""]
    share = frame["cell"].map(shares).astype(float)
    near = frame[~failed & (frame["accuracy"].astype(float) <= share + 1e-9)]
    if fails.empty:
        lines += ["None.", ""]
    else:
        lines += [_md(fails.reset_index(), index=False), ""]
        handicapped = []
        for reg, part in fails.groupby(level="regularizer"):
            where = ", ".join(f"{ds} ({int(r['failed runs'])} of {int(r['runs'])} runs)" for (_, ds), r in part.iterrows())
            handicapped.append(f"`{reg}` on {where}")
        lines += [
            "Where a comparator collapsed it was handicapped there, not out-regularized: "
            + "; ".join(handicapped) + ". The other sections of this report keep every run, so their comparisons "
            "with these levels on these data sets are against a comparator that did not train.",
            "",
        ]
    if not near.empty:
        counts = near.groupby(["regularizer", "dataset"]).size()
        listed = "; ".join(f"`{reg}` on {dataset}: {n}" for (reg, dataset), n in counts.items())
        lines += [
            f"Not flagged by that rule (training accuracy above the share) but scoring at or below it on evaluation, "
            f"i.e. no better than guessing uniformly among the classes of a balanced split: {len(near)} runs "
            f"({listed}). They stay in the tests below.",
            "",
        ]
    if table.empty:
        return lines
    cells, sets = _statistics_tables(table)
    dropped = int(table["dropped"].sum())
    lines += [
        "### Every DREG level against none and weight decay: the regularizer effect (failed runs left out)",
        "",
        f"Pairs dropped for a failed run: {dropped}." if dropped else
        "No DREG, none or weight-decay run failed to train: no pair is dropped.",
        "",
        _md(cells, disable_numparse=True, index=False),
        "",
        "At the data-set level (each data set's mean difference over its cells, then across data sets):",
        "",
        _md(sets, disable_numparse=True, index=False),
        "",
    ]
    if dropped:
        every = paired_statistics(frame)
        lines += ["### The same with every run, failed ones included", "", _md(_statistics_tables(every)[0], disable_numparse=True, index=False), ""]
    else:
        lines += ["With every run, failed ones included, the numbers are the same (no pair held a failed run).", ""]
    return lines


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


def write_report(results: str | Path, folder: str | Path, title: str = "Sweep report", seeds: list[str] | None = None) -> Path:
    """Write REPORT.md and its PNG plots into ``folder``; returns the report's path. ``seeds``: only those seeds' runs
    (a sweep's complete seeds, while a later one is still running)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = load_frame(results)
    if seeds:
        if "seed" not in frame:
            raise ValueError(f"--seeds: {results} has no seed axis.")
        frame = frame[frame["seed"].astype(str).isin([str(s) for s in seeds])].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"{results} holds no finished run yet" + (f" of seeds {seeds}." if seeds else "."))
    source = f"`{results}`" + (f", seeds {', '.join(str(s) for s in seeds)} only" if seeds else "")
    sections = [f"# {title}", "", f"Runs: {len(frame)} finished (from {source}).", ""]
    sections += ["## Accuracy by regularizer", "", _md(summary_table(frame, ["regularizer"])), ""]
    if frame["train_accuracy"].notna().any():
        fit = pd.DataFrame({
            "training accuracy (%)": summary_table(frame, ["regularizer"], "train_accuracy")["mean ± std (%)"],
            "gap: training - evaluation (points)": summary_table(frame, ["regularizer"], "gap")["mean ± std (%)"],
        })
        sections += ["## Fit: training accuracy and the generalisation gap", "", _md(fit), ""]
    sections += statistics_sections(frame, results)  # issue 24: intervals, power, Holm, data-set level, failed runs
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
    parser.add_argument("--seeds", nargs="*", default=None, help="Only these seeds' runs (e.g. the complete ones).")
    args = parser.parse_args()
    folder = args.output or str(Path(args.results).parent)
    print(write_report(args.results, folder, title=args.title, seeds=args.seeds))


if __name__ == "__main__":
    main()
