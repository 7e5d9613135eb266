"""The online phase (replaces the seed's vllm_online_benchmark.py): load levels against the live server.

Closed-loop levels keep `concurrency` requests in flight; open-loop levels send at `request_rate` requests/s
(gamma gaps, shape `burstiness`), optionally capped at `max_concurrency` in flight. A level is `num_prompts`
requests, or, with `duration_s`, as many as fit in that time (closed loop) or rate x duration (open loop),
cycling through the `num_prompts` prompts. Warm-up requests use prompts of their own and are not measured.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from llmstack.bench.phases.common import (
    ENDPOINTS,
    Level,
    PhaseContext,
    check_engine,
    end_progress_line,
    finish_level,
    goodput_slos,
    load_tokenizer,
    log_failures,
    print_combined_table,
    progress_bar,
    request_payload,
    timed_progress_bar,
    warm_up,
)
from llmstack.config.schema import OnlineBenchmarkConfig

logger = logging.getLogger(__name__)


def prepare(ctx: PhaseContext) -> OnlinePhase:
    return OnlinePhase(ctx)


def levels_of(bench: OnlineBenchmarkConfig) -> list[Level]:
    if bench.request_rate:
        cap = bench.max_concurrency
        return [
            Level(f"r{rate:g}" + (f"-c{cap}" if cap else ""), cap, float(rate)) for rate in bench.request_rate
        ]
    return [Level(f"c{c}", c) for c in bench.concurrency]


class OnlinePhase:
    def __init__(self, ctx: PhaseContext) -> None:
        from llmstack.bench.datasets import load_samples
        from llmstack.bench.prompts import token_counter

        bench = ctx.run.benchmark
        assert isinstance(bench, OnlineBenchmarkConfig)
        self.ctx = ctx
        self.bench = bench
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
        self.input_lens = [None if chat else s.input_tokens for s in samples[w:]]
        ctx.summary.update({"endpoint": bench.endpoint, "dataset": bench.dataset, "levels": []})

    def run(self, server: Any) -> None:
        bench, ctx = self.bench, self.ctx
        endpoint = ENDPOINTS[bench.endpoint]
        widest = max((lvl.concurrency or len(self.warmup_payloads)) for lvl in self.levels)
        warm_up(
            ctx,
            server,
            self.warmup_payloads,
            endpoint=endpoint,
            concurrency=max(1, min(len(self.warmup_payloads), widest)),
            timeout_s=bench.timeout_s,
        )
        summaries = []
        for level in self.levels:
            result = self._measure(level, endpoint, server)
            summaries.append(
                finish_level(
                    ctx,
                    server,
                    level,
                    result,
                    count_tokens=self.count_tokens,
                    percentiles=bench.percentiles,
                    slos=goodput_slos(bench),
                )
            )
        print_combined_table(ctx, summaries, [lvl.label for lvl in self.levels])
        log_failures(ctx)

    def _measure(self, level: Level, endpoint: str, server: Any) -> Any:
        from llmstack.bench.loadgen import run_load_sync

        bench = self.bench
        common = {
            "endpoint": endpoint,
            "api_key": self.ctx.api_key,
            "timeout_s": bench.timeout_s,
            "should_stop": self.ctx.should_stop(server),
        }
        check_engine(server, f"before load level {level.label}")
        if bench.duration_s is not None and level.closed:
            assert level.concurrency is not None
            logger.info("benchmark %s: %g s at concurrency %d", level.label, bench.duration_s,
                        level.concurrency)  # fmt: skip
            result = run_load_sync(
                self.ctx.base_url,
                self.payloads,
                concurrency=level.concurrency,
                duration_s=bench.duration_s,
                input_lens=self.input_lens,
                progress=timed_progress_bar(level.label, bench.duration_s),
                **common,
            )
            end_progress_line()
            return result
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
        return run_load_sync(
            self.ctx.base_url,
            payloads,
            concurrency=level.concurrency,
            request_rate=level.request_rate,
            burstiness=bench.burstiness,
            seed=bench.seed,
            progress=progress_bar(level.label),
            input_lens=input_lens,
            **common,
        )
