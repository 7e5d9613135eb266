"""A small, fast HTTP/1.1 client for OpenAI-compatible endpoints.

Why not httpx or aiohttp: a benchmark client must not be the bottleneck, and its timestamps must not wait
behind its own bookkeeping. What happens per read while a response streams in: one timestamp, keep the
bytes, let a framing parser (llhttp in C through `httptools`, else a pure-Python one) find where the
response ends. The coroutine that sent the request wakes once per response, not once per event. Everything
else (undoing the chunked framing, splitting SSE events, JSON) is a replay of the kept reads with their
timestamps: right after the response for `send`, after the whole measured window for `send_deferred` (load
generation). Either way an event's time is the time of the read that completed it.

That time is the kernel's: on Linux, plain-TCP connections read their socket themselves (`_StampedTransport`)
and take each read's receive timestamp (SO_TIMESTAMPNS), so a burst of events from hundreds of streams, a
busy client or a neighbour process leave the timestamps as they were on the wire. Elsewhere, and for TLS,
asyncio's transports deliver the data and the time is `perf_counter()` when the read is processed. All
times are `perf_counter()` seconds.

Scope, on purpose: POST with a JSON body, one request at a time per connection (no pipelining), keep-alive,
`Content-Length`, `Transfer-Encoding: chunked` and read-to-close bodies, `text/event-stream` responses.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import platform
import socket
import ssl
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter, time_ns
from typing import Any
from urllib.parse import urlsplit

from llmstack.bench.records import RequestRecord

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

# Tests switch these off to run the pure-Python framing parser and asyncio's own transports as well.
_USE_LLHTTP = True
_USE_KERNEL_STAMPS = True


def _so_timestampns() -> int | None:
    """SO_TIMESTAMPNS where its control message is a 64-bit timespec: Linux on 64-bit x86 and ARM."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64", "arm64"):
        return None
    return getattr(socket, "SO_TIMESTAMPNS", 35)  # Python 3.11 does not export it


_SO_TIMESTAMPNS = _so_timestampns()
_TIMESPEC = struct.Struct("qq")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 64
# Python allocates the whole size for every recvmsg, then shrinks it: keep it small (a larger one costs an
# mmap per read). A read that fills it is followed by another at once.
_READ_SIZE = 16 * 1024
_MAX_READS_PER_WAKEUP = 16
_MAX_STAMP_DELAY_NS = 60 * 1_000_000_000

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


