"""The rules of the benchmark group: one check per knob of each phase's schema (see schema.py).

Config rules (`benchmark_problems`) look only at the resolved config; host rules (`benchmark_host_problems`)
look at files and programs on this machine and are skipped by dry runs, as in validate.py.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmstack.config.schema import (
    BENCHMARK_SCHEMAS,
    HttpBenchmarkConfig,
    MultimodalBenchmarkConfig,
    OfflineThroughputConfig,
    OnlineBenchmarkConfig,
    RpsBenchmarkConfig,
    RunConfig,
)
from llmstack.errors import ConfigError

ENDPOINT_CHOICES = ("completions", "chat")
DATASET_CHOICES = ("random", "fixed", "sharegpt", "jsonl")
DATASETS_WITH_FILE = ("sharegpt", "jsonl")
WRK_CHOICES = ("auto", "never", "always")
# 600 s of histogram is 4.8 GB of address space already (wrk 4.1: `stats_alloc(timeout_ms * 1000)` uint64s).
WRK_MAX_TIMEOUT_S = 600.0
IMAGE_SCHEMES = ("http://", "https://", "data:image/")
# vLLM's and the seed's ShareGPT filter drops prompts and replies shorter than this.
SHAREGPT_MIN_LEN = 4


def benchmark_problems(run: RunConfig) -> Iterator[ConfigError]:
    b = run.benchmark
    phase = b.phase
    if phase not in BENCHMARK_SCHEMAS:
        yield ConfigError("benchmark.phase", phase, "is not a benchmark phase.", sorted(BENCHMARK_SCHEMAS))
        return
    if type(b) is not BENCHMARK_SCHEMAS[phase]:
        composed = next(p for p, schema in BENCHMARK_SCHEMAS.items() if type(b) is schema)
        yield ConfigError(
            "benchmark.phase",
            phase,
            f"benchmark={b.name} composed the options of the {composed} phase; a phase's options come with "
            "its group option.",
            hint=f"Select it with benchmark={phase} (or a preset of that phase) instead of setting "
            "benchmark.phase.",
        )
        return
    if isinstance(b, HttpBenchmarkConfig):
        yield from _http_problems(b)
    if isinstance(b, OnlineBenchmarkConfig):
        yield from _online_problems(b, _context(run))
    elif isinstance(b, MultimodalBenchmarkConfig):
        yield from _multimodal_problems(b, _context(run))
    elif isinstance(b, RpsBenchmarkConfig):
        yield from _rps_problems(b, _context(run))
    elif isinstance(b, OfflineThroughputConfig):
        yield from _offline_problems(run, b)


def benchmark_host_problems(run: RunConfig) -> Iterator[ConfigError]:
    b = run.benchmark
    path = getattr(b, "dataset_path", None)
    if path is not None and not Path(path).is_file():
        yield ConfigError("benchmark.dataset_path", path, "is not a file on this machine.")
    if (
        isinstance(b, MultimodalBenchmarkConfig)
        and b.image
        and not b.image.startswith(IMAGE_SCHEMES)
        and not Path(b.image).is_file()
    ):
        yield ConfigError(
            "benchmark.image",
            b.image,
            "is neither an http(s) or data:image URL nor a file on this machine.",
        )
    if isinstance(b, RpsBenchmarkConfig) and b.wrk == "always" and shutil.which("wrk") is None:
        yield ConfigError(
            "benchmark.wrk",
            b.wrk,
            "needs the wrk program, which is not on PATH.",
            WRK_CHOICES,
            hint="Install it (Debian/Ubuntu: apt-get install -y wrk) or use benchmark.wrk=auto.",
        )


def _context(run: RunConfig) -> int | None:
    return run.engine.max_model_len


def _http_problems(b: HttpBenchmarkConfig) -> Iterator[ConfigError]:
    yield from _at_least("benchmark.warmup_requests", b.warmup_requests, 0)
    yield from _at_least("benchmark.output_len", b.output_len, 1)
    if b.min_tokens is not None and not 0 <= b.min_tokens <= b.output_len:
        yield ConfigError(
            "benchmark.min_tokens",
            b.min_tokens,
            f"must be between 0 and benchmark.output_len ({b.output_len}); null follows ignore_eos.",
        )
    if not (b.temperature >= 0 and math.isfinite(b.temperature)):
        yield ConfigError("benchmark.temperature", b.temperature, "must be 0 (greedy) or more.")
    yield from _positive_seconds("benchmark.timeout_s", b.timeout_s)
    for metric in ("ttft_ms", "tpot_ms", "e2el_ms"):
        limit = getattr(b.slo, metric)
        if limit is not None and not (limit > 0 and math.isfinite(limit)):
            yield ConfigError(f"benchmark.slo.{metric}", limit, "must be a positive number of ms, or null.")
    streamed = getattr(b, "stream", False)
    for metric in ("ttft_ms", "tpot_ms"):
        if getattr(b.slo, metric) is not None and not streamed:
            yield ConfigError(
                f"benchmark.slo.{metric}",
                getattr(b.slo, metric),
                "needs streamed requests: without a stream there is no first token to time.",
                hint="Set benchmark.stream=true, or keep only benchmark.slo.e2el_ms.",
            )
    for p in b.percentiles:
        if not 0 <= p <= 100:
            yield ConfigError("benchmark.percentiles", p, "is not a percentile (0-100).")


def _online_problems(b: OnlineBenchmarkConfig, context: int | None) -> Iterator[ConfigError]:
    if b.endpoint not in ENDPOINT_CHOICES:
        yield ConfigError("benchmark.endpoint", b.endpoint, "is not an endpoint.", ENDPOINT_CHOICES)
    for rate in b.request_rate:
        if not (rate > 0 and math.isfinite(rate)):
            yield ConfigError(
                "benchmark.request_rate",
                rate,
                "must be a positive, finite number of requests/s.",
                hint="For requests sent as fast as the server takes them, use closed-loop levels: "
                "benchmark.request_rate=[] benchmark.concurrency=[...].",
            )
    if not b.request_rate:
        yield from _levels("benchmark.concurrency", b.concurrency)
        if b.max_concurrency is not None:
            yield ConfigError(
                "benchmark.max_concurrency",
                b.max_concurrency,
                "caps open-loop levels only, and benchmark.request_rate is empty.",
                hint="Closed-loop levels are set with benchmark.concurrency; or give benchmark.request_rate.",
            )
    if b.max_concurrency is not None:
        yield from _at_least("benchmark.max_concurrency", b.max_concurrency, 1)
    if not b.burstiness > 0:
        yield ConfigError(
            "benchmark.burstiness", b.burstiness, "must be positive (1 = Poisson, inf = evenly spaced)."
        )
    yield from _at_least("benchmark.num_prompts", b.num_prompts, 1)
    if b.duration_s is not None:
        yield from _positive_seconds("benchmark.duration_s", b.duration_s)
    yield from _dataset_problems(b, context)


def _multimodal_problems(b: MultimodalBenchmarkConfig, context: int | None) -> Iterator[ConfigError]:
    if not b.image:
        yield ConfigError(
            "benchmark.image",
            b.image,
            "is required: the image every request sends.",
            hint="An http(s) URL, a data:image URL, or a local file (sent as a base64 data URL).",
        )
    elif "://" in b.image and not b.image.startswith(IMAGE_SCHEMES):
        yield ConfigError("benchmark.image", b.image, "has an unsupported URL scheme.", ["http", "https"])
    if b.prompt is not None and b.input_len is not None:
        yield ConfigError(
            "benchmark.input_len",
            b.input_len,
            "and benchmark.prompt both set the text part; give one of them.",
        )
    if b.input_len is not None:
        yield from _at_least("benchmark.input_len", b.input_len, 1)
        yield from _fits_context(b.input_len, b.output_len, context)
    yield from _levels("benchmark.concurrency", b.concurrency)
    yield from _at_least("benchmark.num_prompts", b.num_prompts, 1)


def _rps_problems(b: RpsBenchmarkConfig, context: int | None) -> Iterator[ConfigError]:
    yield from _at_least("benchmark.connections", b.connections, 1)
    yield from _positive_seconds("benchmark.duration_s", b.duration_s)
    yield from _at_least("benchmark.input_len", b.input_len, 1)
    yield from _fits_context(b.input_len, b.output_len, context)
    if b.wrk not in WRK_CHOICES:
        yield ConfigError("benchmark.wrk", b.wrk, "is not a wrk mode.", WRK_CHOICES)
    if not 0 < b.wrk_timeout_s <= WRK_MAX_TIMEOUT_S:
        yield ConfigError(
            "benchmark.wrk_timeout_s",
            b.wrk_timeout_s,
            f"must be in (0, {WRK_MAX_TIMEOUT_S:g}] seconds: wrk reserves 8 bytes of memory per microsecond "
            "of its timeout for its latency histogram.",
        )
    if b.wrk_threads is not None and not 1 <= b.wrk_threads <= max(b.connections, 1):
        yield ConfigError(
            "benchmark.wrk_threads",
            b.wrk_threads,
            f"must be between 1 and benchmark.connections ({b.connections}): wrk gives every thread at "
            "least one connection.",
        )


def _offline_problems(run: RunConfig, b: OfflineThroughputConfig) -> Iterator[ConfigError]:
    if run.engine.name != "vllm":
        yield ConfigError(
            "benchmark",
            b.name,
            f"runs vLLM's in-process engine; engine={run.engine.name} has none.",
            hint="Use engine=vllm or engine=vllm_ipex, or an online benchmark against this engine.",
        )
    yield from _at_least("benchmark.num_prompts", b.num_prompts, 1)
    yield from _at_least("benchmark.warmup_requests", b.warmup_requests, 0)
    yield from _at_least("benchmark.output_len", b.output_len, 1)
    if not (b.temperature >= 0 and math.isfinite(b.temperature)):
        yield ConfigError("benchmark.temperature", b.temperature, "must be 0 (greedy) or more.")
    if not 0 < b.top_p <= 1:
        yield ConfigError("benchmark.top_p", b.top_p, "is a probability mass, in (0, 1].")
    yield from _positive_seconds("benchmark.timeout_s", b.timeout_s)
    yield from _dataset_problems(b, _context(run))


def _dataset_problems(b: Any, context: int | None) -> Iterator[ConfigError]:
    """Rules shared by the phases that draw prompts from a dataset (online, offline_throughput)."""
    if b.dataset not in DATASET_CHOICES:
        yield ConfigError("benchmark.dataset", b.dataset, "is not a dataset.", DATASET_CHOICES)
        return
    if b.dataset in DATASETS_WITH_FILE and not b.dataset_path:
        yield ConfigError(
            "benchmark.dataset_path",
            b.dataset_path,
            f"is required for benchmark.dataset={b.dataset}.",
            hint='sharegpt: a ShareGPT-format JSON file; jsonl: one {"prompt": ...} object per line.',
        )
    if b.dataset not in DATASETS_WITH_FILE and b.dataset_path is not None:
        yield ConfigError(
            "benchmark.dataset_path",
            b.dataset_path,
            f"is only read by the file datasets, not by benchmark.dataset={b.dataset}.",
            DATASETS_WITH_FILE,
        )
    if b.dataset in ("random", "fixed"):
        yield from _at_least("benchmark.input_len", b.input_len, 1)
    if not 0 <= b.range_ratio < 1:
        yield ConfigError("benchmark.range_ratio", b.range_ratio, "must be in [0, 1) (0 = exact lengths).")
    elif b.range_ratio and b.dataset != "random":
        yield ConfigError(
            "benchmark.range_ratio", b.range_ratio, f"applies to dataset=random, not {b.dataset}.", [0.0]
        )
    if b.dataset == "random":
        longest_in = math.ceil(b.input_len * (1 + b.range_ratio))
        longest_out = math.ceil(b.output_len * (1 + b.range_ratio))
        widened = (longest_in, longest_out) if b.range_ratio else None
        yield from _fits_context(b.input_len, b.output_len, context, widened)
    elif b.dataset == "fixed":
        yield from _fits_context(b.input_len, b.output_len, context)
    if b.sharegpt_max_input_len < SHAREGPT_MIN_LEN:
        yield ConfigError(
            "benchmark.sharegpt_max_input_len",
            b.sharegpt_max_input_len,
            f"must be at least {SHAREGPT_MIN_LEN}: shorter prompts are dropped anyway.",
        )
    if b.sharegpt_max_total_len < 2 * SHAREGPT_MIN_LEN:
        yield ConfigError(
            "benchmark.sharegpt_max_total_len",
            b.sharegpt_max_total_len,
            f"must be at least {2 * SHAREGPT_MIN_LEN}: prompt and reply have {SHAREGPT_MIN_LEN} tokens each "
            "at least.",
        )


def _fits_context(
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


def _levels(key: str, levels: list[int]) -> Iterator[ConfigError]:
    if not levels:
        yield ConfigError(key, levels, "needs at least one load level.")
    for level in levels:
        yield from _at_least(key, level, 1)


def _at_least(key: str, value: int, minimum: int) -> Iterator[ConfigError]:
    if value < minimum:
        yield ConfigError(key, value, f"must be at least {minimum}." if minimum else "must be 0 or more.")


def _positive_seconds(key: str, value: float) -> Iterator[ConfigError]:
    if not (value > 0 and math.isfinite(value)):
        yield ConfigError(key, value, "must be a positive number of seconds.")
