"""Start one server process, know when it is really ready, and always take it down again.

The process runs in its own session (process group). Ready means: the health probe answers 200, the
process is still alive, and /v1/models lists the served name. Teardown sends SIGTERM to the whole group
and to every descendant that left it (Ray, for one, starts its own sessions), waits a grace period, then
sends SIGKILL. The supervisor knows nothing about engines: it only runs a LaunchPlan.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from llmstack.engines.plan import LaunchPlan
from llmstack.errors import EngineError, Interrupted

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
HEARTBEAT_S = 10.0
_PR_SET_PDEATHSIG = 1


class ServerProcess:
    def __init__(
        self,
        plan: LaunchPlan,
        log_path: Path,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.plan = plan
        self.log_path = log_path
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._reader: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> ServerProcess:
        # A Ctrl-C that lands while the process is being started (after its exec, before Popen returns)
        # would leave it unknown to us: hold it until start() is done, then deliver it as usual.
        try:
            with _signals_deferred(redeliver=True):
                self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        env = os.environ.copy()
        env.update(self.plan.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting %s: %s", self.plan.engine, " ".join(self.plan.argv))
        self.proc = subprocess.Popen(
            self.plan.argv,
            env=env,
            cwd=self.plan.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self._reader = threading.Thread(target=self._copy_log, name="engine-log", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> list[str]:
        return list(self._tail)[-lines:]

    def wait_ready(self) -> float:
        """Block until ready; returns seconds since start. Raises EngineError if it dies or times out."""
        import httpx

        probe = self.plan.probe
        headers = {"Authorization": f"Bearer {probe.api_key}"} if probe.api_key else {}
        started = time.monotonic()
        deadline = started + probe.timeout_s
        next_heartbeat = started + HEARTBEAT_S
        with httpx.Client(base_url=probe.base_url, timeout=5.0, headers=headers, trust_env=False) as client:
            while True:
                self._raise_if_exited("before it was ready")
                if self._probe_once(client):
                    # The process may have died between the probe and now (a stale listener answering).
                    self._raise_if_exited("right after its probe answered")
                    elapsed = time.monotonic() - started
                    logger.info("%s ready at %s after %.1f s", self.plan.engine, probe.base_url, elapsed)
                    return elapsed
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"{self.plan.engine} was not ready after {probe.timeout_s:.0f} s "
                        f"(engine.startup_timeout_s); its log is {self.log_path}",
                        self.log_tail(),
                    )
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat += HEARTBEAT_S
                    last = self._tail[-1][:120] if self._tail else "(no output yet)"
                    waited = time.monotonic() - started
                    logger.info("waiting for %s (%.0f s): %s", self.plan.engine, waited, last)
                time.sleep(probe.interval_s)

    def wait(self) -> None:
        """Serve until the process exits (an error) or the caller is interrupted."""
        assert self.proc is not None
        while True:
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
            self._raise_if_exited("while serving")

    def wait_exit(self, timeout_s: float | None = None) -> int:
        """Wait for a process that ends by itself (a batch job, not a server); its exit status.

        EngineError when it is still running after `timeout_s`; stopping it is `stop()`'s business.
        """
        assert self.proc is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                code = self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    raise EngineError(
                        f"{self.plan.engine} had not finished after {timeout_s:.0f} s; its log is "
                        f"{self.log_path}",
                        self.log_tail(),
                    ) from None
                continue
            if self._reader is not None:
                self._reader.join(timeout=5.0)  # so the tail holds the last words
            return code

    def stop(self) -> None:
        """TERM the group and every descendant, wait the grace period, then KILL. Idempotent."""
        if self.proc is None:
            return
        with _signals_deferred():
            pgid = self.proc.pid
            targets = _descendants(self.proc.pid) | _group_members(pgid)
            if targets or self.proc.poll() is None:
                logger.info(
                    "stopping %s (pid %d, %d processes)", self.plan.engine, self.proc.pid, len(targets)
                )
            _signal_all(pgid, targets, signal.SIGTERM)
            if not self._wait_gone(pgid, targets, self.plan.shutdown_grace_s):
                remaining = _alive(targets | _group_members(pgid))
                logger.warning(
                    "%d processes still running after %.0f s: SIGKILL",
                    len(remaining),
                    self.plan.shutdown_grace_s,
                )
                _signal_all(pgid, remaining, signal.SIGKILL)
                self._wait_gone(pgid, remaining, 10.0)
            if self._reader is not None:
                self._reader.join(timeout=5.0)

    # -- internals ---------------------------------------------------------------------------------------
    def _probe_once(self, client: object) -> bool:
        import httpx

        assert isinstance(client, httpx.Client)
        probe = self.plan.probe
        try:
            if client.get(probe.health_path).status_code != 200:
                return False
            models = client.get(probe.models_path)
        except httpx.HTTPError:
            return False
        if models.status_code != 200:
            return False
        try:
            names = {m.get("id") for m in models.json().get("data", [])}
        except ValueError:
            return False
        return probe.served_name in names

    def _raise_if_exited(self, when: str) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            return
        if self._reader is not None:
            self._reader.join(timeout=5.0)  # so the tail holds the last words
        raise EngineError(
            f"{self.plan.engine} exited with status {code} {when}; its log is {self.log_path}",
            self.log_tail(),
        )

    def _wait_gone(self, pgid: int, pids: set[int], timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()  # reap the leader
            if not _alive(pids) and not _alive(_group_members(pgid)):
                return True
            time.sleep(0.05)
        self.proc.poll()
        return False

    def _copy_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in iter(self.proc.stdout.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", errors="replace").rstrip()
                self._tail.append(line)
                if self.echo is not None:
                    self.echo(line)
        self.proc.stdout.close()


def run_to_completion(
    plan: LaunchPlan,
    log_path: Path,
    echo: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> tuple[int, list[str]]:
    """Run a plan's process until it exits by itself: (its exit status, its last log lines).

    The same process-group handling as a server: on Ctrl-C, SIGTERM, a timeout, or once it has exited (its
    children may linger), the whole group and every descendant are stopped.
    """
    with ServerProcess(plan, log_path, echo=echo) as proc:
        code = proc.wait_exit(timeout_s)
        return code, proc.log_tail(LOG_TAIL_LINES)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if llmstack itself dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_all(pgid: int, pids: set[int], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _proc_stats() -> Iterator[tuple[int, int, int, str]]:
    """(pid, ppid, pgrp, state) of every process, from /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = data[data.rfind(")") + 2 :].split()
        yield int(entry.name), int(fields[1]), int(fields[2]), fields[0]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, ppid, _, state in _proc_stats():
        if state != "Z":
            children[ppid].append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _group_members(pgid: int) -> set[int]:
    return {pid for pid, _, pgrp, state in _proc_stats() if pgrp == pgid and state != "Z"}


def _alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        if data[data.rfind(")") + 2 :].split()[0] != "Z":
            living.add(pid)
    return living


@contextlib.contextmanager
def _signals_deferred(redeliver: bool = False) -> Iterator[None]:
    """Teardown must finish: hold Ctrl-C and SIGTERM until it has, then raise Interrupted once; with
    `redeliver`, send the first held signal again to the handler that was in place (KeyboardInterrupt for
    Ctrl-C by default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending and redeliver:
            signal.raise_signal(pending[0])
        elif pending:
            raise Interrupted(f"interrupted by signal {signal.Signals(pending[0]).name} during teardown")


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception in the main thread, so `finally` blocks run."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
