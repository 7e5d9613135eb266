"""results/<experiment>/<run>/: one directory per run, written atomically file by file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.errors import ResultsError


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, results_dir: str | Path, experiment: str, run_name: str | None = None) -> RunDir:
        parent = Path(results_dir) / experiment
        parent.mkdir(parents=True, exist_ok=True)
        base = run_name or time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", *(f"-{i}" for i in range(1, 1000))):
            candidate = parent / f"{base}{suffix}"
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return cls(candidate)
        raise FileExistsError(f"no free run directory named {base}* under {parent}")

    @classmethod
    def exact(cls, path: str | Path) -> RunDir:
        """This directory, created if missing (grid jobs have fixed, resumable names)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        return cls(Path(path))

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_text(path: Path, text: str) -> Path:
    """Readers see the old file or the new one, never half of it. ResultsError if it cannot be written."""
    try:
        return _atomic_write_text(path, text)
    except OSError as exc:
        import errno

        why = "the disk is full" if exc.errno == errno.ENOSPC else "it cannot be written"
        raise ResultsError(f"cannot write {path}: {why} ({exc.strerror or exc})") from exc


def _atomic_write_text(path: Path, text: str) -> Path:
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
