"""Kernel receive timestamps for plain-TCP reads on Linux (SO_TIMESTAMPNS), and the transport that takes them.

Every read comes with the time the kernel received its data, so a burst of events from hundreds of streams,
a busy client or a neighbour process leave the timestamps as they were on the wire.
"""

from __future__ import annotations

import asyncio
import platform
import socket
import struct
import sys
from time import perf_counter, time_ns
from typing import Any

__all__ = ["SO_TIMESTAMPNS", "StampedTransport", "open_stamped_socket"]


def _so_timestampns() -> int | None:
    """SO_TIMESTAMPNS where its control message is a 64-bit timespec: Linux on 64-bit x86 and ARM."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64", "arm64"):
        return None
    return getattr(socket, "SO_TIMESTAMPNS", 35)  # Python 3.11 does not export it


SO_TIMESTAMPNS = _so_timestampns()
_TIMESPEC = struct.Struct("qq")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 64
# Python allocates the whole size for every recvmsg, then shrinks it: keep it small (a larger one costs an
# mmap per read). A read that fills it is followed by another at once.
_READ_SIZE = 16 * 1024
_MAX_READS_PER_WAKEUP = 16
_MAX_STAMP_DELAY_NS = 60 * 1_000_000_000


class StampedTransport:
    """The part of an asyncio transport we use, over a plain TCP socket, with kernel receive timestamps.

    Every read comes with the time the kernel received its last byte (SO_TIMESTAMPNS), so a response's
    timestamps do not depend on when this process got the CPU to read it: a burst of events from many streams
    at once, a busy client or a neighbour process on a shared machine leave them as they were on the wire.
    The kernel's stamp is CLOCK_REALTIME; it is turned into `perf_counter` time through the delay until the
    read (`time_ns() - stamp`), measured on one clock just after the read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any) -> None:
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
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) == _TIMESPEC.size:
            seconds, nanos = _TIMESPEC.unpack(raw)
            delay = wall - (seconds * 1_000_000_000 + nanos)
            # Out of range means the wall clock was stepped meanwhile: keep the read time then.
            if 0 <= delay < _MAX_STAMP_DELAY_NS:
                return now - delay * 1e-9
    return now


async def open_stamped_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket that asks the kernel for receive timestamps."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # type: ignore[arg-type]
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error or OSError(f"no address found for {host}")
