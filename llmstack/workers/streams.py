"""The event-loop side of a request: where the scheduler's updates land, and the SSE response that drains it.

The scheduler thread hands a whole iteration's updates to the loop in one callback; `RequestStream.put`
only appends and wakes the one coroutine waiting on that request. The reader takes everything queued at
once, so a response that fell behind catches up with one socket write for several tokens (each still its
own SSE event).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from llmstack.workers.detokenizer import IncrementalDetokenizer
from llmstack.workers.scheduler import Update

logger = logging.getLogger(__name__)


class RequestStream:
    __slots__ = (
        "_loop",
        "_updates",
        "_waiter",
        "arrival",
        "closed",
        "detokenizer",
        "finished",
        "first_token_at",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._updates: list[Update] = []
        self._waiter: asyncio.Future[None] | None = None
        self.finished = False  # a final update (finish_reason set) was put
        self.closed = False  # the client went away
        # perf_counter() at submission, and when the first token was handed over (metrics).
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        # Set where this process makes the request's text from its token ids (engine_client.ProcessEngine).
        self.detokenizer: IncrementalDetokenizer | None = None

    def put(self, update: Update) -> None:
        if update.finish_reason is not None:
            self.finished = True
        self._updates.append(update)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """The client disconnected: wake the reader so it stops."""
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self) -> list[Update]:
        """Every update queued so far (waits for at least one); [] once the client has gone."""
        while not self._updates:
            if self.closed:
                return []
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch, self._updates = self._updates, []
        return batch


class EventStreamResponse(Response):
    """text/event-stream from an async iterator of str; calls `on_disconnect` if the client leaves early."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[str], on_disconnect: Callable[[], None]) -> None:
        super().__init__(content=None, status_code=200, media_type=self.media_type)
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self._chunks = chunks
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        done = False

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not done:
                        self._on_disconnect()
                    return

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            async for text in self._chunks:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            logger.debug("client went away while streaming")
        finally:
            done = True
            watcher.cancel()
