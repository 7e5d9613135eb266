"""The launcher's promises under faults, with real vLLM on CPU: the model worker killed in the last load
level, stop signals in the warm-up and in a level, the launcher killed while vLLM starts, two launches
racing for one port. vLLM renames its engine processes (setproctitle), which wipes their environment, so
what is left is also looked for by session: every process of an engine stays in the engine's session.

Slow: each test starts its own vLLM (25-60 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults import Launch, engine_process
from tests.procs import free_port

pytestmark = pytest.mark.integration

VLLM = ("device=cpu", "engine.enforce_eager=true", "engine.shutdown_grace_s=5")
TIMED_LEVELS = (
    "benchmark=online",
    "benchmark.input_len=32",
    "benchmark.output_len=32",
    "benchmark.duration_s=6",
    "benchmark.warmup_requests=2",
    "benchmark.concurrency=[1,4]",
)


def levels(summary: dict) -> dict[str, dict]:
    return {lvl["label"]: lvl for lvl in summary["benchmark"]["levels"]}


def test_a_dead_vllm_worker_in_the_last_level_fails_the_run(tmp_path: Path) -> None:
    with Launch(tmp_path, *VLLM, *TIMED_LEVELS, "engine.port=0") as launch:
        launch.wait_for("level c1 done", lambda: (launch.run_dir / "bench-c1" / "result.json").exists(), 600)
        worker = engine_process(launch, "VLLM::Worker")
        time.sleep(2.0)
        os.kill(worker, signal.SIGKILL)  # what the OOM killer would do
        code = launch.finish(180)
    assert code == 3, launch.stderr()[-3000:]
    summary = launch.summary()
    assert summary is not None and summary["status"] == "failed" and summary["exit_code"] == 3
    by_label = levels(summary)
    assert by_label["c1"]["complete"] is True and by_label["c1"]["output_throughput"] > 0
    c4 = by_label["c4"]
    assert c4["complete"] is False and c4["cut_short"].startswith("the engine failed")
    assert c4["output_throughput"] is None and c4["request_throughput"] is None
    result = json.loads((launch.run_dir / "bench-c4" / "result.json").read_text())
    assert result["complete"] is False and result["output_throughput"] is None
    assert "failed during load level c4" in launch.stderr()
    launch.assert_nothing_left(launch.port())


def test_sigterm_in_the_warm_up_and_sighup_in_a_level_stop_vllm_runs(tmp_path: Path) -> None:
    warm_up = (
        "benchmark=online",
        "benchmark.input_len=32",
        "benchmark.output_len=32",
        "benchmark.warmup_requests=5000",
        "benchmark.num_prompts=4",
        "benchmark.concurrency=[4]",
    )
    with Launch(tmp_path / "a", *VLLM, *warm_up, "engine.port=0") as launch:
        launch.wait_for_phase("warm-up", 600)
        time.sleep(1.0)
        assert launch.stopped_by(signal.SIGTERM)["phase"] == "warm-up"
    launch.assert_nothing_left(launch.port())

    with Launch(tmp_path / "b", *VLLM, *TIMED_LEVELS, "benchmark.duration_s=60", "engine.port=0") as launch:
        launch.wait_for_phase("benchmark", 600)
        time.sleep(2.0)
        summary = launch.stopped_by(signal.SIGHUP)
    c1 = levels(summary)["c1"]
    assert c1["complete"] is False and c1["cut_short"] == "interrupted by SIGHUP" and c1["completed"] > 0
    launch.assert_nothing_left(launch.port())


def test_a_launcher_killed_while_vllm_starts_leaves_nothing(tmp_path: Path) -> None:
    """vLLM's API server ignores SIGTERM while it starts: the kernel's parent-death signal alone left it
    (and its engine core and worker) running; the guardian escalates to SIGKILL."""
    with Launch(tmp_path, *VLLM, "benchmark=smoke", "engine.port=0") as launch:
        engine_process(launch, "VLLM::EngineCore", timeout=600)
        launch.signal(signal.SIGKILL)
        assert launch.finish(30) == -signal.SIGKILL
        launch.assert_nothing_left(launch.port(), timeout=40)
    assert "the launcher died without stopping the engine" in (launch.run_dir / "server.log").read_text()


def test_two_launches_on_one_port_never_benchmark_each_other(tmp_path: Path) -> None:
    """Both pass the port check (neither listens yet). The first (serving, benchmark=none) listens first;
    the second's readiness probe is then answered by the first, which must not count: its own vLLM cannot
    listen there (uvloop does not even report the failure: it would wait forever), and that is a start-up
    failure (exit 3) naming the port and the other server, with no benchmark run."""
    port = free_port()
    with Launch(tmp_path / "a", *VLLM, "benchmark=none", f"engine.port={port}") as first:
        first.wait_for_phase("startup", 120)
        time.sleep(2.0)
        with Launch(tmp_path / "b", *VLLM, "benchmark=smoke", f"engine.port={port}") as second:
            code = second.finish(300)
            assert first.proc.poll() is None, first.stderr()[-3000:]
            first.signal(signal.SIGTERM)
            assert first.finish(120) == 143
    assert code == 3, second.stderr()[-3000:]
    assert not list(second.run_dir.glob("bench-*")), "it benchmarked the other launch's server"
    summary = second.summary()
    assert summary is not None and (summary["status"], summary["phase"]) == ("failed", "startup")
    engine_pid = (first.summary() or {})["engine_pid"]
    assert f"port {port} answers, but not from the engine we started: pid {engine_pid}" in summary["error"]
    first.assert_nothing_left()
    second.assert_nothing_left(port)
