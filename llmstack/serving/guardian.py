"""The guardian: a small process that stops an engine if the launcher dies without stopping it.

    python -m llmstack.serving.guardian --mark MARK --grace SECONDS --log FILE

The supervisor starts one per engine, in a session of its own (a terminal's Ctrl-C does not reach it), with a
pipe on its stdin. Over the pipe it learns the engine's main pid (`watch PID`) and, once the supervisor has
stopped the engine itself, that it may leave (`done`). If the pipe closes without `done`, the launcher is gone
(SIGKILL, the OOM killer, a crash): the guardian sends SIGTERM to every process of the engine
(`llmstack.serving.proctree`: its group, its descendants, whatever carries its run mark), waits the grace
period, then SIGKILL. The kernel's parent-death signal alone is not enough: it is one SIGTERM, which an engine
may ignore (vLLM's API server does during start-up), and nothing would follow it.

It notes what it did at the end of the engine's log. It imports nothing heavy, to start in milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Seconds between looks at the engine's processes: one that leaves the tree is still known afterwards.
POLL_S = 0.5

logger = logging.getLogger(__name__)


def start(mark: str, grace_s: float, log_path: Path) -> subprocess.Popen[bytes] | None:
    """Start the guardian of the engine marked `mark` (the supervisor side); None if it cannot start."""
    argv = [sys.executable, "-m", "llmstack.serving.guardian", "--mark", mark, "--grace", f"{grace_s:g}"]
    try:
        return subprocess.Popen(
            [*argv, "--log", str(log_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": _checkout_first(os.environ.get("PYTHONPATH"))},
        )
    except OSError as exc:
        logger.warning("could not start the guardian process (%s): if llmstack dies, the engine may "
                       "outlive it", exc)  # fmt: skip
        return None


def _checkout_first(pythonpath: str | None) -> str:
    """So that the guardian imports this llmstack, wherever the launcher was started from."""
    here = str(Path(__file__).resolve().parent.parent)
    return here if not pythonpath else f"{here}{os.pathsep}{pythonpath}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmstack.serving.guardian")
    parser.add_argument("--mark", required=True)
    parser.add_argument("--grace", type=float, default=15.0)
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    from llmstack.serving import proctree

    root: int | None = None
    known: set[proctree.Member] = set()
    inbox = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([inbox], [], [], POLL_S)
        if ready:
            line = inbox.readline()
            if not line:
                break  # the launcher is gone without saying done
            command, _, value = line.decode(errors="replace").strip().partition(" ")
            if command == "done":
                return 0
            if command == "watch":
                root = int(value)
        known = {m for m in known if m.alive()} | proctree.engine_members(root, args.mark)

    started = time.monotonic()
    signalled, killed = proctree.stop_all(root, args.mark, args.grace, known=known)
    if signalled:
        _note(
            args.log,
            f"the launcher died without stopping the engine: stopped {signalled} processes "
            f"({killed} needed SIGKILL) in {time.monotonic() - started:.1f} s",
        )
    return 0


def _note(log: str | None, message: str) -> None:
    if not log:
        return
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"[llmstack guardian, pid {os.getpid()}] {message}\n")
    except OSError:
        pass  # a full disk must not keep the guardian from its work, which is done


if __name__ == "__main__":
    sys.exit(main())
