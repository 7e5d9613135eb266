"""The one way llmstack writes a file of a run: atomically, so a reader sees the old file or the new one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from llmstack.errors import ResultsError


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename. ResultsError if it cannot be written."""
    target = Path(path)
    try:
        return _write(target, text)
    except OSError as exc:
        why = "the disk is full" if exc.errno == errno.ENOSPC else "it cannot be written"
        raise ResultsError(f"cannot write {target}: {why} ({exc.strerror or exc})") from exc


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
