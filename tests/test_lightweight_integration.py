"""The lightweight worker over HTTP, started and stopped through the supervisor like vLLM.

The official `openai` client talks to it (completions and chat, streaming and not); greedy output is
compared with `model.generate` token for token, alone and while other requests share the batch; bad
requests get 4xx with an OpenAI error body and the server keeps serving. One worker (the default, fused
decoder) serves most tests; a second one (model_impl=generic) the equality test; the end-to-end CLI test
starts its own. About 60 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmstack.models.tiny import ensure_tiny_model
from tests.lightweight_worker import API_KEY, MARK_KEY, Worker, start_worker
from tests.procs import wait_no_processes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(tmp_path_factory)


@pytest.fixture(scope="module")
def generic_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(tmp_path_factory, "engine.model_impl=generic")


@pytest.fixture(scope="module")
def reference():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(ensure_tiny_model())
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def greedy_reference(reference, prompt_ids: list[int], max_tokens: int) -> list[int]:
    import torch

    model, _ = reference
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


# -- the OpenAI API through the official client ----------------------------------------------------------
def test_completion(server: Worker) -> None:
    done = server.client().completions.create(
        model="tiny", prompt="hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.usage is not None and done.usage.completion_tokens == 12 and done.usage.prompt_tokens >= 2
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    assert done.model == "tiny" and done.object == "text_completion"


def test_completion_stream_matches_the_non_streamed_text(server: Worker) -> None:
    client = server.client()
    args = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**args, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len([c for c in chunks if c.choices]) >= 10, "tokens were not streamed one by one"


def test_chat_uses_the_models_chat_template(server: Worker, reference) -> None:
    _, tokenizer = reference
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    done = server.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0
    )
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert done.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason in ("length", "stop")
    assert done.object == "chat.completion"


def test_chat_stream_with_usage(server: Worker) -> None:
    stream = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content, "no content chunks"
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_raw_stream_ends_with_done(server: Worker) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    # One event per token that completes some text (a sampled byte token may not), the last one final.
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None} and 1 <= len(finishes) <= 3


def test_stop_string_ends_with_stop(server: Worker) -> None:
    client = server.client()
    args = {"model": "tiny", "prompt": "stop here", "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    done = client.completions.create(**args, stop=[stop], extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].text == full[: full.index(stop)]
    assert done.model_extra.get("choices") is None  # stop_reason travels inside the choice
    assert done.choices[0].model_extra["stop_reason"] == stop


def test_min_tokens_and_seed(server: Worker) -> None:
    client = server.client()
    args = {"model": "tiny", "prompt": "seeded", "max_tokens": 16, "temperature": 1.0, "seed": 5}
    first = client.completions.create(**args, extra_body={"min_tokens": 16})
    second = client.completions.create(**args, extra_body={"min_tokens": 16})
    assert first.usage.completion_tokens == 16
    assert first.choices[0].text == second.choices[0].text


# -- greedy equivalence with model.generate --------------------------------------------------------------
@pytest.mark.parametrize("worker_fixture", ["server", "generic_server"])
def test_greedy_equals_generate_alone_and_in_a_shared_batch(
    worker_fixture: str, request: pytest.FixtureRequest, reference
) -> None:
    worker: Worker = request.getfixturevalue(worker_fixture)
    _, tokenizer = reference
    prompt = "the model token server engine request latency throughput"
    prompt_ids = tokenizer(prompt)["input_ids"]
    want = greedy_reference(reference, prompt_ids, 40)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "return_token_ids": True}

    alone = worker.post("/v1/completions", body).json()
    assert alone["choices"][0]["prompt_token_ids"] == prompt_ids
    assert alone["choices"][0]["token_ids"] == want

    # Others stream long outputs (greedy and sampled, different prompt lengths) while the target runs.
    others = [
        {"prompt": "x " * 30, "temperature": 0},
        {"prompt": "hello", "temperature": 1.0, "seed": 3},
        {"prompt": "a much longer prompt " * 6, "temperature": 0.8, "top_p": 0.9, "top_k": 20},
    ]
    spans: list[tuple[float, float, int]] = []
    started = threading.Barrier(len(others) + 1, timeout=60)

    def stream_one(extra: dict) -> None:
        payload = {"model": "tiny", "max_tokens": 300, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}, **extra}  # fmt: skip
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.stream("POST", worker.base_url + "/v1/completions", json=payload, headers=headers,
                          timeout=120) as response:  # fmt: skip
            lines = response.iter_lines()
            first_at = None
            count = 0
            for line in lines:
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    count = usage["completion_tokens"] if usage else count
                    if first_at is None:
                        first_at = time.monotonic()
                        started.wait()
            spans.append((first_at or 0.0, time.monotonic(), count))

    threads = [threading.Thread(target=stream_one, args=(o,)) for o in others]
    for t in threads:
        t.start()
    started.wait()
    sent = time.monotonic()
    batched = worker.post("/v1/completions", body).json()
    answered = time.monotonic()
    for t in threads:
        t.join(120)
    assert batched["choices"][0]["token_ids"] == want
    assert len(spans) == len(others) and all(count == 300 for _, _, count in spans)
    assert all(first < sent and end > answered for first, end, _ in spans), "the requests did not overlap"


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "gpt-9"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "context length"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "12"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n > 1"),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "one prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 3}, 400, "min_"),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "text content"),
        ("/generate", {"inputs": 5}, 400, "inputs"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)  # fmt: skip
def test_bad_requests_get_4xx_and_an_error_body(
    server: Worker, path: str, body, status: int, fragment: str
) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.base_url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                          **kwargs)  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    # ... and the server keeps serving.
    ok = server.post("/v1/completions", {"model": "tiny", "prompt": "still there?", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_sees_typed_errors(server: Worker) -> None:
    import openai

    client = server.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "nope" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    assert too_long.value.status_code == 400
    unauthorized = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"


# -- the other routes --------------------------------------------------------------------------------------
def test_health_models_and_info(server: Worker) -> None:
    assert httpx.get(server.base_url + "/health").status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    info = httpx.get(server.base_url + "/info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["backend"] == "transformers" and info["model_impl"] == "fused" and info["device"] == "cpu"
    assert info["max_batch_size"] == 16 and info["max_model_len"] == 1024


def test_ipex_llm_generate_routes(server: Worker) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 5, "ignore_eos": True}}
    request_id, text = server.post("/generate", body).json()
    assert request_id and isinstance(text, str) and text
    response = server.post("/generate_stream", body)
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [c["choices"][0]["index"] for c in chunks] == list(range(len(chunks)))  # ipex-llm's counter
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    chat = server.post("/generate_stream", {**body, "req_type": "chat"}).text
    assert '"delta":{"role":"assistant","content":' in chat


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of /metrics, e.g. metric(text, "request_success_total", 'finished_reason="abort"')."""
    prefix = f'llmstack:{name}{{model_name="tiny"' + (f",{labels}" if labels else "") + "}"
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in /metrics")


