"""The engine's output to its log file, never blocking the engine.

An engine whose output nobody drains blocks in its next write, and with it the health probe and the
benchmark; so the copier never stops reading, and a log that cannot be written (a full disk) is counted as
dropped bytes and reported, not waited on.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

logger = logging.getLogger("llmstack.serving.supervisor")

LOG_TAIL_LINES = 40


class LogCopier:
    """Copies the engine's output to its log file, keeps its last lines, and echoes them.

    It never stops reading: an engine whose output nobody drains blocks in its next write, and with it the
    health probe and the benchmark. If the file cannot be written, what follows is dropped and counted,
    and `error` says why.
    """

    def __init__(
        self, source: IO[bytes], path: Path, echo: Callable[[], Callable[[str], None] | None]
    ) -> None:
        self.source = source
        self.path = path
        self.echo = echo
        self.error: str | None = None
        self.dropped_bytes = 0
        self.last_read = time.monotonic()
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._thread = threading.Thread(target=self._run, name="engine-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def tail(self, lines: int) -> list[str]:
        return list(self._tail)[-lines:]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def wait_quiet(self, quiet_s: float = 0.2, at_most_s: float = 1.0) -> None:
        """Until the source has ended, or said nothing for `quiet_s` (bounded by `at_most_s`)."""
        deadline = time.monotonic() + at_most_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            if time.monotonic() - self.last_read >= quiet_s:
                return
            self._thread.join(0.02)

    def _run(self) -> None:
        log = self._open()
        for raw in iter(self.source.readline, b""):
            self.last_read = time.monotonic()
            if log is not None:
                try:
                    log.write(raw)
                    log.flush()
                except OSError as exc:
                    self._failed(exc)
                    with contextlib.suppress(OSError):
                        log.close()
                    log = None
            if log is None:
                self.dropped_bytes += len(raw)
            line = raw.decode("utf-8", errors="replace").rstrip()
            self._tail.append(line)
            echo = self.echo()
            if echo is not None:
                with contextlib.suppress(Exception):  # a closed terminal must not stop the draining
                    echo(line)
        self.source.close()
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()

    def _open(self) -> IO[bytes] | None:
        try:
            return open(self.path, "ab")  # closed at the end of _run
        except OSError as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: OSError) -> None:
        what = "the disk is full" if exc.errno == errno.ENOSPC else "it cannot be written"
        self.error = (
            f"the engine's log {self.path} is lost: {what} ({exc.strerror or exc}); its output is "
            "still read, and dropped"
        )
        logger.error("%s", self.error)
