"""Iteration-level (continuous) batching: one loop runs the model; requests join and leave between steps.

Each iteration:
  1. takes the new requests and aborts handed over by the front end (thread-safe inbox);
  2. admits waiting requests while the batch has free slots, and prefills them (their first token);
  3. runs one decode step over every running sequence (each gets its next token);
  4. samples, detokenizes, checks stop conditions, releases finished sequences' KV state;
  5. publishes all of the iteration's updates at once: `publish(updates, running, waiting)`.

The scheduler runs in the model process (`model_process.py`) or in a thread of the server process
(`model_client.ThreadModelClient`); `publish` is what differs (a pipe write, or `call_soon_threadsafe`).
In the model process it detokenizes only the sequences that have stop strings (their text decides when
they stop); the others' updates carry token ids, and the server process turns them into text, on the
other core, as vLLM's V1 engine does (`text_for_stops_only`). It never touches asyncio objects or HTTP,
and the front end never touches the backend. Requests carry their own sampling parameters and stop
conditions, so any mix shares a forward pass. Admission limits (how many may wait) are the front end's:
it answers 503 before a request gets here.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmstack.workers.detokenizer import Decoders, IncrementalDetokenizer, StopChecker
from llmstack.workers.sampling import SamplerRow, SamplingParams, make_generator, sample

if TYPE_CHECKING:
    from llmstack.workers.backends.base import Backend

logger = logging.getLogger(__name__)


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


def text_needed_beside_model(params: SamplingParams) -> bool:
    """Whether a request's text must be made where the model runs: its stop strings, found in the text,
    decide when it stops. Other requests' text may be made by the front end from their token ids
    (`Scheduler(text_for_stops_only=True)` with `ModelClient(decoders=...)`)."""
    return bool(params.stop)


# publish(updates of this iteration as (request_id, update), running sequences, waiting requests)
Publish = Callable[[list[tuple[str, Update]], int, int], None]


@dataclass(slots=True, eq=False)
class _Sequence:
    seq_id: int
    request: GenerationRequest
    row: SamplerRow
    # None: its text is made by the front end (see `text_for_stops_only`).
    detokenizer: IncrementalDetokenizer | None
    stops: StopChecker
    eos_ids: frozenset[int]
    output_ids: list[int]
    # Per-token checks, precomputed: tokens that may end it (EOS unless ignored, stop_token_ids), whether it
    # has stop strings, and the count at which it ends by length (max_tokens or the context).
    end_ids: frozenset[int]
    has_stops: bool
    length_limit: int
    # The last sampled token: what the next decode step feeds.
    next_token: int = -1
    finished: bool = False


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        decoders: Decoders,
        eos_token_ids: Sequence[int],
        *,
        publish: Publish,
        text_for_stops_only: bool = False,
    ) -> None:
        """`text_for_stops_only`: only sequences with stop strings are detokenized here; the updates of the
        others carry text "" and their token ids, for the front end to detokenize."""
        self.backend = backend
        self._text_for_stops_only = text_for_stops_only
        # ids -> text, by skip_special_tokens.
        self._decoders = decoders
        self._eos_ids = frozenset(eos_token_ids)
        self.max_batch_size = backend.max_batch_size
        self.max_model_len = backend.max_model_len
        self._publish = publish

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[GenerationRequest] = []
        self._aborts: list[str] = []
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: list[_Sequence] = []
        self._by_request: dict[str, _Sequence] = {}
        self._seq_ids = itertools.count()
        self._outbox: list[tuple[str, Update]] = []
        self._published_counts = (0, 0)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # -- thread-safe, from the front end -----------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            self._inbox.append(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); no update follows. Unknown or finished ids are ignored."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def start(self) -> threading.Thread:
        """run() in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="llmstack-scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting) + len(self._inbox),
            "steps": self.steps,
        }

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until stop(), in the calling thread."""
        logger.info("scheduler running (max_batch_size %d)", self.max_batch_size)
        while not self._stopping:
            self._take_inbox()
            if not self._running and not self._waiting:
                self._flush()  # aborts may have changed the counts
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            admitted: list[_Sequence] = []
            try:
                admitted = self._admit()
                if admitted:
                    self._prefill_isolating(admitted)
                    self._flush()
                if self._running:
                    self._decode_step()
                    self._flush()
                self.steps += 1
            except Exception as exc:  # a decode step concerns every running sequence: they all fail
                self._fail_step(exc, admitted)
        for seq in list(self._running):
            self._finish(seq, "abort", error="the server is shutting down")
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
                    break

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            request = self._waiting.popleft()
            try:
                admitted.append(self._sequence_of(request))
            except Exception as exc:  # what it asks for cannot be set up (a seed torch refuses): it fails
                self._fail_alone(request.request_id, "admission", exc)
        return admitted

    def _sequence_of(self, request: GenerationRequest) -> _Sequence:
        params = request.params
        eos = frozenset() if params.ignore_eos else self._eos_ids
        output_ids: list[int] = []
        seq = _Sequence(
            seq_id=next(self._seq_ids),
            request=request,
            # EOS is masked under min_tokens only where it would end the sequence.
            row=SamplerRow(params, request.prompt_ids, output_ids, eos),
            detokenizer=IncrementalDetokenizer(self._decoders[params.skip_special_tokens], request.prompt_ids)
            if text_needed_beside_model(params) or not self._text_for_stops_only
            else None,
            stops=StopChecker(params.stop),
            eos_ids=eos,
            output_ids=output_ids,
            end_ids=eos | frozenset(params.stop_token_ids),
            has_stops=bool(params.stop),
            length_limit=min(params.max_tokens, self.max_model_len - len(request.prompt_ids)),
        )
        if not params.greedy:
            seq.row.generator = make_generator(params.seed, self.backend.device)
        return seq

    def _prefill_isolating(self, admitted: list[_Sequence]) -> None:
        """Prefill the admitted sequences together; if that fails, one by one, so that a request the model
        cannot take fails alone (its KV state freed) and the others are served."""
        try:
            self._prefill(admitted)
            return
        except Exception as exc:
            for seq in admitted:
                self.backend.release(seq.seq_id)  # a backend may have taken a slot before it failed
            if len(admitted) == 1:
                self._fail_unstarted(admitted[0], exc)
                return
            logger.warning("prefill of %d requests failed (%s: %s): trying them one by one",
                           len(admitted), type(exc).__name__, exc)  # fmt: skip
        for seq in admitted:
            try:
                self._prefill([seq])
            except Exception as exc:
                self._fail_unstarted(seq, exc)

    def _fail_unstarted(self, seq: _Sequence, exc: Exception) -> None:
        """An admitted sequence that never ran fails, and whatever slot the backend gave it is freed."""
        seq.finished = True
        try:
            self.backend.release(seq.seq_id)
        except Exception:  # the backend is broken: the request must still get its answer
            logger.exception("releasing request %s's KV state failed", seq.request.request_id)
        self._fail_alone(seq.request.request_id, "prefill", exc)

    def _fail_alone(self, request_id: str, stage: str, exc: Exception) -> None:
        """One request that generated nothing fails with the reason; the loop serves the others."""
        logger.error("request %s failed in %s: %s: %s", request_id, stage, type(exc).__name__, exc)
        error = f"model step failed: {type(exc).__name__}: {exc}"
        self._outbox.append((request_id, Update("", 0, -1, "error", None, error)))

    def _fail_step(self, exc: Exception, admitted: list[_Sequence]) -> None:
        """A step failed where no one request can be blamed: every sequence it concerned fails (the running
        ones, and the admitted ones it had not started), and their KV state is freed."""
        logger.exception("model step failed; failing %d running requests", len(self._running))
        for seq in list(self._running):
            self._finish(seq, "error", error=f"model step failed: {type(exc).__name__}: {exc}")
        for seq in admitted:
            if not seq.finished:
                self._fail_unstarted(seq, exc)
        self._flush()

    def _prefill(self, admitted: list[_Sequence]) -> None:
        logits = self.backend.prefill([s.seq_id for s in admitted], [s.request.prompt_ids for s in admitted])
        tokens = sample(logits, [s.row for s in admitted])
        # Only now, with a token for each, do they run: a prefill that failed left the loop's state as it was.
        for seq in admitted:
            self._running.append(seq)
            self._by_request[seq.request.request_id] = seq
        self._accept_each(admitted, tokens)

    def _decode_step(self) -> None:
        running = self._running
        logits = self.backend.decode([s.seq_id for s in running], [s.next_token for s in running])
        tokens = sample(logits, [s.row for s in running])
        self._accept_each(list(running), tokens)

    def _accept_each(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens, strict=True):
            try:
                self._accept(seq, token)
            except Exception as exc:  # its text or stop checks failed: that is its own, it alone fails
                logger.exception("request %s failed on token %d", seq.request.request_id, token)
                self._finish(seq, "error", error=f"model step failed: {type(exc).__name__}: {exc}")

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record one generated token; emit its text; finish the sequence if a stop condition holds."""
        output = seq.output_ids
        output.append(token)
        seq.next_token = token
        count = len(output)
        detokenizer = seq.detokenizer
        delta = detokenizer.push(token) if detokenizer is not None else ""
        finish_reason: str | None = None
        stop_reason: str | int | None = None
        if seq.has_stops:
            delta, stop_string = seq.stops.add(delta)
            if stop_string is not None:
                finish_reason, stop_reason = "stop", stop_string
        if finish_reason is None:
            if token in seq.end_ids and count >= seq.request.params.min_tokens:
                finish_reason = "stop"
                if token not in seq.eos_ids:
                    stop_reason = token  # a stop_token_id (vLLM reports it; EOS it does not)
            elif count >= seq.length_limit:
                finish_reason = "length"
            else:
                self._outbox.append((seq.request.request_id, Update(delta, count, token)))
                return
        if detokenizer is not None and not isinstance(stop_reason, str):
            # Ending for another reason than a stop string: release what was held back.
            rest = detokenizer.flush()
            if seq.has_stops:
                more, stop_string = seq.stops.add(rest)
                delta += more
                if stop_string is not None:
                    finish_reason, stop_reason = "stop", stop_string
                else:
                    delta += seq.stops.finish()
            else:
                delta += rest
        self._outbox.append((seq.request.request_id, Update(delta, count, token, finish_reason, stop_reason)))
        self._finish(seq, finish_reason, notify=False)

    def _finish(self, seq: _Sequence, reason: str, *, error: str | None = None, notify: bool = True) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.backend.release(seq.seq_id)
        self._running.remove(seq)
        self._by_request.pop(seq.request.request_id, None)
        if notify:
            self._outbox.append(
                (seq.request.request_id, Update("", len(seq.output_ids), -1, reason, None, error))
            )

    def _flush(self) -> None:
        counts = (len(self._running), len(self._waiting))
        if not self._outbox and counts == self._published_counts:
            return
        outbox, self._outbox = self._outbox, []
        self._published_counts = counts
        self._publish(outbox, *counts)