def test_disconnect_aborts_and_metrics_count(server: Worker) -> None:
    aborted = 'finished_reason="abort"'
    aborts_before = metric(httpx.get(server.base_url + "/metrics").text, "request_success_total", aborted)
    payload = {"model": "tiny", "prompt": "go on", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=payload,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:  # fmt: skip
        for i, _ in enumerate(response.iter_lines()):
            if i > 4:
                break
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(server.base_url + "/metrics").text
        aborts = metric(text, "request_success_total", aborted)
        if (
            aborts > aborts_before and metric(text, "num_requests_running") == 0
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert aborts == aborts_before + 1, "the disconnected request was not aborted"
    assert metric(text, "num_requests_running") == 0
    assert metric(text, "generation_tokens_total") > 0
    assert metric(text, "prompt_tokens_total") > 0
    assert metric(text, "time_to_first_token_seconds_count") > 0
    assert metric(text, "time_to_first_token_seconds_bucket", 'le="+Inf"') > 0


def test_a_dead_model_process_fails_open_requests_and_ends_the_worker(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import signal

    workers = start_worker(tmp_path_factory)
    worker = next(workers)
    try:
        (model_pid,) = [
            pid
            for pid in children(worker.proc.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        payload = {"model": "tiny", "prompt": "go", "max_tokens": 900, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = worker.base_url + "/v1/completions"
        with httpx.stream("POST", url, json=payload, headers=headers, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(model_pid, signal.SIGKILL)
            rest = list(lines)
        assert any('"error"' in line and "model process exited" in line for line in rest), rest[-3:]
        worker.proc.proc.wait(timeout=30)
        assert worker.proc.proc.returncode == 1
    finally:
        workers.close()


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


# -- end to end through the CLI ----------------------------------------------------------------------------
def test_cli_engine_lightweight_with_the_smoke_benchmark(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llmstack", "engine=lightweight", "device=cpu", "engine.port=0",
         f"results_dir={tmp_path / 'results'}", f"+engine.extra_env.{MARK_KEY}={mark}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = sorted((tmp_path / "results").glob("*/*/"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["engine"] == "lightweight-transformers"
    (level,) = summary["benchmark"]["levels"]
    assert level["completed"] == 16 and level["failed"] == 0 and level["output_throughput"] > 0
    result = json.loads((run_dir / "bench-c4" / "result.json").read_text())
    assert (
        result["total_output_tokens"] == 16 * 32
    )  # ignore_eos: every request gave exactly output_len tokens
    assert "lightweight" in (run_dir / "command.sh").read_text()
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []
