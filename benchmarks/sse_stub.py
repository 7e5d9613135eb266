"""A minimal OpenAI-completions streaming server: a measuring instrument for benchmark clients, not a model.

One thread, one hand-written epoll loop, no framework: the stub must never be what limits or delays a client.

- `--mode capacity`: zero generation latency. Every `POST .../completions` is answered at once with a
  prebuilt response: HTTP head, `--tokens` one-token chunks (vLLM's JSON layout), a usage-only chunk and
  `data: [DONE]`, each SSE event in its own HTTP chunk. `--writes response` hands the whole response to the
  kernel in one send; `--writes event` makes one send per SSE event, as a real server flushing every token.
- `--mode timed`: the first token leaves `--first-token-ms` after the request arrived, then one token every
  `--itl-ms`, on absolute deadlines (request arrival + offset, never "previous send + gap") kept in one heap
  for all streams. The loop waits in epoll until about a millisecond before the next deadline, serves the
  sockets, then sleeps the rest with `clock_nanosleep` (time.sleep) and sends everything due. The arrival
  time of a request is the kernel's receive timestamp (SO_TIMESTAMPNS), so reading a request a little late
  moves nothing: its deadlines are counted from when it really arrived. Every token's text is
  `k,<arrival_ns>,<send_ns>;` in CLOCK_MONOTONIC nanoseconds (system-wide on Linux, the clock behind
  `time.perf_counter()` there), taken just before the send.

The stub asks for SCHED_FIFO (`--realtime`, on by default, silently skipped where not permitted) and 1 ns
timer slack, so that other processes on a shared machine neither delay its sends nor its wake-ups. It never
spins: it uses CPU only for real work. In timed mode that is a fraction of a core; in capacity mode a fast
enough client can drive it towards 100 %, which is why the benchmarks print its CPU share for every run.

Anything else (GET /metrics, POST /tokenize, ...) gets 404. On SIGTERM/SIGINT the stub prints one JSON line
of statistics and exits.

    python benchmarks/sse_stub.py --mode capacity --cpu 0     # prints "PORT <n>", serves until SIGTERM
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python 3.11 does not export it
EPOLL_MARGIN_NS = 1_500_000  # epoll's timeout is in whole ms, rounded up: leave the last stretch to nanosleep
HEAD = (
    b"HTTP/1.1 200 OK\r\nserver: sse-stub\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 22\r\n\r\n"
    b'{"detail":"Not Found"}'
)
TOKEN_EVENT = (
    b'data: {"id":"cmpl-stub","object":"text_completion","created":1700000000,"model":"tiny","choices":'
    b'[{"index":0,"text":"%s","logprobs":null,"finish_reason":%s,"stop_reason":null}]}\n\n'
)
USAGE_EVENT = (
    b'data: {"id":"cmpl-stub","object":"text_completion","created":1700000000,"model":"tiny","choices":[],'
    b'"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
)
DONE_EVENT = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"
PROMPT_TOKENS = 32


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def token_event(text: bytes, last: bool) -> bytes:
    return TOKEN_EVENT % (text, b'"length"' if last else b"null")


def tail_events(tokens: int) -> bytes:
    usage = USAGE_EVENT % (PROMPT_TOKENS, PROMPT_TOKENS + tokens, tokens)
    return http_chunk(usage) + http_chunk(DONE_EVENT) + LAST_CHUNK


def capacity_pieces(tokens: int) -> list[bytes]:
    """The writes of one zero-latency response: head + first event, each later event, the tail."""
    events = [http_chunk(token_event(b" tok%d" % k, k == tokens - 1)) for k in range(tokens)]
    return [HEAD + events[0], *events[1:], tail_events(tokens)]


@dataclass(slots=True)
class Stream:
    """One timed response in progress."""

    conn: Connection
    arrival_ns: int
    next_token: int = 0


@dataclass(slots=True)
class Connection:
    sock: socket.socket
    fd: int
    inbuf: bytes = b""
    out: bytearray = field(default_factory=bytearray)
    closed: bool = False


@dataclass(slots=True)
class Stats:
    requests: int = 0
    not_found: int = 0
    connections: int = 0
    blocked_writes: int = 0
    peak_streams: int = 0
    lateness_ns: list[int] = field(default_factory=list)  # timed: send time - deadline, per token
    read_delay_ns: list[int] = field(default_factory=list)  # timed: user-space read - kernel arrival

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "realtime": os.sched_getscheduler(0) == getattr(os, "SCHED_FIFO", -1),
            "requests": self.requests,
            "not_found": self.not_found,
            "connections": self.connections,
            "blocked_writes": self.blocked_writes,
            "peak_streams": self.peak_streams,
        }
        for name, values in (("lateness", self.lateness_ns), ("read_delay", self.read_delay_ns)):
            if values:
                values = sorted(values)
                for q in (50, 99, 100):
                    out[f"{name}_p{q}_us"] = values[min(len(values) - 1, len(values) * q // 100)] / 1000
        return out


class Stub:
    def __init__(self, args: argparse.Namespace) -> None:
        self.timed = args.mode == "timed"
        self.tokens = args.tokens
        self.first_ns = int(args.first_token_ms * 1e6)
        self.itl_ns = int(args.itl_ms * 1e6)
        self.pieces = capacity_pieces(args.tokens)
        self.whole = b"".join(self.pieces)
        self.per_event = args.writes == "event"
        self.tail = tail_events(args.tokens)
        self.stats = Stats()
        self.connections: dict[int, Connection] = {}
        self.heap: list[tuple[int, int, Stream]] = []
        self.sequence = 0  # heap tie-breaker
        self.running = True
        self.epoll = select.epoll()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((args.host, args.port))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    # -- loop ------------------------------------------------------------------------------------------

    def serve(self) -> None:
        listen_fd = self.listener.fileno()
        poll = self.epoll.poll
        heap = self.heap
        while self.running:
            if heap:
                wait_ns = heap[0][0] - time.monotonic_ns()
                if wait_ns > EPOLL_MARGIN_NS:
                    timeout = (wait_ns - EPOLL_MARGIN_NS) / 1e9
                else:
                    timeout = 0
                    if wait_ns > 0:
                        # Serve the sockets first, then sleep precisely until the deadline.
                        self.handle(poll(0), listen_fd)
                        wait_ns = heap[0][0] - time.monotonic_ns()
                        if wait_ns > 0:
                            time.sleep(wait_ns / 1e9)
                        self.send_due()
                        continue
            else:
                timeout = 0.2  # idle: wake now and then to notice a stop request
            try:
                events = poll(timeout)
            except InterruptedError:
                continue
            self.handle(events, listen_fd)
            if heap:
                self.send_due()

    def handle(self, events: list[tuple[int, int]], listen_fd: int) -> None:
        for fd, mask in events:
            if fd == listen_fd:
                self.accept()
                continue
            conn = self.connections.get(fd)
            if conn is None:
                continue
            if mask & select.EPOLLOUT:
                self.flush(conn)
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self.read(conn)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.timed:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            conn = Connection(sock, sock.fileno())
            self.connections[conn.fd] = conn
            self.stats.connections += 1
            self.epoll.register(conn.fd, select.EPOLLIN)

    def close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.pop(conn.fd, None)
        with contextlib.suppress(OSError):
            self.epoll.unregister(conn.fd)
        conn.sock.close()

    def read(self, conn: Connection) -> None:
        arrival_ns = 0
        try:
            if self.timed:
                data, ancillary, _, _ = conn.sock.recvmsg(65536, 64)
                user_ns = time.monotonic_ns()
                arrival_ns = user_ns
                for level, kind, raw in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                        seconds, nanos = struct.unpack_from("qq", raw)
                        # Realtime to monotonic through a delay measured on one clock: NTP slewing between
                        # the two readings is negligible.
                        delay = time.time_ns() - (seconds * 1_000_000_000 + nanos)
                        if 0 <= delay < 1_000_000_000:
                            arrival_ns = user_ns - delay
                            self.stats.read_delay_ns.append(delay)
            else:
                data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)
            return
        buf = conn.inbuf + data if conn.inbuf else data
        start = 0
        while True:
            head_end = buf.find(b"\r\n\r\n", start)
            if head_end < 0:
                break
            head = buf[start:head_end]
            length = _content_length(head)
            end = head_end + 4 + length
            if end > len(buf):
                break
            self.respond(conn, head, arrival_ns)
            start = end
        conn.inbuf = buf[start:]

    def respond(self, conn: Connection, head: bytes, arrival_ns: int) -> None:
        line_end = head.find(b"\r\n")
        method, _, rest = head[: line_end if line_end >= 0 else len(head)].partition(b" ")
        path = rest.partition(b" ")[0]
        if method != b"POST" or not path.endswith(b"/completions"):
            self.stats.not_found += 1
            self.send(conn, NOT_FOUND)
            return
        self.stats.requests += 1
        if not self.timed:
            if self.per_event:
                for piece in self.pieces:
                    self.send(conn, piece)
            else:
                self.send(conn, self.whole)
            return
        # Headers go out at once, as a real server starts its streaming response before the first token.
        self.send(conn, HEAD)
        stream = Stream(conn, arrival_ns)
        self.push(stream, arrival_ns + self.first_ns)
        self.stats.peak_streams = max(self.stats.peak_streams, len(self.heap))

    def push(self, stream: Stream, deadline_ns: int) -> None:
        self.sequence += 1
        heapq.heappush(self.heap, (deadline_ns, self.sequence, stream))

    def send_due(self) -> None:
        heap = self.heap
        lateness = self.stats.lateness_ns
        last = self.tokens - 1
        while heap and heap[0][0] <= time.monotonic_ns():
            deadline, _, stream = heapq.heappop(heap)
            conn = stream.conn
            if conn.closed:
                continue
            k = stream.next_token
            sent_ns = time.monotonic_ns()
            text = b"%d,%d,%d;" % (k, stream.arrival_ns, sent_ns)
            data = http_chunk(token_event(text, k == last))
            if k == last:
                data += self.tail
            self.send(conn, data)
            lateness.append(sent_ns - deadline)
            if k < last:
                stream.next_token = k + 1
                self.push(stream, stream.arrival_ns + self.first_ns + (k + 1) * self.itl_ns)

    def send(self, conn: Connection, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        if sent < len(data):
            self.stats.blocked_writes += 1
            conn.out += data[sent:]
            self.epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            self.epoll.modify(conn.fd, select.EPOLLIN)

    def shutdown(self) -> None:
        for conn in list(self.connections.values()):
            self.close(conn)
        self.epoll.close()
        self.listener.close()


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17 : stop if stop >= 0 else len(lower)])


def _make_realtime() -> bool:
    """SCHED_FIFO and 1 ns timer slack for this process; False where not permitted."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        return False
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_timerslack = 29
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_timerslack, 1, 0, 0, 0)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("capacity", "timed"), default="capacity")
    parser.add_argument("--tokens", type=int, default=16, help="one-token chunks per response")
    parser.add_argument("--writes", choices=("response", "event"), default="response", help="capacity mode")
    parser.add_argument("--first-token-ms", type=float, default=50.0, help="timed mode")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="timed mode")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, help="pin the stub to this CPU")
    parser.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=True,
                        help="SCHED_FIFO priority where permitted")  # fmt: skip
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    realtime = args.realtime and _make_realtime()
    stub = Stub(args)

    def stop(signum: int, frame: object) -> None:
        stub.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Short-lived garbage only: the collector would just add pauses to the instrument.
    gc.collect()
    gc.freeze()
    gc.disable()
    print(f"PORT {stub.port} realtime={realtime}", flush=True)
    try:
        stub.serve()
    finally:
        stub.shutdown()
        print(json.dumps(stub.stats.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
