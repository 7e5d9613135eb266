"""Which llmstack produced a run: its version, and the git commit of the checkout it was imported from.

The commit is read from the checkout's files (`.git/HEAD`, the ref it names, `packed-refs`), so a run costs
no `git` process for it and a machine without git still records it. Only whether the tree had uncommitted
changes needs git itself (staged changes are only visible by comparing the index with the commit's tree):
`llmstack.results.git_status` runs it once per process, when the run's environment is described (before any
phase), and this module repeats its answer; until then, and without git, it is None. This module starts no
process, so the phases (and the engines that consult them) may import it. Outside a checkout (llmstack
installed as a wheel) commit and state are None: the version still says which release.

Only the directory that holds the `llmstack` package is looked at, never its parents: an installed copy
under a project's `.venv/lib/.../site-packages` must not claim the project's commit.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

__all__ = ["git_commit", "llmstack_provenance", "remember_dirty", "source_root"]

_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def source_root() -> Path:
    """The directory that holds the `llmstack` package (a checkout's root, or site-packages)."""
    import llmstack

    return Path(llmstack.__file__).resolve().parent.parent


# git_status's answer for this process's source tree (None: not asked, or git could not tell).
_dirty: list[bool | None] = [None]


def llmstack_provenance() -> dict[str, Any]:
    """`{"version", "git_commit", "git_dirty"}` of the code this process imported."""
    import llmstack

    return {"version": llmstack.__version__, "git_commit": _commit(), "git_dirty": _dirty[0]}


def remember_dirty(dirty: bool | None) -> None:
    _dirty[0] = dirty


@functools.cache
def _commit() -> str | None:
    # Once per process: the code that runs is the code that was imported, whatever the checkout holds later.
    return git_commit(source_root())


def git_commit(root: Path) -> str | None:
    """The commit checked out in `root` (a work tree, or a linked worktree), from files only; None when
    `root` is not a checkout or its HEAD cannot be followed."""
    git_dir = _git_dir(root)
    if git_dir is None:
        return None
    common = _common_dir(git_dir)
    head = _read(git_dir / "HEAD")
    for _ in range(5):  # a symbolic ref may name another symbolic ref
        if head is None:
            return None
        if _SHA.match(head):
            return head
        if not head.startswith("ref:"):
            return None
        ref = head[len("ref:") :].strip()
        # Per-worktree refs live in the worktree's own git dir, the others in the common one.
        head = _read(git_dir / ref) or _read(common / ref) or _packed_ref(common, ref)
    return None


def _git_dir(root: Path) -> Path | None:
    dot_git = root / ".git"
    if dot_git.is_dir():
        return dot_git
    # A linked worktree or a submodule: `.git` is a file saying where its git dir is.
    text = _read(dot_git)
    if text is None or not text.startswith("gitdir:"):
        return None
    target = Path(text[len("gitdir:") :].strip())
    target = target if target.is_absolute() else root / target
    return target if target.is_dir() else None


def _common_dir(git_dir: Path) -> Path:
    text = _read(git_dir / "commondir")
    if text is None:
        return git_dir
    common = Path(text)
    return common if common.is_absolute() else (git_dir / common).resolve()


def _packed_ref(common: Path, ref: str) -> str | None:
    text = _read(common / "packed-refs")
    for line in (text or "").splitlines():
        # "<sha> <ref>"; comments start with '#', peeled tags with '^'.
        sha, _, name = line.partition(" ")
        if name == ref and _SHA.match(sha):
            return sha
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
