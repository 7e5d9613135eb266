"""What every phase that loads the live server shares in its config (`HttpBenchmarkConfig`), its rules,
and the small checks every phase's rules are made of.

A rule yields ConfigError; config rules look only at the resolved config, host rules (`*_host_problems`) at
files and programs on this machine and are skipped by dry runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

from llmstack.config.schema import BenchmarkConfig, RunConfig
from llmstack.errors import ConfigError

# OmegaConf 2.3 rejects PEP 604 unions in dataclass fields, hence typing.Optional (as in config/schema.py).


@dataclass
class SloConfig:
    """Service-level objectives for goodput (DistServe, as vLLM's --goodput): a request is good when every
    given limit holds. None: no limit on that metric; all None: no goodput."""

    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    e2el_ms: Optional[float] = None


@dataclass
class HttpBenchmarkConfig(BenchmarkConfig):
    """What every phase that sends requests to the live server shares."""

    # Requests sent before measuring (same load shape), excluded from the results.
    warmup_requests: int = 2
    output_len: int = 32
    # vLLM's sampling extensions: generate exactly max_tokens (no early stop at end-of-sequence).
    ignore_eos: bool = True
    # None: each request's own output length while ignore_eos is on, not sent otherwise; 0: never sent.
    min_tokens: Optional[int] = None
    temperature: float = 0.0
    # Dataset sampling and the open-loop arrival schedule.
    seed: int = 0
    # A request that has not finished after this many seconds counts as failed.
    timeout_s: float = 600.0
    slo: SloConfig = field(default_factory=SloConfig)
    # Percentiles reported for every latency metric (mean, median and std always are).
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 95.0, 99.0])


def served_context(run: RunConfig) -> int | None:
    return run.engine.max_model_len


def http_problems(b: HttpBenchmarkConfig, *, streamed: bool) -> Iterator[ConfigError]:
    """The shared knobs; `streamed`: whether the phase's requests are streams (TTFT and TPOT need one)."""
    yield from at_least("benchmark.warmup_requests", b.warmup_requests, 0)
    yield from at_least("benchmark.output_len", b.output_len, 1)
    if b.min_tokens is not None and not 0 <= b.min_tokens <= b.output_len:
        yield ConfigError(
            "benchmark.min_tokens",
            b.min_tokens,
            f"must be between 0 and benchmark.output_len ({b.output_len}); null follows ignore_eos.",
        )
    if not (b.temperature >= 0 and math.isfinite(b.temperature)):
        yield ConfigError("benchmark.temperature", b.temperature, "must be 0 (greedy) or more.")
    yield from positive_seconds("benchmark.timeout_s", b.timeout_s)
    limits = {"ttft_ms": b.slo.ttft_ms, "tpot_ms": b.slo.tpot_ms, "e2el_ms": b.slo.e2el_ms}
    for metric, limit in limits.items():
        if limit is not None and not (limit > 0 and math.isfinite(limit)):
            yield ConfigError(f"benchmark.slo.{metric}", limit, "must be a positive number of ms, or null.")
    for metric in ("ttft_ms", "tpot_ms"):
        if limits[metric] is not None and not streamed:
            yield ConfigError(
                f"benchmark.slo.{metric}",
                limits[metric],
                "needs streamed requests: without a stream there is no first token to time.",
                hint="Set benchmark.stream=true, or keep only benchmark.slo.e2el_ms.",
            )
    for p in b.percentiles:
        if not 0 <= p <= 100:
            yield ConfigError("benchmark.percentiles", p, "is not a percentile (0-100).")


def fits_context(
    input_len: int, output_len: int, context: int | None, longest: tuple[int, int] | None = None
) -> Iterator[ConfigError]:
    """The longest request (`longest`, when range_ratio widens the lengths) must fit the served context."""
    longest_in, longest_out = longest or (input_len, output_len)
    if context is not None and longest_in + longest_out > context:
        widened = " (lengths widened by range_ratio)" if longest else ""
        yield ConfigError(
            "benchmark.input_len",
            input_len,
            f"the longest request, {longest_in} prompt + {longest_out} output = {longest_in + longest_out} "
            f"tokens{widened}, exceeds the served context engine.max_model_len={context}.",
            hint="Shorten the benchmark's lengths or raise engine.max_model_len.",
        )


def levels(key: str, values: list[int]) -> Iterator[ConfigError]:
    if not values:
        yield ConfigError(key, values, "needs at least one load level.")
    for level in values:
        yield from at_least(key, level, 1)


def at_least(key: str, value: int, minimum: int) -> Iterator[ConfigError]:
    if value < minimum:
        yield ConfigError(key, value, f"must be at least {minimum}." if minimum else "must be 0 or more.")


def positive_seconds(key: str, value: float) -> Iterator[ConfigError]:
    if not (value > 0 and math.isfinite(value)):
        yield ConfigError(key, value, "must be a positive number of seconds.")
