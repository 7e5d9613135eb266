"""The online phase (replaces the seed's vllm_online_benchmark.py): load levels against the live server.

Closed-loop levels keep `concurrency` requests in flight; open-loop levels send at `request_rate` requests/s
(gamma gaps, shape `burstiness`), optionally capped at `max_concurrency` in flight. A level is `num_prompts`
requests, or, with `duration_s`, as many as fit in that time (closed loop) or rate x duration (open loop),
cycling through the `num_prompts` prompts. Warm-up requests use prompts of their own and are not measured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmstack.config.schema import RunConfig
from llmstack.errors import ConfigError
from llmstack.phases.common import Level, PhaseContext, load_tokenizer, request_payload
from llmstack.phases.http_options import (
    HttpBenchmarkConfig,
    at_least,
    http_problems,
    levels,
    positive_seconds,
    served_context,
)
from llmstack.phases.runner import HttpPhase
from llmstack.phases.samples import dataset_host_problems, dataset_problems, load_samples

if TYPE_CHECKING:
    from llmstack.bench.loadgen import LoadResult

logger = logging.getLogger(__name__)

ENDPOINT_CHOICES = ("completions", "chat")


@dataclass
class OnlineBenchmarkConfig(HttpBenchmarkConfig):
    phase: str = "online"
    # completions | chat
    endpoint: str = "completions"
    stream: bool = True
    # Closed-loop load levels (requests in flight), run in order against the same server; used when
    # request_rate is empty.
    concurrency: list[int] = field(default_factory=lambda: [4])
    # Open-loop load levels in requests/s (each a level, in order); empty: closed loop.
    request_rate: list[float] = field(default_factory=list)
    # Gamma shape of the open-loop arrival gaps: 1 = Poisson, < 1 burstier, inf = evenly spaced.
    burstiness: float = 1.0
    # Open loop only: at most this many requests in flight; the wait is reported as client queue time.
    max_concurrency: int | None = None
    # Measured requests per level. With duration_s: the size of the prompt pool cycled through.
    num_prompts: int = 16
    # Run each level this long instead of num_prompts requests (open loop: rate x duration requests).
    duration_s: float | None = None
    # random | fixed | sharegpt | jsonl
    dataset: str = "random"
    # The file for sharegpt (JSON) and jsonl (one {"prompt": ..., "output_len": ...} per line).
    dataset_path: str | None = None
    input_len: int = 32
    # random: lengths uniform in [len*(1-r), len*(1+r)], as vLLM's random dataset.
    range_ratio: float = 0.0
    # sharegpt: the seed's and vLLM's filter (prompt and reply >= 4 tokens, prompt <= 1024, sum <= 2048).
    sharegpt_max_input_len: int = 1024
    sharegpt_max_total_len: int = 2048
    # sharegpt: ask every request for output_len tokens instead of its reply's length.
    sharegpt_fixed_output_len: bool = False


CONFIG = OnlineBenchmarkConfig


def problems(run: RunConfig, b: OnlineBenchmarkConfig) -> Iterator[ConfigError]:
    yield from http_problems(b, streamed=b.stream)
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
        yield from levels("benchmark.concurrency", b.concurrency)
        if b.max_concurrency is not None:
            yield ConfigError(
                "benchmark.max_concurrency",
                b.max_concurrency,
                "caps open-loop levels only, and benchmark.request_rate is empty.",
                hint="Closed-loop levels are set with benchmark.concurrency; or give benchmark.request_rate.",
            )
    if b.max_concurrency is not None:
        yield from at_least("benchmark.max_concurrency", b.max_concurrency, 1)
    if not b.burstiness > 0:
        yield ConfigError(
            "benchmark.burstiness", b.burstiness, "must be positive (1 = Poisson, inf = evenly spaced)."
        )
    yield from at_least("benchmark.num_prompts", b.num_prompts, 1)
    if b.duration_s is not None:
        yield from positive_seconds("benchmark.duration_s", b.duration_s)
    yield from dataset_problems(b, served_context(run))


def host_problems(run: RunConfig, b: OnlineBenchmarkConfig) -> Iterator[ConfigError]:
    yield from dataset_host_problems(b)


def prepare(ctx: PhaseContext) -> OnlinePhase:
    return OnlinePhase(ctx)


def levels_of(bench: OnlineBenchmarkConfig) -> list[Level]:
    if bench.request_rate:
        cap = bench.max_concurrency
        return [
            Level(f"r{rate:g}" + (f"-c{cap}" if cap else ""), cap, float(rate)) for rate in bench.request_rate
        ]
    return [Level(f"c{c}", c) for c in bench.concurrency]


class OnlinePhase(HttpPhase):
    def __init__(self, ctx: PhaseContext) -> None:
        from llmstack.bench.prompts import token_counter

        bench = ctx.run.benchmark
        assert isinstance(bench, OnlineBenchmarkConfig)
        super().__init__(ctx, bench)
        self.bench: OnlineBenchmarkConfig = bench
        self.endpoint_name = bench.endpoint
        self.levels = levels_of(bench)
        tokenizer = load_tokenizer(ctx)
        self.count_tokens = token_counter(tokenizer)
        samples = load_samples(
            bench, tokenizer, bench.warmup_requests + bench.num_prompts, ctx.run.engine.max_model_len
        )
        payloads = [
            request_payload(
                model=ctx.served_name,
                endpoint=bench.endpoint,
                content=s.prompt,
                output_len=s.output_len,
                stream=bench.stream,
                ignore_eos=bench.ignore_eos,
                min_tokens=bench.min_tokens,
                temperature=bench.temperature,
            )
            for s in samples
        ]
        w = bench.warmup_requests
        self.warmup_payloads = payloads[:w]
        self.payloads = payloads[w:]
        # The server counts a chat prompt with its template, which we cannot know: no expected length then.
        chat = bench.endpoint == "chat"
        if chat:
            check_chat_fits(ctx.run, samples, bench.input_len)
        self.input_lens: list[int | None] = [None if chat else s.input_tokens for s in samples[w:]]
        ctx.summary.update({"endpoint": bench.endpoint, "dataset": bench.dataset, "levels": []})

    def measure(self, level: Level, server: Any) -> LoadResult:
        bench = self.bench
        if bench.duration_s is not None and level.closed:
            logger.info("benchmark %s: %g s at concurrency %d", level.label, bench.duration_s,
                        level.concurrency)  # fmt: skip
            return self.load(
                level, server, self.payloads, duration_s=bench.duration_s, input_lens=self.input_lens
            )
        count = bench.num_prompts
        if bench.duration_s is not None:
            count = max(1, math.ceil(level.request_rate * bench.duration_s))
        payloads = [self.payloads[i % len(self.payloads)] for i in range(count)]
        input_lens = [self.input_lens[i % len(self.input_lens)] for i in range(count)]
        if level.closed:
            logger.info("benchmark %s: %d requests at concurrency %s", level.label, count, level.concurrency)
        else:
            logger.info(
                "benchmark %s: %d requests at %g requests/s (burstiness %g, at most %s in flight)",
                level.label,
                count,
                level.request_rate,
                bench.burstiness,
                level.concurrency or "unlimited",
            )
        return self.load(
            level,
            server,
            payloads,
            request_rate=level.request_rate,
            burstiness=bench.burstiness,
            seed=bench.seed,
            input_lens=input_lens,
        )


def check_chat_fits(run: RunConfig, samples: Sequence[Any], input_len: int) -> None:
    """A chat prompt is longer on the server than its text: the model's chat template wraps it. The config
    rule could check only the text's length; here, with the model's tokenizer, the longest prompts are
    counted as the server will count them, before the first request (a server would clamp max_tokens and
    refuse min_tokens, failing every request)."""
    context = run.engine.max_model_len
    if context is None or not samples:
        return
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            run.model.tokenizer or str(run.model.path), trust_remote_code=bool(run.model.trust_remote_code)
        )
        if not tokenizer.chat_template:
            return
        longest = sorted(samples, key=lambda s: s.input_tokens or len(s.prompt), reverse=True)[:8]
        lengths = [(_templated_length(tokenizer, sample.prompt), sample.output_len) for sample in longest]
    except Exception as exc:  # no transformers, or a tokenizer it cannot load: the server will say
        logger.debug("chat prompts not counted with the template: %s", exc)
        return
    for templated, output_len in lengths:
        if templated + output_len > context:
            excess = templated + output_len - context
            raise ConfigError(
                "benchmark.input_len",
                input_len,
                f"with the model's chat template a prompt is {templated} tokens; + {output_len} output = "
                f"{templated + output_len} tokens exceed the served context engine.max_model_len={context}.",
                hint=f"Shorten benchmark.input_len or benchmark.output_len by {excess} tokens or more, use "
                "benchmark.endpoint=completions, or raise engine.max_model_len.",
            )


def _templated_length(tokenizer: Any, prompt: str) -> int:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)
