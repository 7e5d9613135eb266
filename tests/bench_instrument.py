"""A measuring instrument for client tests: a real HTTP/1.1 server (the standard library's) on loopback that
answers every POST with a fixed completion after an optional delay, and records what it received.

Not an imitation of an LLM server: it only lets the tests see exactly which bytes, headers and connections a
client (ours, or wrk) sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    status: int = 200
    delay_s: float = 0.0
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


def _handler(state: Recorded) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.bodies.append(body)
                state.headers.append({k.lower(): v for k, v in self.headers.items()})
                state.peers.add(self.client_address)
            if state.delay_s:
                time.sleep(state.delay_s)
            if state.status == 200:
                payload = json.loads(body or b"{}")
                answer: dict[str, Any] = {
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": "x" * 3, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": payload.get("max_tokens", 3)},
                }
            else:
                answer = {"error": {"message": "The model `nope` does not exist.", "code": state.status}}
            data = json.dumps(answer).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def instrument(status: int = 200, delay_s: float = 0.0) -> Iterator[Recorded]:
    state = Recorded(status=status, delay_s=delay_s)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