class _Parser:
    """HTTP/1.1 response framing; with `keep_content`, also the body and the SSE events with their times.

    A live connection runs a framing-only parser: all it must know is where the response ends. The full
    parse replays the very same reads with the same timestamps later (`RawResponse.apply`), so its results
    are exactly those of parsing live.
    """

    __slots__ = (
        "body",
        "content_type",
        "done_seen",
        "event_data",
        "event_times",
        "keep_alive",
        "keep_content",
        "pending",
        "reason",
        "remaining",
        "sse",
        "sse_crlf",
        "sse_mode",
        "state",
        "status",
        "stream_requested",
    )

    def __init__(self, stream: bool, keep_content: bool) -> None:
        self.keep_content = keep_content
        self.stream_requested = stream
        self.pending = b""  # unparsed tail of the previous read
        self.state = _HEAD
        self.remaining = 0
        self.sse_mode = False
        self.status: int | None = None
        self.reason = ""
        self.content_type = ""
        self.keep_alive = True
        self.body = bytearray()
        self.event_times: list[float] = []
        self.event_data: list[bytes] = []
        self.done_seen = False
        self.sse = b""  # an SSE event still waiting for its blank line
        self.sse_crlf = False

    def feed(self, data: bytes, now: float) -> None:
        """Parse one read that arrived at `now`; raises _ProtocolError."""
        if self.pending:
            data = self.pending + data
            self.pending = b""
        self._advance(data, now)

    def end_of_body(self, now: float) -> None:
        """The connection ended: that completes a read-to-close body."""
        if self.state == _TO_EOF:
            self._complete(now)

    def _advance(self, data: bytes, now: float) -> None:
        # Index arithmetic over the immutable read: no buffer shifting, and a chunk that arrived whole is
        # handed on as one slice (or, framing only, not sliced at all).
        keep = self.keep_content
        pos = 0
        end = len(data)
        while pos < end:
            state = self.state
            if state == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 1024:
                        raise _ProtocolError("chunk-size line too long")
                    break
                size = _chunk_size(data[pos:eol])
                pos = eol + 2
                if size == 0:
                    self.state = _TRAILERS
                elif pos + size + 2 <= end:
                    stop = pos + size
                    if data[stop] != 13 or data[stop + 1] != 10:
                        raise _ProtocolError("chunk data not followed by CRLF")
                    if keep:
                        self._on_body(data[pos:stop], now)
                    pos = stop + 2
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                # Pass partial chunks on at once: an SSE event that completes inside a large chunk must be
                # stamped when its bytes arrive, not when the chunk ends.
                stop = min(end, pos + self.remaining)
                self.remaining -= stop - pos
                if self.remaining == 0:
                    self.state = _CHUNK_END
                if keep:
                    self._on_body(data[pos:stop], now)
                pos = stop
            elif state == _CHUNK_END:
                if end - pos < 2:
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise _ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self.state = _CHUNK_SIZE
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
                stop = min(end, pos + self.remaining)
                self.remaining -= stop - pos
                if keep:
                    self._on_body(data[pos:stop], now)
                pos = stop
                if self.remaining == 0:
                    self._complete(now)
            elif state == _TO_EOF:
                if keep:
                    self._on_body(data[pos:], now)
                pos = end
            else:  # _COMPLETE: we never pipeline, so extra bytes mean a confused server.
                logger.debug("%d bytes after the end of a response; connection will not be reused", end - pos)
                self.keep_alive = False
                pos = end
        if pos < end:
            self.pending = data[pos:]

    def _parse_head(self, head: bytes, now: float) -> None:
        info = _head_info(head)
        if info is None:
            return  # interim response (100 Continue): the real head follows
        status, self.reason, self.content_type, self.keep_alive, chunked, length = info
        self.status = status
        self.sse_mode = (
            self.stream_requested
            and 200 <= status < 300
            and (not self.content_type or self.content_type.lower().startswith("text/event-stream"))
        )
        if chunked:
            self.state = _CHUNK_SIZE
        elif status in (204, 304):
            self._complete(now)
        elif length is not None:
            self.remaining = length
            self.state = _FIXED
            if length == 0:
                self._complete(now)
        else:
            self.state = _TO_EOF
            self.keep_alive = False

    def _on_body(self, data: bytes, now: float) -> None:
        if self.sse_mode:
            self._feed_sse(data, now)
        else:
            self.body += data

    def _feed_sse(self, data: bytes, now: float) -> None:
        if self.sse:
            data = self.sse + data
            self.sse = b""
        if self.sse_crlf or b"\r" in data:
            # Some servers (sse-starlette) end lines with CRLF. A CR and its LF may arrive in different reads,
            # hence the flag: from the first CR on, every read is normalised together with the pending tail.
            self.sse_crlf = True
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
            self.sse = data[start:]

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
        self.state = _COMPLETE
        if self.keep_content and self.sse_mode:
            tail = self.sse.strip(b"\r\n")
            if tail:
                # A last event without its blank line: the body ended, so it is complete.
                self._on_event(tail, 0, len(tail), now)
        self.sse = b""


