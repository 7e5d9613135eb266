"""The parts the benchmark phases are built from, without vLLM: payloads, images, load levels, the timed loop,
the offline process's plan and arithmetic, and running a batch process to completion under supervision."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

from llmstack.bench.errors import BenchInputError
from llmstack.bench.images import image_mime_type, image_url
from llmstack.bench.loadgen import completed_by, run_load_sync
from llmstack.errors import BenchmarkError, EngineError
from llmstack.phases.common import client_errors, request_payload
from llmstack.phases.offline_throughput import (
    engine_args,
    format_report,
    offline_plan,
    throughput_result,
)
from llmstack.phases.online import OnlineBenchmarkConfig, levels_of
from llmstack.serving.plan import LaunchPlan, ReadyProbe
from llmstack.serving.supervisor import run_to_completion
from tests.bench_instrument import instrument
from tests.procs import sigint_by_default, wait_no_processes

pytestmark = pytest.mark.timeout(120)


def tiny_png(width: int = 4, height: int = 3) -> bytes:
    """A valid RGB PNG made with zlib alone (no imaging library, no download)."""
    rows = b"".join(
        b"\x00" + b"".join(bytes([(x * 60) % 256, (y * 80) % 256, 200]) for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# -- images ------------------------------------------------------------------------------------------------


def test_local_image_becomes_a_base64_data_url(tmp_path: Path) -> None:
    png = tiny_png()
    path = tmp_path / "picture.bin"  # the content decides the type, not the name
    path.write_bytes(png)
    url = image_url(str(path))
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix) and base64.b64decode(url[len(prefix) :]) == png


@pytest.mark.parametrize(
    ("data", "name", "mime"),
    [
        (b"\xff\xd8\xff\xe0rest", "x", "image/jpeg"),
        (b"GIF89a....", "x", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "x", "image/webp"),
        (b"unknown bytes", "photo.jpg", "image/jpeg"),
        (b"unknown bytes", "notes.txt", None),
    ],
)
def test_image_type_by_signature_then_name(data: bytes, name: str, mime: str | None) -> None:
    assert image_mime_type(data, name) == mime


def test_urls_pass_through_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    for url in ("https://example.com/cat.png", "http://h/x.jpg", "data:image/png;base64,AAAA"):
        assert image_url(url) == url
    # The client's own error; a phase reports it as BenchmarkError (exit 4) with the same message.
    with pytest.raises(BenchInputError, match="cannot read the image"):
        image_url(str(tmp_path / "missing.png"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BenchInputError, match="not an image"):
        image_url(str(tmp_path / "notes.txt"))
    with pytest.raises(BenchmarkError, match="not an image"), client_errors():
        image_url(str(tmp_path / "notes.txt"))


# -- payloads and levels -----------------------------------------------------------------------------------


def payload(**overrides: object) -> dict:
    args = {"model": "m", "endpoint": "completions", "content": "hi", "output_len": 16, "stream": True,
            "ignore_eos": True, "min_tokens": None, "temperature": 0.0}  # fmt: skip
    args.update(overrides)
    return request_payload(**args)  # type: ignore[arg-type]


def test_completions_payload_asks_exact_lengths_and_server_usage() -> None:
    assert payload() == {
        "model": "m", "max_tokens": 16, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": 16, "prompt": "hi",
    }  # fmt: skip


def test_min_tokens_follows_ignore_eos_unless_given() -> None:
    assert "min_tokens" not in payload(ignore_eos=False) and "ignore_eos" not in payload(ignore_eos=False)
    assert payload(ignore_eos=False, min_tokens=4)["min_tokens"] == 4
    assert "min_tokens" not in payload(min_tokens=0)
    assert "stream_options" not in payload(stream=False)


def test_chat_payload_carries_message_parts() -> None:
    parts = [{"type": "text", "text": "What is here?"}, {"type": "image_url", "image_url": {"url": "u"}}]
    body = payload(endpoint="chat", content=parts)
    assert body["messages"] == [{"role": "user", "content": parts}] and "prompt" not in body


def test_levels_closed_then_open() -> None:
    closed = levels_of(OnlineBenchmarkConfig(concurrency=[1, 8]))
    assert [(lvl.label, lvl.concurrency, lvl.closed) for lvl in closed] == [("c1", 1, True), ("c8", 8, True)]
    open_ = levels_of(OnlineBenchmarkConfig(request_rate=[2.5, 10], max_concurrency=16))
    assert [(lvl.label, lvl.concurrency, lvl.request_rate) for lvl in open_] == [
        ("r2.5-c16", 16, 2.5), ("r10-c16", 16, 10.0),
    ]  # fmt: skip
    assert [lvl.label for lvl in levels_of(OnlineBenchmarkConfig(request_rate=[4]))] == ["r4"]


# -- the timed closed loop ---------------------------------------------------------------------------------


def test_timed_loop_keeps_n_connections_busy_for_the_duration() -> None:
    with instrument(delay_s=0.02) as server:
        result = run_load_sync(
            server.url, [{"model": "m", "prompt": "a", "max_tokens": 2}, {"model": "m", "prompt": "b",
            "max_tokens": 3}], endpoint="/v1/completions", concurrency=3, duration_s=0.6, timeout_s=5,
            input_lens=[5, 6],
        )  # fmt: skip
        peers = len(server.peers)
    records = result.records
    assert all(r.success for r in records) and len(records) == len(server.bodies)
    # 3 connections x 0.6 s / 20 ms each: about 90 requests (fewer on a loaded machine, never more).
    assert 20 <= len(records) <= 95
    assert peers == 3, "one keep-alive connection per worker"
    assert all(r.sent_at < result.start + 0.6 for r in records), "nothing is sent after the deadline"
    assert result.end >= max(r.done_at for r in records)
    assert [r.expected_input_tokens for r in records[:4]] == [5, 6, 5, 6]
    assert {r.completion_tokens for r in records} == {2, 3}
    assert completed_by(result, result.start + 0.6) <= len(records) == completed_by(result, result.end)


def test_timed_loop_stops_early_when_told() -> None:
    from llmstack.bench.loadgen import CANCELLED

    with instrument() as server:
        start = time.monotonic()
        result = run_load_sync(
            server.url, [{"prompt": "x"}], endpoint="/v1/completions", concurrency=2, duration_s=30,
            timeout_s=5, should_stop=lambda: time.monotonic() - start > 1.0,
        )  # fmt: skip
    assert result.stopped and time.monotonic() - start < 8
    assert result.records, "requests were sent before the stop"
    # Nothing in flight survives the stop: each request completed, or was cancelled and says so.
    assert all(r.success or r.error == CANCELLED for r in result.records)
    assert all(r.done_at is not None for r in result.records)


def test_a_timed_loop_told_to_stop_before_it_starts_says_so() -> None:
    """Stopped by the check before a send (not by the 50 ms watcher): still a stopped run, not a short one."""
    with instrument() as server:
        result = run_load_sync(
            server.url, [{"prompt": "x"}], endpoint="/v1/completions", concurrency=2, duration_s=30,
            timeout_s=5, should_stop=lambda: True,
        )  # fmt: skip
    assert result.stopped and result.records == []


# -- offline_throughput's plan and arithmetic --------------------------------------------------------------


def server_plan(env: dict[str, str] | None = None) -> LaunchPlan:
    argv = ("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8123", "--dtype", "bfloat16",
            "--max-num-seqs", "8", "--port=9", "--enforce-eager")  # fmt: skip
    env = env or {"VLLM_CPU_KVCACHE_SPACE": "2"}
    return LaunchPlan("vllm-upstream", argv, env, ReadyProbe("http://x", "tiny"))


def test_engine_args_are_the_servers_without_the_frontend() -> None:
    assert engine_args(server_plan(), seed=42) == [
        "--model", "/m", "--served-model-name", "tiny", "--dtype", "bfloat16", "--max-num-seqs", "8",
        "--enforce-eager", "--seed", "42",
    ]  # fmt: skip


def test_offline_plan_keeps_interpreter_and_environment(tmp_path: Path) -> None:
    import llmstack

    plan = offline_plan(server_plan(), tmp_path / "spec.json")
    spec = str(tmp_path / "spec.json")
    assert plan.argv == ("/venv/bin/python", "-m", "llmstack.phases.offline_process", "--spec", spec)
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    source_root = str(Path(llmstack.__file__).resolve().parent.parent)
    assert plan.env["PYTHONPATH"].split(os.pathsep)[0] == source_root
    assert plan.log_name == "offline.log" and "offline" in plan.engine


def test_the_offline_module_needs_only_the_standard_library_to_start() -> None:
    # The engine's interpreter may be a venv without llmstack's dependencies.
    probe = (
        "import sys, llmstack.phases.offline_process\n"
        "heavy = {'hydra', 'omegaconf', 'numpy', 'httpx', 'tokenizers', 'vllm', 'torch'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_throughput_result_counts_the_engines_tokens() -> None:
    raw = {"elapsed_time": 2.0, "num_requests": 3, "per_request_tokens": [[10, 5], [12, 5], [8, 4]],
           "load_s": 30.0, "warmup_s": 1.5, "warmup_requests": 2,
           "finish_reasons": {"length": 3}}  # fmt: skip
    result = throughput_result(raw)
    assert result["total_num_tokens"] == 44 and result["total_output_tokens"] == 14
    assert result["requests_per_second"] == 1.5 and result["tokens_per_second"] == 22.0
    assert result["output_tokens_per_second"] == 7.0
    assert result["input_lens"] == [10, 12, 8] and result["output_lens"] == [5, 5, 4]
    assert format_report(result).splitlines()[0] == (
        "Throughput: 1.50 requests/s, 22.00 total tokens/s, 7.00 output tokens/s"
    )
    assert throughput_result({**raw, "elapsed_time": 0.0})["requests_per_second"] is None


# -- running a batch process to completion -----------------------------------------------------------------


def batch_plan(code: str, mark: str, tmp_path: Path) -> LaunchPlan:
    return LaunchPlan(
        engine="batch", argv=(sys.executable, "-c", code), env={"LLMSTACK_TEST_MARK": mark},
        probe=ReadyProbe("http://unused", "unused"), shutdown_grace_s=2.0,
    )  # fmt: skip


def test_run_to_completion_returns_the_status_and_stops_what_it_left(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    # The process exits 3 and leaves a sleeping child behind in its group.
    code = "import subprocess, sys; subprocess.Popen(['sleep', '60']); print('bye'); sys.exit(3)"
    status, tail = run_to_completion(batch_plan(code, mark, tmp_path), tmp_path / "batch.log")
    assert status == 3 and tail == ["bye"]
    assert wait_no_processes(f"LLMSTACK_TEST_MARK={mark}", timeout=10) == []
    assert (tmp_path / "batch.log").read_text() == "bye\n"


def test_run_to_completion_times_out_and_stops_the_group(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    code = (
        "import subprocess, time; subprocess.Popen(['sleep', '60']); print('working', flush=True); "
        "time.sleep(60)"
    )
    start = time.monotonic()
    # 5 s, not less: the child must have started and printed before the timeout, even on a loaded machine.
    with pytest.raises(EngineError, match="had not finished after 5 s") as info:
        run_to_completion(batch_plan(code, mark, tmp_path), tmp_path / "batch.log", timeout_s=5.0)
    assert info.value.log_tail == ["working"]
    assert wait_no_processes(f"LLMSTACK_TEST_MARK={mark}", timeout=10) == []
    assert time.monotonic() - start < 20


def test_offline_phase_spec_from_a_composed_run(compose_cfg, tmp_path: Path) -> None:
    from llmstack.cli import CONFIG_DIR
    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.devices import Inventory
    from llmstack.engines import get_engine
    from llmstack.models.tiny import ensure_tiny_model
    from llmstack.phases.registry import prepare_phase
    from llmstack.results.rundir import RunDir

    ensure_tiny_model()
    cfg = compose_cfg(
        "device=cpu", "benchmark=offline_throughput", "benchmark.num_prompts=5",
        "benchmark.warmup_requests=2", "benchmark.input_len=20", "benchmark.seed=7",
    )  # fmt: skip
    run = resolve(to_run_config(cfg), Path(CONFIG_DIR), Inventory())
    plan = get_engine("vllm").plan(run)
    summary: dict = {}
    phase = prepare_phase(run, plan, RunDir(tmp_path), summary, save=lambda: None, enter=lambda _: None)
    spec = json.loads(json.dumps(phase.spec(tmp_path / "raw.json")))  # plain JSON for the other process
    assert len(spec["warmup"]["prompts"]) == 2 and len(spec["prompts"]) == 5 == len(spec["output_lens"])
    assert not set(spec["warmup"]["prompts"]) & set(spec["prompts"]), "warm-up prompts are not measured ones"
    assert spec["engine_args"][:2] == ["--model", run.model.path]
    assert spec["engine_args"][-2:] == ["--seed", "7"]
    assert "--port" not in spec["engine_args"] and spec["llm_class"] == "vllm:LLM"
    assert spec["sampling"] == {"temperature": 1.0, "top_p": 1.0, "ignore_eos": True}
    assert summary == {"name": "offline_throughput", "phase": "offline_throughput", "dataset": "random"}


def test_ctrl_c_while_running_to_completion_stops_the_group(tmp_path: Path) -> None:
    """What the offline phase relies on: Ctrl-C in the launcher reaches the batch process through teardown
    (the batch process has its own session, so the terminal's SIGINT would not reach it directly)."""
    import signal

    from tests.procs import processes_with_env

    mark = uuid.uuid4().hex
    launcher = (
        "import sys\n"
        "from pathlib import Path\n"
        "from llmstack.serving.plan import LaunchPlan, ReadyProbe\n"
        "from llmstack.serving.supervisor import run_to_completion\n"
        "child = (sys.executable, '-c', 'import time; time.sleep(60)')\n"
        f"env = {{'LLMSTACK_TEST_MARK': '{mark}'}}\n"
        "plan = LaunchPlan('batch', child, env, ReadyProbe('http://x', 'x'), shutdown_grace_s=2.0)\n"
        "try:\n"
        f"    run_to_completion(plan, Path({str(tmp_path / 'batch.log')!r}))\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, preexec_fn=sigint_by_default
    )
    try:
        deadline = time.monotonic() + 30
        while not processes_with_env(f"LLMSTACK_TEST_MARK={mark}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with_env(f"LLMSTACK_TEST_MARK={mark}"), "the batch process never started"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and out.strip() == "interrupted"
    assert wait_no_processes(f"LLMSTACK_TEST_MARK={mark}", timeout=10) == []


def test_ipex_low_bit_goes_to_the_llm_class_by_name() -> None:
    from llmstack.phases.offline_process import split_low_bit

    argv = ["--model", "/m", "--device", "xpu", "--load-in-low-bit", "fp8", "--dtype", "float16"]
    assert split_low_bit(argv) == (["--model", "/m", "--device", "xpu", "--dtype", "float16"], "fp8")
    assert split_low_bit(["--load-in-low-bit=sym_int4", "--model", "/m"]) == (["--model", "/m"], "sym_int4")
    assert split_low_bit(["--model", "/m"]) == (["--model", "/m"], None)


def test_ctrl_c_while_the_process_is_being_started_still_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrow window of the test above: Ctrl-C after the child's exec, before Popen returns."""
    import signal

    from llmstack.serving.supervisor import ServerProcess

    real_popen = subprocess.Popen

    def popen_then_ctrl_c(*args: object, **kwargs: object) -> subprocess.Popen:
        child = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        signal.raise_signal(signal.SIGINT)  # as if it landed right here
        return child

    monkeypatch.setattr("llmstack.serving.supervisor.subprocess.Popen", popen_then_ctrl_c)
    mark = uuid.uuid4().hex
    child = (sys.executable, "-c", "import time; time.sleep(60)")
    plan = LaunchPlan("batch", child, {"LLMSTACK_TEST_MARK": mark}, ReadyProbe("http://x", "x"),
                      shutdown_grace_s=2.0)  # fmt: skip
    # Ctrl-C raises KeyboardInterrupt here even if this suite was started with SIGINT ignored (`cmd &`).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), ServerProcess(plan, tmp_path / "batch.log"):
            pytest.fail("the body must not run")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert wait_no_processes(f"LLMSTACK_TEST_MARK={mark}", timeout=10) == []


@pytest.mark.parametrize(("input_len", "fits"), [(512, False), (448, True)])
def test_chat_prompts_are_checked_with_the_chat_template(
    compose_cfg, tmp_path: Path, input_len, fits
) -> None:
    """README's open-loop chat example: 512 prompt + 512 output tokens fit model=tiny's 1,024 as text, but
    the chat template adds tokens; vLLM then refused every request (min_tokens > clamped max_tokens). The
    phase counts the templated prompt before the first request and says what to change."""
    from llmstack.cli import CONFIG_DIR
    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.devices import Inventory
    from llmstack.engines import get_engine
    from llmstack.errors import ConfigError
    from llmstack.models.tiny import ensure_tiny_model
    from llmstack.phases.registry import prepare_phase
    from llmstack.results.rundir import RunDir

    ensure_tiny_model()
    cfg = compose_cfg(
        "device=cpu", "benchmark=online", "benchmark.endpoint=chat", f"benchmark.input_len={input_len}",
        "benchmark.num_prompts=4", "benchmark.warmup_requests=1",
    )  # fmt: skip
    run = resolve(to_run_config(cfg), Path(CONFIG_DIR), Inventory())
    plan = get_engine("vllm").plan(run)

    def prepare() -> object:
        return prepare_phase(run, plan, RunDir(tmp_path), {}, save=lambda: None, enter=lambda _: None)

    if fits:
        assert prepare() is not None
        return
    with pytest.raises(ConfigError, match="chat template") as info:
        prepare()
    assert info.value.key == "benchmark.input_len" and "engine.max_model_len=1024" in str(info.value)
    assert "benchmark.endpoint=completions" in str(info.value)
