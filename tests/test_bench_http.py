"""The benchmark HTTP client against a scripted server on loopback.

The server writes exactly the bytes a test scripts, with pauses in between, so that SSE events split across
TCP reads, several events in one read, early closes and error bodies are all exercised for real.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from time import perf_counter

import pytest

from llmstack.bench import http
from llmstack.bench.http import (
    HttpConnection,
    RawResponse,
    parse_url,
    post_once,
    prepare_request,
)
from llmstack.bench.openai import apply_sse_events, error_text
from llmstack.bench.records import RequestRecord

pytestmark = pytest.mark.timeout(30)


LIVE_PATHS = ["llhttp-kernel-stamps", "llhttp-asyncio-transport", "python-kernel-stamps"]


@pytest.fixture(autouse=True, params=LIVE_PATHS)
def live_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with each live framing parser (llhttp through httptools, the pure-Python fallback) and
    each way of reading sockets (kernel-stamped reads, asyncio's transport)."""
    framing, _, reads = request.param.partition("-")
    if framing == "llhttp" and http.httptools is None:
        pytest.skip("httptools is not installed")
    if reads == "kernel-stamps" and http._SO_TIMESTAMPNS is None:
        pytest.skip("no SO_TIMESTAMPNS here")
    monkeypatch.setattr(http, "_USE_LLHTTP", framing == "llhttp")
    monkeypatch.setattr(http, "_USE_KERNEL_STAMPS", reads == "kernel-stamps")
    return request.param


# A script step: bytes to write, a pause in seconds, or CLOSE.
CLOSE = object()
Step = bytes | float | object
# (connection number, request number on that connection, request bytes) -> steps
Script = Callable[[int, int, bytes], list[Step]]


