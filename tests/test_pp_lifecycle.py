"""engine=pp's lifecycle under faults (issue 14), with real processes: the launcher, torchrun, its ranks and
rank 0's model process, on CPU over gloo with the tiny model. A rank killed mid-stream or hung past the
collective timeout ends the run with exit 3, naming the rank and showing its log's last lines; SIGINT and
SIGTERM to the launcher stop every rank; three ranks serve a 7-layer model split 3/2/2. After every run no
process of it is left (launcher, guardian, torchrun, ranks, model process) and its port is free.

A rank is found by torchrun's RANK in its environment; rank 0's model process inherits RANK=0 and is the
one that multiprocessing's spawn_main runs. Each run is started once and checked by several tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _session_cache
from tests.faults import Launch

pytestmark = pytest.mark.integration

PP = ("engine=pp", "device=cpu", "engine.torch_threads=1", "engine.port=0")
# A level still streaming when the test strikes: far more 32-token streams than get sent before it.
STREAMING = ("benchmark=online", "benchmark.input_len=16", "benchmark.output_len=32",
             "benchmark.num_prompts=2000", "benchmark.warmup_requests=2",
             "benchmark.concurrency=[4]")  # fmt: skip
EXIT_FOR = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Seconds from a rank stopping (SIGSTOP) to the launcher's exit: 3 s of collective timeout, the teardown's
# grace (a stopped rank ignores SIGTERM, so it is killed after engine.shutdown_grace_s=5) and slack.
HUNG_RANK_EXIT_S = 60.0


# -- finding ranks ------------------------------------------------------------------------------------------
def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rank_pid(launch: Launch, rank: int, model_process: bool = False, timeout: float = 60.0) -> int:
    """Rank `rank`'s own process (torchrun started it: `-m llmstack.workers.pipeline`), or with
    `model_process` the model process it spawned (rank 0's runs stage 0)."""
    found: list[int] = []

    def look() -> bool:
        for pid in launch.processes():
            if f"RANK={rank}".encode() not in _environ(pid):
                continue
            command = _cmdline(pid)
            spawned = "spawn_main" in command
            if spawned if model_process else not spawned and "-m llmstack.workers.pipeline " in command:
                found.append(pid)
                return True
        return False

    launch.wait_for(f"rank {rank}'s {'model ' if model_process else ''}process", look, timeout)
    return found[0]


def finished_requests(launch: Launch) -> int:
    """Requests the worker has finished so far (its /metrics, warm-up included); 0 if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{launch.port()}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (OSError, ValueError, KeyError):
        return 0
    lines = [line for line in text.splitlines() if line.startswith("llmstack:request_success_total{")]
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in lines)


def wait_mid_stream(launch: Launch) -> None:
    """In the level, with some of its requests finished and others streaming (on a busy machine a fixed
    sleep may see none finished)."""
    launch.wait_for_phase("benchmark", 240)
    warm_up = 2
    launch.wait_for("4 requests of the level finished", lambda: finished_requests(launch) >= warm_up + 4, 60)


# -- one run, checked by several tests ---------------------------------------------------------------------
@dataclass
class Outcome:
    code: int
    console: str
    summary: dict[str, Any]
    server_log: str
    left: str | None  # what assert_nothing_left said, None when nothing was left and the port was free
    seconds: float = 0.0  # from the fault to the launcher's exit


def finish(launch: Launch, timeout: float, struck: float | None = None) -> Outcome:
    code = launch.finish(timeout)
    seconds = time.monotonic() - struck if struck is not None else 0.0
    left = None
    try:
        launch.assert_nothing_left(launch.port())
    except AssertionError as exc:
        left = str(exc)
    try:
        server_log = (launch.run_dir / "server.log").read_text(errors="replace")
    except OSError:
        server_log = ""
    return Outcome(code, "".join(launch.out) + "".join(launch.err), launch.summary() or {}, server_log, left,
                   seconds)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """tmp dirs and the session's model cache for module-scoped runs (the autouse cache fixture is
    function-scoped, so it has not set LLMSTACK_CACHE yet when these start)."""
    cache = {"LLMSTACK_CACHE": str(_session_cache(tmp_path_factory))}
    return lambda name: (tmp_path_factory.mktemp(name), cache)


def killed_mid_stream(run_dir: Any, name: str, rank: int, *overrides: str, model_process: bool = False,
                      ) -> Outcome:  # fmt: skip
    path, env = run_dir(name)
    with Launch(path, *PP, *STREAMING, *overrides, env=env) as launch:
        victim = rank_pid(launch, rank, model_process)
        wait_mid_stream(launch)
        os.kill(victim, signal.SIGKILL)  # what the OOM killer would do
        return finish(launch, 120, time.monotonic())


@pytest.fixture(scope="module")
def rank1_killed(run_dir: Any) -> Outcome:
    return killed_mid_stream(run_dir, "rank1", 1)


@pytest.fixture(scope="module")
def rank0_model_killed(run_dir: Any) -> Outcome:
    return killed_mid_stream(run_dir, "model-process", 0, model_process=True)


@pytest.fixture(scope="module")
def rank1_hung(run_dir: Any) -> Outcome:
    path, env = run_dir("hung")
    with Launch(path, *PP, *STREAMING, "engine.collective_timeout_s=3", "engine.shutdown_grace_s=5",
                env=env) as launch:  # fmt: skip
        rank1 = rank_pid(launch, 1)
        wait_mid_stream(launch)
        os.kill(rank1, signal.SIGSTOP)
        try:
            return finish(launch, HUNG_RANK_EXIT_S + 60, time.monotonic())
        finally:
            # Whatever happened, a stopped rank must not outlive the test.
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGKILL)
                os.kill(rank1, signal.SIGCONT)


@pytest.fixture(scope="module")
def seven_layers(run_dir: Any) -> Path:
    from llmstack.models.tiny import Shape, ensure_tiny_model

    _, env = run_dir("model")
    return ensure_tiny_model(Path(env["LLMSTACK_CACHE"]), shape=Shape(num_hidden_layers=7))


def three_ranks(model: Path) -> tuple[str, ...]:
    return ("model=local", f"model.path={model}", "engine.pipeline_parallel_size=3")


@pytest.fixture(scope="module")
def rank2_of_3_killed(run_dir: Any, seven_layers: Path) -> Outcome:
    return killed_mid_stream(run_dir, "rank2", 2, *three_ranks(seven_layers))


# -- the checks ---------------------------------------------------------------------------------------------
def assert_failed_cleanly(outcome: Outcome) -> None:
    """Exit 3, a failed summary in the benchmark phase, the level cut short, nothing left, the port free."""
    assert outcome.code == 3, outcome.console[-4000:]
    summary = outcome.summary
    assert (summary.get("status"), summary.get("exit_code")) == ("failed", 3), summary
    assert summary["phase"] == "benchmark"
    (level,) = summary["benchmark"]["levels"]
    assert level["complete"] is False and level["cut_short"].startswith("the engine failed"), level
    assert outcome.left is None, outcome.left


def assert_rank_reported(text: str, rank: int, log_line: str) -> None:
    """torchrun's wrapper names the rank that failed first and prints its log's last lines."""
    assert f"pipeline rank {rank} (local rank {rank}, pid " in text, text[-4000:]
    assert "failed first: signal SIGKILL" in text, text[-4000:]
    assert f"last lines of rank {rank}'s log:" in text, text[-4000:]
    assert f"  [rank {rank}] " in text and log_line in text, text[-4000:]


def test_killing_rank_1_mid_stream_ends_the_run_with_exit_3_and_leaves_nothing(rank1_killed: Outcome) -> None:
    assert_failed_cleanly(rank1_killed)
    # rank 0's own account of the broken ring is on the console (its log's tail).
    assert "from rank 1: rank 1 is gone" in rank1_killed.console, rank1_killed.console[-4000:]
    assert "Traceback" not in rank1_killed.console, rank1_killed.console[-4000:]


def test_killing_rank_1_names_it_and_its_log_on_the_console(rank1_killed: Outcome) -> None:
    assert_rank_reported(rank1_killed.console, 1, "rank 1 ready")


def test_killing_rank_0s_model_process_ends_the_run_with_exit_3(rank0_model_killed: Outcome) -> None:
    """The OOM killer's likeliest victim (it holds stage 0 and the KV cache): torchrun names rank 0, whose
    front end exits when its model process is gone, not rank 1, which only lost its peer (and leaves a
    moment later, so as not to be taken for the cause)."""
    assert_failed_cleanly(rank0_model_killed)
    console = rank0_model_killed.console
    assert "pipeline rank 0 (local rank 0, pid " in console and "failed first: exit status 1" in console, (
        console[-4000:]
    )
    assert "the model process exited (status -9)" in console, console[-4000:]
    assert "Traceback" not in console, console[-4000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_to_the_launcher_stops_every_rank(tmp_path: Path, sig: signal.Signals) -> None:
    with Launch(tmp_path, *PP, *STREAMING) as launch:
        ranks = [rank_pid(launch, 0), rank_pid(launch, 0, model_process=True), rank_pid(launch, 1)]
        wait_mid_stream(launch)
        summary = launch.stopped_by(sig)
    assert summary["phase"] == "benchmark" and summary["exit_code"] == EXIT_FOR[sig]
    (level,) = summary["benchmark"]["levels"]
    assert level["complete"] is False and level["cut_short"] == f"interrupted by {sig.name}", level
    assert level["output_throughput"] is None and 0 < level["completed"] < 2000
    result = json.loads((launch.run_dir / "bench-c4" / "result.json").read_text())
    assert result["complete"] is False
    console = "".join(launch.out) + launch.stderr()
    assert f"interrupted by {sig.name}" in console
    assert "Traceback" not in console, console[-4000:]
    launch.assert_nothing_left(launch.port())
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]


def test_a_hung_rank_ends_the_run_naming_it_within_the_collective_timeout(rank1_hung: Outcome) -> None:
    assert rank1_hung.seconds < HUNG_RANK_EXIT_S, f"the launcher exited {rank1_hung.seconds:.0f} s after"
    assert_failed_cleanly(rank1_hung)
    assert "rank 1 sent nothing for 3 s (engine.collective_timeout_s)" in rank1_hung.console, (
        rank1_hung.console[-4000:]
    )
    assert "Traceback" not in rank1_hung.console, rank1_hung.console[-4000:]


def test_three_ranks_serve_seven_layers_split_3_2_2(tmp_path: Path, seven_layers: Path) -> None:
    info: dict[str, Any] = {}

    def answers_info() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{launch.port()}/info", timeout=2) as response:
                info.update(json.loads(response.read()))
        except (OSError, ValueError, KeyError):
            return False
        return True

    with Launch(tmp_path, *PP, *three_ranks(seven_layers), "benchmark=smoke", "benchmark.num_prompts=8",
                "benchmark.output_len=16") as launch:  # fmt: skip
        launch.wait_for("answering /info", answers_info, 240)
        code = launch.finish(120)
    assert code == 0, launch.stderr()[-4000:]
    assert info["extra"]["pipeline_parallel_size"] == 3
    assert info["extra"]["stage_layers"] == [[0, 3], [3, 5], [5, 7]]
    summary = launch.summary()
    assert summary is not None and summary["status"] == "ok"
    (level,) = summary["benchmark"]["levels"]
    assert level["complete"] is True and level["completed"] == 8 and level["output_throughput"] > 0
    launch.assert_nothing_left(launch.port())


def test_killing_rank_2_of_3_ends_the_run_with_exit_3(rank2_of_3_killed: Outcome) -> None:
    assert_failed_cleanly(rank2_of_3_killed)
    console = rank2_of_3_killed.console
    assert "from rank 2: rank 2 is gone" in console or "pipeline rank 2 " in console, console[-4000:]


def test_killing_rank_2_of_3_names_it_and_its_log_on_the_console(rank2_of_3_killed: Outcome) -> None:
    assert_rank_reported(rank2_of_3_killed.console, 2, "rank 2 ready")
