"""Which code produced a result: the git commit of the hf_dreg source, whether its tree had changes, and the versions."""

from __future__ import annotations

import functools
import os
import platform
import subprocess


@functools.lru_cache(maxsize=4)
def code_revision(folder: str | None = None) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository hf_dreg is imported from.

    ``dirty`` is True when tracked files differ from the commit (untracked files do not count, nor files
    under the repository's ``study/results/``: a sweep appends to its tracked results while it runs). Both
    are None for an installed (non-git) copy of the package. Read once per process. ``folder``: another
    source folder to ask about (default: hf_dreg's own).
    """
    folder = folder or os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)study/results").strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def versions() -> dict:
    """The versions of hf_dreg, torch, transformers, datasets and Python, and the code's git revision."""
    import datasets
    import torch
    import transformers

    from .. import __version__

    return {
        "hf_dreg": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        **code_revision(),  # the git commit of the code, and whether its tracked files had changes
    }
