"""Logging setup for the CLI: concise console lines, and a file handler per run directory."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def setup_console_logging() -> None:
    level = os.environ.get("LLMSTACK_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger()
    if any(getattr(h, "_llmstack_console", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    handler._llmstack_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every probe request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def add_file_logging(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler
