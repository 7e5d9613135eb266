"""The supervisor's mechanisms under faults, with real child processes: an engine log that cannot be
written (a full disk), an engine whose children keep its output pipe open after it died, the guardian."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest

from llmstack.errors import EngineError
from llmstack.serving.plan import LaunchPlan, ReadyProbe
from llmstack.serving.supervisor import ServerProcess
from tests.procs import free_port, wait_no_processes

MARK_KEY = "LLMSTACK_TEST_MARK"


def plan_of(code: str, mark: str) -> LaunchPlan:
    # A probe nobody answers: these processes are not servers.
    probe = ReadyProbe(f"http://127.0.0.1:{free_port()}", "x", timeout_s=60, interval_s=0.05)
    return LaunchPlan("child", (sys.executable, "-c", code), {MARK_KEY: mark}, probe, shutdown_grace_s=2.0)


@pytest.fixture
def full_disk_log(tmp_path: Path) -> Path:
    """A log path where every write fails with ENOSPC, as on a full disk."""
    log = tmp_path / "server.log"
    log.symlink_to("/dev/full")
    return log


def test_an_unwritable_log_is_still_drained(full_disk_log: Path) -> None:
    """The engine writes 20 MB of output to a log that cannot be written: it must not block (nobody
    draining its pipe would stop it in its next write), and the loss is reported and counted."""
    mark = uuid.uuid4().hex
    chatty = "import sys\nfor _ in range(200_000):\n    sys.stdout.write('x' * 99 + '\\n')\n"
    with ServerProcess(plan_of(chatty, mark), full_disk_log) as proc:
        assert proc.wait_exit(timeout_s=60) == 0
        assert proc.log_error is not None and "the disk is full" in proc.log_error
        assert proc.log_dropped_bytes >= 19_000_000
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []


def test_a_lost_log_fails_the_start_up_with_a_clear_error(full_disk_log: Path) -> None:
    mark = uuid.uuid4().hex
    loading = "import time\nprint('loading', flush=True)\ntime.sleep(60)\n"
    start = time.monotonic()
    proc = ServerProcess(plan_of(loading, mark), full_disk_log)
    with proc, pytest.raises(EngineError, match="the disk is full"):
        proc.wait_ready()
    assert time.monotonic() - start < 20
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []


def test_an_engine_that_exits_while_its_children_hold_its_output_is_noticed_at_once(tmp_path: Path) -> None:
    """Its child inherits the output pipe and keeps it open: the exit must still be reported within a
    moment (not after waiting for the pipe to close), with the last lines it wrote."""
    mark = uuid.uuid4().hex
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('giving up', flush=True)\n"
        "time.sleep(0.3)\n"
        "sys.exit(7)\n"
    )
    with ServerProcess(plan_of(code, mark), tmp_path / "server.log") as proc:
        start = time.monotonic()
        with pytest.raises(EngineError, match="exited with status 7") as raised:
            proc.wait_ready()
        noticed_after = time.monotonic() - start
    assert noticed_after < 2.5, f"the exit was noticed after {noticed_after:.1f} s"
    assert "giving up" in raised.value.log_tail
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []


def test_an_engine_that_cannot_start_leaves_no_guardian(tmp_path: Path) -> None:
    import psutil

    plan = plan_of("", uuid.uuid4().hex)
    plan = LaunchPlan("missing", ("/nonexistent/python",), plan.env, plan.probe, shutdown_grace_s=1.0)
    proc = ServerProcess(plan, tmp_path / "server.log")
    with pytest.raises(FileNotFoundError), proc:
        pytest.fail("the body must not run")

    def guardians() -> list[int]:
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if proc.mark in " ".join(p.info["cmdline"] or []):
                found.append(p.pid)
        return found

    deadline = time.monotonic() + 10
    while guardians() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guardians() == []
    assert not (tmp_path / "server.log").exists() or "guardian" not in (tmp_path / "server.log").read_text()


# A main process that stops its own child when TERMed, as vLLM's API server stops its engine core.
_STOPS_ITS_CHILD = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
def term(*_):
    print("child: TERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("child: up", flush=True)
time.sleep(60)
'''])
def term(*_):
    time.sleep(0.5)
    print("main: forwarding TERM", flush=True)
    child.terminate()
    child.wait()
    print("main: child stopped", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("main: up", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("main_first", [True, False])
def test_stop_main_first_lets_the_main_process_stop_its_children(tmp_path: Path, main_first: bool) -> None:
    """With `stop_main_first` the main process alone gets SIGTERM and stops its child itself (the child's
    TERM comes from it, after it said so); without it, the whole group is TERMed at once."""
    import dataclasses

    mark = uuid.uuid4().hex
    log = tmp_path / "server.log"
    plan = dataclasses.replace(plan_of(_STOPS_ITS_CHILD, mark), stop_main_first=main_first)
    with ServerProcess(plan, log) as proc:
        deadline = time.monotonic() + 30
        while "child: up" not in proc.log_tail(5) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "child: up" in proc.log_tail(5)
    lines = log.read_text().splitlines()
    assert "main: child stopped" in lines
    told, child_term = lines.index("main: forwarding TERM"), lines.index("child: TERM")
    assert (child_term > told) is main_first, lines
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []
