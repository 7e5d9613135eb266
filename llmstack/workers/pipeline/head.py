"""Rank 0's end of the pipeline: stage 0, the KV slots, the ring; and the model process that runs them.

The front end (rank 0's main process: HTTP, tokenizer; `workers/lightweight.serve`) starts this process as
its model process, the same as the lightweight worker's (`model_process.serve_model`): it inherits torchrun's
environment, so it is the group's rank 0. `PipelineHead` is what the scheduler knows of the model: it hands
out KV slots (every stage keeps its layers' keys and values of a sequence in the slot named here), runs a
micro-batch's step through stage 0 and sends it on, and takes the logits back from the last stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llmstack.workers.model_process import ModelFacts, serve_model
from llmstack.workers.pipeline.stage import StageModel
from llmstack.workers.pipeline.transport import PING, STEP, STOP, Header, Link, PipelineBroken
from llmstack.workers.protocol import PipelineOptions

logger = logging.getLogger(__name__)


class PipelineHead:
    """The scheduler's backend on rank 0 (the `Backend` attributes it reads, `release`), and the pipeline."""

    def __init__(self, stage: StageModel, link: Link, *, per_lane: int, lanes: int, max_model_len: int,
                 vocab_size: int) -> None:  # fmt: skip
        self.stage = stage
        self.link = link
        self.device = stage.device
        self.vocab_size = vocab_size
        self.max_batch_size = per_lane * lanes
        self.max_model_len = max_model_len
        self._free = list(range(self.max_batch_size - 1, -1, -1))
        self._slot_of: dict[int, int] = {}
        self._numbers = 0
        self._busy_s = self._cpu_s = 0.0
        self._remote_busy_us: tuple[int, ...] = (0,) * link.world
        self._remote_cpu_us: tuple[int, ...] = (0,) * link.world
        # A one-stage pipeline computes its logits here: kept until the lane collects them.
        self._local: dict[int, torch.Tensor] = {}

    # -- KV slots ------------------------------------------------------------------------------------------
    def assign(self, seq_id: int) -> int:
        slot = self._free.pop()
        self._slot_of[seq_id] = slot
        return slot

    def release(self, seq_id: int) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)

    # -- steps ---------------------------------------------------------------------------------------------
    def issue(self, lane: int, seq_ids: Sequence[int], tokens: list[int], starts: list[int],
              counts: list[int]) -> None:  # fmt: skip
        slots = [self._slot_of[s] for s in seq_ids]
        started, cpu_started = time.perf_counter(), time.thread_time()
        out = self.stage.forward(torch.tensor(tokens, dtype=torch.long), slots, starts, counts)
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)  # busy time is the device's, not the launch's
        self._busy_s += time.perf_counter() - started
        self._cpu_s += time.thread_time() - cpu_started
        self._numbers += 1
        if self.link.world == 1:
            self._local[lane] = out
            return
        header = Header(STEP, lane, self._numbers, tuple(slots), tuple(starts), tuple(counts), *self._busy())
        self.link.send(header, out)

    def collect(self, lane: int) -> torch.Tensor:
        """The logits of `lane`'s step in flight: [sequences, vocab], float32."""
        if self.link.world == 1:
            return self._local.pop(lane)
        last = self.link.world - 1
        header = self.link.receive_header(source=last)
        if header.kind != STEP or header.lane != lane:
            raise PipelineBroken(f"rank {last} returned {header} where micro-batch {lane}'s step was due")
        self._remote_busy_us, self._remote_cpu_us = header.busy_us, header.cpu_us
        return self.link.receive_payload((len(header.slots), self.vocab_size), torch.float32, source=last)

    def ping(self) -> None:
        """A header round the ring and back: every rank is alive and has loaded its stage."""
        if self.link.world == 1:
            return
        busy, cpu = self._busy()
        self.link.send(Header(PING, busy_us=busy, cpu_us=cpu))
        header = self.link.receive_header(source=self.link.world - 1)
        if header.kind != PING:
            raise PipelineBroken(f"rank {self.link.world - 1} answered a ping with {header}")
        self._remote_busy_us, self._remote_cpu_us = header.busy_us, header.cpu_us

    def shutdown(self) -> None:
        """Tell every rank to stop, and wait until the last one passed it on (each rank has then flushed)."""
        if self.link.world > 1:
            try:
                self.link.send(Header(STOP))
                self.link.receive_header(source=self.link.world - 1)
                self.link.flush()
            except PipelineBroken:
                # torchrun signals every rank at once when it is stopped: they may have left already.
                logger.info("the other ranks stopped before rank 0's STOP reached them")
        self.link.close()

    def busy_seconds(self) -> list[float]:
        """Seconds each stage has spent computing, by the clock (the other stages' as of their last
        returned step)."""
        return [self._busy_s] + [us / 1e6 for us in self._remote_busy_us[1:]]

    def cpu_seconds(self) -> list[float]:
        """CPU seconds of each stage's computing thread: below busy_seconds when a stage waits for a core
        (or for its device)."""
        return [self._cpu_s] + [us / 1e6 for us in self._remote_cpu_us[1:]]

    def _busy(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (int(self._busy_s * 1e6), *self._remote_busy_us[1:]), (
            int(self._cpu_s * 1e6),
            *self._remote_cpu_us[1:],
        )


# -- the model process ------------------------------------------------------------------------------------
def main(inbox: Any, outbox: Any, options: PipelineOptions) -> None:
    """`ModelProcess`'s target on rank 0."""
    serve_model(inbox, outbox, options, _start)


def _start(options: PipelineOptions, publish: Callable[..., None]) -> tuple[Any, ModelFacts]:
    from llmstack.workers.backends.base import BackendInfo
    from llmstack.workers.backends.loader import load_tokenizer
    from llmstack.workers.detokenizer import decoders_for
    from llmstack.workers.pipeline.ranks import eos_token_ids, gather_qtypes, join_pipeline, load_my_stage
    from llmstack.workers.pipeline.scheduler import PipelineScheduler

    stage, plan = load_my_stage(options, rank=0)
    link = join_pipeline(options, plan, rank=0, device=stage.device)
    stage_qtypes = gather_qtypes(link, stage.w.qtypes) if options.backend == "ipex_llm" else None
    lanes, per_lane = plan.lanes, options.max_batch_size
    head = PipelineHead(stage, link, per_lane=per_lane, lanes=lanes, max_model_len=plan.max_model_len,
                        vocab_size=plan.vocab_size)  # fmt: skip
    started = time.perf_counter()
    head.ping()  # every rank has loaded its stage: only now is the worker ready
    logger.info("all %d stages answered in %.2f s: layers %s", plan.world, time.perf_counter() - started,
                plan.describe())  # fmt: skip
    tokenizer = load_tokenizer(options)
    eos = eos_token_ids(options.model, tokenizer)
    scheduler = PipelineScheduler(
        head,
        decoders_for(tokenizer),
        eos,
        publish=publish,
        lanes=lanes,
        per_lane=per_lane,
        max_prefilled=options.max_prefilled_seqs,
        prefill_chunk=options.prefill_chunk,
        heartbeat_s=max(1.0, min(30.0, options.collective_timeout_s / 3)),
    )
    info = BackendInfo(
        backend=options.backend,
        model_impl="pipeline",
        device=options.device,
        dtype=str(stage.dtype).removeprefix("torch."),
        low_bit=options.low_bit,
        model_type=plan.model_type,
        kv_cache_bytes=stage.kv_cache_bytes,
        extra={
            "attention": stage.attention,
            "pipeline_parallel_size": plan.world,
            "stage_layers": plan.ranges_as_lists(),
            "micro_batches": lanes,
            "max_num_seqs_per_micro_batch": per_lane,
            "prefill_chunk": options.prefill_chunk,
            "dist_backend": options.dist_backend,
        },
    )
    if stage_qtypes is not None:
        # The lightweight worker's key (the model's linears by format), and each stage's share of them.
        names = dict.fromkeys(name for q in stage_qtypes for name in q)
        info.extra["qtypes"] = {name: sum(q.get(name, 0) for q in stage_qtypes) for name in names}
        info.extra["stage_qtypes"] = stage_qtypes
    facts = ModelFacts(head.max_batch_size, plan.max_model_len, eos, info, plan.vocab_size)
    return scheduler, facts
