"""What the console shows: the status line (llmstack.progress), the closing line, vLLM's quiet stop."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from llmstack import progress
from llmstack.progress import StatusLine, closing_line, cut_at_word, render
from tests.procs import wait_no_processes

MARK_KEY = "LLMSTACK_TEST_MARK"


# -- rendering -----------------------------------------------------------------------------------------------
def test_cut_at_word_never_cuts_a_word() -> None:
    text = "(EngineCore pid=26174) INFO 12-03 12:16:00 [ompmultiprocessing.py:185] reserved_cpus=[1]"
    for width in range(1, len(text) + 5):
        cut = cut_at_word(text, width)
        assert len(cut) <= max(width, 1)
        kept = cut.removesuffix("…").split()
        # Every word kept is a whole word of the text, in order.
        assert kept == text.split()[: len(kept)], (width, cut)
    assert cut_at_word(text, 200) == text
    assert cut_at_word("a   b\n c", 20) == "a b c"


def test_render_shows_elapsed_phase_counts_rate_and_a_note_within_the_width() -> None:
    line = render("load level c4", elapsed_s=12.4, done=5, total=16, rate=2.5, note="word " * 50, width=80)
    assert line.startswith("[  12 s] load level c4: 5/16 requests, 2.5 req/s — word")
    assert len(line) <= 80 and line.endswith("…")
    assert render("timed", done=7) == "timed: 7 requests"
    assert render("c4", done=3, total=8, rate=1.5, ttft_s=0.0123) == "c4: 3/8 requests, 1.5 req/s, TTFT 12 ms"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_status_is_periodic_and_never_repeats_an_unchanged_line() -> None:
    clock, lines = Clock(), []
    status = StatusLine("waiting for engine", live=False, plain_every_s=10, emit=lines.append, clock=clock)
    for second in range(0, 61):
        clock.now = float(second)
        # The engine's log says one thing for 40 s, then another.
        status.update(note="loading weights" if second < 45 else "compiling the graph")
    assert [line.split("] ", 1)[1] for line in lines] == [
        "waiting for engine — loading weights",
        "waiting for engine — compiling the graph",
    ]
    assert lines[0].startswith("[  10 s]") and lines[1].startswith("[  50 s]")


def test_plain_status_of_a_load_level_counts_requests_and_rate() -> None:
    clock, lines = Clock(), []
    status = StatusLine("load level c4", live=False, plain_every_s=1, emit=lines.append, clock=clock)
    for tick in range(31):
        clock.now = tick / 10
        status.update(done=tick * 2, total=100)
    assert lines and all(re.search(r"\d+/100 requests", line) for line in lines)
    assert "20.0 req/s" in lines[-1]


def test_the_live_line_is_erased_before_a_log_line_prints(tmp_path: Path) -> None:
    """On a terminal (forced here on a file), the line is drawn in place and erased by progress.clear()."""
    out = (tmp_path / "tty").open("w+")
    status = StatusLine("load level c4", stream=out, live=True)
    status.update(done=3, total=16)
    assert progress._active is status
    progress.clear()
    assert progress._active is None
    out.seek(0)
    drawn = out.read()
    assert "3/16 requests" in drawn and "\x1b[" in drawn  # drawn, then erased with cursor controls


# -- the closing line --------------------------------------------------------------------------------
def test_closing_line_names_the_directory_and_the_headline_figures() -> None:
    summary = {
        "status": "ok",
        "run_dir": "/r/20261203-1",
        "benchmark": {"levels": [{"label": "c4", "output_throughput": 688.27, "median_ttft_ms": 24.66,
                                  "completed": 16, "failed": 0, "complete": True}]},
    }  # fmt: skip
    assert closing_line(summary) == (
        "results in /r/20261203-1 (ok): c4: 688.3 output tok/s, TTFT p50 24.7 ms, 16 ok / 0 failed"
    )
    assert closing_line({"status": "failed", "run_dir": "/r/x"}) == "results in /r/x (failed)"


def test_the_tiny_model_message_names_its_final_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from llmstack.models import tiny

    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="llmstack.models.tiny"):
        path = tiny.ensure_tiny_model()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(str(path) in m for m in messages), messages
    assert not any("staging" in m for m in messages), messages


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_lightweight_run_console_without_a_terminal(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMSTACK_PROGRESS_EVERY_S": "0.2"}
    done = subprocess.run(
        [sys.executable, "-m", "llmstack", "engine=lightweight", "device=cpu", "engine.port=0",
         "benchmark.num_prompts=200", f"results_dir={tmp_path / 'results'}",
         f"+engine.extra_env.{MARK_KEY}={mark}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in done.stderr.splitlines()]
    status = [line for line in lines if re.match(r"\[ *\d+ s\] ", line)]
    assert any(re.search(r"load level c4: \d+/200 requests", line) for line in status), done.stderr
    assert any("waiting for lightweight" in line for line in status), done.stderr
    without_time = [re.sub(r"^\[ *\d+ s\] ", "", line) for line in status]
    repeated = [a for a, b in itertools.pairwise(without_time) if a == b]
    assert not repeated, repeated
    assert not any("\r" in line or "\x1b[" in line for line in lines)
    (run_dir,) = sorted((tmp_path / "results").glob("*/*/"))
    assert lines[-1].startswith(f"results in {run_dir} (ok): ")
    assert re.search(r"output tok/s, TTFT p50 [\d.]+ ms, 200 ok / 0 failed", lines[-1]), lines[-1]
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []


@pytest.mark.integration
def test_vllm_stops_quietly_api_server_first(tmp_path: Path) -> None:
    """Real vLLM: after the stop, nothing on the console reads like a problem, and its log shows its own
    shutdown (the API server stopped its engine core), with no error before it."""
    pytest.importorskip("vllm")
    mark = uuid.uuid4().hex
    done = subprocess.run(
        [sys.executable, "-m", "llmstack", "device=cpu", f"results_dir={tmp_path / 'results'}",
         f"+engine.extra_env.{MARK_KEY}={mark}", "engine.port=0"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    after_stop = done.stderr.split("stopping vllm-upstream", 1)[1]
    assert "waiting up to" in after_stop.splitlines()[0]
    assert not re.search(r"ERROR|Traceback|EngineDeadError", after_stop), after_stop
    (run_dir,) = sorted((tmp_path / "results").glob("*/*/"))
    log = (run_dir / "server.log").read_text(errors="replace")
    before, shutdown = log.split("[shutdown] API server: shutdown triggered", 1)
    # vLLM's own shutdown (mode=abort, --shutdown-timeout 0 by default) force-kills its engine core and can
    # log EngineDeadError while doing so: that stays in server.log, after the trigger, never on the console.
    assert "EngineDeadError" not in before and "Traceback" not in before, before[-3000:]
    assert "Application shutdown complete" in shutdown
    # The API server got the signal first, and stopped its engine core itself.
    assert "EngineCore: trigger received" not in log[: log.index("[shutdown] API server: shutdown triggered")]
    assert "killed" not in (run_dir / "llmstack.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []


def test_on_a_terminal_the_status_line_is_live_and_log_lines_print_clean() -> None:
    """Under a pty: the line is rewritten in place (no new line per update) and erased before a log line."""
    import pty

    script = (
        "import logging, time\n"
        "from llmstack.logs import setup_console_logging\n"
        "from llmstack.progress import StatusLine\n"
        "setup_console_logging()\n"
        "status = StatusLine('load level c4')\n"
        "for done in range(1, 17):\n"
        "    status.update(done=done, total=16)\n"
        "    time.sleep(0.03)\n"
        "logging.getLogger('x').info('a log line')\n"
        "status.update(done=16, total=16)\n"
        "status.close()\n"
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: stderr is the pty
        os.execv(sys.executable, [sys.executable, "-c", script])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    out = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "16/16 requests" in out and "\x1b[" in out
    # Updates are drawn in place: far fewer new lines than updates.
    assert out.count("\n") <= 3, repr(out)
    log_line = next(line for line in out.split("\n") if "a log line" in line)
    # The status line was erased first: what precedes the log line on its row is cursor control only.
    assert "requests" not in log_line.split("a log line")[0].rsplit("\x1b", 1)[-1], repr(log_line)


def test_a_batch_process_shows_its_latest_line_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The offline phase's process (run_to_completion) says what it is doing during a long model load."""
    from llmstack.serving.plan import LaunchPlan, ReadyProbe
    from llmstack.serving.supervisor import run_to_completion

    monkeypatch.setenv("LLMSTACK_PROGRESS_EVERY_S", "0.2")
    code = "import time\nprint('loading the model weights', flush=True)\ntime.sleep(1.5)\n"
    plan = LaunchPlan("batch", (sys.executable, "-c", code), {}, ReadyProbe("http://127.0.0.1:9", "x"))
    with caplog.at_level(logging.INFO, logger="llmstack.progress"):
        status, _ = run_to_completion(plan, tmp_path / "offline.log")
    assert status == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "llmstack.progress"]
    assert any(line.endswith("running batch — loading the model weights") for line in lines), lines
    # Said once, not every 0.2 s while it did not change.
    assert len({line.split("] ", 1)[1] for line in lines}) == len(lines), lines
