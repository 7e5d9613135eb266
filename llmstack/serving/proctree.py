"""The processes of one engine, found three ways, and how to stop them all.

An engine's processes are (1) its process group (it runs in its own session), (2) every descendant of its
main process, and (3) every process whose environment carries the engine's run mark
(`LLMSTACK_RUN_MARK=<uuid>`): children inherit their parent's environment, so a process that left the
group (Ray starts sessions of its own) and lost its parent (reparented to init) is still found.

Used by the supervisor and by the guardian (`llmstack.serving.guardian`), which stops the engine when the
launcher itself dies. Processes are named by (pid, start time) so that a reused pid is never taken for one of
ours."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

MARK_ENV = "LLMSTACK_RUN_MARK"
# After a main process stopped first, its leftovers get at least this long before SIGKILL.
_AFTER_MAIN_S = 2.0


@dataclass(frozen=True)
class Member:
    pid: int
    started: float  # psutil's create_time(): with the pid, a name no other process can have
    name: str

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid})"


def member(proc: psutil.Process) -> Member | None:
    try:
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return Member(proc.pid, proc.create_time(), proc.name())
    except psutil.Error:
        return None


def engine_members(root: int | None, mark: str | None) -> set[Member]:
    """Every live process of the engine whose main process is `root` (also its group id) or whose
    environment carries `mark`."""
    found: dict[int, psutil.Process] = {}
    if root is not None:
        with contextlib.suppress(psutil.Error):
            main = psutil.Process(root)
            found[root] = main
            for child in main.children(recursive=True):
                found[child.pid] = child
    me = os.getpid()
    needle = f"{MARK_ENV}={mark}".encode() if mark else None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in found or pid == me:
            continue
        in_group = root is not None and _pgid(pid) == root
        if in_group or (needle is not None and _has_env(pid, needle)):
            with contextlib.suppress(psutil.Error):
                found[pid] = psutil.Process(pid)
    return {m for p in found.values() if (m := member(p)) is not None}


def signal_all(members: Iterable[Member], sig: signal.Signals, group: int | None = None) -> None:
    """Send `sig` once to each process: to the group, then to each member outside it that is still the
    process we knew. (Twice would be a second Ctrl-C to some programs, and re-enters a handler that is
    still running.)"""
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for m in members:
        if group is not None and _pgid(m.pid) == group:
            continue  # the group's signal reached it
        if m.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(m.pid, sig)


def stop_all(
    root: int | None,
    mark: str | None,
    grace_s: float,
    *,
    known: Iterable[Member] = (),
    reap: object = None,
    main_first: bool = False,
) -> tuple[int, int]:
    """TERM every process of the engine, wait up to `grace_s` for them to go, KILL what is left.

    `known`: processes seen earlier (they may have left the tree since). `reap`: a callable run while
    waiting, so that the caller's own child does not linger as a zombie. `main_first`: TERM the main
    process `root` alone first and give it the grace period to stop its own children (vLLM's API server
    shuts its engine core down; TERMed at once, the core dies under the server, which logs EngineDeadError
    tracebacks); then the rest as usual, with what is left of the grace (at least a moment). Returns
    (processes signalled, processes that needed SIGKILL).
    """
    deadline = time.monotonic() + grace_s
    signalled: set[Member] = set()
    if main_first and root is not None:
        main = {m for m in engine_members(root, None) if m.pid == root}
        signal_all(main, signal.SIGTERM)
        signalled |= main
        _wait_gone(None, None, main, grace_s, reap)
        grace_s = max(deadline - time.monotonic(), min(grace_s, _AFTER_MAIN_S))
    targets = engine_members(root, mark) | {m for m in known if m.alive()}
    signal_all(targets, signal.SIGTERM, root)
    targets |= signalled
    remaining = _wait_gone(root, mark, targets, grace_s, reap)
    killed = len(remaining)
    if remaining:
        signal_all(remaining, signal.SIGKILL, root)
        _wait_gone(root, mark, remaining, 10.0, reap)
    return len(targets), killed


def _wait_gone(
    root: int | None, mark: str | None, targets: set[Member], timeout_s: float, reap: object
) -> set[Member]:
    deadline = time.monotonic() + timeout_s
    while True:
        if callable(reap):
            reap()
        # New processes may still appear (a parent forking while it is being stopped): take them too.
        left = {m for m in targets if m.alive()} | engine_members(root, mark)
        if not left or time.monotonic() >= deadline:
            return left
        targets |= left
        time.sleep(0.05)


def listening_ports(members: Iterable[Member]) -> dict[int, Member]:
    """The TCP ports the members listen on, and who listens."""
    ports: dict[int, Member] = {}
    for m in members:
        try:
            connections = psutil.Process(m.pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN and conn.laddr:
                ports[conn.laddr.port] = m
    return ports


def listener_of(port: int) -> str | None:
    """Who listens on `port` on this host, as far as this user can see ("pid 123 (python3)"), or None."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "a process of another user"
            try:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return None


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[2]) if fields[0] != b"Z" else None


def _has_env(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False
