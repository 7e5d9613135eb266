"""Start one server process, know when it is really ready and whether it is still healthy, always stop it.

The process runs in its own session (process group), with a run mark in its environment that its children
inherit (`llmstack.serving.proctree`). Ready means: the health probe answers 200, /v1/models lists the served
name, the process is alive, and the port is held by a process of ours (not by another server that happens to
answer there). Healthy, later, means the same, plus: every process the engine had when it became ready is
still there (a dead model worker under a living API server is a dead engine).

Teardown sends SIGTERM to the whole group, to every descendant and to every marked process, waits a grace
period, then sends SIGKILL; a plan with `stop_main_first` has its main process TERMed alone first, to stop
its children itself (vLLM). A guardian process (`llmstack.serving.guardian`) does the same if the launcher
itself dies. While the engine starts, the status line (`llmstack.progress`) shows its latest log line. The
engine's output is copied to its log without ever blocking the engine: if the log cannot be written (a full
disk), the output is still drained, dropped and counted, and the run fails saying so. The supervisor knows
nothing about engines: it only runs a LaunchPlan.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from llmstack import interrupts
from llmstack.errors import EngineError
from llmstack.pdeathsig import die_with_parent
from llmstack.progress import StatusLine
from llmstack.serving import guardian, proctree
from llmstack.serving.log_copier import LOG_TAIL_LINES, LogCopier
from llmstack.serving.plan import LaunchPlan

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

# A process that had been running this long when the engine became ready took part in loading it: its
# death later is the engine's death. (Younger ones may be short-lived helpers caught by chance.)
_MEMBER_MIN_AGE_S = 1.0
_HEALTH_TIMEOUT_S = 5.0
_OWN_EXIT_WAIT_S = 10.0  # for an engine whose process died to go down by itself (`_await_own_exit`)


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
        self.mark = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: LogCopier | None = None
        self._guardian: subprocess.Popen[bytes] | None = None
        # The engine's processes when it became ready (see `health_problem`).
        self._members: set[proctree.Member] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> ServerProcess:
        # Where signals raise (no `interrupts.capture()`), a Ctrl-C that lands while the process is being
        # started (after its exec, before Popen returns) would leave it unknown to us: hold it until start()
        # is done, then deliver it as usual.
        try:
            with interrupts.deferred(redeliver=True):
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
        env[proctree.MARK_ENV] = self.mark
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._guardian = guardian.start(self.mark, self.plan.shutdown_grace_s, self.log_path)
        logger.info("starting %s: %s", self.plan.engine, " ".join(self.plan.argv))
        self.proc = subprocess.Popen(
            self.plan.argv,
            env=env,
            cwd=self.plan.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # In the child: SIGTERM if llmstack itself dies, even by SIGKILL.
            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM)
            if sys.platform == "linux"
            else None,
        )
        self._tell_guardian(f"watch {self.proc.pid}")
        assert self.proc.stdout is not None
        self._log = LogCopier(self.proc.stdout, self.log_path, lambda: self.echo)
        self._log.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> list[str]:
        return self._log.tail(lines) if self._log is not None else []

    def _latest_line(self) -> str:
        """The engine's last line that says something (blank lines skipped)."""
        return next((line for line in reversed(self.log_tail(5)) if line.strip()), "(no output yet)")

    @property
    def log_error(self) -> str | None:
        """Why the engine's log is being lost (its output is still drained), or None."""
        return self._log.error if self._log is not None else None

    @property
    def log_dropped_bytes(self) -> int:
        return self._log.dropped_bytes if self._log is not None else 0

    def wait_ready(self, meanwhile: Callable[[], None] | None = None) -> float:
        """Block until ready; returns seconds since start. Raises EngineError if it dies or times out,
        Interrupted on a stop signal. `meanwhile` runs at every look (a group: are the others alive?)."""
        probe = self.plan.probe
        started = time.monotonic()
        deadline = started + probe.timeout_s
        status = StatusLine(f"waiting for {self.plan.engine}")
        with self._client(timeout=5.0) as client, status:
            while True:
                interrupts.check()
                self.raise_if_exited("before it was ready")
                self._raise_if_log_failed()
                if meanwhile is not None:
                    meanwhile()
                if self._probe_once(client) and self._port_is_ours():
                    # The process may have died between the probe and now (a stale listener answering).
                    self.raise_if_exited("right after its probe answered")
                    elapsed = time.monotonic() - started
                    self._members = self._loading_members()
                    status.close()
                    logger.info("%s ready at %s after %.1f s", self.plan.engine, probe.base_url, elapsed)
                    return elapsed
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"{self.plan.engine} was not ready after {probe.timeout_s:.0f} s "
                        f"(engine.startup_timeout_s); its log is {self.log_path}",
                        self.log_tail(),
                    )
                status.update(note=self._latest_line())
                interrupts.sleep(probe.interval_s)

    def health_problem(self) -> str | None:
        """Why the engine is not healthy now, or None: its main process exited, a process it had when it
        became ready died, its log cannot be written, or its health probe does not answer 200."""
        import httpx

        assert self.proc is not None
        probe = self.plan.probe
        code = self.proc.poll()
        if code is not None:
            return f"its main process exited with status {code}"
        dead = sorted((m for m in self._members if not m.alive()), key=lambda m: m.pid)
        if dead:
            return "its process " + ", ".join(m.describe() for m in dead) + " died"
        if self.log_error:
            return self.log_error
        try:
            with self._client(timeout=_HEALTH_TIMEOUT_S) as client:
                status = client.request(probe.method, probe.health_path).status_code
        except httpx.HTTPError as exc:
            return f"{probe.method} {probe.health_path} failed ({type(exc).__name__}: {exc})"
        if status != 200:
            return f"{probe.method} {probe.health_path} answered {status}"
        return None

    def settle(self) -> None:
        """After a problem: give an engine whose process died its moment to go down by itself, and the log
        its last words."""
        self._await_own_exit()
        self._settle_log()

    def check_healthy(self, when: str) -> None:
        """EngineError (exit 3) with the reason and the log's last lines if the engine is not healthy."""
        problem = self.health_problem()
        if problem is not None:
            self.settle()
            raise EngineError(
                f"{self.plan.engine} is not healthy {when}: {problem}; its log is {self.log_path}",
                self.log_tail(),
            )

    def wait(self) -> None:
        """Serve until the process exits or a process of it dies (an error), or a stop signal."""
        while True:
            interrupts.check()
            self.check_serving()
            interrupts.sleep(1.0)

    def check_serving(self) -> None:
        """EngineError if the process has exited, a process of it died or its log fails (no HTTP: cheap)."""
        self.raise_if_exited("while serving")
        self._raise_if_log_failed()
        if not all(m.alive() for m in self._members):
            self.check_healthy("while serving")

    def wait_exit(self, timeout_s: float | None = None) -> int:
        """Wait for a process that ends by itself (a batch job, not a server); its exit status.

        EngineError when it is still running after `timeout_s`; stopping it is `stop()`'s business.
        """
        assert self.proc is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with StatusLine(f"running {self.plan.engine}") as status:
            code = self._wait_exit(deadline, timeout_s, status)
        self._settle_log()
        return code

    def _wait_exit(self, deadline: float | None, timeout_s: float | None, status: StatusLine) -> int:
        assert self.proc is not None
        while True:
            interrupts.check()
            status.update(note=self._latest_line())
            try:
                return self.proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    raise EngineError(
                        f"{self.plan.engine} had not finished after {timeout_s:.0f} s; its log is "
                        f"{self.log_path}",
                        self.log_tail(),
                    ) from None

    def stop(self) -> None:
        """TERM the group, every descendant and every marked process, wait the grace period, then KILL.
        Idempotent."""
        if self.proc is None:
            self._release_guardian()  # the engine never started
            return
        with interrupts.deferred():
            proc = self.proc
            # What an engine says while it is being stopped (vLLM: EngineDeadError tracebacks) is no
            # problem of the run's: it goes to the log only.
            self.echo = None
            grace = self.plan.shutdown_grace_s
            main_first = self.plan.stop_main_first and proc.poll() is None
            if proc.poll() is None or proctree.engine_members(proc.pid, self.mark):
                # An engine may take seconds to stop: say what the silence is.
                logger.info("stopping %s (pid %d): waiting up to %.0f s for it to exit%s", self.plan.engine,
                            proc.pid, grace, " (its main process first)" if main_first else "")  # fmt: skip
            signalled, killed = proctree.stop_all(
                proc.pid, self.mark, grace, known=self._members, reap=proc.poll, main_first=main_first
            )
            if killed:
                logger.warning(
                    "%d of %d processes were still running %.0f s after SIGTERM: killed",
                    killed,
                    signalled,
                    self.plan.shutdown_grace_s,
                )
            proc.poll()
            if self._log is not None:
                self._log.join(5.0)
            self._release_guardian()

    # -- internals ---------------------------------------------------------------------------------------
    def _client(self, timeout: float) -> httpx.Client:
        import httpx

        probe = self.plan.probe
        headers = {"Authorization": f"Bearer {probe.api_key}"} if probe.api_key else {}
        return httpx.Client(base_url=probe.base_url, timeout=timeout, headers=headers, trust_env=False)

    def _probe_once(self, client: httpx.Client) -> bool:
        import httpx

        probe = self.plan.probe
        try:
            if client.request(probe.method, probe.health_path).status_code != 200:
                return False
            if probe.models_path is None:
                return True
            models = client.request(probe.method, probe.models_path)
        except httpx.HTTPError:
            return False
        if models.status_code != 200:
            return False
        try:
            listed = models.json().get(probe.names_field, [])
            names = {m.get("id") if isinstance(m, dict) else m for m in listed}
        except (ValueError, AttributeError, TypeError):
            return False
        return probe.served_name in names

    def _port_is_ours(self) -> bool:
        """Whether a process of the engine listens on the probe's port. Another server there (two launches
        racing for one fixed port, an engine left over) answers the probe just as well, and ours can never
        listen while it does (some event loops do not even report the failed listen): EngineError."""
        assert self.proc is not None
        port = _port_of(self.plan.probe.base_url)
        if port is None:
            return True
        members = proctree.engine_members(self.proc.pid, self.mark)
        if port in proctree.listening_ports(members):
            return True
        listener = proctree.listener_of(port)
        if listener is None:
            return False  # it stopped listening since the probe: look again
        raise EngineError(
            f"port {port} answers, but not from the engine we started: {listener} listens there, so "
            f"{self.plan.engine} cannot. Two launches on one engine.port? Choose a free engine.port, or "
            "engine.port=0 for one that llmstack picks",
            self.log_tail(),
        )

    def _loading_members(self) -> set[proctree.Member]:
        assert self.proc is not None
        now = time.time()
        members = proctree.engine_members(self.proc.pid, self.mark)
        return {m for m in members if m.pid == self.proc.pid or now - m.started >= _MEMBER_MIN_AGE_S}

    def raise_if_exited(self, when: str) -> None:
        """EngineError with the log's last lines if the main process has exited."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            return
        self._settle_log()
        raise EngineError(
            f"{self.plan.engine} exited with status {code} {when}; its log is {self.log_path}",
            self.log_tail(),
        )

    def _raise_if_log_failed(self) -> None:
        if self.log_error:
            raise EngineError(f"{self.plan.engine}: {self.log_error}")

    def _await_own_exit(self) -> None:
        """A process died, the main one lives: let it go down and say what failed (torchrun does)."""
        assert self.proc is not None
        if self.proc.poll() is None and not all(m.alive() for m in self._members):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=min(self.plan.shutdown_grace_s, _OWN_EXIT_WAIT_S))

    def _settle_log(self) -> None:
        """Let the log copier take the last words of a process that has exited (not more than a moment:
        children that outlive it may keep the pipe open)."""
        if self._log is not None:
            self._log.wait_quiet()

    def _tell_guardian(self, message: str) -> None:
        guardian = self._guardian
        if guardian is None or guardian.stdin is None:
            return
        try:
            guardian.stdin.write(message.encode() + b"\n")
            guardian.stdin.flush()
        except OSError:
            logger.warning("the guardian process is gone: if llmstack dies, the engine may outlive it")
            self._guardian = None

    def _release_guardian(self) -> None:
        guardian, self._guardian = self._guardian, None
        if guardian is None:
            return
        with contextlib.suppress(OSError):
            assert guardian.stdin is not None
            guardian.stdin.write(b"done\n")
            guardian.stdin.close()
        try:
            guardian.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            guardian.kill()
            guardian.wait()


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


def _port_of(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None
