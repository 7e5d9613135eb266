"""Hostile and careless requests against the lightweight worker: each gets a clear 4xx (or the work it asked
for), and the server keeps serving. A real worker on the tiny model, started through the supervisor; the
official `openai` client where it fits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.lightweight_worker import API_KEY, Worker, start_worker

pytestmark = pytest.mark.integration

# The tiny model's vocabulary and context.
VOCAB = 1024
CONTEXT = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # A short stall timeout, so that the stalled-loop test need not wait a minute.
    yield from start_worker(tmp_path_factory, "engine.stall_timeout_s=3")


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker that takes many long stop strings (its requests to the model process are a megabyte),
    prompts of millions of characters (seconds of tokenizing) and the chat templates requests bring."""
    yield from start_worker(
        tmp_path_factory,
        "engine.max_stop_strings=2000",
        "engine.max_stop_string_chars=2000",
        "engine.max_prompt_chars=50000000",
        "engine.trust_request_chat_template=true",
    )


# A token id that the model process's embedding cannot take, as if it were out of its vocabulary: a
# sitecustomize in the worker's processes swaps it for one past the embedding's rows inside the fused
# backend's prefill, after the prefill has taken its KV slots (how an out-of-vocabulary id used to fail).
POISON = 999
POISONED_PREFILL = f"""
from llmstack.workers.backends import fused

_prefill = fused.FusedDecoderBackend.prefill


def prefill(self, seq_ids, prompts):
    prompts = [[self.vocab_size + 4000 if t == {POISON} else t for t in p] for p in prompts]
    return _prefill(self, seq_ids, prompts)


fused.FusedDecoderBackend.prefill = prefill
"""


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    site = tmp_path_factory.mktemp("poison")
    (site / "sitecustomize.py").write_text(POISONED_PREFILL)
    from llmstack.engines.base import source_first_pythonpath

    # extra_env replaces the PYTHONPATH the engine's plan sets: keep the checkout first on it.
    pythonpath = source_first_pythonpath(str(site))
    yield from start_worker(
        tmp_path_factory, "engine.model_impl=fused", f"+engine.extra_env.PYTHONPATH={pythonpath}"
    )


def completion(worker: Worker, **body: object) -> httpx.Response:
    return worker.post("/v1/completions", {"model": "tiny", "max_tokens": 4, **body})


def assert_serving(worker: Worker) -> None:
    assert httpx.get(worker.base_url + "/health", timeout=10).status_code == 200
    done = completion(worker, prompt="still serving", temperature=0, ignore_eos=True)
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] == 4


def error_of(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


@functools.cache
def tiny_tokenizer():  # the worker's own, for what the tests expect of it
    from transformers import AutoTokenizer

    from llmstack.models.tiny import ensure_tiny_model

    return AutoTokenizer.from_pretrained(str(ensure_tiny_model()))


def concurrently(send: Callable[[dict], httpx.Response], bodies: list[dict]) -> list[httpx.Response]:
    """`send(body)` for every body at once, one thread each; the responses in the bodies' order."""
    responses: list[httpx.Response | None] = [None] * len(bodies)

    def one(i: int) -> None:
        responses[i] = send(bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert None not in responses
    return responses  # type: ignore[return-value]


@contextlib.contextmanager
def health_latencies(worker: Worker) -> Iterator[list[float]]:
    """/health polled for as long as the block runs: how long each answer took."""
    latencies: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            started = time.monotonic()
            httpx.get(worker.base_url + "/health", timeout=60)
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield latencies
    finally:
        stop.set()
        watcher.join()


# -- item 10: sizes ----------------------------------------------------------------------------------------
def test_a_megabyte_of_stop_strings_is_refused_and_the_server_keeps_serving(server: Worker) -> None:
    stops = ["x" * 1000 + str(i) for i in range(1000)]
    response = completion(server, prompt="hello", stop=stops)
    assert response.status_code == 400
    assert "stop" in error_of(response) and "at most 4" in error_of(response)
    long_stop = completion(server, prompt="hello", stop=["y" * 5000])
    assert long_stop.status_code == 400 and "1024 characters" in error_of(long_stop)
    assert_serving(server)


def test_a_megabyte_request_reaches_the_model_process(roomy: Worker) -> None:
    """Where the limits allow it, a message of any size goes down the pipe to the model process."""
    stops = ["x" * 1000 + str(i) for i in range(1000)]
    response = completion(roomy, prompt="hello", stop=stops, temperature=0, ignore_eos=True)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    assert_serving(roomy)


def test_an_oversized_body_gets_413(server: Worker) -> None:
    body = b'{"model": "tiny", "prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(server.base_url + "/v1/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == 413
    assert "bytes" in error_of(response)
    assert_serving(server)


def test_a_huge_prompt_is_refused_before_it_is_tokenized_and_health_stays_prompt(server: Worker) -> None:
    with health_latencies(server) as latencies:
        response = completion(server, prompt="word " * 2_000_000)  # 10 MB of text
    assert response.status_code == 400 and "characters" in error_of(response)
    # Only parsing the body holds the loop (a fraction of a second, more on a loaded box); tokenizing the
    # prompt there took about 10 s.
    assert max(latencies) < 3.0, f"/health took {max(latencies):.2f} s while the prompt was handled"
    assert_serving(server)


def test_a_huge_list_of_token_ids_is_refused_and_health_stays_prompt(server: Worker) -> None:
    with health_latencies(server) as latencies:
        response = completion(server, prompt=[5] * 3_000_000)  # 9 MB of JSON
    assert response.status_code == 400 and "context" in error_of(response)
    assert max(latencies) < 3.0, f"/health took {max(latencies):.2f} s while the prompt was handled"
    assert_serving(server)


def test_a_long_prompt_is_tokenized_off_the_event_loop(roomy: Worker) -> None:
    """A prompt within the character limit but seconds of tokenizing: /health and the other streams do not
    wait for it."""
    started = time.monotonic()
    with health_latencies(roomy) as latencies:
        response = completion(roomy, prompt="word " * 1_000_000)  # 5 MB of text, two million tokens
    took = time.monotonic() - started
    assert response.status_code == 400 and "context length" in error_of(response)
    # Relative to the request's own time, which a busy machine stretches as much: on the event loop,
    # tokenizing held /health for all of it.
    assert max(latencies) < took / 2, f"/health took {max(latencies):.2f} s of the request's {took:.2f} s"
    assert_serving(roomy)


# -- item 11: ids and seeds --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": [1, 2, VOCAB + 3976]}, f"Token id {VOCAB + 3976} is out of vocabulary"),
        ({"prompt": [1, -5]}, "Token id -5 is out of vocabulary"),
        ({"prompt": "hi", "stop_token_ids": [VOCAB]}, f"Token id {VOCAB} is out of vocabulary"),
        ({"prompt": "hi", "seed": 2**63}, "seed"),
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ],
    ids=["prompt-id", "negative-id", "stop-token-id", "seed-too-big", "seed-too-small"],
)
def test_bad_ids_and_seeds_get_400(server: Worker, body: dict, message: str) -> None:
    response = completion(server, **body)
    assert response.status_code == 400, response.text
    assert message in error_of(response)


def test_many_bad_requests_at_once_do_not_wedge_the_server(server: Worker) -> None:
    bodies = [{"prompt": [1, VOCAB + i]} for i in range(16)] + [{"prompt": "hi", "seed": 2**64}] * 16
    results: list[int] = []

    def send(body: dict) -> None:
        results.append(completion(server, **body).status_code)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [400] * len(bodies)
    # Every slot is still free: a full batch of good requests is served.
    oks: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: oks.append(completion(server, prompt="x", ignore_eos=True).status_code)
        )
        for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert oks == [200] * 16
    assert_serving(server)


def test_a_request_the_model_fails_on_fails_alone_and_frees_its_slot(poisoned: Worker) -> None:
    """A batch's worth of requests whose prefill fails inside the model, sent with as many good ones: each
    bad one gets its error, every good one its tokens, and no KV slot stays taken."""
    slots = 16  # the worker's max_batch_size
    bad = {"prompt": [1, POISON, 7]}
    good = {"prompt": [1, 7, 8], "ignore_eos": True, "temperature": 0}
    responses = concurrently(lambda body: completion(poisoned, **body), [bad] * slots + [good] * slots)
    for response in responses[:slots]:
        assert response.status_code == 500 and "IndexError" in error_of(response), response.text
    for response in responses[slots:]:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    again = concurrently(lambda body: completion(poisoned, **body), [good] * slots)
    assert [r.status_code for r in again] == [200] * slots
    assert_serving(poisoned)


def test_a_stalled_model_loop_makes_health_fail_and_recover(server: Worker) -> None:
    """The model process stops making progress (SIGSTOP) while a request is open: /health says 503 once
    the stall timeout has passed, and 200 again when the loop moves."""
    import psutil

    worker_pid = server.proc.pid
    (model,) = [p for p in psutil.Process(worker_pid).children() if "spawn_main" in " ".join(p.cmdline())]
    results: list[int] = []
    os.kill(model.pid, signal.SIGSTOP)
    try:
        sender = threading.Thread(
            target=lambda: results.append(completion(server, prompt="waiting", ignore_eos=True).status_code)
        )
        sender.start()
        deadline = time.monotonic() + 20
        status = 200
        while time.monotonic() < deadline and status == 200:
            time.sleep(0.25)
            status = httpx.get(server.base_url + "/health", timeout=10).status_code
        assert status == 503
        body = httpx.get(server.base_url + "/health", timeout=10).json()
        assert "no progress" in body["error"]["message"]
    finally:
        os.kill(model.pid, signal.SIGCONT)
    sender.join(30)
    assert results == [200]
    assert_serving(server)


# -- item 12: templates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["field", "kwargs"])
def test_a_request_supplied_chat_template_is_refused(server: Worker, where: str) -> None:
    template = "{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}"
    body: dict = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if where == "field":
        body["chat_template"] = template
    else:
        body["chat_template_kwargs"] = {"chat_template": template}
    started = time.monotonic()
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 400 and "trust_request_chat_template" in error_of(response)
    assert time.monotonic() - started < 5
    assert_serving(server)


def test_a_trusted_request_template_runs_off_the_event_loop(roomy: Worker) -> None:
    """Where the server trusts request templates, a slow one (a nested loop: seconds) holds neither /health
    nor other requests, however short the conversation it renders."""
    template = (
        "{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template": template}  # fmt: skip
    started = time.monotonic()
    with health_latencies(roomy) as latencies:
        response = roomy.post("/v1/chat/completions", body)
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    # What the request's template renders: no role markers.
    expected = tiny_tokenizer()("<s>hi", add_special_tokens=False)["input_ids"]
    assert response.json()["usage"]["prompt_tokens"] == len(expected)
    assert max(latencies) < took / 2, f"/health took {max(latencies):.2f} s of the request's {took:.2f} s"
    assert_serving(roomy)


# -- item 13: parity with vLLM -----------------------------------------------------------------------------
def test_the_auth_scheme_is_case_insensitive(server: Worker) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = httpx.get(
            server.base_url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=10
        )
        assert response.status_code == 200, scheme
    wrong = httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401


@pytest.mark.parametrize("stop", [None, ["never in the text"]], ids=["text-by-server", "text-by-model"])
def test_an_output_cut_inside_a_character_has_no_replacement_character(server: Worker, stop: object) -> None:
    """One sampled token each: an eighth of the tiny vocabulary is a lone byte of a longer character. vLLM
    emits nothing for such bytes; the text never ends in U+FFFD. Both places that make text are tried:
    the server process (no stop strings) and the model process (stop strings)."""
    tokenizer = tiny_tokenizer()
    incomplete = {i for i in range(VOCAB) if tokenizer.decode([i]).endswith("\ufffd")}
    client = server.client()
    cut = 0
    for seed in range(40):
        choice = client.completions.create(
            model="tiny", prompt="hello", max_tokens=1, temperature=1.0, seed=seed, stop=stop,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        ).choices[0]  # fmt: skip
        assert not choice.text.endswith("\ufffd"), (seed, choice)
        cut += choice.model_extra["token_ids"][-1] in incomplete
    assert cut > 0, "no output ended inside a character: the test showed nothing"


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-string", "empty-list"])
def test_an_empty_prompt_gets_400(server: Worker, prompt: object) -> None:
    response = completion(server, prompt=prompt)
    assert response.status_code == 400 and "empty" in error_of(response)


def test_without_max_tokens_a_long_prompt_is_clamped_to_the_context(server: Worker) -> None:
    prompt = [1] + [5] * (CONTEXT - 3)  # leaves room for 2 tokens
    response = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "ignore_eos": True})
    assert response.status_code == 200, response.text
    choice, usage = response.json()["choices"][0], response.json()["usage"]
    assert usage["completion_tokens"] == 2 and choice["finish_reason"] == "length"
    # Asked for explicitly, the same is still the client's mistake.
    explicit = completion(server, prompt=prompt, max_tokens=16)
    assert explicit.status_code == 400
