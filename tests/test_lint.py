"""The code base stays ruff-clean: checked with the tests, so CI catches it too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    paths = ["llmstack", "tests", "benchmarks"]
    done = subprocess.run([ruff, "check", *paths], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
