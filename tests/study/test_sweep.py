"""The sweep runner (resumable, sharded, kill-safe JSONL) and the report."""


import pytest

from hf_dreg.recipes.results_store import append_result, read_results
from study.report import load_frame, wilcoxon_against, write_report
from study.sweep import SweepConfig, expand_grid, run_sweep, select_shard


@pytest.fixture
def tiny_config(shared_data, tmp_path):
    config = SweepConfig.from_yaml("study/configs/sweep_tiny.yaml")
    config.base["data_dir"] = str(shared_data / "sst2")
    config.results = str(tmp_path / "results.jsonl")
    return config


def test_grid_expands_dict_values_by_name():
    config = SweepConfig(
        base={"max_steps": 1},
        grid={"dataset": [{"name": "a", "data_dir": "x", "label_noise": 0.2}, {"name": "b", "data_dir": "y"}], "seed": [0, 1, 2]},
        results="r.jsonl",
    )
    cells = expand_grid(config)
    assert len(cells) == 6 and len({c.id for c in cells}) == 6
    assert cells[0].id == "dataset=a|seed=0" and cells[0].flags == {"max_steps": 1, "data_dir": "x", "label_noise": 0.2, "seed": 0}
    shards = [select_shard(cells, (i, 4)) for i in range(4)]
    assert sorted(c.id for s in shards for c in s) == sorted(c.id for c in cells)
    with pytest.raises(ValueError, match="shard"):
        select_shard(cells, (4, 4))


def test_store_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_result(path, {"cell": "a"})
    with open(path, "a") as f:
        f.write('{"cell": "b", "metr')  # killed mid-write
    append_result(path, {"cell": "c"})
    with pytest.warns(UserWarning, match="incomplete line"):
        assert [r["cell"] for r in read_results(path)] == ["a", "c"]


def test_sweep_runs_resumes_and_reports(tiny_config, tmp_path):
    tiny_config.grid["samples_per_class"] = [4]
    written = run_sweep(tiny_config, limit=3, progress=False)
    assert len(written) == 3
    record = read_results(tiny_config.results)[0]
    assert {"cell", "axes", "config", "metrics", "wall_time_s", "versions", "per_site_dreg"} <= set(record)
    assert record["versions"]["transformers"].startswith("5.")
    assert 0 <= record["metrics"]["eval_accuracy"] <= 1
    # a rerun skips finished cells and runs only the one left
    written = run_sweep(tiny_config, progress=False)
    assert [r["cell"] for r in written] == ["samples_per_class=4|regularizer=dreg|seed=1"]
    assert run_sweep(tiny_config, progress=False) == []
    frame = load_frame(tiny_config.results)
    assert len(frame) == 4 and set(frame["regularizer"]) == {"none", "dreg"}
    tests = wilcoxon_against(frame)
    assert tests.loc["none", "pairs"] == 2
    report = write_report(tiny_config.results, tmp_path / "report")
    text = report.read_text()
    assert "Wilcoxon" in text and "mean_ranks.png" in text
    assert (tmp_path / "report" / "mean_ranks.png").stat().st_size > 1000


def test_report_of_a_strength_sweep_tests_every_strength_against_plain(tmp_path):
    path = tmp_path / "lambda.jsonl"
    for seed in range(5):
        for dataset in ("a", "b"):
            for strength, shift in (("0", 0.0), ("1e-2.5", 0.0), ("1e0", -0.05), ("auto@0.1", 0.02)):
                accuracy = 0.7 + shift + 0.01 * seed + (0.001 * seed if strength == "auto@0.1" else 0)
                append_result(path, {
                    "cell": f"seed={seed}|dataset={dataset}|strength={strength}",
                    "axes": {"seed": str(seed), "dataset": dataset, "strength": strength},
                    "regularizer": {"name": "dreg", "reg_lambda": 0.2 if strength == "auto@0.1" else None},
                    "metrics": {"eval_accuracy": accuracy},
                    "grad_ratios": {"1e0": [[0, 0.5], [20, 1.5]], "auto@0.1": [[0, 0.1], [20, 0.3]]}.get(strength, []),
                })
    text = write_report(path, tmp_path / "report").read_text()
    assert "Accuracy by DREG strength" in text and "accuracy_vs_strength.png" in text
    assert "Best strength on average: `auto@0.1`" in text and "Bonferroni p = " in text
    assert "against plain the mean difference is +2.2" in text  # read from the strength's side: it beat plain
    row_1e0 = next(line for line in text.splitlines() if line.startswith("| 1e0 "))
    assert "-5" in row_1e0 and row_1e0.split("|")[4].strip() == "0"  # 5 points below plain, no wins over plain
    assert "| 0.5 -> 1.5 |" in text and "0.1 -> 0.3 [lambda 0.2]" in text  # where each strength sits
    assert "DREG against each regularizer" not in text  # one regularizer: no such test
    tests = wilcoxon_against(load_frame(path), reference="0", axis="strength")
    assert tests.loc["auto@0.1", "pairs"] == 10 and tests.loc["auto@0.1", "losses"] == 10


