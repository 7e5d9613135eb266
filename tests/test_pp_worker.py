"""engine=pp over HTTP: the pipeline's rank 0 serves the lightweight worker's API, with the same answers.

Real torchrun, real gloo, the tiny model split over 2 ranks (one layer each) and a 7-layer one over 3 ranks
(3, 2, 2). The lightweight worker's own API tests run unchanged against rank 0 (imported from
test_lightweight_integration: the official `openai` client, streaming, stop strings, errors, routes); then
the pipeline's answers are compared with a lightweight worker's for the same requests, sent concurrently
(greedy tokens, stop conditions, finish and stop reasons, usage, seeded sampling, the shape of every stream
event), and its stage figures are read from /info and /metrics. About 90 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmstack.models.tiny import Shape, ensure_tiny_model
from tests import test_lightweight_integration as lw
from tests.lightweight_worker import API_KEY, MARK_KEY, Worker, start_worker
from tests.procs import wait_no_processes

pytestmark = pytest.mark.integration

PP_OPTIONS = ("engine.pipeline_parallel_size=2", "engine.max_num_seqs=8", "engine.torch_threads=1")
SEVEN_LAYERS = Shape(num_hidden_layers=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """The pipeline (2 ranks); named `server` so that the lightweight worker's tests run against it."""
    yield from start_worker(tmp_path_factory, *PP_OPTIONS, engine="pp")


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """The pipeline feeding prompts 8 tokens a step (engine.prefill_chunk)."""
    yield from start_worker(tmp_path_factory, *PP_OPTIONS, "engine.prefill_chunk=8", engine="pp")


@pytest.fixture(scope="module")
def lightweight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(tmp_path_factory)


reference = lw.reference

# -- the lightweight worker's API tests, unchanged, against rank 0 -----------------------------------------
test_completion = lw.test_completion
test_completion_stream_matches_the_non_streamed_text = lw.test_completion_stream_matches_the_non_streamed_text
test_chat_uses_the_models_chat_template = lw.test_chat_uses_the_models_chat_template
test_chat_stream_with_usage = lw.test_chat_stream_with_usage
test_raw_stream_ends_with_done = lw.test_raw_stream_ends_with_done
test_stop_string_ends_with_stop = lw.test_stop_string_ends_with_stop
test_min_tokens_and_seed = lw.test_min_tokens_and_seed
test_bad_requests_get_4xx_and_an_error_body = lw.test_bad_requests_get_4xx_and_an_error_body
test_openai_client_sees_typed_errors = lw.test_openai_client_sees_typed_errors
test_ipex_llm_generate_routes = lw.test_ipex_llm_generate_routes
test_disconnect_aborts_and_metrics_count = lw.test_disconnect_aborts_and_metrics_count


def test_greedy_equals_generate_alone_and_in_a_shared_batch(
    request: pytest.FixtureRequest, reference: Any
) -> None:
    lw.test_greedy_equals_generate_alone_and_in_a_shared_batch("server", request, reference)


