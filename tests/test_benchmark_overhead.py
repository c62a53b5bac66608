"""benchmarks/overhead.py runs end to end on a tiny shape and prints its table (no timing assertion)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_overhead_benchmark_prints_its_table(tmp_path):
    output = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--shapes", "tiny", "--steps", "2",
           "--warmup", "1", "--batch", "4", "--seq", "16", "--threads", "1", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("| shape |") for line in lines), done.stdout
    row = next(line for line in lines if line.startswith("| tiny |"))
    assert row.count("x |") == 5  # time, CPU time, saved for backward, peak step and total memory ratios

    results = json.loads(output.read_text())
    (result,) = results["results"]
    assert result["shape"] == "tiny" and result["steps"] == 2 and result["sites"] == 2
    assert len(result["step_s"]["plain"]) == len(result["step_s"]["dreg"]) == 2
    assert result["fused"] and result["recompiles_timed"] == 0
    assert result["saved_ratio"] > 0 and result["peak_ratio"] > 0
    assert results["meta"]["threads"] == 1
