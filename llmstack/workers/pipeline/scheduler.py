"""Rank 0's scheduler: continuous batching inside each micro-batch, several micro-batches in the pipeline.

The running sequences are divided among `lanes` (micro-batches). Rank 0 visits the lanes in turn; at a
lane's turn it
  1. takes the lane's last step back from the last stage (its logits), samples each sequence's token and
     applies the stop conditions, exactly as the lightweight worker's scheduler does (the same code: this
     class is that scheduler, with its loop replaced);
  2. admits waiting requests into the lane (so that lanes stay equally full, at most `per_lane` each and at
     most `max_prefilled` prompts in one step), and
  3. runs the lane's next step through stage 0 and sends it on: one token for each running sequence, the
     prompt of each admitted one, packed together. With `prefill_chunk` > 0 a step carries at most that
     many prompt tokens (prompts are fed over several steps, their logits read only after the last chunk):
     every step of every micro-batch then costs about the same, and a long prompt does not leave the other
     stages waiting for the step that carries it.
While one lane's step travels through stages 1..N-1, rank 0 works on the next lanes, so with as many lanes
as stages every stage has work at once. Steps come back in the order they were issued (each stage handles
them in order), which is the order rank 0 visits the lanes: the lane whose turn it is always owns the
oldest step in flight.

A request finished or aborted while its lane's step is in flight is dropped; that step's row for it is
ignored when it returns, and its KV slot may be reused at once (the new owner's prefill reaches every stage
after the old step did).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmstack.workers.sampling import sample
from llmstack.workers.scheduler import Scheduler, _Sequence

logger = logging.getLogger(__name__)

# How often the stage figures go to the front end (/metrics), at most.
STATS_INTERVAL_S = 0.5


class Head(Protocol):
    """What the scheduler needs of the pipeline (`head.PipelineHead`), besides a backend's attributes."""

    def assign(self, seq_id: int) -> int: ...
    def release(self, seq_id: int) -> None: ...
    def issue(self, lane: int, seq_ids: list[int], tokens: list[int], starts: list[int],
              counts: list[int]) -> None: ...  # fmt: skip
    def collect(self, lane: int) -> Any: ...
    def ping(self) -> None: ...
    def shutdown(self) -> None: ...
    def busy_seconds(self) -> list[float]: ...
    def cpu_seconds(self) -> list[float]: ...


@dataclass(eq=False)
class Lane:
    index: int
    seqs: list[_Sequence] = field(default_factory=list)
    # The sequences of the step in flight, in the step's order (None: nothing in flight), and for each
    # whether that step gives it a token (False: a chunk of its prompt that is not the last).
    in_flight: list[_Sequence] | None = None
    samples: list[bool] = field(default_factory=list)


