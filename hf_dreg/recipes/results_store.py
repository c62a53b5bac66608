"""An append-only JSONL file of finished runs that survives being killed at any moment.

Each finished run is one line, written with a single ``write`` on a file opened in append mode and
then fsync'ed, so a line is either all there or (if the process died mid-write) a torn tail that
``read_results`` skips with a warning. Nothing is ever rewritten.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def append_result(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and not _ends_with_newline(path, size):
            line = b"\n" + line  # a torn line before us stays alone on its line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def read_results(path: str | Path) -> list[dict]:
    """Every complete record; torn or corrupt lines are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: skipping an incomplete line (a run killed while writing).")
    return records
