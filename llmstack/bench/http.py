"""A small, fast HTTP/1.1 client for OpenAI-compatible endpoints.

Why not httpx or aiohttp: a benchmark client must not be the bottleneck, and its timestamps must not wait
behind its own bookkeeping. Here each connection is an `asyncio.Protocol`: `data_received` runs straight
from the event loop's socket callback, takes one `perf_counter()` per read, undoes the chunked framing, splits
SSE events and keeps their raw `data:` bytes. The coroutine that sent the request wakes once per response,
not once per event, and JSON is parsed only after the response has ended.

Scope, on purpose: POST with a JSON body, one request at a time per connection (no pipelining), keep-alive,
`Content-Length`, `Transfer-Encoding: chunked` and read-to-close bodies, `text/event-stream` responses.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

from llmstack.bench.records import RequestRecord

__all__ = [
    "HttpConnection",
    "PreparedRequest",
    "Target",
    "apply_json_body",
    "apply_sse_events",
    "error_text",
    "parse_url",
    "post_once",
    "prepare_request",
]

logger = logging.getLogger(__name__)

_MAX_HEAD_BYTES = 64 * 1024
_ERROR_TEXT_LIMIT = 500

# Response parser states.
_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _FIXED, _TO_EOF, _COMPLETE = range(8)


@dataclass(slots=True, frozen=True)
class Target:
    """Where requests go: the connection address and the request path."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: str

    @property
    def uses_tls(self) -> bool:
        return self.scheme == "https"


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme in {url!r}: only http and https")
    if not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")
    default_port = 443 if parts.scheme == "https" else 80
    port = parts.port or default_port
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == default_port else f"{shown_host}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, path, host_header)


@dataclass(slots=True, frozen=True)
class PreparedRequest:
    """The exact bytes of one request, built before the measured window starts."""

    wire: bytes
    stream: bool


