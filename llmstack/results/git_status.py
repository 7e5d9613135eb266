"""Whether llmstack's checkout has uncommitted changes: `git status`, once per process.

Apart from `llmstack.results.provenance` because it starts a process: only the run (llmstack.run, when it
describes the run's environment) calls it, and provenance repeats the answer in every result.json.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from llmstack.results.provenance import llmstack_provenance, remember_dirty, source_root

__all__ = ["checked_provenance", "tree_dirty"]


def checked_provenance() -> dict[str, Any]:
    """llmstack_provenance() with `git_dirty` asked of git (once per process)."""
    if llmstack_provenance()["git_commit"] is not None:
        remember_dirty(_source_dirty())
    return llmstack_provenance()


@functools.cache
def _source_dirty() -> bool | None:
    return tree_dirty(source_root())


def tree_dirty(root: Path) -> bool | None:
    """Uncommitted changes in `root` (staged or not), or new files git does not ignore; None without git,
    outside a checkout, when git refuses it (another owner's repository) or takes too long."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "-C", str(root), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
            # A read-only look: no index refresh written back, which could race with the user's own git.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return bool(done.stdout.strip())
