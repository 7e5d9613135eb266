"""Property-based fuzzing of the lightweight worker's API (hypothesis): whatever a client sends to any route,
the answer is never a 5xx other than 503 (overload), a stream that starts ends well, and the server still
serves afterwards.

Bodies are of three kinds: arbitrary JSON (mostly refused by validation); the routes' own fields holding
values of any type; and well-formed requests whose fields hold values of the right type drawn toward the
edges (seeds past 64 bits, token ids around the vocabulary's ends, stop lists, penalties at their bounds,
infinities), which is what reaches templating, tokenizing, sampling and the model. The generation is
derandomized, so that a failure repeats, and not shrunk: shrinking replays examples against a server
whose state the failing one may have changed (a wedged loop answers nothing). Output lengths are kept
small, so that the run stays within about a minute on 2 cores.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.lightweight_worker import API_KEY, Worker, start_worker

pytestmark = pytest.mark.integration

VOCAB = 1024  # the tiny model's
EXAMPLES = 500  # per route: about 15 s for all four on 2 cores
ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream")
OPENAI_ROUTES = ROUTES[:2]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-3, max_value=1100)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def edgy(valid: st.SearchStrategy, edge: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values the server takes (three in four), sometimes values at or past its bounds."""
    return st.integers(0, 3).flatmap(lambda i: edge if i == 0 else valid)


# Values of the right type, toward the edges of what the server takes.
token_ids = edgy(st.integers(0, VOCAB - 1), st.integers(-3, -1) | st.integers(VOCAB - 2, VOCAB + 3))
huge_ints = st.integers(min_value=-(2**66), max_value=2**66)
unit_float_edges = st.sampled_from([-0.5, 0.0, 1e-300, 5e-324, 2.5, float("inf")])
small_texts = st.text(max_size=12)
typed_fields: dict[str, st.SearchStrategy] = {
    "temperature": edgy(st.floats(0.0, 2.0), unit_float_edges),
    "top_p": edgy(st.floats(0.01, 1.0), unit_float_edges),
    "top_k": edgy(st.integers(-1, VOCAB + 2), huge_ints),
    "seed": edgy(st.integers(-(2**63), 2**63 - 1), huge_ints | st.sampled_from([2**63, -(2**63) - 1, 2**64])),
    "stop": edgy(small_texts | st.lists(small_texts, max_size=4), st.lists(small_texts, max_size=8)),
    "stop_token_ids": st.lists(token_ids, max_size=4),
    "ignore_eos": st.booleans(),
    "min_tokens": edgy(st.integers(0, 3), st.integers(-1, 10)),
    "presence_penalty": edgy(st.floats(-2.0, 2.0), st.floats(-3.0, 3.0)),
    "frequency_penalty": edgy(st.floats(-2.0, 2.0), st.floats(-3.0, 3.0)),
    "repetition_penalty": edgy(st.floats(0.5, 2.0), st.sampled_from([0.0, 1e-308, 1e308, float("inf")])),
    "skip_special_tokens": st.booleans(),
    "return_token_ids": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    ),
    "n": edgy(st.just(1), st.integers(0, 3)),
    "logprobs": edgy(st.none(), st.integers(0, 2)),
    "echo": edgy(st.just(False), st.just(True)),
    "best_of": edgy(st.just(1), st.integers(0, 3)),
    "suffix": edgy(st.none(), small_texts),
    "user": small_texts,
    "add_generation_prompt": st.booleans(),
    # Refused unless the server trusts request templates (it does not here).
    "chat_template": small_texts,
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(
            ["chat_template", "tokenize", "add_generation_prompt", "continue_final_message", "tools", "x"]
        ),
        values,
        max_size=3,
    ),
}
FIELDS = tuple(typed_fields)
prompts = edgy(
    st.text(min_size=1, max_size=80) | st.lists(token_ids, min_size=1, max_size=40),
    st.text(max_size=2)
    | st.lists(st.text(max_size=20), max_size=3)
    | st.lists(st.lists(token_ids), max_size=2),
)
contents = edgy(st.text(max_size=60), st.none()) | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": small_texts}),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": edgy(st.just("user"), st.sampled_from(["assistant", "system", "tool", ""]))},
        optional={"content": contents},
    ),
    min_size=1,
    max_size=4,
)
output_lengths = edgy(st.integers(1, 8), st.integers(-1, 0))


@st.composite
def bodies(draw: st.DrawFn, route: str) -> object:
    kind = draw(st.sampled_from(["any", "any-values", "typed", "typed", "typed"]))
    if kind == "any":
        return draw(values)
    typed = kind == "typed"
    body: dict[str, object] = {}
    if route == "/v1/completions":
        body["prompt"] = draw(prompts if typed else values)
        body["max_tokens"] = draw(output_lengths if typed else values)
    elif route == "/v1/chat/completions":
        body["messages"] = draw(messages if typed else values)
        body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = draw(
            output_lengths if typed else values
        )
    else:
        inputs = edgy(st.text(min_size=1, max_size=80), st.just("") | values)
        body["inputs"] = draw(inputs if typed else values)
        names = ("do_sample", "temperature", "top_k", "top_p", "stop", "seed", "repetition_penalty")
        parameters = {name: draw(typed_fields.get(name, st.booleans())) for name in draw(
            st.lists(st.sampled_from(names), max_size=3, unique=True)
        )}  # fmt: skip
        parameters["max_new_tokens"] = draw(output_lengths)
        body["parameters"] = parameters if typed else draw(values)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[name] = draw(typed_fields[name] if typed else values)
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server: Worker) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    # The tiny model answers in milliseconds: a request it has not answered in 30 s never will be.
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as c:
        yield c


def check_stream(route: str, text: str) -> None:
    """A stream that began with 200 ends as a stream should: no error event, [DONE] on OpenAI routes."""
    assert '"error"' not in text and '"finish_reason":"error"' not in text, text[-500:]
    if route in OPENAI_ROUTES:
        assert text.endswith("data: [DONE]\n\n"), text[-500:]


@pytest.mark.parametrize("route", ROUTES)
def test_no_request_gets_a_server_error(server: Worker, client: httpx.Client, route: str) -> None:
    seen: dict[int, int] = {}
    examples = itertools.count()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),
    )
    @given(body=bodies(route))
    def one(body: object) -> None:
        content = json.dumps(body)
        if next(examples) % 10 == 0:  # one body in ten cut in the middle
            content = content[: max(1, len(content) // 2)]
        response = client.post(route, content=content)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500 or response.status_code == 503, (body, response.text[:500])
        if response.status_code >= 400:
            assert "error" in response.json(), response.text[:300]
        elif response.headers.get("content-type", "").startswith("text/event-stream"):
            check_stream(route, response.text)

    one()
    assert sum(seen.values()) >= EXAMPLES
    assert seen.get(200, 0) >= EXAMPLES // 10, f"too little was served to test the model's side: {seen}"
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    done = client.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 3})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
