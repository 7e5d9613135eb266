"""Command-line entry: `python -m llmstack [overrides...]`, Hydra's syntax, plus llmstack's error handling."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmstack.config.store import register_schemas
from llmstack.errors import LlmstackError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(os.environ.get("LLMSTACK_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))

# Hydra reports its own composition errors (unknown group option, unknown key, bad type) with exit status 1.
# We turn those into 2, the status of every config error, but only if the task never started.
_task_started = False


def _full_error() -> bool:
    return os.environ.get("LLMSTACK_FULL_ERROR", "") not in ("", "0")


def _task(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    from llmstack.logs import setup_console_logging
    from llmstack.run import run

    setup_console_logging()
    try:
        run(cfg, CONFIG_DIR)
    except LlmstackError as exc:
        if _full_error():
            traceback.print_exc()
        print(f"llmstack: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("llmstack: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def main() -> int:
    global _task_started
    _task_started = False
    register_schemas()
    if _full_error():
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    entry = hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_task)
    try:
        entry()
    except SystemExit as exc:
        if exc.code == 1 and not _task_started:
            return 2
        return exc.code if isinstance(exc.code, int) else 1
    return 0