@dataclass
class ServerLog:
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    # Just before each write, and after it was drained: the client's stamp of bytes lies in between, the
    # kernel's receive time (kernel-stamped reads) possibly before the drain finished.
    write_starts: list[float] = field(default_factory=list)
    write_times: list[float] = field(default_factory=list)


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[str, ServerLog]]:
    log = ServerLog()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        connection = log.connections
        log.connections += 1
        try:
            for number in range(1000):
                request = await _read_request(reader)
                if request is None:
                    return
                log.requests.append(request)
                for step in script(connection, number, request):
                    if step is CLOSE:
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        log.write_starts.append(perf_counter())
                        writer.write(step)  # type: ignore[arg-type]
                        await writer.drain()
                        log.write_times.append(perf_counter())
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def completion_event(text: str, finish: str | None = None) -> bytes:
    return sse({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


USAGE_EVENT = sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
DONE_EVENT = b"data: [DONE]\n\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
)
END_CHUNKS = b"0\r\n\r\n"
PAUSE = 0.03  # long enough for the client to see two separate reads


def json_response(obj: object, status: str = "200 OK", extra: bytes = b"") -> bytes:
    body = json.dumps(obj).encode()
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


COMPLETION_BODY = {
    "choices": [{"index": 0, "text": "hello world", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}
STREAM_PAYLOAD = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
PLAIN_PAYLOAD = {"model": "m", "prompt": "hi", "max_tokens": 2}


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_chunked_sse_split_and_merged_reads_with_usage_and_done() -> None:
    first, second, third = completion_event("a"), completion_event("b"), completion_event("c", "length")

    def script(conn: int, n: int, request: bytes) -> list[Step]:
        framed = chunk(second)
        return [
            SSE_HEAD + chunk(first[:9]),  # the first event is split across two reads...
            PAUSE,
            chunk(first[9:]),
            PAUSE,
            framed[:4],  # ...and the second is split inside the chunked framing itself
            PAUSE,
            framed[4:],
            PAUSE,
            chunk(third) + chunk(USAGE_EVENT) + chunk(DONE_EVENT) + END_CHUNKS,  # several events in one read
        ]

    async def main() -> tuple[RequestRecord, ServerLog]:
        async with scripted_server(script) as (url, log):
            record = await post_once(url + "/v1/completions", STREAM_PAYLOAD, timeout_s=5)
        return record, log

    record, log = run(main())
    assert record.success, record.error
    assert record.http_status == 200
    assert record.output_text == "abc"
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)
    assert record.finish_reason == "length"
    assert len(record.chunk_times) == 3
    assert record.first_content_at == record.chunk_times[0]
    # Each event is stamped when its last byte arrived: after the write that completed it.
    assert record.chunk_times[0] >= log.write_starts[1]
    assert record.chunk_times[1] >= log.write_starts[3]
    assert record.chunk_times[0] < log.write_starts[2]
    # Events that arrived in one read share one timestamp.
    assert record.chunk_times[2] >= log.write_starts[4]
    assert record.done_at is not None and record.done_at >= record.chunk_times[2]
    assert record.sent_at is not None and record.sent_at < record.chunk_times[0]


def test_events_inside_one_large_chunk_are_stamped_as_their_bytes_arrive() -> None:
    body = completion_event("a") + completion_event("b") + DONE_EVENT
    framed = chunk(body)
    cut = len(framed) - 20  # inside the second event

    def script(conn: int, n: int, request: bytes) -> list[Step]:
        return [SSE_HEAD + framed[:cut], PAUSE, framed[cut:] + END_CHUNKS]

    async def main() -> tuple[RequestRecord, ServerLog]:
        async with scripted_server(script) as (url, log):
            record = await post_once(url + "/v1/completions", STREAM_PAYLOAD, timeout_s=5)
        return record, log

    record, log = run(main())
    assert record.success, record.error
    assert record.output_text == "ab"
    assert log.write_starts[0] <= record.chunk_times[0] < log.write_starts[1] <= record.chunk_times[1]


def test_chat_role_only_and_empty_chunks_do_not_count_and_crlf_events() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    hello = {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    lo = {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    def crlf(obj: object) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"

    def script(conn: int, n: int, request: bytes) -> list[Step]:
        hello_event = crlf(hello)
        return [
            SSE_HEAD + chunk(crlf(role)),
            PAUSE,
            chunk(b": keep-alive comment\r\n\r\n"),
            chunk(hello_event[:-1]),  # CR and LF of the blank line in different reads
            PAUSE,
            chunk(hello_event[-1:]),
            PAUSE,
            chunk(
                crlf(lo)
                + crlf(finish)
                + crlf({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}})
            ),
            chunk(b"data: [DONE]\r\n\r\n") + END_CHUNKS,
        ]

    async def main() -> RequestRecord:
        async with scripted_server(script) as (url, _):
            payload = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
            return await post_once(url + "/v1/chat/completions", payload, timeout_s=5)

    record = run(main())
    assert record.success, record.error
    assert record.output_text == "Hello"
    assert len(record.chunk_times) == 2
    assert record.finish_reason == "stop"
    assert record.completion_tokens == 2


def test_non_streaming_content_length_body() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        response = json_response(COMPLETION_BODY)
        return [response[:30], PAUSE, response[30:]]

    async def main() -> RequestRecord:
        async with scripted_server(script) as (url, _):
            return await post_once(url + "/v1/completions", PLAIN_PAYLOAD, timeout_s=5)

    record = run(main())
    assert record.success, record.error
    assert record.stream is False
    assert record.output_text == "hello world"
    assert (record.prompt_tokens, record.completion_tokens, record.finish_reason) == (5, 2, "length")
    assert record.chunk_times == [] and record.first_content_at is None
    assert record.done_at is not None and record.sent_at is not None and record.done_at > record.sent_at


def test_http_error_body_becomes_the_error_text() -> None:
    body = {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400}

    def script(conn: int, n: int, request: bytes) -> list[Step]:
        return [json_response({"error": body}, "400 Bad Request")]

    async def main() -> RequestRecord:
        async with scripted_server(script) as (url, _):
            return await post_once(url + "/v1/completions", STREAM_PAYLOAD, timeout_s=5)

    record = run(main())
    assert record.success is False
    assert record.http_status == 400
    assert record.error == "HTTP 400 Bad Request: max_tokens is too large"


def test_error_text_variants() -> None:
    assert error_text(404, "Not Found", b'{"detail":"Not Found"}') == "HTTP 404 Not Found: Not Found"
    assert error_text(502, "Bad Gateway", b"upstream down\n") == "HTTP 502 Bad Gateway: upstream down"
    assert error_text(500, "", b"") == "HTTP 500"


def test_server_closing_mid_stream_keeps_partial_timings() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        return [
            SSE_HEAD + chunk(completion_event("a")),
            PAUSE,
            chunk(completion_event("b")),
            PAUSE,
            chunk(completion_event("c")[:10]),
            CLOSE,
        ]

    async def main() -> RequestRecord:
        async with scripted_server(script) as (url, _):
            return await post_once(url + "/v1/completions", STREAM_PAYLOAD, timeout_s=5)

    record = run(main())
    assert record.success is False
    assert record.error is not None and "closed the connection mid-response" in record.error
    assert record.output_text == "ab"
    assert len(record.chunk_times) == 2
    assert record.done_at is not None and record.done_at >= record.chunk_times[-1]


def test_error_event_inside_a_stream_fails_the_request() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        error = sse({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
        return [SSE_HEAD + chunk(completion_event("a")) + chunk(error) + chunk(DONE_EVENT) + END_CHUNKS]

    async def main() -> RequestRecord:
        async with scripted_server(script) as (url, _):
            return await post_once(url + "/v1/completions", STREAM_PAYLOAD, timeout_s=5)

    record = run(main())
    assert record.success is False
    assert record.error == "error event in stream: engine died"
    assert record.output_text == "a"


def test_keep_alive_reuse_reconnect_after_close_and_bearer_header() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        if conn == 0 and n == 1:
            return [json_response(COMPLETION_BODY, extra=b"connection: close\r\n"), CLOSE]
        return [json_response(COMPLETION_BODY)]

    async def main() -> tuple[list[RequestRecord], ServerLog]:
        async with scripted_server(script) as (url, log):
            target = parse_url(url + "/v1/completions")
            request = prepare_request(target, PLAIN_PAYLOAD, api_key="sk-test")
            connection = HttpConnection(target)
            records = [RequestRecord(index=i) for i in range(4)]
            try:
                for record in records:
                    await connection.send(request, record, timeout_s=5)
            finally:
                connection.close()
        return records, log

    records, log = run(main())
    assert all(r.success for r in records), [r.error for r in records]
    # Requests 0 and 1 share a connection; the server closed it after 1, so 2 and 3 share a new one.
    assert log.connections == 2
    assert all(b"\r\nAuthorization: Bearer sk-test\r\n" in r for r in log.requests)
    assert all(r.startswith(b"POST /v1/completions HTTP/1.1\r\n") for r in log.requests)


def test_request_on_a_connection_the_server_dropped_is_resent_once() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        if conn == 0 and n == 1:
            return [CLOSE]  # keep-alive timeout racing the client's next request
        return [json_response(COMPLETION_BODY)]

    async def main() -> tuple[list[RequestRecord], ServerLog]:
        async with scripted_server(script) as (url, log):
            target = parse_url(url + "/v1/completions")
            request = prepare_request(target, PLAIN_PAYLOAD)
            connection = HttpConnection(target)
            records = [RequestRecord(index=i) for i in range(2)]
            try:
                for record in records:
                    await connection.send(request, record, timeout_s=5)
            finally:
                connection.close()
        return records, log

    records, log = run(main())
    assert [r.success for r in records] == [True, True], [r.error for r in records]
    assert log.connections == 2
    assert len(log.requests) == 3


def test_timeout_fails_the_request() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        return [SSE_HEAD + chunk(completion_event("a")), 5.0]

    async def main() -> RequestRecord:
        async with scripted_server(script) as (url, _):
            return await post_once(url + "/v1/completions", STREAM_PAYLOAD, timeout_s=0.2)

    started = perf_counter()
    record = run(main())
    assert perf_counter() - started < 3
    assert record.success is False
    assert record.error == "timeout: no complete response after 0.2 s"
    assert record.output_text == "a" and len(record.chunk_times) == 1


def test_connection_refused_is_a_failed_record() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    record = run(post_once(f"http://127.0.0.1:{port}/v1/completions", STREAM_PAYLOAD, timeout_s=2))
    assert record.success is False
    assert record.error is not None and record.error.startswith(f"connect to 127.0.0.1:{port} failed")


def test_sse_with_content_length_and_read_to_close_bodies() -> None:
    body = completion_event("x") + completion_event("y") + USAGE_EVENT + DONE_EVENT

    def script(conn: int, n: int, request: bytes) -> list[Step]:
        if n == 0:
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
            return [head % len(body) + body]
        return [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + body, CLOSE]

    async def main() -> list[RequestRecord]:
        async with scripted_server(script) as (url, _):
            target = parse_url(url + "/v1/completions")
            request = prepare_request(target, STREAM_PAYLOAD)
            connection = HttpConnection(target)
            records = [RequestRecord(index=i) for i in range(2)]
            try:
                for record in records:
                    await connection.send(request, record, timeout_s=5)
            finally:
                connection.close()
            return records

    records = run(main())
    for record in records:
        assert record.success, record.error
        assert record.output_text == "xy"
        assert record.completion_tokens == 3


def test_per_chunk_token_counts_from_continuous_usage_and_logprobs() -> None:
    continuous = [
        {
            "choices": [{"text": "ab", "finish_reason": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        },
        {
            "choices": [{"text": "", "finish_reason": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3},
        },
        {
            "choices": [{"text": "c", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        },
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]
    record = RequestRecord(index=0)
    apply_sse_events(record, [1.0, 2.0, 3.0, 4.0], [json.dumps(e).encode() for e in continuous])
    # The text-less chunk's token is credited to the next text chunk.
    assert record.chunk_times == [1.0, 3.0]
    assert record.chunk_token_counts == [2, 2]
    assert (record.completion_tokens, record.finish_reason, record.output_text) == (4, "length", "abc")

    with_logprobs = [
        {"choices": [{"delta": {"content": "xy"}, "logprobs": {"content": [{}, {}]}}]},
        {"choices": [{"delta": {"content": "z"}, "logprobs": {"content": [{}]}}]},
    ]
    record = RequestRecord(index=1)
    apply_sse_events(record, [1.0, 2.0], [json.dumps(e).encode() for e in with_logprobs])
    assert record.chunk_token_counts == [2, 1]
    assert record.completion_tokens is None

    record = RequestRecord(index=2)
    apply_sse_events(record, [1.0], [json.dumps({"choices": [{"text": "q"}]}).encode()])
    assert record.chunk_token_counts is None


def test_parse_url_and_request_bytes() -> None:
    target = parse_url("https://example.com/v1/completions?x=1")
    assert (target.host, target.port, target.path, target.host_header) == (
        "example.com",
        443,
        "/v1/completions?x=1",
        "example.com",
    )
    target = parse_url("http://[::1]:8000/v1/chat/completions")
    assert (target.host, target.port, target.host_header) == ("::1", 8000, "[::1]:8000")
    request = prepare_request(target, {"model": "m", "prompt": "é", "stream": True})
    head, _, body = request.wire.partition(b"\r\n\r\n")
    assert request.stream is True
    assert b"Content-Length: %d" % len(body) in head
    assert json.loads(body) == {"model": "m", "prompt": "é", "stream": True}
    with pytest.raises(ValueError):
        parse_url("ftp://example.com/")


def test_deferred_parse_gives_the_same_record_as_parsing_at_once() -> None:
    events = [completion_event("a"), completion_event("b"), completion_event("c", "length")]

    def script(conn: int, n: int, request: bytes) -> list[Step]:
        tail = chunk(events[2]) + chunk(USAGE_EVENT) + chunk(DONE_EVENT) + END_CHUNKS
        return [SSE_HEAD + chunk(events[0]), PAUSE, chunk(events[1]), PAUSE, tail]

    async def main() -> tuple[RequestRecord, RequestRecord, RawResponse | None]:
        async with scripted_server(script) as (url, _):
            target = parse_url(url + "/v1/completions")
            request = prepare_request(target, STREAM_PAYLOAD)
            connection = HttpConnection(target)
            at_once, deferred = RequestRecord(index=0), RequestRecord(index=1)
            try:
                await connection.send(request, at_once, timeout_s=5)
                raw = await connection.send_deferred(request, deferred, timeout_s=5)
            finally:
                connection.close()
        return at_once, deferred, raw

    at_once, deferred, raw = run(main())
    assert raw is not None
    # Before `apply` only the send time is known; the reads are kept with their arrival times.
    assert deferred.sent_at is not None and deferred.done_at is None and deferred.chunk_times == []
    assert len(raw.read_times) == len(raw.read_data) == 3 and raw.size == sum(map(len, raw.read_data))
    raw.apply(deferred)
    assert deferred.success and at_once.success
    assert deferred.output_text == at_once.output_text == "abc"
    assert deferred.completion_tokens == at_once.completion_tokens == 3
    assert len(deferred.chunk_times) == 3
    # Each event is stamped with the read that completed it: three separate reads here.
    assert deferred.chunk_times == raw.read_times
    assert deferred.done_at == raw.finished_at == raw.read_times[-1]


def test_bytes_after_the_end_of_a_response_stop_connection_reuse() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        if conn == 0 and n == 0:
            return [json_response(COMPLETION_BODY) + b"HTTP/1.1 200 OK\r\n"]  # a confused server
        return [json_response(COMPLETION_BODY)]

    async def main() -> tuple[list[RequestRecord], ServerLog]:
        async with scripted_server(script) as (url, log):
            target = parse_url(url + "/v1/completions")
            request = prepare_request(target, PLAIN_PAYLOAD)
            connection = HttpConnection(target)
            records = [RequestRecord(index=i) for i in range(2)]
            try:
                for record in records:
                    await connection.send(request, record, timeout_s=5)
            finally:
                connection.close()
        return records, log

    records, log = run(main())
    assert [r.success for r in records] == [True, True], [r.error for r in records]
    assert records[0].output_text == "hello world"
    assert log.connections == 2


def test_interim_100_continue_is_skipped() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        return [b"HTTP/1.1 100 Continue\r\n\r\n", PAUSE, json_response(COMPLETION_BODY)]

    async def main() -> RequestRecord:
        async with scripted_server(script) as (url, _):
            return await post_once(url + "/v1/completions", PLAIN_PAYLOAD, timeout_s=5)

    record = run(main())
    assert record.success, record.error
    assert (record.http_status, record.output_text) == (200, "hello world")


def test_bad_framing_fails_the_request_and_closes_the_connection() -> None:
    def script(conn: int, n: int, request: bytes) -> list[Step]:
        if conn == 0:
            return [SSE_HEAD + b"zz\r\n" + completion_event("a") + b"\r\n"]
        return [json_response(COMPLETION_BODY)]

    async def main() -> tuple[list[RequestRecord], ServerLog]:
        async with scripted_server(script) as (url, log):
            target = parse_url(url + "/v1/completions")
            connection = HttpConnection(target)
            records = [RequestRecord(index=i) for i in range(2)]
            try:
                await connection.send(prepare_request(target, STREAM_PAYLOAD), records[0], timeout_s=5)
                await connection.send(prepare_request(target, PLAIN_PAYLOAD), records[1], timeout_s=5)
            finally:
                connection.close()
        return records, log

    records, log = run(main())
    assert records[0].success is False
    assert records[0].error is not None and records[0].error.startswith("invalid HTTP response")
    assert records[1].success, records[1].error
    assert log.connections == 2


def test_kernel_stamps_do_not_wait_for_a_busy_client(live_path: str) -> None:
    """The server answers while the client's event loop is blocked for 0.3 s: kernel-stamped reads keep the
    time the bytes arrived, asyncio's transport can only stamp when the loop reads them."""
    listener = socket.create_server(("127.0.0.1", 0))
    write_start: list[float] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            write_start.append(perf_counter())
            conn.sendall(SSE_HEAD + chunk(completion_event("a")) + chunk(DONE_EVENT) + END_CHUNKS)
            conn.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main() -> RequestRecord:
        target = parse_url(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/completions")
        connection = HttpConnection(target)
        record = RequestRecord(index=0)
        try:
            await connection.connect()
            request = prepare_request(target, STREAM_PAYLOAD)
            sending = asyncio.ensure_future(connection.send(request, record, timeout_s=5))
            await asyncio.sleep(0)  # the request goes out
            time.sleep(0.3)  # a busy client: the loop reads nothing meanwhile
            await sending
        finally:
            connection.close()
        return record

    try:
        record = run(main())
    finally:
        thread.join(5)
        listener.close()
    assert record.success, record.error
    delay = record.chunk_times[0] - write_start[0]
    if live_path.endswith("kernel-stamps"):
        assert 0 <= delay < 0.15
    else:
        assert delay > 0.2