def prepare_request(
    target: Target, payload: Mapping[str, Any], *, api_key: str | None = None
) -> PreparedRequest:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    stream = bool(payload.get("stream"))
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        "User-Agent: llmstack-bench",
        "Accept: text/event-stream" if stream else "Accept: application/json",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if api_key:
        if any(c in api_key for c in "\r\n"):
            raise ValueError("api_key must not contain line breaks")
        lines.append(f"Authorization: Bearer {api_key}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return PreparedRequest(head + body, stream)


class _ProtocolError(Exception):
    """The server's bytes are not valid HTTP/1.1 framing."""


class _ResponseProtocol(asyncio.Protocol):
    """Parses one response at a time; lives as long as its TCP connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._reset(stream=False)

    def _reset(self, stream: bool) -> None:
        self._pending = b""  # unparsed tail of the previous read
        self._state = _HEAD
        self._remaining = 0
        self._stream_requested = stream
        self.sse_mode = False
        self.status: int | None = None
        self.reason = ""
        self.content_type = ""
        self.keep_alive = True
        self.bytes_received = 0
        self.finished_at: float | None = None
        self.error: str | None = None
        self.timed_out = False
        self.body = bytearray()
        self.event_times: list[float] = []
        self.event_data: list[bytes] = []
        self.done_seen = False
        self._sse = b""  # an SSE event still waiting for its blank line
        self._sse_crlf = False

    # -- lifecycle, called by HttpConnection -------------------------------------------------------------

    def begin(self, stream: bool, waiter: asyncio.Future[None]) -> None:
        self._reset(stream)
        self._waiter = waiter

    def on_timeout(self, timeout_s: float) -> None:
        if self._waiter is None:
            return
        self.timed_out = True
        self.keep_alive = False
        self._finish(perf_counter(), f"timeout: no complete response after {timeout_s:g} s")
        self._close_transport()

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        if self._waiter is None:
            # Bytes nobody asked for: the framing of any later response would be lost.
            logger.debug("unexpected %d bytes from an idle connection; closing it", len(data))
            self.keep_alive = False
            self._close_transport()
            return
        self.bytes_received += len(data)
        if self._pending:
            data = self._pending + data
            self._pending = b""
        try:
            self._advance(data, now)
        except _ProtocolError as exc:
            self.keep_alive = False
            self._finish(now, f"invalid HTTP response: {exc}")
            self._close_transport()

    def eof_received(self) -> bool:
        if self._waiter is not None and self._state == _TO_EOF:
            self._complete(perf_counter())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        now = perf_counter()
        if self._state == _TO_EOF:
            self._complete(now)
            return
        detail = f": {exc}" if exc else ""
        where = "before responding" if self.bytes_received == 0 else "mid-response"
        self.keep_alive = False
        self._finish(now, f"server closed the connection {where}{detail}")

    # -- parsing -----------------------------------------------------------------------------------------

    def _advance(self, data: bytes, now: float) -> None:
        # Index arithmetic over the immutable read: no buffer shifting, and a chunk that arrived whole is
        # handed on as one slice.
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 1024:
                        raise _ProtocolError("chunk-size line too long")
                    break
                size = _chunk_size(data[pos:eol])
                pos = eol + 2
                if size == 0:
                    self._state = _TRAILERS
                elif pos + size + 2 <= end:
                    stop = pos + size
                    if data[stop] != 13 or data[stop + 1] != 10:
                        raise _ProtocolError("chunk data not followed by CRLF")
                    self._on_body(data[pos:stop], now)
                    pos = stop + 2
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                # Pass partial chunks on at once: an SSE event that completes inside a large chunk must be
                # stamped when its bytes arrive, not when the chunk ends.
                stop = min(end, pos + self._remaining)
                self._remaining -= stop - pos
                if self._remaining == 0:
                    self._state = _CHUNK_END
                piece = data[pos:stop]
                pos = stop
                self._on_body(piece, now)
            elif state == _CHUNK_END:
                if end - pos < 2:
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise _ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                if data.startswith(b"\r\n", pos):
                    pos += 2
                else:
                    stop = data.find(b"\r\n\r\n", pos)
                    if stop < 0:
                        break
                    pos = stop + 4
                self._complete(now)
            elif state == _HEAD:
                stop = data.find(b"\r\n\r\n", pos)
                if stop < 0:
                    if end - pos > _MAX_HEAD_BYTES:
                        raise _ProtocolError("response head too large")
                    break
                head = data[pos:stop]
                pos = stop + 4
                self._parse_head(head, now)
            elif state == _FIXED:
                stop = min(end, pos + self._remaining)
                self._remaining -= stop - pos
                piece = data[pos:stop]
                pos = stop
                self._on_body(piece, now)
                if self._remaining == 0:
                    self._complete(now)
            elif state == _TO_EOF:
                self._on_body(data[pos:], now)
                pos = end
            else:  # _COMPLETE: we never pipeline, so extra bytes mean a confused server.
                logger.debug("%d bytes after the end of a response; connection will not be reused", end - pos)
                self.keep_alive = False
                pos = end
        if pos < end:
            self._pending = data[pos:]

    def _parse_head(self, head: bytes, now: float) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise _ProtocolError(f"bad status line {lines[0][:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise _ProtocolError(f"bad status code {parts[1][:20]!r}") from None
        if 100 <= status < 200:
            return  # interim response (100 Continue): the real head follows
        self.status = status
        self.reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        keep_alive = parts[0] != b"HTTP/1.0"
        chunked = False
        length: int | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _ProtocolError(f"bad Content-Length {value[:20]!r}") from None
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    keep_alive = False
                elif token == b"keep-alive":
                    keep_alive = True
            elif name == b"content-type":
                self.content_type = value.strip().decode("latin-1")
        self.keep_alive = keep_alive
        is_2xx = 200 <= status < 300
        self.sse_mode = (
            self._stream_requested
            and is_2xx
            and (not self.content_type or self.content_type.lower().startswith("text/event-stream"))
        )
        if chunked:
            self._state = _CHUNK_SIZE
        elif status in (204, 304):
            self._complete(now)
        elif length is not None:
            self._remaining = length
            self._state = _FIXED
            if length == 0:
                self._complete(now)
        else:
            self._state = _TO_EOF
            self.keep_alive = False

    def _on_body(self, data: bytes, now: float) -> None:
        if self.sse_mode:
            self._feed_sse(data, now)
        else:
            self.body += data

    def _feed_sse(self, data: bytes, now: float) -> None:
        if self._sse:
            data = self._sse + data
            self._sse = b""
        if self._sse_crlf or b"\r" in data:
            # Some servers (sse-starlette) end lines with CRLF. A CR and its LF may arrive in different reads,
            # hence the flag: from the first CR on, every read is normalised together with the pending tail.
            self._sse_crlf = True
            data = data.replace(b"\r\n", b"\n")
        start = 0
        while True:
            stop = data.find(b"\n\n", start)
            if stop < 0:
                break
            if stop > start:
                self._on_event(data, start, stop, now)
            start = stop + 2
        if start < len(data):
            self._sse = data[start:]

    def _on_event(self, data: bytes, start: int, stop: int, now: float) -> None:
        """Keep the `data:` payload of the event `data[start:stop]`."""
        if data.startswith(b"data:", start) and data.find(b"\n", start, stop) < 0:
            begin = start + 6 if stop > start + 5 and data[start + 5] == 32 else start + 5
            payload = data[begin:stop]
        else:
            lines = [
                line[6:] if line[5:6] == b" " else line[5:]
                for line in data[start:stop].split(b"\n")
                if line.startswith(b"data:")
            ]
            if not lines:
                return  # a comment (keep-alive ping) or an event without data
            payload = b"\n".join(lines)
        if self.done_seen:
            return
        if payload == b"[DONE]":
            self.done_seen = True
            return
        self.event_times.append(now)
        self.event_data.append(payload)

    def _complete(self, now: float) -> None:
        self._state = _COMPLETE
        tail = self._sse.strip(b"\r\n")
        if self.sse_mode and tail:
            # A last event without its blank line: the body ended, so it is complete.
            self._on_event(tail, 0, len(tail), now)
        self._sse = b""
        self._finish(now, None)

    def _finish(self, now: float, error: str | None) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        self.finished_at = now
        self.error = error
        if not waiter.done():
            waiter.set_result(None)

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class HttpConnection:
    """One keep-alive connection, used by one coroutine at a time.

    `send` (re)connects when needed. A request whose reused connection turns out to have been closed by the
    server before any response byte arrived (an idle keep-alive timeout racing our write) is sent once more on
    a fresh connection; anything else is reported in the record, never raised.
    """

    def __init__(self, target: Target, *, connect_timeout_s: float = 30.0) -> None:
        self.target = target
        self.connect_timeout_s = connect_timeout_s
        self._transport: asyncio.Transport | None = None
        self._protocol: _ResponseProtocol | None = None
        self._responses_on_connection = 0

    @property
    def is_open(self) -> bool:
        return (
            self._transport is not None
            and self._protocol is not None
            and not self._protocol.closed
            and not self._transport.is_closing()
        )

    async def connect(self) -> None:
        self.close()
        loop = asyncio.get_running_loop()
        protocol = _ResponseProtocol()
        target = self.target
        tls = _client_tls_context() if target.uses_tls else None
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: protocol,
                target.host,
                target.port,
                ssl=tls,
                server_hostname=target.host if tls else None,
            ),
            self.connect_timeout_s,
        )
        self._transport = transport  # type: ignore[assignment]
        self._protocol = protocol
        self._responses_on_connection = 0

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._transport = None
        self._protocol = None

    async def send(self, request: PreparedRequest, record: RequestRecord, *, timeout_s: float) -> None:
        """Send one request and fill `record`; errors end up in `record.error`, not raised."""
        record.stream = request.stream
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            if not self.is_open:
                try:
                    await self.connect()
                except (TimeoutError, OSError) as exc:
                    now = perf_counter()
                    record.sent_at = now
                    record.done_at = now
                    record.success = False
                    record.error = (
                        f"connect to {self.target.host}:{self.target.port} failed: {_describe(exc)}"
                    )
                    return
            protocol = self._protocol
            transport = self._transport
            assert protocol is not None and transport is not None
            reused = self._responses_on_connection > 0
            waiter: asyncio.Future[None] = loop.create_future()
            protocol.begin(request.stream, waiter)
            timer = loop.call_later(timeout_s, protocol.on_timeout, timeout_s)
            record.sent_at = perf_counter()
            transport.write(request.wire)
            try:
                await waiter
            except asyncio.CancelledError:
                self.close()
                raise
            finally:
                timer.cancel()
            self._responses_on_connection += 1
            stale = reused and protocol.bytes_received == 0 and protocol.closed and not protocol.timed_out
            if stale and attempt == 0:
                logger.debug("keep-alive connection was closed by the server; resending on a new one")
                self.close()
                continue
            break
        _fill_record(record, protocol, request)
        if protocol.error is not None or not protocol.keep_alive:
            self.close()


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise _ProtocolError(f"bad chunk size {line[:40]!r}") from None


@functools.cache
def _client_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fill_record(record: RequestRecord, protocol: _ResponseProtocol, request: PreparedRequest) -> None:
    record.http_status = protocol.status
    record.done_at = protocol.finished_at
    status = protocol.status
    is_2xx = status is not None and 200 <= status < 300
    if protocol.sse_mode:
        # Partial streams are interpreted too: a request that died mid-stream keeps its timings.
        apply_sse_events(record, protocol.event_times, protocol.event_data)
    elif is_2xx and protocol.error is None:
        if request.stream:
            record.error = f"asked for a stream but the server answered {protocol.content_type or 'no type'}"
        else:
            apply_json_body(record, bytes(protocol.body))
    if protocol.error is not None:
        record.error = protocol.error
    elif not is_2xx:
        record.error = error_text(status, protocol.reason, bytes(protocol.body))
    elif record.error is None and request.stream and not record.chunk_times:
        record.error = "stream ended without any generated text"
    record.success = record.error is None


def error_text(status: int | None, reason: str, body: bytes) -> str:
    """`HTTP 400 Bad Request: <message>`, the message taken from an OpenAI-style error body if any."""
    message = ""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        message = _error_message(
            parsed.get("error") or parsed.get("detail") or parsed.get("message") or parsed
        )
    elif body:
        message = body.decode("utf-8", errors="replace").strip()
    text = f"HTTP {status} {reason}".rstrip()
    if message:
        text += f": {message[:_ERROR_TEXT_LIMIT]}"
    return text


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if message:
            return str(message)
    return str(error)


def _choice_text(choice: Mapping[str, Any]) -> tuple[str, str]:
    """(content, reasoning) of one choice: `text` for completions, `delta`/`message` for chat."""
    text = choice.get("text")
    if isinstance(text, str):
        return text, ""
    delta = choice.get("delta") or choice.get("message")
    if not isinstance(delta, dict):
        return "", ""
    content = delta.get("content")
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    return (
        content if isinstance(content, str) else "",
        reasoning if isinstance(reasoning, str) else "",
    )


def _logprob_token_count(choice: Mapping[str, Any]) -> int | None:
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        tokens = logprobs.get("tokens")  # completions
        if tokens is None:
            tokens = logprobs.get("content")  # chat
        if isinstance(tokens, list):
            return len(tokens)
    return None


def _apply_usage(record: RequestRecord, usage: object) -> int | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(prompt, int):
        record.prompt_tokens = prompt
    if isinstance(completion, int):
        record.completion_tokens = completion
        return completion
    return None


def _parse_events(payloads: list[bytes]) -> tuple[list[object], bytes | None]:
    """Decode every payload; on a bad one, the events before it and the bad payload."""
    if not payloads:
        return [], None
    try:
        # One decoder call per response instead of one per event: several times cheaper.
        events = json.loads(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        events = None
    if isinstance(events, list) and len(events) == len(payloads):
        return events, None
    # Either a payload is not JSON, or one held several values ("1,2") and the count is off.
    good: list[object] = []
    for raw in payloads:
        try:
            good.append(json.loads(raw))
        except ValueError:
            return good, raw
    return good, None


def apply_sse_events(record: RequestRecord, times: list[float], payloads: list[bytes]) -> None:
    """Interpret the `data:` payloads of a stream (without `[DONE]`) and fill `record`.

    A chunk counts as generated text when `choices[0].text` (completions) or `choices[0].delta.content`
    (or a reasoning delta, chat) is a non-empty string. Role-only chunks, empty texts, finish-only chunks and
    usage-only chunks (empty `choices`) give no entry in `chunk_times` but still supply usage and
    finish_reason. Tokens per chunk are known when every text chunk carries a cumulative
    `usage.completion_tokens` (vLLM's `continuous_usage_stats`) or `logprobs`.
    """
    chunk_times: list[float] = []
    texts: list[str] = []
    thoughts: list[str] = []
    counts: list[int] | None = []
    completion_at_last_chunk = 0
    events, bad_event = _parse_events(payloads)
    if bad_event is not None:
        record.error = f"invalid JSON in SSE event: {bad_event[:200]!r}"
    for arrived_at, event in zip(times, events, strict=False):
        if not isinstance(event, dict):
            continue
        if event.get("error") is not None and not event.get("choices"):
            record.error = f"error event in stream: {_error_message(event['error'])[:_ERROR_TEXT_LIMIT]}"
            break
        cumulative = _apply_usage(record, event.get("usage"))
        choices = event.get("choices")
        if not choices or not isinstance(choices[0], dict):
            continue
        choice = choices[0]
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
        text, thought = _choice_text(choice)
        if not text and not thought:
            continue
        chunk_times.append(arrived_at)
        if text:
            texts.append(text)
        if thought:
            thoughts.append(thought)
        if counts is not None:
            if cumulative is not None:
                # Tokens of text-less chunks in between (special tokens) are credited to this chunk.
                counts.append(cumulative - completion_at_last_chunk)
                completion_at_last_chunk = cumulative
            else:
                n = _logprob_token_count(choice)
                if n is None:
                    counts = None
                else:
                    counts.append(n)
    record.output_text = "".join(texts)
    record.reasoning_text = "".join(thoughts)
    record.chunk_times = chunk_times
    record.first_content_at = chunk_times[0] if chunk_times else None
    record.chunk_token_counts = counts if counts else None


def apply_json_body(record: RequestRecord, body: bytes) -> None:
    """Interpret a complete non-streaming response body."""
    try:
        obj = json.loads(body)
    except ValueError:
        record.error = f"invalid JSON response: {body[:200]!r}"
        return
    if not isinstance(obj, dict):
        record.error = f"unexpected JSON response: {body[:200]!r}"
        return
    if obj.get("error") is not None and not obj.get("choices"):
        record.error = _error_message(obj["error"])[:_ERROR_TEXT_LIMIT]
        return
    _apply_usage(record, obj.get("usage"))
    choices = obj.get("choices")
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        record.output_text, record.reasoning_text = _choice_text(choice)
        record.finish_reason = choice.get("finish_reason")


async def post_once(
    url: str,
    payload: Mapping[str, Any],
    *,
    api_key: str | None = None,
    timeout_s: float = 60.0,
) -> RequestRecord:
    """One request on a fresh connection (warm-ups, probes, tests)."""
    target = parse_url(url)
    connection = HttpConnection(target, connect_timeout_s=timeout_s)
    record = RequestRecord(index=0)
    try:
        await connection.send(prepare_request(target, payload, api_key=api_key), record, timeout_s=timeout_s)
    finally:
        connection.close()
    return record
