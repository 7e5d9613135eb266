"""Cooperating processes supervised as one engine (engine=fastchat: controller, model worker, API server).

A plan with `members` is run member by member: each is a `ServerProcess` of its own (its session, run mark,
guardian and log file), started only once the one before it is ready, while those before it are watched (a
controller that dies while the worker loads ends the start at once, naming the controller). Ready means every
member is ready, in order. Healthy means every member is healthy; the first that is not is named, with its own
log's last lines, in the error. Teardown stops the members in reverse order (the API server first, so that no
request reaches a worker that is going away), each with its own grace period, always all of them.

It has the interface the run and the phases use of `ServerProcess`; `supervise` picks one or the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from llmstack import interrupts
from llmstack.serving.plan import LaunchPlan
from llmstack.serving.supervisor import ServerProcess


def supervise(
    plan: LaunchPlan, log_file: Callable[[str], Path], echo: Callable[[str], None] | None = None
) -> ServerProcess | ServerGroup:
    """The supervisor of `plan`, not started yet: a context manager that always stops what it started.
    `log_file(name)` is where the log called `name` goes (the run directory's)."""
    if plan.members:
        return ServerGroup(plan, log_file, echo)
    return ServerProcess(plan, log_file(plan.log_name), echo=echo)


class ServerGroup:
    def __init__(
        self, plan: LaunchPlan, log_file: Callable[[str], Path], echo: Callable[[str], None] | None = None
    ) -> None:
        self.plan = plan
        self.members = [ServerProcess(m, log_file(m.log_name), echo=echo) for m in plan.members]
        self._echo = echo
        self._started = 0
        self._ready = 0
        self._blamed: ServerProcess | None = None  # the member the last problem was about

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> ServerGroup:
        self._start_next()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _start_next(self) -> ServerProcess:
        member = self.members[self._started]
        self._started += 1  # before starting: a start that fails half-way is stopped too
        try:
            member.__enter__()
        except BaseException:
            self.stop()
            raise
        return member

    def wait_ready(self) -> float:
        """Start the members in order, each once the previous is ready; seconds from the first start."""
        started = time.monotonic()
        for index in range(self._ready, len(self.members)):
            member = self.members[index] if index < self._started else self._start_next()
            earlier = self.members[:index]
            when = f"while {member.plan.engine} was starting"
            member.wait_ready(meanwhile=lambda earlier=earlier, when=when: self._check_exited(earlier, when))
            self._ready = index + 1
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop every member started, the last first; all of them even if one fails. Idempotent."""
        failure: BaseException | None = None
        for member in reversed(self.members[: self._started]):
            try:
                member.stop()
            except BaseException as exc:  # the others must still be stopped
                failure = failure or exc
        if failure is not None:
            raise failure

    # -- what the run and the phases ask ----------------------------------------------------------------
    @property
    def echo(self) -> Callable[[str], None] | None:
        return self._echo

    @echo.setter
    def echo(self, echo: Callable[[str], None] | None) -> None:
        self._echo = echo
        for member in self.members:
            member.echo = echo

    @property
    def pid(self) -> int:
        """The first member's pid (the one started first); `pids` has every member's."""
        return self.members[0].pid

    @property
    def pids(self) -> dict[str, int]:
        return {m.plan.engine: m.pid for m in self.members[: self._started]}

    @property
    def log_path(self) -> Path:
        return (self._blamed or self.members[-1]).log_path

    @property
    def log_error(self) -> str | None:
        return next((f"{m.plan.engine}: {m.log_error}" for m in self._running() if m.log_error), None)

    @property
    def log_dropped_bytes(self) -> int:
        return sum(m.log_dropped_bytes for m in self._running())

    def alive(self) -> bool:
        return self._started == len(self.members) and all(m.alive() for m in self.members)

    def log_tail(self, lines: int = 20) -> list[str]:
        return (self._blamed or self.members[-1]).log_tail(lines)

    def health_problem(self) -> str | None:
        """Why the engine is not healthy, naming the member: a member whose process died is named before
        any that only fails its health probe (a dead worker can make the API server's answer fail too)."""
        running = self._running()
        problems = [(m, m.health_problem()) for m in running]
        failing = [(m, p) for m, p in problems if p is not None]
        if not failing:
            return None
        member, problem = next(((m, p) for m, p in failing if not m.alive()), failing[0])
        self._blamed = member
        return f"{member.plan.engine}: {problem}"

    def settle(self) -> None:
        if self._blamed is not None:
            self._blamed.settle()

    def check_healthy(self, when: str) -> None:
        if self.health_problem() is None:
            return
        assert self._blamed is not None
        self._blamed.check_healthy(when)

    def wait(self) -> None:
        """Serve until a member exits or fails, or a stop signal."""
        while True:
            interrupts.check()
            for member in self.members:
                self._blamed = member
                member.check_serving()
            self._blamed = None
            interrupts.sleep(1.0)

    # -- internals ---------------------------------------------------------------------------------------
    def _running(self) -> list[ServerProcess]:
        return self.members[: self._started]

    def _check_exited(self, members: list[ServerProcess], when: str) -> None:
        for member in members:
            self._blamed = member
            member.raise_if_exited(when)
        self._blamed = None
