"""The event-loop side of a request: where the model loop's updates for it land.

One iteration's updates reach the event loop in one callback; `RequestStream.put` only appends and wakes
the one coroutine waiting on that request. The reader takes everything queued at once (`next_batch`).
"""

from __future__ import annotations

import asyncio
import time

from llmstack.workers.detokenizer import IncrementalDetokenizer
from llmstack.workers.scheduler import Update


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
        # Set where this process makes the request's text from its token ids (ProcessModelClient).
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
