"""A small, fast HTTP/1.1 client for OpenAI-compatible endpoints.

Why not httpx or aiohttp: a benchmark client must not be the bottleneck, and its timestamps must not wait
behind its own bookkeeping. What happens per read while a response streams in: one timestamp, keep the
bytes, let a framing parser (llhttp in C through `httptools`, else a pure-Python one) find where the
response ends. The coroutine that sent the request wakes once per response, not once per event. Everything
else (undoing the chunked framing, splitting SSE events, JSON) is a replay of the kept reads with their
timestamps: right after the response for `send`, after the whole measured window for `send_deferred` (load
generation). Either way an event's time is the time of the read that completed it.

That time is the kernel's: on Linux, plain-TCP connections read their socket themselves (`stamped.py`)
and take each read's receive timestamp (SO_TIMESTAMPNS), so a burst of events from hundreds of streams, a
busy client or a neighbour process leave the timestamps as they were on the wire. Elsewhere, and for TLS,
asyncio's transports deliver the data and the time is `perf_counter()` when the read is processed. All
times are `perf_counter()` seconds.

Scope, on purpose: POST with a JSON body, one request at a time per connection (no pipelining), keep-alive,
`Content-Length`, `Transfer-Encoding: chunked` and read-to-close bodies, `text/event-stream` responses.
The framing parser is `framing.py`; what a response means (OpenAI's SSE events and JSON bodies) is
`openai.py`.
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

from llmstack.bench.framing import COMPLETE, ProtocolError, ResponseParser
from llmstack.bench.openai import fill_record
from llmstack.bench.records import RequestRecord
from llmstack.bench.stamped import SO_TIMESTAMPNS, StampedTransport, open_stamped_socket

try:  # llhttp in C: finds the end of a response in about a microsecond (uvicorn[standard] ships it)
    import httptools
    from httptools import HttpParserError as _LlhttpError
except ImportError:  # pragma: no cover - the pure-Python framing parser does the same, slower
    httptools = None

    class _LlhttpError(Exception):  # type: ignore[no-redef]
        pass


__all__ = [
    "HttpConnection",
    "PreparedRequest",
    "RawResponse",
    "Target",
    "parse_url",
    "post_once",
    "prepare_request",
]

logger = logging.getLogger(__name__)

# Tests switch these off to run the pure-Python framing parser and asyncio's own transports as well.
_USE_LLHTTP = True
_USE_KERNEL_STAMPS = True
# Read by the tests: whether kernel-stamped reads are possible here.
_SO_TIMESTAMPNS = SO_TIMESTAMPNS


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


@dataclass(slots=True)
class RawResponse:
    """One response as it came off the socket: every read with its arrival time, and how it ended.

    `apply(record)` parses it into the record. Load generation keeps these until the measured window has
    ended, so JSON decoding and SSE splitting never compete with the event loop for the CPU during a run.
    """

    stream: bool
    read_times: list[float]
    read_data: list[bytes]
    finished_at: float | None
    # Set live: a timeout, or framing the live parser rejected. A closed connection is judged by `apply`.
    error: str | None
    size: int
    ended_by_close: bool = False
    close_detail: str = ""

    def apply(self, record: RequestRecord) -> None:
        parser = ResponseParser(self.stream, keep_content=True)
        error = self.error
        try:
            for now, data in zip(self.read_times, self.read_data, strict=True):
                parser.feed(data, now)
            if error is None and self.ended_by_close and self.finished_at is not None:
                parser.end_of_body(self.finished_at)  # completes a read-to-close body
        except ProtocolError as exc:
            error = error or f"invalid HTTP response: {exc}"
        if error is None and parser.state != COMPLETE:
            if self.ended_by_close:
                where = "before responding" if self.size == 0 else "mid-response"
                error = f"server closed the connection {where}{self.close_detail}"
            else:  # the live parser saw an end that this one did not: never for valid HTTP
                error = "invalid HTTP response: incomplete"
        fill_record(record, parser, self.stream, self.finished_at, error)
        self.read_data = []  # applied once; the bytes are not needed any more


class _ResponseProtocol(asyncio.Protocol):
    """Receives one response at a time; lives as long as its TCP connection.

    Per read it gets one timestamp (the kernel's through `StampedTransport`, else `perf_counter()` now),
    keeps the bytes and lets a framing parser find where the response ends: llhttp (through `httptools`, in
    C) when installed, else `ResponseParser` without content. Nothing else happens while the response
    streams in.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        # One llhttp parser per connection: it follows consecutive keep-alive responses by itself.
        self._llhttp = httptools.HttpResponseParser(self) if httptools is not None and _USE_LLHTTP else None
        self.begin(False, None)

    def begin(self, stream: bool, waiter: asyncio.Future[None] | None) -> None:
        self.stream = stream
        self.read_times: list[float] = []
        self.read_data: list[bytes] = []
        self.bytes_received = 0
        self.finished_at: float | None = None
        self.error: str | None = None
        self.timed_out = False
        self.ended_by_close = False
        self.close_detail = ""
        self.reusable = True
        self._complete = False
        self._server_keep_alive = True
        self._framing = None if self._llhttp is not None else ResponseParser(stream, keep_content=False)
        self._waiter = waiter

    @property
    def keep_alive(self) -> bool:
        if not self.reusable:
            return False
        return self._server_keep_alive if self._framing is None else self._framing.keep_alive

    def on_timeout(self, timeout_s: float) -> None:
        if self._waiter is None:
            return
        self.timed_out = True
        self._finish(perf_counter(), f"timeout: no complete response after {timeout_s:g} s")
        self._close_transport()

    # -- llhttp callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # bytes after the end of the response: we never pipeline
            logger.debug("bytes after the end of a response; connection will not be reused")
            self.reusable = False

    def on_headers_complete(self) -> None:
        assert self._llhttp is not None
        if self._llhttp.get_status_code() >= 200:
            self._server_keep_alive = self._llhttp.should_keep_alive()

    def on_message_complete(self) -> None:
        assert self._llhttp is not None
        if self._llhttp.get_status_code() >= 200:  # not an interim 1xx response
            self._complete = True

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data_arrived(data, perf_counter())

    def data_arrived(self, data: bytes, now: float) -> None:
        """`data` arrived at `now` (perf_counter seconds): the kernel's time with `StampedTransport`."""
        if self._waiter is None:
            # Bytes nobody asked for: the framing of any later response would be lost.
            logger.debug("unexpected %d bytes from an idle connection; closing it", len(data))
            self._close_transport()
            return
        self.bytes_received += len(data)
        self.read_times.append(now)
        self.read_data.append(data)
        try:
            if self._framing is None:
                self._llhttp.feed_data(data)  # type: ignore[union-attr]
            else:
                self._framing.feed(data, now)
                self._complete = self._framing.state == COMPLETE
        except (ProtocolError, _LlhttpError) as exc:
            if not self._complete:
                self._finish(now, f"invalid HTTP response: {exc}")
                self._close_transport()
                return
            self.reusable = False  # garbage after a complete response
        if self._complete:
            self._finish(now, None)

    def eof_received(self) -> bool:
        if self._waiter is not None:
            self._end_by_close(perf_counter(), None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None:
            self._end_by_close(perf_counter(), exc)

    def _end_by_close(self, now: float, exc: Exception | None) -> None:
        # Complete for a read-to-close body, else a failure: `RawResponse.apply` tells which.
        self.ended_by_close = True
        self.close_detail = f": {exc}" if exc else ""
        self.reusable = False
        self._finish(now, None)

    def _finish(self, now: float, error: str | None) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        self.finished_at = now
        self.error = error
        if error is not None:
            self.reusable = False
        if not waiter.done():
            waiter.set_result(None)

    def take_response(self) -> RawResponse:
        return RawResponse(
            self.stream,
            self.read_times,
            self.read_data,
            self.finished_at,
            self.error,
            self.bytes_received,
            self.ended_by_close,
            self.close_detail,
        )

    def _close_transport(self) -> None:
        self.reusable = False
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
        if not target.uses_tls and _USE_KERNEL_STAMPS and SO_TIMESTAMPNS is not None:
            sock = await asyncio.wait_for(
                open_stamped_socket(loop, target.host, target.port), self.connect_timeout_s
            )
            transport: Any = StampedTransport(loop, sock, protocol)
        else:
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
        self._transport = transport
        self._protocol = protocol
        self._responses_on_connection = 0

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._transport = None
        self._protocol = None

    async def send(self, request: PreparedRequest, record: RequestRecord, *, timeout_s: float) -> None:
        """Send one request and fill `record`; errors end up in `record.error`, not raised."""
        response = await self.send_deferred(request, record, timeout_s=timeout_s)
        if response is not None:
            response.apply(record)

    async def send_deferred(
        self, request: PreparedRequest, record: RequestRecord, *, timeout_s: float
    ) -> RawResponse | None:
        """Send one request and set `record.sent_at`; return the raw response for `apply(record)` later.

        None means there is no response to parse (the connection could not be made) and `record` is
        already complete.
        """
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
                    return None
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
            stale = reused and protocol.bytes_received == 0 and protocol.ended_by_close
            if stale and attempt == 0:
                logger.debug("keep-alive connection was closed by the server; resending on a new one")
                self.close()
                continue
            break
        if not protocol.keep_alive:
            self.close()
        return protocol.take_response()


@functools.cache
def _client_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