# -- the same answers as the lightweight worker ------------------------------------------------------------
REQUESTS: list[dict[str, Any]] = [
    {"prompt": "the quick brown fox", "max_tokens": 40, "ignore_eos": True},
    {"prompt": "a", "max_tokens": 7},  # EOS may end it: same place on both
    {"prompt": "one two three four five six seven eight nine ten " * 4, "max_tokens": 25},
    {"prompt": "stop strings", "max_tokens": 60, "ignore_eos": True, "stop": ["in", "er"]},
    {"prompt": "stop tokens", "max_tokens": 60, "ignore_eos": True},  # + a stop token id it generates
    {"prompt": "minimum", "max_tokens": 30, "min_tokens": 20},
    {"prompt": "seeded", "max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 11},
    {"prompt": "penalized", "max_tokens": 30, "temperature": 0, "repetition_penalty": 1.3,
     "frequency_penalty": 0.5, "ignore_eos": True},
    {"prompt": "hello " * 50, "max_tokens": 5, "ignore_eos": True},
]  # fmt: skip


def complete(worker: Worker, body: dict[str, Any]) -> dict[str, Any]:
    payload = {"model": "tiny", "temperature": 0, "return_token_ids": True, **body}
    response = worker.post("/v1/completions", payload)
    assert response.status_code == 200, response.text
    data = response.json()
    data.pop("id"), data.pop("created")
    return data


def answers(worker: Worker, requests: list[dict[str, Any]], concurrent: bool) -> list[dict[str, Any]]:
    if not concurrent:
        return [complete(worker, r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: complete(worker, r), requests))


@pytest.fixture(scope="module")
def mixed_requests(lightweight: Worker) -> list[dict[str, Any]]:
    """REQUESTS, the stop-token one stopping at the sixth token it would generate."""
    requests = [dict(r) for r in REQUESTS]
    stop_tokens = next(r for r in requests if r["prompt"] == "stop tokens")
    free_run = complete(lightweight, stop_tokens)["choices"][0]["token_ids"]
    stop_tokens["stop_token_ids"] = [free_run[5]]
    return requests


@pytest.mark.parametrize("pipeline", ["server", "chunked"])
@pytest.mark.parametrize("concurrent", [False, True], ids=["alone", "concurrent"])
def test_answers_equal_the_lightweight_workers(
    request: pytest.FixtureRequest,
    pipeline: str,
    lightweight: Worker,
    mixed_requests: list[dict[str, Any]],
    concurrent: bool,
) -> None:
    """Tokens, text, finish and stop reasons, usage: identical, request by request, whether each runs alone
    or all at once (then the pipeline spreads them over its micro-batches), prompts fed whole or in chunks."""
    server: Worker = request.getfixturevalue(pipeline)
    info = httpx.get(server.base_url + "/info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["extra"]["prefill_chunk"] == (8 if pipeline == "chunked" else 0)
    want = answers(lightweight, mixed_requests, concurrent)
    got = answers(server, mixed_requests, concurrent)
    for body, mine, theirs in zip(mixed_requests, got, want, strict=True):
        assert mine == theirs, f"{body}: pipeline {mine['choices']} vs lightweight {theirs['choices']}"
    reasons = {(a["choices"][0]["finish_reason"], type(a["choices"][0]["stop_reason"]).__name__) for a in got}
    assert {("stop", "str"), ("stop", "int"), ("length", "NoneType")} <= reasons, reasons


def test_seeded_sampling_repeats(server: Worker) -> None:
    body = {"prompt": "again", "max_tokens": 24, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    first, second = answers(server, [body, body], concurrent=True)
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    other = complete(server, {**body, "seed": 1235})
    assert other["choices"][0]["token_ids"] != first["choices"][0]["token_ids"]


def event_shape(value: Any) -> Any:
    """A stream event's structure: keys and value types, not the values (ids, times, texts differ)."""
    if isinstance(value, dict):
        return {k: event_shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [event_shape(v) for v in value]
    return type(value).__name__


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_events_have_the_lightweight_workers_shape(
    server: Worker, lightweight: Worker, route: str
) -> None:
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    body.update(
        {"prompt": "shape"} if "chat" not in route else {"messages": [{"role": "user", "content": "hi"}]}
    )

    def events(worker: Worker) -> list[Any]:
        text = worker.post(route, body).text
        data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(d) for d in data[:-1]]

    mine, theirs = events(server), events(lightweight)
    assert [event_shape(e) for e in mine] == [event_shape(e) for e in theirs]
    finishes = [e["choices"][0]["finish_reason"] for e in mine if e["choices"]]
    assert finishes == [e["choices"][0]["finish_reason"] for e in theirs if e["choices"]]
    assert mine[-1]["usage"] == theirs[-1]["usage"]


def test_info_and_metrics_describe_the_stages(server: Worker) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    info = httpx.get(server.base_url + "/info", headers=headers).json()
    assert info["model_impl"] == "pipeline" and info["device"] == "cpu"
    assert info["extra"]["stage_layers"] == [[0, 1], [1, 2]] and info["extra"]["micro_batches"] == 2
    assert info["max_batch_size"] == 16  # 8 per micro-batch x 2 micro-batches
    before = httpx.get(server.base_url + "/metrics").text
    answers(server, [{"prompt": "busy " * 20, "max_tokens": 30, "ignore_eos": True}] * 4, concurrent=True)
    after = httpx.get(server.base_url + "/metrics").text
    for stage in ("0", "1"):
        label = f'stage="{stage}"'
        grew = lw.metric(after, "pipeline_stage_busy_seconds_total", label) - lw.metric(
            before, "pipeline_stage_busy_seconds_total", label
        )
        assert grew > 0, f"stage {stage} reported no busy time"
    assert lw.metric(after, "pipeline_steps_total") > lw.metric(before, "pipeline_steps_total")
    assert lw.metric(after, "pipeline_micro_batches_in_flight") == 0


# -- three ranks, uneven split ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seven_layers() -> str:
    return str(ensure_tiny_model(shape=SEVEN_LAYERS))


def test_three_uneven_stages_answer_as_the_lightweight_worker(
    tmp_path_factory: pytest.TempPathFactory, seven_layers: str
) -> None:
    model = ("model=local", f"model.path={seven_layers}", "model.served_name=tiny")
    requests = REQUESTS[:4] + REQUESTS[6:7]
    workers = start_worker(tmp_path_factory, *model)
    single = next(workers)
    try:
        want = answers(single, requests, concurrent=True)
    finally:
        workers.close()
    three = ("engine.pipeline_parallel_size=3", "engine.torch_threads=1")
    pipelines = start_worker(tmp_path_factory, *model, *three, engine="pp")
    pipeline = next(pipelines)
    try:
        info = httpx.get(pipeline.base_url + "/info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert info["extra"]["stage_layers"] == [[0, 3], [3, 5], [5, 7]]
        assert info["extra"]["micro_batches"] == 3
        got = answers(pipeline, requests, concurrent=True)
    finally:
        pipelines.close()
    assert got == want


# -- through the launcher, with the online benchmark ---------------------------------------------------------
def test_cli_engine_pp_with_the_smoke_benchmark(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llmstack", "engine=pp", "device=cpu", "engine.port=0", "benchmark=smoke",
         f"results_dir={tmp_path / 'results'}", f"+engine.extra_env.{MARK_KEY}={mark}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = sorted((tmp_path / "results").glob("*/*/"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["engine"] == "pp-transformers"
    (level,) = summary["benchmark"]["levels"]
    assert level["completed"] == 16 and level["failed"] == 0 and level["output_throughput"] > 0
    result = json.loads((run_dir / "bench-c4" / "result.json").read_text())
    assert result["total_output_tokens"] == 16 * 32  # ignore_eos: exactly output_len tokens each
    command = (run_dir / "command.sh").read_text()
    assert "llmstack.workers.pipeline.torchrun" in command and "--nproc-per-node=2" in command
    log = (run_dir / "server.log").read_text()
    assert "[default1]:" in log and "rank 1 loaded layers 1-1" in log  # each rank's lines, tagged
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []
