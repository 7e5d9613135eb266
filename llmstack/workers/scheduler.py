"""Iteration-level (continuous) batching: one thread runs the model; requests join and leave between steps.

Each iteration of the scheduler thread:
  1. takes new requests and aborts handed over by the event loop;
  2. admits waiting requests while the batch has free slots, and prefills them (their first token);
  3. runs one decode step over every running sequence (each gets its next token);
  4. samples, detokenizes, checks stop conditions, releases finished sequences' KV state;
  5. hands all of the iteration's outputs to the event loop in one `call_soon_threadsafe`.

The thread never touches asyncio objects itself; the event loop never touches the backend. Requests carry
their own sampling parameters and stop conditions, so any mix shares a forward pass.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmstack.workers.detokenizer import IncrementalDetokenizer, StopChecker
from llmstack.workers.metrics import WorkerMetrics
from llmstack.workers.sampling import SamplerRow, SamplingParams, make_generator, sample

if TYPE_CHECKING:
    import asyncio

    from llmstack.workers.backends.base import Backend

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The running batch and the waiting queue are full."""


@dataclass(slots=True)
class Update:
    """What one request gets from one scheduler iteration."""

    text: str
    # Tokens generated so far (usage.completion_tokens), and the token this update adds (-1: none).
    completion_tokens: int
    token_id: int
    finish_reason: str | None = None
    # The stop string or stop token id that ended generation, when one did (vLLM's `stop_reason`).
    stop_reason: str | int | None = None
    error: str | None = None


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Called in the event loop with a list of Updates (one or more iterations' worth).
    deliver: Callable[[Update], None]
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(slots=True, eq=False)
class _Sequence:
    seq_id: int
    request: GenerationRequest
    row: SamplerRow
    detokenizer: IncrementalDetokenizer
    stops: StopChecker
    eos_ids: frozenset[int]
    output_ids: list[int]
    # The last sampled token: what the next decode step feeds.
    next_token: int = -1
    first_token_at: float | None = None
    finished: bool = False


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        decoders: dict[bool, Callable[[list[int]], str]],
        eos_token_ids: Sequence[int],
        *,
        max_waiting_requests: int,
        metrics: WorkerMetrics,
    ) -> None:
        self.backend = backend
        # ids -> text, by skip_special_tokens.
        self._decoders = decoders
        self._eos_ids = frozenset(eos_token_ids)
        self.max_batch_size = backend.max_batch_size
        self.max_model_len = backend.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics
        metrics.running = lambda: len(self._running)
        metrics.waiting = lambda: len(self._waiting) + len(self._inbox)

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[GenerationRequest] = []
        self._aborts: list[str] = []
        self._unfinished = 0  # admitted by submit() and not yet finished; guarded by _lock
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: list[_Sequence] = []
        self._by_request: dict[str, _Sequence] = {}
        self._seq_ids = itertools.count()
        self._outbox: list[tuple[Callable[[Update], None], Update]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # -- called from the event loop ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="llmstack-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting) + len(self._inbox),
            "steps": self.steps,
        }

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises Overloaded when batch and queue are full."""
        with self._lock:
            if self._unfinished >= self.max_batch_size + self.max_waiting_requests:
                self.metrics.rejected += 1
                raise Overloaded(
                    f"{self._unfinished} requests are running or waiting "
                    f"(max_batch_size {self.max_batch_size} + max_waiting_requests "
                    f"{self.max_waiting_requests}); retry later"
                )
            self._unfinished += 1
            self._inbox.append(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away). Unknown or finished ids are ignored."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    # -- the scheduler thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        logger.info("scheduler running (max_batch_size %d)", self.max_batch_size)
        while not self._stopping:
            self._take_inbox()
            if not self._running and not self._waiting:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                    self._flush()
                if self._running:
                    self._decode_step()
                    self._flush()
                self.steps += 1
            except Exception as exc:  # the model failed: fail what was in flight, keep serving
                logger.exception("model step failed; failing %d running requests", len(self._running))
                for seq in list(self._running):
                    self._finish(seq, "error", error=f"model step failed: {exc}")
                self._flush()
        for seq in list(self._running):
            self._finish(seq, "abort", error="server shutting down")
        self._flush()

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        self._waiting.extend(inbox)
        for request_id in aborts:
            seq = self._by_request.get(request_id)
            if seq is not None:
                self._finish(seq, "abort", notify=False)
                continue
            for request in self._waiting:
                if request.request_id == request_id:
                    self._waiting.remove(request)
                    self._count_finished("abort")
                    break

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            request = self._waiting.popleft()
            params = request.params
            eos = frozenset() if params.ignore_eos else self._eos_ids
            seq = _Sequence(
                seq_id=next(self._seq_ids),
                request=request,
                # EOS is masked under min_tokens only where it would end the sequence.
                row=SamplerRow(params, request.prompt_ids, [], eos),
                detokenizer=IncrementalDetokenizer(
                    self._decoders[params.skip_special_tokens], request.prompt_ids
                ),
                stops=StopChecker(params.stop),
                eos_ids=eos,
                output_ids=[],
            )
            seq.row.output_ids = seq.output_ids
            if not params.greedy:
                seq.row.generator = make_generator(params.seed, self.backend.device)
            admitted.append(seq)
        return admitted

    def _prefill(self, admitted: list[_Sequence]) -> None:
        logits = self.backend.prefill([s.seq_id for s in admitted], [s.request.prompt_ids for s in admitted])
        for seq in admitted:
            self._running.append(seq)
            self._by_request[seq.request.request_id] = seq
            self.metrics.prompt_tokens += len(seq.request.prompt_ids)
        tokens = sample(logits, [s.row for s in admitted])
        for seq, token in zip(admitted, tokens, strict=True):
            self._accept(seq, token)

    def _decode_step(self) -> None:
        running = self._running
        logits = self.backend.decode([s.seq_id for s in running], [s.next_token for s in running])
        tokens = sample(logits, [s.row for s in running])
        for seq, token in zip(list(running), tokens, strict=True):
            self._accept(seq, token)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record one generated token; emit its text; finish the sequence if a stop condition holds."""
        seq.output_ids.append(token)
        seq.next_token = token
        self.metrics.generation_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(seq.first_token_at - seq.request.arrival)
        params = seq.request.params
        count = len(seq.output_ids)
        delta = seq.detokenizer.push(token)
        finish_reason: str | None = None
        stop_reason: str | int | None = None
        if seq.stops.active:
            delta, stop_string = seq.stops.add(delta)
            if stop_string is not None:
                finish_reason, stop_reason = "stop", stop_string
        if finish_reason is None:
            if count >= params.min_tokens and token in seq.eos_ids:
                finish_reason = "stop"
            elif count >= params.min_tokens and token in params.stop_token_ids:
                finish_reason, stop_reason = "stop", token
            elif count >= params.max_tokens or len(seq.request.prompt_ids) + count >= self.max_model_len:
                finish_reason = "length"
        if finish_reason is None:
            self._outbox.append((seq.request.deliver, Update(delta, count, token)))
            return
        if not isinstance(stop_reason, str):
            # Ending for another reason than a stop string: release what was held back.
            rest = seq.detokenizer.flush()
            if seq.stops.active:
                more, stop_string = seq.stops.add(rest)
                delta += more
                if stop_string is not None:
                    finish_reason, stop_reason = "stop", stop_string
                else:
                    delta += seq.stops.finish()
            else:
                delta += rest
        self._outbox.append((seq.request.deliver, Update(delta, count, token, finish_reason, stop_reason)))
        self._finish(seq, finish_reason, notify=False)

    def _finish(self, seq: _Sequence, reason: str, *, error: str | None = None, notify: bool = True) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.backend.release(seq.seq_id)
        self._running.remove(seq)
        self._by_request.pop(seq.request.request_id, None)
        if notify:
            count = len(seq.output_ids)
            self._outbox.append((seq.request.deliver, Update("", count, -1, reason, None, error)))
        self._count_finished(reason)
        if seq.first_token_at is not None:
            self.metrics.e2e.observe(time.perf_counter() - seq.request.arrival)

    def _count_finished(self, reason: str) -> None:
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
        with self._lock:
            self._unfinished -= 1

    def _flush(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        assert self._loop is not None
        # RuntimeError: the loop closed under us, the server is going down.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_dispatch, outbox)


def _dispatch(outbox: list[tuple[Callable[[Update], None], Update]]) -> None:
    for deliver, update in outbox:
        deliver(update)
