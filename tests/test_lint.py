"""The tree passes the linter configured in pyproject.toml (ruff: pyflakes, pycodestyle, import order)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff is in the test extra: pip install -e '.[test]'")
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)]
    if shutil.which("git") and (ROOT / ".git").exists():  # the files git knows, as CI sees them
        files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "*.py"],
                               capture_output=True, text=True, check=True).stdout.split()
        command = [*command[:-1], *(str(ROOT / f) for f in files if (ROOT / f).exists())]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
