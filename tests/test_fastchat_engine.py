"""engine=fastchat with real FastChat (fschat 0.2.36) and ipex-llm's worker (sym_int4 on CPU), in .venv-ipex,
through the launcher (issue 15).

Checked: the online benchmark runs against FastChat's API server and writes results like the other engines;
the official openai client gets completions and chat, streamed and not; a request without the API key gets
401 and the key is on no command line; each process has its own log; killing the worker mid-benchmark ends
the run with exit 3, naming the worker and showing its log's last lines; SIGINT and SIGTERM stop all three;
after every run nothing is left and all three ports are free. FastChat's own model_worker serves too.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _session_cache
from tests.faults import Launch, engine_process
from tests.procs import port_is_free

REPO = Path(__file__).resolve().parent.parent
IPEX_PYTHON = REPO / ".venv-ipex" / "bin" / "python"
API_KEY = "fastchat-test-key"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (
            IPEX_PYTHON.exists()
            and any((REPO / ".venv-ipex" / "lib").glob("python3*/site-packages/fastchat"))
        ),
        reason=".venv-ipex with FastChat is absent: scripts/setup.sh --ipex builds it (CI does)",
    ),
]

FASTCHAT = ("engine=fastchat", f"engine.python={IPEX_PYTHON}", "device=cpu", "engine.port=0",
            "engine.controller_port=0", "engine.worker_port=0")  # fmt: skip
# A level still running when the test strikes.
STREAMING = ("benchmark=online", "benchmark.input_len=16", "benchmark.output_len=32",
             "benchmark.num_prompts=2000", "benchmark.warmup_requests=2",
             "benchmark.concurrency=[4]")  # fmt: skip


def ports(launch: Launch) -> list[int]:
    """Every member's port, from the plan the run recorded."""
    plan = json.loads((launch.run_dir / "plan.json").read_text())
    return [int(m["probe"]["base_url"].rsplit(":", 1)[1]) for m in plan["members"]]


def assert_all_stopped(launch: Launch) -> None:
    launch.assert_nothing_left()
    for port in ports(launch):
        assert port_is_free(port), f"port {port} is still bound"


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"LLMSTACK_CACHE": str(_session_cache(tmp_path_factory))}


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, cache_env: dict[str, str]) -> Iterator[Launch]:
    """One engine serving (benchmark=none) for the API checks; the last test stops it with SIGINT."""
    with Launch(tmp_path_factory.mktemp("serving"), *FASTCHAT, "benchmark=none", f"engine.api_key={API_KEY}",
                env=cache_env) as launch:  # fmt: skip
        launch.wait_for_phase("serving", 300)
        yield launch


def client(launch: Launch):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{launch.port()}/v1", api_key=API_KEY, max_retries=0)


def test_the_openai_client_gets_completions_streamed_and_not(serving: Launch) -> None:
    api = client(serving)
    done = api.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0)
    assert isinstance(done.choices[0].text, str) and done.choices[0].finish_reason in ("stop", "length")
    assert 0 < done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0
    chunks = list(api.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0,
                                         stream=True))  # fmt: skip
    # Greedy: the same text, but for what a stream cannot show: FastChat leaves out the replacement character
    # of a token that ends mid-UTF-8 sequence (the tiny model's text is random bytes).
    assert chunks and "".join(c.choices[0].text for c in chunks) == done.choices[0].text.replace("\ufffd", "")


def test_the_openai_client_gets_chat_streamed_and_not(serving: Launch) -> None:
    api = client(serving)
    messages = [{"role": "user", "content": "Say something."}]
    done = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert done.choices[0].message.role == "assistant" and isinstance(done.choices[0].message.content, str)
    assert 0 < done.usage.completion_tokens <= 8
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              stream=True))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content.replace("\ufffd", "")


def test_the_key_is_required_and_on_no_command_line(serving: Launch) -> None:
    import psutil

    answer = httpx.get(f"http://127.0.0.1:{serving.port()}/v1/models", timeout=10)
    assert answer.status_code == 401, answer.text
    for pid in set(serving.processes()) - {serving.proc.pid}:  # the test gave the launcher the key itself
        try:
            assert API_KEY not in " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue


