"""study/benchmarks/gpu_check.py runs here too: its bf16 check on the CPU (autocast bf16), FSDP/DDP skipped with a reason."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "study" / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_its_cpu_part_and_writes_json(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is present: run study/benchmarks/gpu_check.sh instead")
    report = _load().main(["--out", str(tmp_path), "--checks", "bf16,fsdp"])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == report
    bf16 = report["bf16"]
    assert bf16["passed"], bf16
    assert bf16["relative_difference"]["fp32_accumulation"] < 1e-5  # the float32 control is exact
    assert bf16["relative_difference"]["bf16_vs_fp32"] > 0  # bf16 really changed the arithmetic
    assert "no CUDA device" in report["fsdp"]["skipped"]


def test_unknown_check_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="Unknown check"):
        _load().main(["--out", str(tmp_path), "--checks", "tf32"])
