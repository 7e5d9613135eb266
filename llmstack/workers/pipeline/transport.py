"""How stages talk: a fixed-size header on a CPU (gloo) group, then the step's tensor on the device's group.

Every message goes one way round the ring, rank r to r+1, the last rank back to rank 0:

    header  int64 [HEADER_FIXED + 2 * stages + 3 * max_seqs]: kind, lane, sequences, tokens, step number,
            each stage's busy microseconds so far (wall clock, then the computing thread's CPU time: a stage
            waiting for a core counts in the first only; each stage writes its own), then (slot, start,
            count) of each sequence;
    payload hidden states [tokens, hidden] from each stage to the next (rank 0 embeds the tokens and
            runs its layers first), float32 logits [sequences, vocab] from the last stage to rank 0.
            PING and STOP carry none.

Headers always travel over gloo on the CPU, whatever carries the tensors (nccl, xccl, ccl): a rank waiting
for work blocks in a socket read, not a spinning device kernel, so an idle pipeline burns no core (ipex-llm's
ranks spin in `process_step`). Sends are asynchronous (gloo's I/O thread, or the device's stream); their
tensors are kept until the send completed. A receive waits at most the group's timeout
(`collective_timeout_s`): rank 0 sends a PING round the ring while idle, so only a stuck step runs into it.
"""

from __future__ import annotations

import collections
import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

STEP, PING, STOP = 1, 2, 3
_KIND, _LANE, _SEQS, _TOKENS, _NUMBER = range(5)
HEADER_FIXED = 5


class PipelineBroken(Exception):
    """A transfer failed: a rank died, or did not answer within the collective timeout."""


@dataclass
class Header:
    kind: int
    lane: int = 0
    number: int = 0
    slots: tuple[int, ...] = ()
    starts: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()
    # Busy microseconds of each stage (wall clock, and CPU time of its computing thread), as last written
    # by that stage.
    busy_us: tuple[int, ...] = ()
    cpu_us: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(self.counts)


class Link:
    """This rank's ends of the ring: the process group(s), and the sends still in flight."""

    def __init__(
        self,
        *,
        rank: int,
        world: int,
        backend: str,
        device: torch.device,
        timeout_s: float,
        init_timeout_s: float,
        max_seqs: int,
    ) -> None:
        """`init_timeout_s` bounds the wait for the slowest rank to load and join; `timeout_s` every
        transfer after that."""
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = rank, world
        self.device = device
        self.max_seqs = max_seqs
        self.timeout_s = timeout_s
        if backend == "ccl":
            import oneccl_bindings_for_pytorch  # noqa: F401 (registers the ccl backend)
        # torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE): init by env://.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=init_timeout_s))
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend=backend, timeout=timeout)
        self.control = self.group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        self.header_len = HEADER_FIXED + 2 * world + 3 * max_seqs
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()
        self.next = (rank + 1) % world
        self.previous = (rank - 1) % world

    # -- sending ---------------------------------------------------------------------------------------------
    def send(self, header: Header, payload: torch.Tensor | None = None, to: int | None = None) -> None:
        """Header (and payload) to rank `to` (the next one by default), without waiting for delivery."""
        dst = self.next if to is None else to
        self._reap()
        packed = self._pack(header)
        try:
            self._pending.append((self.dist.isend(packed, dst, group=self.control), packed))
            if payload is not None:
                payload = payload.contiguous()
                self._pending.append((self.dist.isend(payload, dst, group=self.group), payload))
        except RuntimeError as exc:
            raise PipelineBroken(f"rank {self.rank} could not send to rank {dst}: {exc}") from exc

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].is_completed():
            self._pending.popleft()

    def flush(self) -> None:
        """Wait until every send of this rank was delivered (before exiting)."""
        while self._pending:
            work, _ = self._pending.popleft()
            try:
                work.wait()
            except RuntimeError as exc:
                raise PipelineBroken(f"rank {self.rank}: a send did not complete: {exc}") from exc

    # -- receiving ----------------------------------------------------------------------------------------
    def receive_header(self, source: int | None = None) -> Header:
        src = self.previous if source is None else source
        buffer = torch.empty(self.header_len, dtype=torch.long)
        self._wait(self.dist.irecv(buffer, src, group=self.control), src, "a header")
        return self._unpack(buffer)

    def receive_payload(
        self, shape: tuple[int, ...], dtype: torch.dtype, source: int | None = None
    ) -> torch.Tensor:
        src = self.previous if source is None else source
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        self._wait(self.dist.irecv(buffer, src, group=self.group), src, f"a {tuple(shape)} tensor")
        return buffer

    def _wait(self, work: Any, src: int, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            text = str(exc)
            if "imed out" in text:
                reason = f"rank {src} sent nothing for {self.timeout_s:g} s (engine.collective_timeout_s)"
            else:
                reason = f"rank {src} is gone ({text.splitlines()[0] if text else type(exc).__name__})"
            raise PipelineBroken(f"rank {self.rank} waited for {what} from rank {src}: {reason}") from exc

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.dist.destroy_process_group()

    # -- the header's layout --------------------------------------------------------------------------------
    def _pack(self, h: Header) -> torch.Tensor:
        n = len(h.slots)
        if n > self.max_seqs:
            raise ValueError(f"a step of {n} sequences exceeds the header's {self.max_seqs}")
        values = [h.kind, h.lane, n, h.tokens, h.number]
        for per_stage in (h.busy_us, h.cpu_us):
            values += list(per_stage) + [0] * (self.world - len(per_stage))
        for triple in zip(h.slots, h.starts, h.counts, strict=True):
            values += triple
        values += [0] * (self.header_len - len(values))
        return torch.tensor(values, dtype=torch.long)

    def _unpack(self, buffer: torch.Tensor) -> Header:
        values = buffer.tolist()
        n = values[_SEQS]
        busy = tuple(values[HEADER_FIXED : HEADER_FIXED + self.world])
        cpu = tuple(values[HEADER_FIXED + self.world : HEADER_FIXED + 2 * self.world])
        meta = values[HEADER_FIXED + 2 * self.world : HEADER_FIXED + 2 * self.world + 3 * n]
        return Header(
            kind=values[_KIND], lane=values[_LANE], number=values[_NUMBER], slots=tuple(meta[0::3]),
            starts=tuple(meta[1::3]), counts=tuple(meta[2::3]), busy_us=busy, cpu_us=cpu,
        )  # fmt: skip