def test_each_process_has_its_own_log_and_session(serving: Launch) -> None:
    summary = serving.summary() or {}
    pids = summary["engine_pids"]
    assert list(pids) == ["fastchat-controller", "fastchat-worker (ipex_llm)", "fastchat-api-server"]
    assert "Register a new worker" in (serving.run_dir / "controller.log").read_text()
    assert "Using low bit format: sym_int4, device: cpu" in (serving.run_dir / "worker.log").read_text()
    assert "Uvicorn running on" in (serving.run_dir / "server.log").read_text()
    assert not list(REPO.glob("model_worker_*.log")) and not (REPO / "openai_api_server.log").exists()


def test_sigint_stops_all_three(serving: Launch) -> None:
    serving.stopped_by(signal.SIGINT)
    assert_all_stopped(serving)


# -- runs of their own ---------------------------------------------------------------------------------------
def test_the_online_benchmark_runs_through_the_launcher(tmp_path: Path, cache_env: dict[str, str]) -> None:
    with Launch(tmp_path, *FASTCHAT, "benchmark=smoke", env=cache_env) as launch:
        code = launch.finish(300)
        assert code == 0, launch.stderr()[-4000:]
        summary = launch.summary() or {}
        assert (summary["status"], summary["engine"]) == ("ok", "fastchat-ipex_llm"), summary
        result = json.loads((launch.run_dir / "bench-c4" / "result.json").read_text())
        assert result["completed"] == 16 and result["failed"] == 0, result
        assert result["output_throughput"] > 0
        assert (launch.run_dir / "bench-c4" / "requests.jsonl").exists()
        assert_all_stopped(launch)


def test_killing_the_worker_ends_the_engine_with_exit_3_and_its_log(
    tmp_path: Path, cache_env: dict[str, str]
) -> None:
    with Launch(tmp_path, *FASTCHAT, *STREAMING, env=cache_env) as launch:
        worker = engine_process(launch, "llmstack.workers.fastchat.ipex_llm_worker", timeout=120)
        launch.wait_for_phase("benchmark", 240)
        time.sleep(1.0)  # requests in flight
        os.kill(worker, signal.SIGKILL)
        code = launch.finish(120)
        console = launch.stderr()
        assert code == 3, console[-4000:]
        assert "fastchat-worker (ipex_llm)" in console and "worker.log" in console, console[-3000:]
        assert "Last lines of the engine log" in console
        summary: dict[str, Any] = launch.summary() or {}
        assert (summary["status"], summary["exit_code"], summary["phase"]) == ("failed", 3, "benchmark")
        assert "fastchat-worker (ipex_llm)" in summary["error"]
        assert_all_stopped(launch)


def test_sigterm_mid_benchmark_stops_all_three(tmp_path: Path, cache_env: dict[str, str]) -> None:
    with Launch(tmp_path, *FASTCHAT, *STREAMING, env=cache_env) as launch:
        launch.wait_for_phase("benchmark", 240)
        launch.stopped_by(signal.SIGTERM)
        assert_all_stopped(launch)


def test_fastchats_own_model_worker_serves(tmp_path: Path, cache_env: dict[str, str]) -> None:
    with Launch(tmp_path, *FASTCHAT, "engine.worker=model_worker", "low_bit=none", "benchmark=smoke",
                env=cache_env) as launch:  # fmt: skip
        assert launch.finish(300) == 0, launch.stderr()[-4000:]
        result = json.loads((launch.run_dir / "bench-c4" / "result.json").read_text())
        assert result["completed"] == 16 and result["failed"] == 0, result
        assert "fastchat.serve.model_worker" in (launch.run_dir / "command.sh").read_text()
        assert_all_stopped(launch)


def test_a_launcher_killed_outright_leaves_none_of_the_three(
    tmp_path: Path, cache_env: dict[str, str]
) -> None:
    """SIGKILL to the launcher: each process's guardian stops it (nothing can run llmstack's teardown)."""
    with Launch(tmp_path, *FASTCHAT, "benchmark=none", env=cache_env) as launch:
        launch.wait_for_phase("serving", 300)
        launch.proc.kill()
        launch.proc.wait(10)
        launch.assert_nothing_left(timeout=60)
        for port in ports(launch):
            assert port_is_free(port), f"port {port} is still bound"
