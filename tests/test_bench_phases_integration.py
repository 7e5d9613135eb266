"""Every benchmark phase end to end from the CLI, against real vLLM on CPU with the tiny model.

Slow: each run starts its own engine (30-60 s on 2 cores), and a run is what these tests check: the launcher,
the phase, the files it writes, its exit status, and that nothing is left running. About 5-6 minutes in all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.procs import processes_with_env, wait_no_processes

pytestmark = pytest.mark.integration

MARK_KEY = "LLMSTACK_TEST_MARK"


def launch(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen[str], str]:
    mark = uuid.uuid4().hex
    argv = [
        sys.executable, "-m", "llmstack", "device=cpu", "profile=cpu", "engine.port=0",
        f"results_dir={tmp_path / 'results'}", f"+engine.extra_env.{MARK_KEY}={mark}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMSTACK_NO_COMPOSE_CACHE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, mark


def finish(proc: subprocess.Popen[str], mark: str, timeout: float = 600) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=30) == [], "engine processes left running"
    return out, err


def the_run_dir(tmp_path: Path) -> Path:
    (rundir,) = sorted((tmp_path / "results").glob("*/*/"))
    return rundir


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def records(level_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (level_dir / "requests.jsonl").read_text().splitlines()]


def assert_token_counts_are_the_servers(level_dir: Path, count: int) -> dict[str, Any]:
    result = read_json(level_dir / "result.json")
    rows = records(level_dir)
    assert len(rows) == count and result["completed"] == count and result["failed"] == 0
    assert result["output_tokens_source_counts"] == {"usage": count}
    # ignore_eos + min_tokens: every request generated exactly what it asked for, as the server counted it.
    assert [r["completion_tokens"] for r in rows] == [r["expected_output_tokens"] for r in rows]
    assert result["total_output_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert result["total_input_tokens"] == sum(r["prompt_tokens"] for r in rows)
    return result


def test_online_open_loop_chat_sharegpt(tmp_path: Path) -> None:
    conversations = [
        {"conversations": [{"from": "human", "value": f"Question {i}: what is the colour of the sea today?"},
                           {"from": "gpt", "value": "It is blue and grey. " * (1 + i % 4)}]}
        for i in range(10)
    ]  # fmt: skip
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations))
    proc, mark = launch(
        tmp_path, "benchmark=online", "benchmark.endpoint=chat", "benchmark.dataset=sharegpt",
        f"benchmark.dataset_path={dataset}", "benchmark.request_rate=[4,16]", "benchmark.max_concurrency=3",
        "benchmark.num_prompts=10", "benchmark.warmup_requests=2", "benchmark.slo.e2el_ms=60000",
    )  # fmt: skip
    out, err = finish(proc, mark)
    assert proc.returncode == 0, err[-3000:]
    rundir = the_run_dir(tmp_path)
    summary = read_json(rundir / "summary.json")
    assert summary["status"] == "ok" and summary["benchmark"]["endpoint"] == "chat"
    assert [lvl["label"] for lvl in summary["benchmark"]["levels"]] == ["r4-c3", "r16-c3"]
    for label, rate in (("r4-c3", 4.0), ("r16-c3", 16.0)):
        result = assert_token_counts_are_the_servers(rundir / f"bench-{label}", 10)
        assert (result["request_rate"], result["max_concurrency"], result["burstiness"]) == (rate, 3, 1.0)
        assert result["endpoint_type"] == "openai-chat" and result["model_id"] == "tiny"
        assert result["max_concurrent_requests"] <= 3
        assert result["mean_client_queue_time_ms"] is not None  # open loop: measured separately
        assert result["request_goodput"] == result["request_throughput"]  # a one-minute SLO: all good
        assert result["llmstack"]["benchmark"]["dataset"] == "sharegpt"
        assert "Average first token latency" in (rundir / f"bench-{label}" / "report.txt").read_text()
    assert "All load levels" in out and (rundir / "benchmark.txt").is_file()
    assert "client queue time" in out and "goodput:" in out


def test_rps_with_wrk_side_by_side(tmp_path: Path) -> None:
    proc, mark = launch(
        tmp_path, "benchmark=rps", "benchmark.input_len=128", "benchmark.output_len=8",
        "benchmark.connections=2", "benchmark.duration_s=3", "benchmark.wrk_threads=1",
    )  # fmt: skip
    out, err = finish(proc, mark)
    assert proc.returncode == 0, err[-3000:]
    level = the_run_dir(tmp_path) / "bench-c2"
    rows = records(level)
    assert len(rows) >= 2 and all(r["success"] and not r["stream"] for r in rows)
    assert {(r["prompt_tokens"], r["completion_tokens"]) for r in rows} == {(128, 8)}
    result = read_json(level / "result.json")
    assert result["completed"] == len(rows) and result["mean_e2el_ms"] > 0
    rps = result["llmstack"]["rps"]
    assert rps["prompt_tokens"] == 128 and 0 < rps["completed_within_duration"] <= len(rows)
    lua = (level / "payload.lua").read_text()
    assert '"model":"tiny"' in lua and '"stream":false' in lua and '"max_tokens":8' in lua
    assert "requests/s (done in duration / duration)" in out
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed: only our client ran (the phase itself passed)")
    wrk = result["llmstack"]["wrk"]
    assert result["llmstack"]["wrk_error"] is None, result["llmstack"]["wrk_error"]
    assert wrk["requests"] > 0 and wrk["errors"] == 0 and set(wrk["latency_percentiles_s"]) == {
        "p50", "p75", "p90", "p99",
    }  # fmt: skip
    assert (level / "wrk.txt").read_text().startswith("wrk -t1 -c2 -d3s")


def tiny_png(width: int = 2, height: int = 2) -> bytes:
    """A valid RGB PNG from zlib alone: no imaging library, no download."""
    pixels = (bytes([x * 90, y * 90, 200]) for y in range(height) for x in range(width))
    flat = b"".join(pixels)
    rows = b"".join(b"\x00" + flat[y * width * 3 : (y + 1) * width * 3] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_multimodal_on_a_text_only_model_is_a_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(tiny_png())
    proc, mark = launch(
        tmp_path, "benchmark=multimodal", f"benchmark.image={image}", "benchmark.output_len=8"
    )
    _, err = finish(proc, mark)
    assert proc.returncode == 4, err[-3000:]
    # vLLM's own shutdown noise is echoed under "[engine]"; llmstack itself prints no traceback.
    ours = [line for line in err.splitlines() if not line.lstrip().startswith("[engine]")]
    assert not [line for line in ours if "Traceback" in line]
    message = [line for line in err.splitlines() if line.startswith("llmstack:")]
    assert len(message) == 1
    # Ours, and the server's own words.
    assert "did not take an image request for model 'tiny'" in message[0]
    assert "HTTP 400" in message[0] and "not a multimodal model" in message[0]
    summary = read_json(the_run_dir(tmp_path) / "summary.json")
    assert summary["status"] == "failed" and summary["phase"] == "benchmark"
    assert "not a multimodal model" in summary["error"]


def test_offline_throughput_starts_no_server(tmp_path: Path) -> None:
    proc, mark = launch(
        tmp_path, "benchmark=offline_throughput", "benchmark.num_prompts=12", "benchmark.warmup_requests=2",
        "benchmark.input_len=48", "benchmark.output_len=12", "benchmark.range_ratio=0.25",
    )  # fmt: skip
    out, err = finish(proc, mark)
    assert proc.returncode == 0, err[-3000:]
    rundir = the_run_dir(tmp_path)
    assert not (rundir / "server.log").exists(), "a server was started"
    assert (rundir / "offline.log").is_file() and "[offline] model loaded" in err
    result = read_json(rundir / "result.json")
    assert result["num_requests"] == 12
    # Counted from the engine's outputs: exactly the dataset's lengths (exact prompts, ignore_eos).
    assert result["output_lens"] == result["expected_output_lens"]
    assert result["input_lens"] == result["expected_input_lens"]
    assert len(set(result["output_lens"])) > 1, "range_ratio spreads the lengths"
    assert result["total_num_tokens"] == sum(result["input_lens"]) + sum(result["output_lens"])
    assert result["tokens_per_second"] == pytest.approx(result["total_num_tokens"] / result["elapsed_time"])
    assert result["warmup_requests"] == 2 and result["finish_reasons"] == {"length": 12}
    assert out.startswith("Throughput: ") and "requests/s" in out and "output tokens/s" in out
    summary = read_json(rundir / "summary.json")
    assert summary["status"] == "ok" and "ready_s" not in summary
    assert summary["benchmark"]["result"]["num_requests"] == 12


def engine_groups(mark: str) -> set[int]:
    groups = set()
    for pid in processes_with_env(f"{MARK_KEY}={mark}"):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    return groups


def test_server_killed_mid_run_leaves_partial_results(tmp_path: Path) -> None:
    proc, mark = launch(
        tmp_path, "benchmark=smoke", "benchmark.concurrency=[2]", "benchmark.duration_s=120",
        "benchmark.output_len=64",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        log: Path | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list((tmp_path / "results").glob("*/*/llmstack.log"))
            log = logs[0] if logs else None
            if log is not None and "benchmark c2:" in log.read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(3)  # some requests done, some in flight
        groups = engine_groups(mark)
        assert groups, "no engine process found"
        killed_at = time.monotonic()
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        _, err = finish(proc, mark, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    assert time.monotonic() - killed_at < 60, "the benchmark ran on against a dead server"
    assert "failed during load level c2" in err and "marked cut short" in err
    rundir = the_run_dir(tmp_path)
    summary = read_json(rundir / "summary.json")
    assert summary["status"] == "failed" and summary["phase"] == "benchmark"
    (level,) = summary["benchmark"]["levels"]
    assert level["label"] == "c2" and level["completed"] >= 1 and level["failed"] >= 1
    assert level["complete"] is False and level["output_throughput"] is None
    result = read_json(rundir / "bench-c2" / "result.json")
    assert result["failed"] == level["failed"] and sum(result["error_counts"].values()) == result["failed"]
    assert result["duration"] < 100
    rows = records(rundir / "bench-c2")
    assert sum(not r["success"] for r in rows) == result["failed"]
