"""What every phase shares: its context (the run, the plan, the run directory, the summary), request payloads,
provenance, the engine check, progress bars, and the client's errors as llmstack's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack import interrupts
from llmstack.config.schema import RunConfig
from llmstack.errors import BenchmarkError
from llmstack.results.files import write_text_atomic
from llmstack.results.rundir import RunDir
from llmstack.serving.plan import LaunchPlan

if TYPE_CHECKING:
    from llmstack.bench.loadgen import StopCheck
    from llmstack.bench.records import RequestRecord

logger = logging.getLogger(__name__)

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _no_op(*_: object) -> None:
    return None


@dataclass
class PhaseContext:
    run: RunConfig
    plan: LaunchPlan
    rundir: RunDir
    # summary.json's "benchmark" entry; phases add to it as each level finishes, so that a run that fails
    # half-way still records what it measured.
    summary: dict[str, Any]
    # Writes the run's summary.json now (after each level: a launcher killed later loses nothing measured).
    save: Callable[[], None] = field(default=_no_op)
    # Names the run's current phase in summary.json ("warm-up", "benchmark").
    enter: Callable[[str], None] = field(default=_no_op)

    @property
    def base_url(self) -> str:
        return self.plan.probe.base_url

    @property
    def served_name(self) -> str:
        return self.plan.probe.served_name

    @property
    def api_key(self) -> str | None:
        return self.plan.probe.api_key

    def should_stop(self, server: Any | None) -> StopCheck:
        """For the load generator: a stop signal, or a server whose main process has exited (every
        further request would fail at once)."""
        return interrupts.stop_requested_or((lambda: not server.alive()) if server is not None else None)


@dataclass(frozen=True)
class Level:
    """One load level: closed loop (`request_rate` inf, `concurrency` workers) or open loop."""

    label: str
    concurrency: int | None
    request_rate: float = math.inf

    @property
    def closed(self) -> bool:
        return math.isinf(self.request_rate)


def request_payload(
    *,
    model: str,
    endpoint: str,
    content: str | list[dict[str, Any]],
    output_len: int,
    stream: bool,
    ignore_eos: bool,
    min_tokens: int | None,
    temperature: float,
) -> dict[str, Any]:
    """An OpenAI completions or chat body; `content` is a prompt, or a chat message's parts."""
    payload: dict[str, Any] = {"model": model, "max_tokens": output_len, "temperature": temperature}
    payload["stream"] = stream
    if stream:
        # Token counts from the server itself, in the last event.
        payload["stream_options"] = {"include_usage": True}
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM's sampling extension: no early stop at end-of-sequence
    floor = output_len if min_tokens is None and ignore_eos else (min_tokens or 0)
    if floor:
        # Also vLLM's: belt and braces with ignore_eos, and what ipex-llm's benchmark patch sends.
        payload["min_tokens"] = min(floor, output_len)
    if endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": content}]
    else:
        payload["prompt"] = content
    return payload


def level_rundir(ctx: PhaseContext, label: str) -> RunDir:
    path = ctx.rundir.path / f"bench-{label}"
    path.mkdir(exist_ok=True)
    return RunDir(path)


def provenance(
    ctx: PhaseContext, extra: Mapping[str, Any] | None = None, *, chat: bool = False
) -> dict[str, Any]:
    """vLLM's setup keys, and ours under `llmstack` (the whole benchmark config included); `chat`: the
    requests went to the chat endpoint. `llmstack` starts with which llmstack measured (version, git commit,
    uncommitted changes)."""
    from llmstack.results.provenance import llmstack_provenance

    run = ctx.run
    return {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if chat else "vllm",
        "endpoint_type": "openai-chat" if chat else "openai",
        "model_id": ctx.served_name,
        "tokenizer_id": run.model.tokenizer or run.model.path,
        "llmstack": {
            **llmstack_provenance(),
            "engine": ctx.plan.engine,
            "model": run.model.name,
            "low_bit": run.low_bit.name,
            "device": run.device.name,
            "benchmark": dataclasses.asdict(run.benchmark),
            **(extra or {}),
        },
    }


def check_engine(server: Any | None, when: str) -> None:
    """Stop on a stop signal; fail (EngineError, exit 3) if the engine is not healthy."""
    interrupts.check()
    if server is not None:
        server.check_healthy(when)


def load_tokenizer(ctx: PhaseContext) -> Any | None:
    from llmstack.bench.prompts import load_tokenizer as load

    return load(ctx.run.model.tokenizer or str(ctx.run.model.path))


@contextlib.contextmanager
def client_errors() -> Iterator[None]:
    """The client's input errors (a dataset file, an image) as BenchmarkError (exit 4), message unchanged."""
    from llmstack.bench.errors import BenchInputError

    try:
        yield
    except BenchInputError as exc:
        raise BenchmarkError(str(exc)) from exc


def dump_records(path: str | Path, records: Iterable[RequestRecord]) -> Path:
    """`requests.jsonl`: one JSON object per request, written atomically, its times also as Unix dates (the
    clocks are read together here, after the load, never per request)."""
    from llmstack.bench.records import WallClock, records_jsonl

    return write_text_atomic(path, records_jsonl(records, WallClock.now()))