def test_report_tests_dreg_within_each_activation_and_modality(tmp_path):
    """DREG helps under gelu only here: the per-activation table must show it, and the modality split both."""
    from study.report import ranks_by, wilcoxon_by

    path = tmp_path / "paper.jsonl"
    for seed in range(6):
        for dataset, model_type in (("sst2", "bert"), ("mnist", "vit")):
            for act in ("gelu", "relu"):
                for reg in ("none", "dreg"):
                    gain = 0.03 + 0.001 * seed if (reg == "dreg" and act == "gelu") else 0.0
                    append_result(path, {
                        "cell": f"seed={seed}|dataset={dataset}|hidden_act={act}|regularizer={reg}",
                        "axes": {"seed": str(seed), "dataset": dataset, "hidden_act": act, "regularizer": reg},
                        "config": {"model_type": model_type},
                        "metrics": {"eval_accuracy": 0.6 + 0.01 * seed + gain, "eval_noisy_accuracy": 0.5 + gain,
                                    "eval_train_accuracy": 0.95 if reg == "none" else 0.9},
                    })
    frame = load_frame(path)
    assert sorted(frame["modality"].unique()) == ["image", "text"]
    by_act = wilcoxon_by(frame, "hidden_act")
    assert by_act.loc["gelu", "none"].startswith("+3.25 (p=") and by_act.loc["gelu", "none"].endswith("n=12)")
    assert by_act.loc["relu", "none"] == "+0.00 (p=nan, n=12)"
    assert ranks_by(frame, "hidden_act").loc["gelu", "dreg"] == 1.0
    text = write_report(path, tmp_path / "report").read_text()
    assert "## By activation" in text and "## By modality" in text and "Mean ranks, noisy inputs:" in text
    assert "## By activation and modality" in text and "| gelu / image |" in text
    fit = text.split("## Fit: training accuracy and the generalisation gap", 1)[1].split("## ", 1)[0]
    none_row = next(line for line in fit.splitlines() if line.startswith("| none"))
    assert "| 95.0 ± 0.0 " in none_row and "| 32.5 ± " in none_row  # gap: 0.95 - mean(0.60..0.65)


def _write_low_data_runs(tmp_path, regularizers, accuracy):
    """A low-data sweep's JSONL: 3 seeds x 3 data sets x 16 and 64 per class, ``accuracy(seed, dataset, size, reg)``."""
    path = tmp_path / "low_data.jsonl"
    for seed in range(3):
        for dataset in ("sst2", "trec6", "ag_news"):
            for size in ("16", "64"):
                for reg in regularizers:
                    append_result(path, {
                        "cell": f"seed={seed}|dataset={dataset}|samples_per_class={size}|regularizer={reg}",
                        "axes": {"seed": str(seed), "dataset": dataset, "samples_per_class": size, "regularizer": reg},
                        "metrics": {"eval_accuracy": accuracy(seed, dataset, size, reg)},
                    })
    return path


