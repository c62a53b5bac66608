"""benchmarks/overhead.py runs end to end on a tiny shape and prints its table (no timing assertion)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGULARIZERS = ["none", "weight_decay", "spectral_norm", "igpen", "jacobian", "dreg"]


@pytest.mark.slow
def test_overhead_benchmark_prints_a_row_per_regularizer(tmp_path):
    output = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--shapes", "tiny", "--steps", "2",
           "--warmup", "1", "--batch", "4", "--seq", "16", "--threads", "1", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("| shape |") for line in lines), done.stdout
    rows = [line for line in lines if line.startswith("| tiny |")]
    assert [row.split("|")[3].strip() for row in rows] == REGULARIZERS
    assert all(row.count("x |") == 5 for row in rows)  # time, CPU time, saved, peak step and total ratios

    results = json.loads(output.read_text())
    (result,) = results["results"]
    assert result["shape"] == "tiny" and result["steps"] == 2 and result["dreg_sites"] == 2
    assert (result["batch"], result["seq"]) == (4, 16)
    assert sorted(result["step_s"]) == sorted(["plain", *REGULARIZERS])
    assert all(len(times) == 2 for times in result["step_s"].values())
    assert result["fused"] and result["recompiles_timed"] == 0
    rows = result["regularizers"]
    assert rows["none"]["saved_ratio"] == 1.0  # a second plain model keeps exactly what plain keeps
    assert rows["igpen"]["saved_ratio"] > 1.0 and rows["jacobian"]["saved_ratio"] > 1.0  # double backward's graph
    assert rows["dreg"]["reg_lambda"] == pytest.approx(10**-2.5)
    assert results["meta"]["threads"] == 1


def test_overhead_benchmark_rejects_an_unknown_regularizer(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--shapes", "tiny", "--regularizers", "dropout"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown regularizer(s) ['dropout']" in done.stderr
