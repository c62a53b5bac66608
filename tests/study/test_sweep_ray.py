"""Sweeps on Ray (study/sweep.py --backend ray): the same results as the local pool, resumable.

Slow (a local Ray instance takes ~20 s to start) and skipped without ray (not in the test extra):
    pip install "hf_dreg[ray]" && HF_HUB_OFFLINE=1 python -m pytest -q -m slow tests/study/test_sweep_ray.py

Compared against: the records the local process pool writes for the same cells (every field, metrics
and per-site DREG included, but the times: wall time, finish time, runtimes and throughputs), and, after half the lines of the Ray results are removed, the cells a
rerun runs (exactly the removed ones) and the file it leaves (equal in content again).
"""

from __future__ import annotations

import pytest

from hf_dreg.recipes.results_store import read_results
from study.sweep import SweepConfig, expand_grid, run_sweep

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

VOLATILE = ("wall_time_s", "finished_at")
TIMINGS = ("_runtime", "_per_second")  # train_runtime, eval_samples_per_second...


def _content(path) -> dict[str, dict]:
    """Every record by cell, less what measures time (the rest, metrics included, must be equal)."""
    content = {}
    for record in read_results(path):
        record = {k: v for k, v in record.items() if k not in VOLATILE}
        record["metrics"] = {k: v for k, v in record["metrics"].items() if not k.endswith(TIMINGS)}
        content[record["cell"]] = record
    return content


@pytest.fixture
def tiny_config(shared_data, tmp_path):
    config = SweepConfig.from_yaml("study/configs/sweep_tiny.yaml")
    config.base["data_dir"] = str(shared_data / "sst2")
    config.grid["samples_per_class"] = [4]  # 4 cells: none/dreg x seeds 0/1
    return config


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_equals_the_local_pool_and_resumes(tiny_config, tmp_path, local_ray, monkeypatch):
    cells = [c.id for c in expand_grid(tiny_config)]
    assert len(cells) == 4

    tiny_config.results = str(tmp_path / "local.jsonl")
    run_sweep(tiny_config, workers=2, progress=False)
    local = _content(tiny_config.results)

    requested = []
    remote = ray.remote

    def spy_remote(*args, **kwargs):
        requested.append(kwargs)
        return remote(*args, **kwargs)

    monkeypatch.setattr(ray, "remote", spy_remote)
    tiny_config.results = str(tmp_path / "ray.jsonl")
    written = run_sweep(tiny_config, backend="ray", num_cpus=1, progress=False)
    assert requested == [{"num_cpus": 1, "num_gpus": 0}]  # every cell a task with its CPU/GPU request
    assert sorted(r["cell"] for r in written) == sorted(cells)
    on_ray = _content(tiny_config.results)
    assert sorted(on_ray) == sorted(cells)
    for cell in cells:  # same metrics, per-site DREG, config...
        assert on_ray[cell] == local[cell], cell
    assert ray.is_initialized()  # the sweep left the instance it did not start running

    # killed after two cells: keep half the lines; the rerun runs exactly the two others
    with open(tiny_config.results) as f:
        lines = f.readlines()
    with open(tiny_config.results, "w") as f:
        f.writelines(lines[:2])
    kept = {r["cell"] for r in read_results(tiny_config.results)}
    written = run_sweep(tiny_config, backend="ray", num_cpus=2, progress=False)
    assert sorted(r["cell"] for r in written) == sorted(set(cells) - kept)
    assert requested[-1] == {"num_cpus": 2, "num_gpus": 0}
    assert _content(tiny_config.results) == local
    assert run_sweep(tiny_config, backend="ray", progress=False) == []  # nothing left to run


def test_a_failing_cell_does_not_lose_the_others(tiny_config, tmp_path, local_ray):
    tiny_config.grid["regularizer"] = ["dreg", "no_such_regularizer"]
    tiny_config.results = str(tmp_path / "ray.jsonl")
    with pytest.raises(RuntimeError, match=r"(?s)2 cell\(s\) failed on Ray.*regularizer=no_such_regularizer\|seed=0: ValueError: .*Unknown"):
        run_sweep(tiny_config, backend="ray", progress=False)
    assert sorted(r["axes"]["regularizer"] for r in read_results(tiny_config.results)) == ["dreg", "dreg"]
