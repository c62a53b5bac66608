"""The report's statistics of issue 24: intervals, Holm, the MDE, the data-set-level test and failed runs."""

import numpy as np
import pytest

from hf_dreg.recipes.results_store import append_result
from study.report import (
    failed_to_train,
    failure_table,
    holm,
    load_frame,
    majority_share,
    majority_shares,
    min_detectable_effect,
    paired_statistics,
    statistics_sections,
    write_report,
)

DATASETS = {"sst2": 2, "ag_news": 4, "trec6": 6, "mnist": 10}
ACTS = ("relu", "gelu", "tanh", "silu")


def _record(seed, dataset, act, reg, accuracy, train_accuracy=1.0, per_class=50):
    classes = DATASETS.get(dataset, 4)
    return {
        "cell": f"seed={seed}|dataset={dataset}|hidden_act={act}|regularizer={reg}",
        "axes": {"seed": str(seed), "dataset": dataset, "hidden_act": act, "regularizer": reg},
        "data": {"samples_per_class": per_class, "train_examples": per_class * classes, "modality": "text"},
        "metrics": {"eval_accuracy": accuracy, "eval_train_accuracy": train_accuracy},
    }


def _noise(i):
    """A fixed pattern, zero-mean over any 4 consecutive cells: -0.3, -0.1, +0.1, +0.3 points."""
    return 0.002 * ((i % 4) - 1.5)


def _write(path, gains, seeds=2, datasets=tuple(DATASETS), train_accuracy=None):
    """Every (seed, dataset, activation) cell: none at a cell-specific base, each level at base + gain(i) (fractions)."""
    i = 0
    for seed in range(seeds):
        for dataset in datasets:
            for act in ACTS:
                base = 0.5 + 0.01 * (i % 7)
                for reg, gain in gains.items():
                    train = (train_accuracy or {}).get((seed, dataset, act, reg), 1.0)
                    append_result(path, _record(seed, dataset, act, reg, round(base + gain(i), 3), train))
                i += 1
    return path


def test_a_known_shift_is_a_gain_and_a_zero_effect_bounds_the_gain(tmp_path):
    """dreg_auto_r0.1 gains 2 points (+-0.4) in every one of 32 pairs; dreg ties none up to the same noise."""
    path = _write(tmp_path / "r.jsonl", {"none": lambda i: 0.0, "weight_decay": lambda i: 0.0,
                                         "dreg_auto_r0.1": lambda i: 0.02 + _noise(i), "dreg": lambda i: _noise(i + 1)})
    table = paired_statistics(load_frame(path))
    gain = table.loc[("dreg_auto_r0.1", "none")]
    assert gain["pairs"] == 32 and gain["dropped"] == 0
    assert gain["low"] > 0 and gain["low"] < 2 < gain["high"]
    assert gain["mean"] == pytest.approx(2.0)
    assert gain["verdict"].startswith("gain of 2.00 points") and "95% CI" in gain["verdict"] and "not robust" not in gain["verdict"]
    tie = table.loc[("dreg", "weight_decay")]
    assert tie["low"] < 0 < tie["high"]
    assert tie["verdict"].startswith(f"no gain larger than {tie['high']:.2f} points shown")
    assert "MDE" in tie["verdict"]
    # the interval is the t interval of the paired differences
    from scipy import stats

    frame = load_frame(path)
    wide = frame.pivot_table(index=["seed", "dataset", "hidden_act"], columns="regularizer", values="accuracy")
    diff = 100 * (wide["dreg"] - wide["weight_decay"])
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    assert tie["high"] == pytest.approx(diff.mean() + half) and tie["low"] == pytest.approx(diff.mean() - half)
    assert tie["wilcoxon p"] == pytest.approx(stats.wilcoxon(diff.round(10)).pvalue)


def test_a_loss_is_called_a_loss():
    import pandas as pd

    records = [_record(s, d, a, reg, 0.6 + (0 if reg == "none" else -0.01 + _noise(k)), 1.0)
               for k, (s, d, a) in enumerate((s, d, a) for s in range(2) for d in DATASETS for a in ACTS)
               for reg in ("none", "dreg")]
    frame = pd.DataFrame([{**r["axes"], "accuracy": r["metrics"]["eval_accuracy"], "cell": r["cell"]} for r in records])
    row = paired_statistics(frame).loc[("dreg", "none")]
    assert row["high"] < 0 and row["verdict"].startswith("loss of 1.0")


