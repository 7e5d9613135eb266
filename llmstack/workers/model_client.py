"""The server process's client of the model loop: admission, per-request streams, metrics.

Two ways to run the scheduler (`scheduler.Scheduler`), same interface here (`ModelClient`):

  ProcessModelClient (default)  the scheduler and the backend run in a child process (`model_process.py`);
                                requests go down one pipe (sent by a writer thread: a large message never
                                blocks the event loop), each iteration's updates come back up another and
                                are read by the event loop (`add_reader`). The model never competes with
                                HTTP for the GIL: with both in one process, every torch call releases and
                                re-takes the GIL, and each re-take waits behind the event loop (measured:
                                half the throughput of a small model on 2 cores).
  ThreadModelClient             the scheduler in a thread of this process; updates come in through
                                `call_soon_threadsafe`. Simpler to debug; fine when the model step waits on
                                a device (GIL released) rather than on Python.

Metrics are kept here, from what clients are sent: TTFT is arrival at this process to the first token
handed to the client's stream. So is the model loop's progress: requests open and no update for
`stall_timeout_s` is a stalled loop (`stalled_for`), which /health reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from llmstack.workers.detokenizer import Decoders, IncrementalDetokenizer
from llmstack.workers.metrics import WorkerMetrics
from llmstack.workers.model_process import ModelFacts, ModelProcess
from llmstack.workers.protocol import WorkerOptions
from llmstack.workers.sampling import SamplingParams
from llmstack.workers.scheduler import GenerationRequest, Scheduler, Update, text_needed_beside_model
from llmstack.workers.streams import RequestStream

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The running batch and the waiting queue are full."""


class ModelDied(Exception):
    """The model process exited."""


class ModelClient:
    """Admission and dispatch, shared by both ways of running the scheduler.

    `decoders` (ids -> text, by skip_special_tokens): given where the scheduler leaves the text of requests
    without stop strings to this process (`Scheduler(text_for_stops_only=True)`); their streams then get
    an incremental detokenizer here, fed with each update's token id.
    """

    def __init__(
        self,
        facts: ModelFacts,
        *,
        max_waiting_requests: int,
        metrics: WorkerMetrics,
        decoders: Decoders | None = None,
    ) -> None:
        self.facts = facts
        self._decoders = decoders
        self.max_batch_size = facts.max_batch_size
        self.max_model_len = facts.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics
        self.running = 0
        self.waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        # When the model loop last showed progress (an update), or work arrived at an idle loop.
        self._progress_at = time.monotonic()
        metrics.running = lambda: self.running
        metrics.waiting = lambda: self.waiting

    # -- used by the routes --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, prefix: str) -> tuple[str, RequestStream]:
        if len(self._streams) >= self.max_batch_size + self.max_waiting_requests:
            self.metrics.rejected += 1
            raise Overloaded(
                f"{len(self._streams)} requests are running or waiting (max_batch_size "
                f"{self.max_batch_size} + max_waiting_requests {self.max_waiting_requests}); retry later"
            )
        if not self.alive():
            raise ModelDied("the model loop is not running")
        assert self._loop is not None
        if not self._streams:
            self._progress_at = time.monotonic()  # an idle loop owes no progress until now
        request_id = f"{prefix}-{os.urandom(12).hex()}"
        stream = RequestStream(self._loop)
        if self._decoders is not None and not text_needed_beside_model(params):
            stream.detokenizer = IncrementalDetokenizer(
                self._decoders[params.skip_special_tokens], prompt_ids
            )
        self._streams[request_id] = stream
        self.metrics.prompt_tokens += len(prompt_ids)
        self._send(GenerationRequest(request_id, prompt_ids, params))
        return request_id, stream

    def abort(self, request_id: str) -> None:
        """The client went away before its request finished."""
        if self._streams.pop(request_id, None) is None:
            return
        self.metrics.finished["abort"] += 1
        self._send_abort(request_id)

    def snapshot(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "open_requests": len(self._streams)}

    def stalled_for(self) -> float:
        """Seconds the model loop has made no progress while requests are open (0: none open)."""
        if not self._streams:
            return 0.0
        return time.monotonic() - self._progress_at

    # -- for subclasses ----------------------------------------------------------------------------------
    def _dispatch(self, updates: list[tuple[str, Update]], running: int, waiting: int) -> None:
        """In the event loop: hand one iteration's updates to their streams."""
        self.running, self.waiting = running, waiting
        self._progress_at = time.monotonic()
        now = time.perf_counter()
        metrics = self.metrics
        for request_id, update in updates:
            stream = self._streams.get(request_id)
            if stream is None:  # aborted meanwhile
                continue
            if update.token_id >= 0:
                detokenizer = stream.detokenizer
                if detokenizer is not None:
                    try:
                        # As the scheduler would: the token's text, and at the end whatever was held back.
                        text = detokenizer.push(update.token_id)
                        update.text = text + detokenizer.flush() if update.finish_reason is not None else text
                    except Exception as exc:  # that request's text alone: it fails, the others go on
                        update = self._failed_here(request_id, update, exc)
                metrics.generation_tokens += 1
                if stream.first_token_at is None:
                    stream.first_token_at = now
                    metrics.ttft.observe(now - stream.arrival)
            if update.finish_reason is not None:
                del self._streams[request_id]
                metrics.finished[update.finish_reason] = metrics.finished.get(update.finish_reason, 0) + 1
                metrics.e2e.observe(now - stream.arrival)
            stream.put(update)

    def _failed_here(self, request_id: str, update: Update, exc: Exception) -> Update:
        """The final update of a request whose update this process could not handle; the model loop is
        told to drop it (its KV slot), unless it was finishing anyway."""
        logger.exception("request %s failed in the server process", request_id)
        if update.finish_reason is None:
            self._send_abort(request_id)
        error = f"the server failed on the model's output: {type(exc).__name__}: {exc}"
        return Update("", update.completion_tokens, update.token_id, "error", None, error)

    def _fail_all(self, message: str) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(Update("", 0, -1, "error", None, message))
            self.metrics.finished["error"] += 1
            del self._streams[request_id]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def _send(self, request: GenerationRequest) -> None:
        raise NotImplementedError

    def _send_abort(self, request_id: str) -> None:
        raise NotImplementedError


class ThreadModelClient(ModelClient):
    def __init__(self, options: WorkerOptions, metrics: WorkerMetrics) -> None:
        from llmstack.workers.backends.loader import load
        from llmstack.workers.detokenizer import decoders_for

        loaded = load(options)
        self.tokenizer = loaded.tokenizer
        self.scheduler = Scheduler(
            loaded.backend,
            decoders_for(loaded.tokenizer),
            loaded.eos_token_ids,
            publish=self._publish,
        )
        facts = ModelFacts(options.max_batch_size, loaded.max_model_len, loaded.eos_token_ids,
                            loaded.backend.info(), loaded.backend.vocab_size)  # fmt: skip
        super().__init__(facts, max_waiting_requests=options.max_waiting_requests, metrics=metrics)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def alive(self) -> bool:
        return self._loop is not None and self._thread.is_alive()

    def _publish(self, updates: list[tuple[str, Update]], running: int, waiting: int) -> None:
        # In the scheduler thread. RuntimeError: the loop closed under us, the server is going down.
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._dispatch, updates, running, waiting)

    def _send(self, request: GenerationRequest) -> None:
        self.scheduler.submit(request)

    def _send_abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)


class ProcessModelClient(ModelClient):
    """The model loop in a child process. The text of requests without stop strings is made here, from
    their token ids (`decoders`), so that the model process spends no time on it.

    Requests and aborts go to a writer thread, which sends them on a blocking pipe: a message of any size
    goes through, and the event loop never waits for the model process to read it. Updates are read by the
    event loop from the other pipe.
    """

    def __init__(
        self,
        model: ModelProcess,
        facts: ModelFacts,
        *,
        max_waiting_requests: int,
        metrics: WorkerMetrics,
        decoders: Decoders,
    ) -> None:
        super().__init__(facts, max_waiting_requests=max_waiting_requests, metrics=metrics, decoders=decoders)
        self._model = model
        self._updates = model.updates
        self._outgoing: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="llmstack-model-requests", daemon=True)
        self._dead = False
        self._stopping = False
        self._died_serving = False
        # Called (in the event loop) when the model process dies while serving.
        self.on_death: Callable[[], None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._updates.fileno(), self._on_readable)
        self._writer.start()

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None and not self._dead:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._updates.fileno())
        self._outgoing.put(("stop", None))
        self._outgoing.put(None)
        if self._writer.is_alive():
            self._writer.join(5)
        self._model.stop(tell=not self._writer.ident)

    def alive(self) -> bool:
        return not self._dead and self._model.process.is_alive()

    @property
    def died(self) -> bool:
        """The model process exited while serving (not because the server stopped it)."""
        return self._died_serving

    def _on_readable(self) -> None:
        try:
            while self._updates.poll():
                message = self._updates.recv()
                if message[0] == "stats":
                    self.metrics.model_stats = message[1]
                    continue
                _, rows, running, waiting = message
                updates = [(r[0], Update(r[1], r[2], r[3], r[4], r[5], r[6])) for r in rows]
                self._dispatch(updates, running, waiting)
        except (EOFError, OSError) as exc:
            self._model_died(exc)

    def _write(self) -> None:
        """In the writer thread: send what the event loop queued, in order, blocking as long as it takes."""
        conn = self._model.requests
        while (message := self._outgoing.get()) is not None:
            try:
                conn.send(message)
            except (OSError, ValueError) as exc:
                if not self._stopping:
                    logger.error("cannot send to the model process (%s: %s)", type(exc).__name__, exc)
                    if self._loop is not None:
                        with contextlib.suppress(RuntimeError):
                            self._loop.call_soon_threadsafe(self._model_died, exc)
                return

    def _model_died(self, exc: BaseException) -> None:
        if self._dead:
            return
        self._dead = True
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._updates.fileno())
        if self._stopping:
            return
        self._died_serving = True
        self._model.process.join(1)
        message = f"the model process exited (status {self._model.process.exitcode})"
        logger.error(
            "%s (%s: %s): failing %d open requests and stopping the server",
            message, type(exc).__name__, exc, len(self._streams),
        )  # fmt: skip
        self._fail_all(message)
        if self.on_death is not None:
            self.on_death()

    def _send(self, request: GenerationRequest) -> None:
        self._outgoing.put(("add", request))

    def _send_abort(self, request_id: str) -> None:
        self._outgoing.put(("abort", request_id))
