"""Every result records the code that produced it: the git commit and whether the tree had changes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hf_dreg.recipes.provenance import code_revision

ROOT = Path(__file__).resolve().parents[2]


def _git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_commit_and_dirty_flag_of_this_checkout():
    try:
        head = _git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    revision = code_revision.__wrapped__()
    assert revision["commit"] == head
    changed = [line for line in _git("status", "--porcelain", "--untracked-files=no").splitlines() if not line[3:].startswith("study/results/")]
    assert revision["dirty"] == bool(changed)


def test_a_changed_tracked_file_makes_the_tree_dirty(tmp_path):
    _git("init", "-q", cwd=tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    _git("add", "a.py", cwd=tmp_path)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=tmp_path)
    clean = code_revision.__wrapped__(str(tmp_path))
    assert clean == {"commit": _git("rev-parse", "HEAD", cwd=tmp_path), "dirty": False}
    (tmp_path / "untracked.py").write_text("y = 2\n")
    assert code_revision.__wrapped__(str(tmp_path))["dirty"] is False  # untracked files do not count
    (tmp_path / "study" / "results").mkdir(parents=True)
    (tmp_path / "study" / "results" / "r.jsonl").write_text("{}\n")
    _git("add", "study/results/r.jsonl", cwd=tmp_path)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two", cwd=tmp_path)
    with open(tmp_path / "study" / "results" / "r.jsonl", "a") as f:
        f.write("{}\n")  # a sweep appending to its tracked results
    assert code_revision.__wrapped__(str(tmp_path))["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_revision.__wrapped__(str(tmp_path))["dirty"] is True


def test_outside_git_both_are_unknown(tmp_path):
    assert code_revision.__wrapped__(str(tmp_path)) == {"commit": None, "dirty": None}


def test_sweep_records_carry_the_revision():
    from hf_dreg.recipes.provenance import versions

    record = versions()
    assert {"commit", "dirty"} <= set(record) and record["commit"] == code_revision()["commit"]