@functools.lru_cache(maxsize=256)
def _head_info(head: bytes) -> tuple[int, str, str, bool, bool, int | None] | None:
    """(status, reason, content type, keep-alive, chunked, content length) of a response head, None for 1xx.

    Cached: a server sends the same few heads over and over (a `date` header changes once a second).
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise _ProtocolError(f"bad status line {lines[0][:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise _ProtocolError(f"bad status code {parts[1][:20]!r}") from None
    if 100 <= status < 200:
        return None
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    keep_alive = parts[0] != b"HTTP/1.0"
    chunked = False
    length: int | None = None
    content_type = ""
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
            content_type = value.strip().decode("latin-1")
    return status, reason, content_type, keep_alive, chunked, length


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
        parser = _Parser(self.stream, keep_content=True)
        error = self.error
        try:
            for now, data in zip(self.read_times, self.read_data, strict=True):
                parser.feed(data, now)
            if error is None and self.ended_by_close and self.finished_at is not None:
                parser.end_of_body(self.finished_at)  # completes a read-to-close body
        except _ProtocolError as exc:
            error = error or f"invalid HTTP response: {exc}"
        if error is None and parser.state != _COMPLETE:
            if self.ended_by_close:
                where = "before responding" if self.size == 0 else "mid-response"
                error = f"server closed the connection {where}{self.close_detail}"
            else:  # the live parser saw an end that this one did not: never for valid HTTP
                error = "invalid HTTP response: incomplete"
        _fill_record(record, parser, self.stream, self.finished_at, error)
        self.read_data = []  # applied once; the bytes are not needed any more


class _ResponseProtocol(asyncio.Protocol):
    """Receives one response at a time; lives as long as its TCP connection.

    Per read it gets one timestamp (the kernel's through `_StampedTransport`, else `perf_counter()` now),
    keeps the bytes and lets a framing parser find where the response ends: llhttp (through `httptools`, in
    C) when installed, else `_Parser` without content. Nothing else happens while the response streams in.
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
        self._framing = None if self._llhttp is not None else _Parser(stream, keep_content=False)
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
        """`data` arrived at `now` (perf_counter seconds): the kernel's time with `_StampedTransport`."""
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
                self._complete = self._framing.state == _COMPLETE
        except (_ProtocolError, _LlhttpError) as exc:
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


class _StampedTransport:
    """The part of an asyncio transport we use, over a plain TCP socket, with kernel receive timestamps.

    Every read comes with the time the kernel received its last byte (SO_TIMESTAMPNS), so a response's
    timestamps do not depend on when this process got the CPU to read it: a burst of events from many streams
    at once, a busy client or a neighbour process on a shared machine leave them as they were on the wire.
    The kernel's stamp is CLOCK_REALTIME; it is turned into `perf_counter` time through the delay until the
    read (`time_ns() - stamp`), measured on one clock just after the read.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: _ResponseProtocol
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._closing = False
        self._out = bytearray()
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(self._fd, self._on_readable)

    def is_closing(self) -> bool:
        return self._closing

    def _on_readable(self) -> None:
        recvmsg = self._sock.recvmsg
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                data, ancillary, _, _ = recvmsg(_READ_SIZE, _ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._shut(exc)
                return
            now = perf_counter()
            wall = time_ns()
            if not data:
                self._protocol.eof_received()
                self._shut(None)
                return
            if ancillary:
                now = _kernel_receive_time(ancillary, now, wall)
            self._protocol.data_arrived(data, now)
            if len(data) < _READ_SIZE or self._closing:
                return

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        if self._out:
            self._out += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._shut(exc)
            return
        if sent < len(data):
            self._out += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._shut(exc)
            return
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        self._shut(None)

    def _shut(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if self._out:
            self._loop.remove_writer(self._fd)
            self._out.clear()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


def _kernel_receive_time(ancillary: list[tuple[int, int, bytes]], now: float, wall: int) -> float:
    """`now` (perf_counter, just after the read) moved back by how long ago the kernel received the data."""
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) == _TIMESPEC.size:
            seconds, nanos = _TIMESPEC.unpack(raw)
            delay = wall - (seconds * 1_000_000_000 + nanos)
            # Out of range means the wall clock was stepped meanwhile: keep the read time then.
            if 0 <= delay < _MAX_STAMP_DELAY_NS:
                return now - delay * 1e-9
    return now


async def _open_stamped_socket(loop: asyncio.AbstractEventLoop, target: Target) -> socket.socket:
    infos = await loop.getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)  # type: ignore[arg-type]
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error or OSError(f"no address found for {target.host}")


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
        if not target.uses_tls and _USE_KERNEL_STAMPS and _SO_TIMESTAMPNS is not None:
            sock = await asyncio.wait_for(_open_stamped_socket(loop, target), self.connect_timeout_s)
            transport: Any = _StampedTransport(loop, sock, protocol)
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


def _fill_record(
    record: RequestRecord, parser: _Parser, stream: bool, finished_at: float | None, error: str | None
) -> None:
    status = parser.status
    record.http_status = status
    record.done_at = finished_at
    is_2xx = status is not None and 200 <= status < 300
    if parser.sse_mode:
        # Partial streams are interpreted too: a request that died mid-stream keeps its timings.
        apply_sse_events(record, parser.event_times, parser.event_data)
    elif is_2xx and error is None:
        if stream:
            record.error = f"asked for a stream but the server answered {parser.content_type or 'no type'}"
        else:
            apply_json_body(record, bytes(parser.body))
    if error is not None:
        record.error = error
    elif not is_2xx:
        record.error = error_text(status, parser.reason, bytes(parser.body))
    elif record.error is None and stream and not record.chunk_times:
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