def test_holm_matches_a_hand_computation():
    assert np.allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.allclose(holm([0.2, 0.01]), [0.2, 0.02])
    assert np.allclose(holm([0.5, 0.4]), [0.8, 0.8])  # monotone: the larger p is never adjusted below the smaller
    out = holm([0.01, float("nan"), 0.04])  # nan is no member of the family
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.02, 0.04])
    assert holm([0.9, 0.6, 0.7]).max() == 1.0


def test_the_mde_has_80_percent_power_by_simulation():
    n, sd = 32, 2.0
    mde = min_detectable_effect(sd, n)
    normal = (1.959964 + 0.841621) * sd / np.sqrt(n)  # the normal approximation: a little below the exact t
    assert normal < mde < 1.05 * normal
    rng = np.random.default_rng(0)
    from scipy import stats

    draws = rng.normal(mde, sd, size=(40000, n))
    tstat = draws.mean(1) / (draws.std(1, ddof=1) / np.sqrt(n))
    power = (np.abs(tstat) > stats.t.ppf(0.975, n - 1)).mean()
    assert power == pytest.approx(0.8, abs=0.01)
    assert min_detectable_effect(2 * sd, n) == pytest.approx(2 * mde)  # linear in the SD
    assert min_detectable_effect(sd, 3) > 3 * mde  # few pairs: large MDE, still found
    assert np.isnan(min_detectable_effect(sd, 1)) and np.isnan(min_detectable_effect(0.0, n))


def test_the_data_set_level_test_averages_the_cells_first(tmp_path):
    """sst2: 8 cells at +1 point; ag_news: 2 cells at +3. Cell mean 1.4, data-set mean 2.0 over n = 2."""
    path = tmp_path / "r.jsonl"
    for seed in range(2):
        for act in ACTS:
            for dataset, gain in (("sst2", 0.01), ("ag_news", 0.03)):
                if dataset == "ag_news" and (seed, act) not in ((0, "relu"), (1, "gelu")):
                    continue
                append_result(path, _record(seed, dataset, act, "none", 0.6))
                append_result(path, _record(seed, dataset, act, "dreg", 0.6 + gain))
    row = paired_statistics(load_frame(path)).loc[("dreg", "none")]
    assert row["pairs"] == 10 and row["mean"] == pytest.approx(1.4)
    assert row["data sets"] == 2 and row["set mean"] == pytest.approx(2.0)
    assert row["set high"] - row["set low"] > row["high"] - row["low"]  # 2 data sets say less than 10 cells


def test_the_majority_share_comes_from_the_record():
    assert majority_share(_record(0, "ag_news", "relu", "none", 0.5, per_class=100)) == 0.25
    assert majority_share({"data": {"class_counts": {"a": 30, "b": 10}}}) == 0.75
    assert majority_share({"axes": {"dataset": "trec6"}}) == pytest.approx(1 / 6)
    assert majority_share({"axes": {"dataset": "unknown"}}) is None


def test_a_run_that_failed_to_train_is_flagged_and_left_out(tmp_path):
    """One none run on ag_news trains to 0.25 (4 classes): flagged, its pair dropped from the effect reading."""
    collapsed = {(0, "ag_news", "relu", "none"): 0.25, (0, "ag_news", "gelu", "weight_decay"): 0.26,
                 (1, "trec6", "tanh", "igpen"): 1 / 6}
    path = _write(tmp_path / "r.jsonl", {"none": lambda i: 0.0, "weight_decay": lambda i: 0.0, "igpen": lambda i: -0.05,
                                         "dreg": lambda i: 0.02 + _noise(i)}, train_accuracy=collapsed)
    frame = load_frame(path)
    failed = failed_to_train(frame, majority_shares(path))
    assert sorted(frame.loc[failed, "cell"]) == sorted([
        "seed=0|dataset=ag_news|hidden_act=relu|regularizer=none", "seed=1|dataset=trec6|hidden_act=tanh|regularizer=igpen"])
    fails = failure_table(frame, failed)
    assert fails.loc[("none", "ag_news"), "failed runs"] == 1 and fails.loc[("igpen", "trec6"), "runs"] == 8
    table = paired_statistics(frame, exclude_cells=set(frame.loc[failed, "cell"]))
    assert table.loc[("dreg", "none"), "pairs"] == 31 and table.loc[("dreg", "none"), "dropped"] == 1
    assert table.loc[("dreg", "weight_decay"), "pairs"] == 32  # 0.26 > 0.25: trained, kept
    assert paired_statistics(frame).loc[("dreg", "none"), "pairs"] == 32
    text = "\n".join(statistics_sections(frame, path))
    assert "### Runs that failed to train: 2 of 128" in text
    assert "`igpen` on trec6 (1 of 8 runs)" in text and "handicapped" in text
    assert "Pairs dropped for a failed run: 1." in text and "### The same with every run, failed ones included" in text


def test_the_report_carries_the_section_after_the_fit(tmp_path):
    path = _write(tmp_path / "r.jsonl", {"none": lambda i: 0.0, "weight_decay": lambda i: 0.0,
                                         "dreg_auto_r0.1": lambda i: 0.02 + _noise(i), "dreg": lambda i: _noise(i + 1)})
    text = write_report(path, tmp_path / "report").read_text()
    head = "## What the design shows: intervals, power, Holm, data-set level (issue 24)"
    assert text.index("## Fit: training accuracy") < text.index(head) < text.index("## Accuracy by activation")
    section = text.split(head, 1)[1].split("\n## ", 1)[0]
    assert "### Runs that failed to train: 0 of 128" in section and "None." in section
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| dreg")]
    gain = next(r for r in rows if r[:2] == ["dreg_auto_r0.1", "none"])
    assert gain[2:5] == ["32", "+2.00", "+1.92..+2.08"] and gain[-1] == "gain of 2.00 points (95% CI +1.92..+2.08)"
    by_sets = next(r for r in rows if r[:2] == ["dreg_auto_r0.1", "none"] and r is not gain)
    assert by_sets[2:4] == ["4", "+2.00"]  # the data-set-level table: 4 data sets
    tie = next(r for r in rows if r[:2] == ["dreg", "weight_decay"])
    assert tie[-1].startswith("no gain larger than 0.08 points shown")
    assert "noncentral t" in section and "At the data-set level" in section


def test_the_report_reads_only_the_seeds_asked_for(tmp_path):
    path = _write(tmp_path / "r.jsonl", {"none": lambda i: 0.0, "dreg": lambda i: 0.02 + _noise(i)}, seeds=3)
    text = write_report(path, tmp_path / "two", seeds=["0", "1"]).read_text()
    assert "Runs: 64 finished (from" in text and "seeds 0, 1 only" in text
    assert "Runs: 96 finished" in write_report(path, tmp_path / "all").read_text()
    with pytest.raises(ValueError, match="no finished run yet of seeds"):
        write_report(path, tmp_path / "none", seeds=["7"])


def test_a_gain_that_the_data_set_level_does_not_carry_is_called_not_robust(tmp_path):
    """+1 point on sst2 and +0.2 on ag_news, 8 cells each: the cells exclude 0, the 2 data sets do not."""
    path = tmp_path / "r.jsonl"
    for seed in range(2):
        for k, act in enumerate(ACTS):
            for dataset, gain in (("sst2", 0.01), ("ag_news", 0.002)):
                append_result(path, _record(seed, dataset, act, "none", 0.6))
                append_result(path, _record(seed, dataset, act, "dreg", round(0.6 + gain + 0.002 * (k % 2), 3)))
    row = paired_statistics(load_frame(path)).loc[("dreg", "none")]
    assert row["low"] > 0 and row["set low"] < 0 and row["data sets"] == 2
    assert row["verdict"].startswith("gain of 0.70 points") and "not robust (data-set level p" in row["verdict"]


def test_a_grid_without_data_sets_still_reports(tmp_path):
    """The tiny sweep's grid (no data-set axis) with a collapsed run: the report is written, without the section."""
    path = tmp_path / "r.jsonl"
    for seed in range(3):
        for reg in ("none", "dreg"):
            append_result(path, {"cell": f"seed={seed}|regularizer={reg}", "axes": {"seed": str(seed), "regularizer": reg},
                                 "data": {"samples_per_class": 4, "train_examples": 8},
                                 "metrics": {"eval_accuracy": 0.5, "eval_train_accuracy": 0.5}})
    text = write_report(path, tmp_path / "report").read_text()
    assert "## Accuracy by regularizer" in text and "issue 24" not in text