class PipelineScheduler(Scheduler):
    def __init__(
        self,
        head: Head,
        decoders: Any,
        eos_token_ids: Any,
        *,
        publish: Any,
        lanes: int,
        per_lane: int,
        max_prefilled: int = 0,
        prefill_chunk: int = 0,
        heartbeat_s: float = 30.0,
    ) -> None:
        super().__init__(head, decoders, eos_token_ids, publish=publish, text_for_stops_only=True)
        self.head = head
        self.lanes = [Lane(i) for i in range(lanes)]
        self.per_lane = per_lane
        self.max_prefilled = max_prefilled
        self.prefill_chunk = prefill_chunk
        # seq_id -> how much of its prompt has been fed, while it is not all fed.
        self._fed: dict[int, int] = {}
        self.heartbeat_s = heartbeat_s
        # Set by the model process: where the stage figures go (the front end's /metrics).
        self.publish_stats: Callable[[dict[str, Any]], None] | None = None
        self._stats_at = 0.0

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        logger.info("pipeline scheduler running: %d micro-batches of up to %d sequences",
                    len(self.lanes), self.per_lane)  # fmt: skip
        turn = 0
        try:
            while not self._stopping:
                self._take_inbox()
                if not self._running and not self._waiting and not self._in_flight():
                    self._flush()
                    self._send_stats(force=True)
                    if not self._wake.wait(timeout=self.heartbeat_s):
                        self.head.ping()  # keep the idle ranks' receives inside their timeout
                    self._wake.clear()
                    continue
                lane = self.lanes[turn]
                turn = (turn + 1) % len(self.lanes)
                self._serve_lane(lane)
                self.steps += 1
                self._flush()
                self._send_stats()
            self._drain()
        except BaseException as exc:
            # The pipeline is broken (a rank died or hung): every open request learns why, then the
            # model process ends (its server sees that and exits).
            for seq in list(self._running):
                self._finish(seq, "error", error=f"the pipeline stopped: {exc}")
            for request in self._waiting:
                self._fail_alone(request.request_id, "the pipeline", RuntimeError(str(exc)))
            self._waiting.clear()
            self._flush()
            raise
        for seq in list(self._running):
            self._finish(seq, "abort", error="the server is shutting down")
        self._flush()
        self.head.shutdown()

    def _in_flight(self) -> int:
        return sum(lane.in_flight is not None for lane in self.lanes)

    def _serve_lane(self, lane: Lane) -> None:
        if lane.in_flight is not None:
            logits = self.head.collect(lane.index)
            self._accept_step(lane, logits)
            self._take_inbox()
        for seq in lane.seqs:
            if seq.finished:
                self._fed.pop(seq.seq_id, None)
        lane.seqs = [s for s in lane.seqs if not s.finished]
        admitted = self._admit_into(lane)
        lane.seqs += admitted
        if lane.seqs:
            self._issue(lane)

    def _accept_step(self, lane: Lane, logits: Any) -> None:
        seqs, lane.in_flight = lane.in_flight or [], None
        live = [i for i, s in enumerate(seqs) if not s.finished and lane.samples[i]]
        if not live:
            return
        if len(live) != len(seqs):
            import torch

            logits = logits.index_select(0, torch.tensor(live, device=logits.device))
        kept = [seqs[i] for i in live]
        try:
            tokens = sample(logits, [s.row for s in kept])
        except Exception as exc:  # the sampler failed for this micro-batch: its requests fail, others go on
            logger.exception("sampling micro-batch %d failed", lane.index)
            for seq in kept:
                self._finish(seq, "error", error=f"model step failed: {type(exc).__name__}: {exc}")
            return
        self._accept_each(kept, tokens)

    def _admit_into(self, lane: Lane) -> list[_Sequence]:
        """Waiting requests into this lane: up to an equal share of all work, `per_lane`, free slots and
        `max_prefilled` prompts per step."""
        share = math.ceil((len(self._running) + len(self._waiting)) / len(self.lanes))
        room = min(share, self.per_lane) - len(lane.seqs)
        if self.max_prefilled:
            room = min(room, self.max_prefilled)
        admitted: list[_Sequence] = []
        while self._waiting and len(admitted) < room:
            request = self._waiting.popleft()
            try:
                seq = self._sequence_of(request)
            except Exception as exc:  # a seed torch refuses: that request fails alone
                self._fail_alone(request.request_id, "admission", exc)
                continue
            self.head.assign(seq.seq_id)
            self._fed[seq.seq_id] = 0
            self._running.append(seq)
            self._by_request[request.request_id] = seq
            admitted.append(seq)
        return admitted

    def _issue(self, lane: Lane) -> None:
        tokens: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        seqs: list[_Sequence] = []
        samples: list[bool] = []
        budget = self.prefill_chunk or None
        for seq in lane.seqs:
            prompt = seq.request.prompt_ids
            fed = self._fed.get(seq.seq_id)
            if fed is None:  # decoding: the token sampled last
                tokens.append(seq.next_token)
                starts.append(len(prompt) + len(seq.output_ids) - 1)
                counts.append(1)
                samples.append(True)
            else:
                n = len(prompt) - fed if budget is None else min(len(prompt) - fed, budget)
                if n <= 0:
                    continue  # this step's prompt budget is spent: its next chunk goes with a later step
                if budget is not None:
                    budget -= n
                tokens += prompt[fed : fed + n]
                starts.append(fed)
                counts.append(n)
                done = fed + n == len(prompt)
                samples.append(done)
                if done:
                    del self._fed[seq.seq_id]
                else:
                    self._fed[seq.seq_id] = fed + n
            seqs.append(seq)
        if not seqs:
            return
        try:
            self.head.issue(lane.index, [s.seq_id for s in seqs], tokens, starts, counts)
        except Exception as exc:
            from llmstack.workers.pipeline.transport import PipelineBroken

            if isinstance(exc, PipelineBroken):
                raise
            # Stage 0 failed on this step (nothing was sent): its requests fail, the others are served.
            logger.exception("stage 0 failed on micro-batch %d", lane.index)
            for seq in seqs:
                self._finish(seq, "error", error=f"model step failed: {type(exc).__name__}: {exc}")
            lane.seqs = []
            return
        lane.in_flight, lane.samples = seqs, samples

    def _drain(self) -> None:
        """Take back every step still in flight (so that no rank is left sending to a rank that left)."""
        for lane in self.lanes:
            if lane.in_flight is not None:
                self.head.collect(lane.index)
                lane.in_flight = None

    def _send_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.publish_stats is None or (not force and now - self._stats_at < STATS_INTERVAL_S):
            return
        self._stats_at = now
        self.publish_stats(
            {
                "stage_busy_seconds": self.head.busy_seconds(),
                "stage_cpu_seconds": self.head.cpu_seconds(),
                "in_flight": self._in_flight(),
                "steps": self.steps,
            }
        )

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "in_flight": self._in_flight()}
