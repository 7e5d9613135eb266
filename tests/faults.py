"""A launcher run in a child process, for fault injection: watch its summary and output, signal it, kill
what it started, and check that nothing of it is left.

Every process of the run (the launcher, its guardian, the engine and whatever the engine starts) carries
the test's mark in its environment: the launcher is started with it and everything inherits it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.procs import (
    port_is_free,
    processes_in_sessions,
    processes_with_env,
    sigint_by_default,
    wait_no_processes,
)

MARK_KEY = "LLMSTACK_TEST_MARK"
# The lightweight worker on the tiny model, one torch thread: what most fault tests run.
LIGHTWEIGHT = ("engine=lightweight", "device=cpu", "engine.torch_threads=1")


class Launch:
    """`python -m llmstack ...` with its stdout and stderr collected line by line."""

    def __init__(
        self, tmp_path: Path, *overrides: str, multirun: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.mark = uuid.uuid4().hex
        self.results = tmp_path / "results"
        argv = [sys.executable, "-m", "llmstack", *(["-m"] if multirun else [])]
        argv += [f"results_dir={self.results}", "experiment_name=faults"]
        if not multirun:
            argv.append("run_name=run")
        argv += list(overrides)
        self.argv = argv
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", MARK_KEY: self.mark, **(env or {})}
        self.proc = subprocess.Popen(
            argv,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=sigint_by_default,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=_collect, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=_collect, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        # A failed assertion must not leave the run behind for the next test.
        if self.proc.poll() is None:
            self.kill_everything()

    # -- what it wrote -------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.results / "faults" / "run"

    def summary(self, job_dir: Path | None = None) -> dict[str, Any] | None:
        try:
            return json.loads(((job_dir or self.run_dir) / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def stderr(self) -> str:
        return "".join(self.err)

    def port(self) -> int:
        """The engine's port, from the plan the run recorded."""
        plan = json.loads((self.run_dir / "plan.json").read_text())
        return int(plan["probe"]["base_url"].rsplit(":", 1)[1])

    # -- waiting and signalling ----------------------------------------------------------------------------
    def wait_for(self, what: str, condition: Callable[[], object], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"llmstack exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.stderr()[-4000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {timeout:.0f} s:\n{self.stderr()[-4000:]}")
            time.sleep(0.05)

    def wait_for_phase(self, phase: str, timeout: float = 300.0) -> None:
        self.wait_for(f"in phase {phase}", lambda: (self.summary() or {}).get("phase") == phase, timeout)

    def wait_for_stderr(self, text: str, timeout: float = 300.0) -> None:
        self.wait_for(f"printing {text!r}", lambda: any(text in line for line in self.err), timeout)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stopped_by(self, sig: signal.Signals, timeout: float = 120.0) -> dict[str, Any]:
        """Send `sig` and wait for the exit; the run's summary, once the exit status and the summary have
        both been checked to say that `sig` interrupted it."""
        self.signal(sig)
        code = self.finish(timeout)
        assert code == 128 + sig, self.stderr()[-3000:]
        summary = self.summary()
        assert summary is not None
        assert (summary["status"], summary["signal"], summary["exit_code"]) == ("interrupted", sig.name, code)
        return summary

    def finish(self, timeout: float = 300.0) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError(
                f"llmstack did not exit within {timeout:.0f} s:\n{self.stderr()[-4000:]}"
            ) from None
        for reader in self._readers:
            reader.join(10)
        return self.proc.returncode

    def engine_sessions(self) -> set[int]:
        """The engines' sessions (their main pids), from every summary.json the run wrote."""
        pids = set()
        for path in self.results.rglob("summary.json"):
            with contextlib.suppress(OSError, ValueError):
                summary = json.loads(path.read_text())
                if (pid := summary.get("engine_pid")) is not None:
                    pids.add(int(pid))
                pids.update(int(pid) for pid in summary.get("engine_pids", {}).values())  # a group's
        return pids

    def processes(self) -> list[int]:
        marked = processes_with_env(f"{MARK_KEY}={self.mark}")
        return sorted(set(marked) | set(processes_in_sessions(self.engine_sessions())))

    def assert_nothing_left(self, port: int | None = None, timeout: float = 30.0) -> None:
        sessions = self.engine_sessions()
        left = wait_no_processes(f"{MARK_KEY}={self.mark}", timeout=timeout, sessions=sessions)
        if left:
            described = [_describe(pid) for pid in left]
            self.kill_everything()
            raise AssertionError(f"processes of the run left running: {described}")
        if port is not None:
            deadline = time.monotonic() + 10
            while not port_is_free(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert port_is_free(port), f"port {port} is still bound"

    def kill_everything(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _collect(stream: Any, lines: list[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.append(line)
    stream.close()


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return str(pid)


def engine_process(launch: Launch, cmdline_part: str, timeout: float = 60.0) -> int:
    """The pid of the run's process whose command line (or name) contains `cmdline_part`."""
    import psutil

    found: list[int] = []

    def look() -> bool:
        for pid in launch.processes():
            try:
                proc = psutil.Process(pid)
                text = " ".join(proc.cmdline()) + " " + proc.name()
            except psutil.Error:
                continue
            if cmdline_part in text:
                found.append(pid)
                return True
        return False

    launch.wait_for(f"running {cmdline_part!r}", look, timeout)
    return found[0]
