"""Logging setup for the CLI: concise console lines, and a file handler per run directory."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"

# Secret values (API keys) that no log line may show; see `hide_secrets`.
_SECRETS: set[str] = set()


def hide_secrets(values: object) -> None:
    """From now on, these values read *** in llmstack's console and run logs (Hydra's included)."""
    _SECRETS.update(v for v in values if isinstance(v, str) and v)  # type: ignore[attr-defined]


def scrubbed(text: str) -> str:
    from llmstack.config.secrets import scrub

    return scrub(text, sorted(_SECRETS, key=len, reverse=True)) if _SECRETS else text


class _SecretFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            message = record.getMessage()
            hidden = scrubbed(message)
            if hidden != message:
                record.msg, record.args = hidden, ()
        return True


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The console's log lines, after erasing the live status line (llmstack.progress) if one is shown."""

    def emit(self, record: logging.LogRecord) -> None:
        from llmstack import progress

        progress.clear()
        super().emit(record)


def setup_console_logging() -> None:
    level = os.environ.get("LLMSTACK_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger()
    if any(getattr(h, "_llmstack_console", False) for h in root.handlers):
        return
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    handler._llmstack_console = True  # type: ignore[attr-defined]
    handler.addFilter(_SecretFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every probe request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class _RunLogHandler(logging.FileHandler):
    """The run's llmstack.log. If it cannot be written (a full disk), it says so once and then stays quiet:
    logging's default prints a traceback to stderr for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_failed", False):
            self._failed = True
            print(f"llmstack: cannot write {self.baseFilename}; the run goes on without it", file=sys.stderr)


def add_file_logging(path: Path) -> logging.Handler:
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_SecretFilter())
    logging.getLogger().addHandler(handler)
    return handler


def file_only_logger(handler: logging.Handler) -> logging.Logger:
    """A logger that writes to `handler` only: tracebacks for the run's log, not for the console."""
    log = logging.getLogger("llmstack.run.file")
    log.propagate = False
    log.handlers = [handler]
    return log
