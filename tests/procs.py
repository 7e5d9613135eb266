"""Find processes by an environment marker: children inherit it even after renaming themselves."""

from __future__ import annotations

import os
import socket
import time


def processes_with_env(marker: str) -> list[int]:
    needle = marker.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        zombie = stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"
        if needle in env.split(b"\0") and not zombie:
            found.append(int(entry.name))
    return found


def processes_in_sessions(sessions: set[int]) -> list[int]:
    """Processes whose session id is one of `sessions`. An engine runs in a session of its own (its main
    pid), and its processes stay in it: this finds the ones that renamed themselves with setproctitle
    (vLLM's EngineCore and Worker), which overwrites their /proc environ, so the marker is gone."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[3]) in sessions:
            found.append(int(entry.name))
    return found


def wait_no_processes(marker: str, timeout: float = 30.0, sessions: set[int] = frozenset()) -> list[int]:
    deadline = time.monotonic() + timeout

    def left() -> list[int]:
        return sorted(set(processes_with_env(marker)) | set(processes_in_sessions(set(sessions))))

    while (remaining := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return remaining


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    from llmstack.validation import port_is_free as free_for_servers

    return free_for_servers(host, port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sigint_by_default() -> None:
    """preexec_fn for children that a test interrupts with SIGINT: a shell starts background jobs (`cmd &`)
    with SIGINT ignored and exec keeps it ignored, so a suite started that way would see Ctrl-C do nothing.
    The default disposition lets the child's Python install its KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
