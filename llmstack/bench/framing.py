"""HTTP/1.1 response framing in pure Python: where a response ends, and (replaying the kept reads) its body
and the SSE events with the time of the read that completed each.

`llmstack.bench.http` uses it live only where llhttp (`httptools`) is missing; after the measured window it
replays every response's reads through it to get the content.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["COMPLETE", "ProtocolError", "ResponseParser"]

logger = logging.getLogger(__name__)

_MAX_HEAD_BYTES = 64 * 1024

# Response parser states.
_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _FIXED, _TO_EOF, COMPLETE = range(8)


class ProtocolError(Exception):
    """The server's bytes are not valid HTTP/1.1 framing."""


class ResponseParser:
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
        """Parse one read that arrived at `now`; raises ProtocolError."""
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
                        raise ProtocolError("chunk-size line too long")
                    break
                size = _chunk_size(data[pos:eol])
                pos = eol + 2
                if size == 0:
                    self.state = _TRAILERS
                elif pos + size + 2 <= end:
                    stop = pos + size
                    if data[stop] != 13 or data[stop + 1] != 10:
                        raise ProtocolError("chunk data not followed by CRLF")
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
                    raise ProtocolError("chunk data not followed by CRLF")
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
                        raise ProtocolError("response head too large")
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
            else:  # COMPLETE: we never pipeline, so extra bytes mean a confused server.
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
        self.state = COMPLETE
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
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise ProtocolError(f"bad status code {parts[1][:20]!r}") from None
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
                raise ProtocolError(f"bad Content-Length {value[:20]!r}") from None
        elif name == b"connection":
            token = value.strip().lower()
            if token == b"close":
                keep_alive = False
            elif token == b"keep-alive":
                keep_alive = True
        elif name == b"content-type":
            content_type = value.strip().decode("latin-1")
    return status, reason, content_type, keep_alive, chunked, length


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
