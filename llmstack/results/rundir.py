"""results/<experiment>/<run>/: one directory per run, written atomically file by file."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.results.files import write_text_atomic


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
        return write_text_atomic(self.path / name, text)

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
