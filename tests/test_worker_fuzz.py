"""Property-based fuzzing of the lightweight worker's API (hypothesis): whatever a client sends to any route,
the answer is never a 5xx other than 503 (overload), and the server still serves afterwards.

Bodies are of two kinds: arbitrary JSON (mostly refused by validation), and objects with the routes' own
field names holding values of any type and size (what reaches sampling, tokenizing and the model). Output
lengths are kept small so that the run stays within a minute on 2 cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lightweight_worker import API_KEY, Worker, start_worker

pytestmark = pytest.mark.integration

ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream")
FIELDS = (
    "model", "temperature", "top_p", "top_k", "seed", "n", "stream", "stream_options", "stop",
    "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs", "top_logprobs", "skip_special_tokens", "return_token_ids", "echo",
    "best_of", "suffix", "add_generation_prompt", "chat_template", "chat_template_kwargs", "user",
)  # fmt: skip

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
prompts = (
    st.text(max_size=200)
    | st.lists(st.integers(min_value=-5, max_value=1100), max_size=40)
    | st.lists(st.text(max_size=20), max_size=3)
    | values
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | values},
        optional={"content": st.text(max_size=100) | st.lists(values, max_size=3) | values},
    )
    | values,
    max_size=4,
)
small_counts = st.integers(min_value=-2, max_value=12) | values


good_messages = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=60)}),
    min_size=1,
    max_size=2,
)


@st.composite
def bodies(draw: st.DrawFn, route: str) -> object:
    """Arbitrary JSON, or the route's own fields: either well-formed (so that requests reach the model,
    with random extra fields) or holding any value."""
    if draw(st.integers(0, 4)) == 0:
        return draw(values)  # anything at all
    well_formed = draw(st.booleans())
    count = st.integers(min_value=1, max_value=8) if well_formed else small_counts
    body: dict[str, object] = {}
    if route == "/v1/completions":
        body["prompt"] = draw(st.text(min_size=1, max_size=80) if well_formed else prompts)
        body["max_tokens"] = draw(count)
    elif route == "/v1/chat/completions":
        body["messages"] = draw(good_messages if well_formed else messages)
        body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = draw(count)
    else:
        body["inputs"] = draw(
            st.text(min_size=1, max_size=80) if well_formed else st.text(max_size=100) | values
        )
        optional = {k: values for k in ("do_sample", "temperature", "top_k", "top_p", "stop", "seed")}
        parameters = st.fixed_dictionaries(
            {"max_new_tokens": count}, optional={} if well_formed else optional
        )
        body["parameters"] = draw(parameters if well_formed else parameters | values)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3 if well_formed else 6, unique=True)):
        body[name] = draw(values)
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server: Worker) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as c:
        yield c


@pytest.mark.parametrize("route", ROUTES)
def test_no_request_gets_a_server_error(server: Worker, client: httpx.Client, route: str) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies(route), cut=st.integers(0, 9))
    def one(body: object, cut: int) -> None:
        content = json.dumps(body)
        if cut == 0:  # a body cut in the middle
            content = content[: max(1, len(content) // 2)]
        response = client.post(route, content=content)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500 or response.status_code == 503, (body, response.text[:500])
        if response.status_code >= 400:
            assert "error" in response.json(), response.text[:300]

    one()
    assert sum(seen.values()) >= 300
    assert any(code == 200 for code in seen), f"nothing was ever served: {seen}"
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    done = client.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 3})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