def test_report_tests_whether_the_advantage_grows_as_data_shrinks(tmp_path):
    """DREG beats none by 3 points at 16 per class and ties at 64: growth +3, in 9 of 9 pairs."""
    from study.report import advantage_growth

    def accuracy(seed, dataset, size, reg):
        gain = 0.03 + 0.001 * seed if (reg == "dreg" and size == "16") else 0.0
        return 0.5 + 0.1 * (size == "64") + 0.01 * seed + gain

    path = _write_low_data_runs(tmp_path, ("none", "weight_decay", "dreg"), accuracy)
    growth = advantage_growth(load_frame(path))
    assert growth.loc["none", "pairs"] == 9
    assert growth.loc["none", "advantage at 16 (pts)"] == 3.1 and growth.loc["none", "advantage at 64 (pts)"] == 0.0
    assert growth.loc["none", "growth (pts)"] == 3.1 and growth.loc["none", "p (two-sided)"] < 0.01
    text = write_report(path, tmp_path / "report").read_text()
    assert "Does DREG's advantage grow as data shrinks? (clean;" in text


def test_the_growth_is_tested_for_every_dreg_strength(tmp_path):
    """dreg ties none; dreg_auto_r0.1 gains 2 points at 64 per class only (its advantage shrinks with data):
    each DREG level gets its own growth table, and the two tables say different things."""
    from study.report import advantage_growth

    def accuracy(seed, dataset, size, reg):
        gain = 0.02 + 0.001 * seed if (reg == "dreg_auto_r0.1" and size == "64") else 0.0
        return 0.5 + 0.01 * seed + 0.002 * len(dataset) + gain

    path = _write_low_data_runs(tmp_path, ("none", "dreg", "dreg_auto_r0.1"), accuracy)
    frame = load_frame(path)
    acting = advantage_growth(frame, reference="dreg_auto_r0.1")
    assert acting.loc["none", "growth (pts)"] == -2.1 and acting.loc["none", "p (two-sided)"] < 0.01
    assert advantage_growth(frame).loc["none", "growth (pts)"] == 0.0
    text = write_report(path, tmp_path / "report").read_text()
    table = text.split("Does DREG as `dreg_auto_r0.1`'s advantage grow as data shrinks? (clean;", 1)[1].split("\n\n", 2)[1]
    none_row = next(line for line in table.splitlines() if line.startswith("| none"))
    assert "-2.1" in none_row, table


def test_the_backend_is_checked_and_the_ray_flags_go_with_ray(monkeypatch, capsys, tmp_path):
    """--backend ray takes --address/--num_cpus/--num_gpus instead of --workers; the local pool stays the default."""
    import runpy

    config = SweepConfig(base={}, grid={"seed": [0]}, results=str(tmp_path / "r.jsonl"))
    with pytest.raises(ValueError, match="backend must be one of local, ray"):
        run_sweep(config, backend="slurm", progress=False)
    with pytest.raises(ValueError, match="num_cpus > 0"):
        run_sweep(config, backend="ray", num_cpus=0, progress=False)

    path = tmp_path / "sweep.yaml"  # 8 cells on data that is not there: nothing may run here
    path.write_text(f"results: {tmp_path / 'r.jsonl'}\nbase: {{data_dir: {tmp_path / 'none'}}}\ngrid: {{seed: [0, 1, 2, 3, 4, 5, 6, 7]}}\n")

    def script(*flags):
        monkeypatch.setattr("sys.argv", ["sweep.py", str(path), *flags])
        runpy.run_module("study.sweep", run_name="__main__")

    for flags, message in ((["--backend", "ray", "--workers", "2"], "--workers is for the local backend"),
                           (["--num_gpus", "1"], "--address and --num_gpus are for --backend ray")):  # fmt: skip
        with pytest.raises(SystemExit):
            script(*flags)
        assert message in capsys.readouterr().err
    script("--backend", "ray", "--num_cpus", "2", "--shard", "1/4", "--dry_run")  # --shard stays
    assert capsys.readouterr().out.splitlines()[-1] == "2 cells"


