"""Every run ends with a summary.json that says what happened, and secrets never reach disk: results
directories that cannot be written, a closed stdout, an error of llmstack's own, a signal while the run is
being recorded, a disk that fills up during the benchmark, and an API key that must not be written
anywhere. Real launcher runs with the lightweight worker as the engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmstack.errors import Interrupted
from tests.faults import LIGHTWEIGHT, MARK_KEY, Launch
from tests.procs import wait_no_processes

pytestmark = pytest.mark.integration

SHORT = ("benchmark=online", "benchmark.input_len=16", "benchmark.output_len=16", "benchmark.num_prompts=8",
         "benchmark.warmup_requests=2", "benchmark.concurrency=[2]", "engine.port=0")  # fmt: skip


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def unwritable(kind: str, tmp_path: Path) -> Iterator[Path]:
    if kind == "under-proc":
        yield Path("/proc/llmstack-results")
    elif kind == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        yield tmp_path / "a-file" / "results"
    else:
        with tmpfs(tmp_path / "ro", "1m", "ro") as mount:
            yield mount / "results"


@pytest.mark.parametrize("kind", ["under-proc", "under-a-file", "read-only-mount"])
def test_an_unwritable_results_dir_is_a_config_error(tmp_path: Path, kind: str) -> None:
    for results in unwritable(kind, tmp_path):
        mark = uuid.uuid4().hex
        done = subprocess.run(
            [sys.executable, "-m", "llmstack", *LIGHTWEIGHT, f"results_dir={results}"],
            env={**os.environ, MARK_KEY: mark}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"llmstack: Invalid config: results_dir={results}:")
        assert "Traceback" not in done.stderr
        assert not results.exists()
        assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=5) == []


def test_a_closed_stdout_does_not_end_the_run(tmp_path: Path) -> None:
    """`llmstack ... | head -2`: the reader leaves after two lines; the run goes on and records it all."""
    results = tmp_path / "results"
    # Two levels: the reader is gone when the second one's table is printed.
    argv = [sys.executable, "-m", "llmstack", *LIGHTWEIGHT, *SHORT, "benchmark.concurrency=[1,2]",
            f"results_dir={results}", "experiment_name=x", "run_name=run"]  # fmt: skip
    script = " ".join(map(repr, argv)) + " | head -2; exit ${PIPESTATUS[0]}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == 2
    assert "BrokenPipeError" not in done.stderr
    summary = json.loads((results / "x" / "run" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert [lvl["completed"] for lvl in summary["benchmark"]["levels"]] == [8, 8]


def _session(compose_cfg, tmp_path: Path, *overrides: str):
    from llmstack.cli import CONFIG_DIR
    from llmstack.run import Session, prepare

    cfg = compose_cfg(*LIGHTWEIGHT, *SHORT, f"results_dir={tmp_path / 'results'}", "experiment_name=x",
                      "run_name=run", *overrides)  # fmt: skip
    run, plan = prepare(cfg, CONFIG_DIR)
    return Session(run, plan)


def test_an_error_outside_llmstacks_own_types_is_recorded(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmstack import cli, interrupts

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug in the load generator")

    monkeypatch.setattr("llmstack.bench.loadgen.run_load_sync", broken)
    monkeypatch.setattr(cli, "tolerate_closed_stdout", lambda: None)
    session = _session(compose_cfg, tmp_path)
    with interrupts.captured(), pytest.raises(ValueError) as raised:
        session.execute()
    summary = json.loads(session.rundir.file("summary.json").read_text())
    assert (summary["status"], summary["exit_code"], summary["error_type"]) == ("failed", 1, "ValueError")
    assert summary["error"] == "internal error: ValueError: a bug in the load generator"
    assert summary["phase"] == "warm-up"
    assert "Traceback" in session.rundir.file("llmstack.log").read_text()
    # What the CLI prints: one line, pointing at the traceback.
    with interrupts.captured():
        monkeypatch.setattr("llmstack.run.run", lambda cfg, config_dir: (_ for _ in ()).throw(raised.value))
        assert cli.run_task(compose_cfg(*LIGHTWEIGHT)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llmstack: internal error: ValueError: a bug in the load generator; the "
                              "traceback is in ")  # fmt: skip


def test_a_signal_while_the_run_is_recorded_is_reported_as_interrupted(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the doctor report is written (after the engine has stopped): exit 130 and a summary
    that says interrupted, not "ok", with every level complete."""
    from llmstack import interrupts

    monkeypatch.setattr("llmstack.doctor.write_report", lambda *a, **k: signal.raise_signal(signal.SIGINT))
    session = _session(compose_cfg, tmp_path)
    with interrupts.captured(), pytest.raises(Interrupted) as raised:
        session.execute()
    assert raised.value.exit_code == 130
    summary = json.loads(session.rundir.file("summary.json").read_text())
    assert (summary["status"], summary["phase"], summary["signal"]) == ("interrupted", "recording", "SIGINT")
    assert [lvl["complete"] for lvl in summary["benchmark"]["levels"]] == [True]


def test_a_disk_that_fills_up_during_the_benchmark_fails_the_run_clearly(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk, Launch(
        tmp_path, *LIGHTWEIGHT, *SHORT, "benchmark.num_prompts=2000", "benchmark.concurrency=[4]",
        f"results_dir={disk}",
    ) as launch:  # fmt: skip
        launch.results = disk
        launch.wait_for_phase("benchmark")
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 65536)
        code = launch.finish(120)
        assert code == 1, launch.stderr()[-3000:]
        last = launch.stderr().strip().splitlines()[-1]
        assert last.startswith("llmstack: cannot write ") and "the disk is full" in last
        assert "Traceback" not in launch.stderr()
        launch.assert_nothing_left()


SECRET = "sk-llmstack-test-" + uuid.uuid4().hex


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_an_api_key_never_reaches_disk_or_the_console(tmp_path: Path) -> None:
    key = f"engine.api_key={SECRET}"
    with Launch(tmp_path / "single", *LIGHTWEIGHT, *SHORT, key) as single:
        assert single.finish(300) == 0, single.stderr()[-3000:]
    with Launch(
        tmp_path / "grid", *LIGHTWEIGHT, *SHORT, key, "engine.max_batch_size=2,4", multirun=True
    ) as grid:
        assert grid.finish(300) == 0, grid.stderr()[-3000:]
    dry = subprocess.run([sys.executable, "-m", "llmstack", *LIGHTWEIGHT, key, "dry_run=true"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dry.returncode == 0 and "***" in dry.stdout
    for launch in (single, grid):
        written = sorted(p.name for p in launch.results.rglob("*") if p.is_file())
        assert "summary.json" in written and "config.yaml" in written
        assert files_holding(launch.results, SECRET) == []
        assert SECRET not in "".join(launch.out) + launch.stderr()
    assert (grid.results / "faults" / "multirun.yaml").is_file()
    assert SECRET not in dry.stdout + dry.stderr
    # The key did reach the engine: requests with it were served.
    assert (single.summary() or {})["benchmark"]["levels"][0]["completed"] == 8
