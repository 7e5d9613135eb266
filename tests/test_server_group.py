"""The supervisor's multi-process engines (`LaunchPlan.members`, llmstack.serving.group), with real processes.

Each member is a real HTTP server on loopback (Python's http.server) that refuses to start unless the member
before it already answers, so a group that started them out of order fails. Checked: order, readiness, one
log each, a member dying while serving or while a later one starts (named, with its own log's last lines),
one failing to start, teardown (nothing left, ports free), and the dry run's rendering.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from llmstack.errors import EngineError
from llmstack.serving.group import ServerGroup, supervise
from llmstack.serving.plan import LaunchPlan, ReadyProbe
from tests.procs import port_is_free

# argv: PREVIOUS_PORT|none PORT DELAY_S. Refuses to start (exit 7) unless the previous member answers.
MEMBER = """
import sys, time, urllib.request, http.server, functools
previous, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if previous != "none":
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{previous}/", timeout=2)
    except OSError as exc:
        print(f"member on {port}: the one before it does not answer: {exc}", flush=True)
        sys.exit(7)
print(f"member on {port}: loading for {delay} s", flush=True)
time.sleep(delay)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="/")
print(f"member on {port}: serving", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def member(name: str, port: int, previous: int | None, delay: float = 0.0, code: str = MEMBER) -> LaunchPlan:
    return LaunchPlan(
        engine=name,
        argv=(sys.executable, "-c", code, str(previous or "none"), str(port), str(delay)),
        env={},
        probe=ReadyProbe(f"http://127.0.0.1:{port}", name, health_path="/", models_path=None, timeout_s=30),
        log_name=f"{name}.log",
        shutdown_grace_s=5,
    )


def group_plan(delays: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> LaunchPlan:
    ports = free_ports(3)
    members = tuple(
        member(f"member-{i}", port, ports[i - 1] if i else None, delay)
        for i, (port, delay) in enumerate(zip(ports, delays, strict=True))
    )
    return LaunchPlan(**{**members[-1].__dict__, "engine": "group", "members": members})


def assert_all_gone(group: ServerGroup) -> None:
    for m in group.members:
        assert port_is_free(int(m.plan.probe.base_url.rsplit(":", 1)[1]))
        if m.proc is None:
            continue  # never started
        assert m.proc.poll() is not None, f"{m.plan.engine} is still running"
        with pytest.raises(ProcessLookupError):
            os.killpg(m.pid, 0)  # its whole session is gone


def test_members_start_in_order_each_ready_first_and_stop_together(tmp_path: Path) -> None:
    plan = group_plan(delays=(0.5, 0.5, 0.0))
    with supervise(plan, lambda name: tmp_path / name) as group:
        assert isinstance(group, ServerGroup)
        assert group._started == 1  # only the first until wait_ready
        elapsed = group.wait_ready()
        assert elapsed >= 1.0  # the second started only after the first had loaded
        assert group.alive() and group.health_problem() is None
        assert len(set(group.pids.values())) == 3 and list(group.pids) == ["member-0", "member-1", "member-2"]
    for i in range(3):
        assert "serving" in (tmp_path / f"member-{i}.log").read_text()  # one log each
    assert_all_gone(group)


def test_a_member_dying_while_serving_is_named_with_its_own_log(tmp_path: Path) -> None:
    plan = group_plan()
    with pytest.raises(EngineError) as caught, supervise(plan, lambda name: tmp_path / name) as group:
        group.wait_ready()
        os.kill(group.members[1].pid, signal.SIGKILL)
        group.wait()
    message = str(caught.value)
    assert "member-1 exited with status -9 while serving" in message, message
    assert str(tmp_path / "member-1.log") in message
    assert any("member on" in line and "serving" in line for line in caught.value.log_tail)
    assert_all_gone(group)


def test_health_names_the_dead_member_not_the_one_it_broke(tmp_path: Path) -> None:
    with supervise(group_plan(), lambda name: tmp_path / name) as group:
        group.wait_ready()
        middle = group.members[1]
        os.kill(middle.pid, signal.SIGKILL)
        middle.proc.wait(5)
        problem = group.health_problem()
        assert problem is not None and problem.startswith("member-1: its main process exited"), problem
        with pytest.raises(EngineError, match="member-1 is not healthy at the end"):
            group.check_healthy("at the end")
    assert_all_gone(group)


def test_an_earlier_member_dying_while_a_later_one_starts_ends_the_start(tmp_path: Path) -> None:
    plan = group_plan(delays=(0.0, 30.0, 0.0))  # the second loads for 30 s
    started = time.monotonic()
    with pytest.raises(EngineError) as caught, supervise(plan, lambda name: tmp_path / name) as group:
        first = group.members[0].pid
        threading.Timer(2.0, os.kill, (first, signal.SIGKILL)).start()  # once the second is loading
        group.wait_ready()
    assert time.monotonic() - started < 20  # not the second's 30 s load, nor its timeout
    assert "member-0 exited with status -9 while member-1 was starting" in str(caught.value)
    assert_all_gone(group)


def test_a_member_that_cannot_start_stops_those_before_it(tmp_path: Path) -> None:
    ports = free_ports(2)
    first = member("first", ports[0], None)
    broken = member(
        "broken", ports[1], None, code="import sys; print('no model here', flush=True); sys.exit(1)"
    )
    plan = LaunchPlan(**{**broken.__dict__, "members": (first, broken)})
    with pytest.raises(EngineError) as caught, supervise(plan, lambda name: tmp_path / name) as group:
        group.wait_ready()
    assert "broken exited with status 1 before it was ready" in str(caught.value)
    assert caught.value.log_tail[-1] == "no model here"
    assert_all_gone(group)


def test_a_plan_of_members_renders_each_command_in_order() -> None:
    plan = group_plan()
    text = plan.shell_command()
    head, *rest = text.splitlines()
    assert head.startswith("# 3 processes, each in a shell of its own, in order")
    assert [line.split(",")[0] for line in rest if line.startswith("# ")] == [
        "# 1/3 member-0",
        "# 2/3 member-1",
        "# 3/3 member-2",
    ]
    assert "ready when GET http://127.0.0.1:" in text and "log: member-1.log" in text
    assert [m["engine"] for m in plan.to_dict()["members"]] == ["member-0", "member-1", "member-2"]


def test_a_stop_signal_while_a_later_member_loads_stops_those_started(tmp_path: Path) -> None:
    from llmstack import interrupts
    from llmstack.errors import Interrupted

    plan = group_plan(delays=(0.0, 30.0, 0.0))
    with interrupts.captured():
        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # while the second loads
        started = time.monotonic()
        with pytest.raises(Interrupted), supervise(plan, lambda name: tmp_path / name) as group:
            group.wait_ready()
    assert time.monotonic() - started < 20
    assert group._started == 2  # the third never started
    assert_all_gone(group)