def test_accuracy_against_gradient_ratio_pairs_each_run_with_plain_in_its_cell(tmp_path):
    """Made-up runs: dreg's ratio is 0.1 (accuracy +2 points over none in its cell), spectral norm's 0.01 (-1)."""
    from study.report import ratio_points

    path = tmp_path / "ratios.jsonl"
    for seed in range(3):
        for dataset in ("mnist", "sst2"):
            base = 0.5 + 0.1 * seed + (0.2 if dataset == "sst2" else 0.0)
            for reg, gain, ratios in (("none", 0.0, []), ("dreg", 0.02, [[0, 0.3], [20, 0.1], [40, 0.05]]),
                                      ("spectral_norm", -0.01, [[0, 0.01], [20, 0.01], [40, 0.02]])):
                append_result(path, {
                    "cell": f"seed={seed}|dataset={dataset}|regularizer={reg}",
                    "axes": {"seed": str(seed), "dataset": dataset, "regularizer": reg},
                    "metrics": {"eval_accuracy": base + gain},
                    "grad_ratios": ratios,
                })
        append_result(path, {  # an 'auto' strength: calibrated to 0.1 at steps 0 and 20, drifted to 0.04 and 0.02 between
            "cell": f"seed={seed}|dataset=mnist|regularizer=dreg_auto",
            "axes": {"seed": str(seed), "dataset": "mnist", "regularizer": "dreg_auto"},
            "metrics": {"eval_accuracy": 0.5 + 0.1 * seed},
            "grad_ratios": [[0, 0.1], [10, 0.04], [20, 0.1], [30, 0.02]],
            "reg_lambdas": [[0, 3.0], [20, 5.0]],
        })
    points = ratio_points(load_frame(path))
    auto = points[points["regularizer"] == "dreg_auto"]
    assert auto["ratio"].round(6).tolist() == [0.03] * 3 and auto["difference"].round(6).tolist() == [0.0] * 3
    points = points[points["regularizer"] != "dreg_auto"]
    assert len(points) == 12 and set(points["regularizer"]) == {"dreg", "spectral_norm"}
    dreg = points[points["regularizer"] == "dreg"]
    assert dreg["ratio"].tolist() == [0.1] * 6 and dreg["difference"].round(6).tolist() == [2.0] * 6
    spectral = points[points["regularizer"] == "spectral_norm"]
    assert spectral["ratio"].tolist() == [0.01] * 6 and spectral["difference"].round(6).tolist() == [-1.0] * 6
    append_result(path, {  # weight decay logs no ratio: named as missing, not plotted
        "cell": "seed=0|dataset=mnist|regularizer=weight_decay",
        "axes": {"seed": "0", "dataset": "mnist", "regularizer": "weight_decay"},
        "metrics": {"eval_accuracy": 0.5},
    })
    text = write_report(path, tmp_path / "report").read_text()
    assert "![accuracy_vs_gradient_ratio.png](accuracy_vs_gradient_ratio.png)" in text
    table = text.split("## Where each regularizer sat", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| level")}
    assert rows["dreg"] == ["6", "0.1", "0.1 - 0.1", "+2.00"]
    assert rows["spectral_norm"] == ["6", "0.01", "0.01 - 0.01", "-1.00"]
    assert rows["dreg_auto"][:2] == ["3", "0.03"]  # the drift between calibrations, not the target 0.1
    assert "no gradient ratio logged): `weight_decay`" in table
    assert (tmp_path / "report" / "accuracy_vs_gradient_ratio.png").stat().st_size > 0


def test_a_sweep_line_keeps_every_calibration_of_an_auto_strength(shared_data):
    """dreg_lambda auto re-calibrated every 2 of 4 steps: the line holds the calibrations at steps 0 and 2."""
    from study.sweep import Cell, run_cell

    flags = {**SweepConfig.from_yaml("study/configs/sweep_tiny.yaml").base, "data_dir": str(shared_data / "sst2"), "samples_per_class": 4,
             "max_steps": 4, "regularizer": "dreg", "dreg_lambda": "auto", "dreg_target_ratio": 0.1, "dreg_recalibrate_steps": 2}
    record = run_cell(Cell(key=(("regularizer", "dreg_auto"),), flags=flags))
    assert [step for step, _ in record["reg_lambdas"]] == [0, 2]
    assert all(value > 0 for _, value in record["reg_lambdas"])
    assert record["regularizer"]["reg_lambda"] == record["reg_lambdas"][-1][1]  # the strength it ended with


def test_report_tests_every_dreg_strength_against_every_regularizer(tmp_path):
    """dreg_auto_r0.1 gains 2 points over none in every cell; dreg ties none: both sections, with their own numbers."""
    path = tmp_path / "levels.jsonl"
    for seed in range(4):
        for dataset in ("mnist", "sst2"):
            for reg, gain in (("none", 0.0), ("dreg", 0.0), ("dreg_auto_r0.1", 0.02 + 0.001 * seed), ("jacobian_auto_r0.1", 0.01)):
                append_result(path, {
                    "cell": f"seed={seed}|dataset={dataset}|regularizer={reg}",
                    "axes": {"seed": str(seed), "dataset": dataset, "regularizer": reg},
                    "metrics": {"eval_accuracy": 0.5 + 0.05 * seed + gain},
                })
    text = write_report(path, tmp_path / "report").read_text()
    section = text.split("## DREG as `dreg_auto_r0.1` against each regularizer", 1)[1].split("\n## ", 1)[0]
    none_row = next(line for line in section.splitlines() if line.startswith("| none"))
    cells = [c.strip() for c in none_row.strip("|").split("|")]
    assert cells[1:3] == ["8", "2.15"] and cells[3:6] == ["8", "0", "0"]  # pairs, mean diff, wins/ties/losses
    jacobian_row = next(line for line in section.splitlines() if line.startswith("| jacobian_auto_r0.1"))
    assert [c.strip() for c in jacobian_row.strip("|").split("|")][2] == "1.15"
    assert "## DREG as `dreg` against" not in text  # the level dreg has its own section above


def test_a_level_run_on_fewer_seeds_does_not_shrink_the_other_comparisons(tmp_path):
    """A partial sweep: jacobian_auto_r0.1 has seed 0 only. DREG against none still pairs all 5 seeds (and the
    growth test too); DREG against jacobian_auto_r0.1 pairs the cells where both ran."""
    from study.report import advantage_growth, partial_levels

    path = tmp_path / "partial.jsonl"
    for seed in range(5):
        for dataset in ("sst2", "trec6"):
            for size in ("16", "64"):
                for reg in ("none", "dreg", "jacobian_auto_r0.1"):
                    if reg == "jacobian_auto_r0.1" and seed > 0:
                        continue
                    gain = {"none": 0.0, "dreg": 0.01 + 0.001 * seed + 0.01 * (size == "16"), "jacobian_auto_r0.1": 0.05}[reg]
                    append_result(path, {
                        "cell": f"seed={seed}|dataset={dataset}|samples_per_class={size}|regularizer={reg}",
                        "axes": {"seed": str(seed), "dataset": dataset, "samples_per_class": size, "regularizer": reg},
                        "metrics": {"eval_accuracy": 0.5 + 0.02 * seed + gain},
                    })
    frame = load_frame(path)
    tests = wilcoxon_against(frame)
    assert tests.loc["none", "pairs"] == 20 and tests.loc["none", "wins"] == 20
    assert tests.loc["jacobian_auto_r0.1", "pairs"] == 4 and tests.loc["jacobian_auto_r0.1", "losses"] == 4
    growth = advantage_growth(frame)
    assert growth.loc["none", "pairs"] == 10 and growth.loc["none", "growth (pts)"] == 1.0
    assert growth.loc["jacobian_auto_r0.1", "pairs"] == 2
    text = write_report(path, tmp_path / "report").read_text()
    ranks = text.split("## Mean ranks (1 = best)", 1)[1].split("\n## ", 1)[0]
    assert "Over the 20 cells where every level finished" in ranks and "`jacobian_auto_r0.1`" in ranks
    assert partial_levels(frame.drop(index=frame.index[0])) == ["jacobian_auto_r0.1"]  # one crashed run evicts no level
    rows = {line.split("|")[1].strip(): line for line in ranks.splitlines() if line.startswith("| ")}
    assert "dreg" in rows and "none" in rows and "jacobian_auto_r0.1" not in rows
    assert rows["dreg"].split("|")[2].strip() == "1"  # dreg beats none in all 20 cells

