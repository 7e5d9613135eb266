"""The multimodal phase (replaces vllm_online_benchmark_multimodal.py): chat completions with an image.

Every request is one user message with a text part and an `image_url` part (a URL as given, a local file as
a base64 data URL), at each closed-loop concurrency level in turn. The first request goes alone, before any
other: a server that does not take images (a text-only model) answers it with an error, and the phase stops
there with that error, instead of sending hundreds of requests that fail the same way.
"""

from __future__ import annotations

import logging
from typing import Any

from llmstack.bench.phases.common import (
    ENDPOINTS,
    Level,
    PhaseContext,
    check_engine,
    finish_level,
    goodput_slos,
    load_tokenizer,
    log_failures,
    print_combined_table,
    progress_bar,
    request_payload,
    warm_up,
)
from llmstack.config.schema import MultimodalBenchmarkConfig
from llmstack.errors import BenchmarkError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "What is in the image?"


def prepare(ctx: PhaseContext) -> MultimodalPhase:
    return MultimodalPhase(ctx)


class MultimodalPhase:
    def __init__(self, ctx: PhaseContext) -> None:
        from llmstack.bench.images import image_url
        from llmstack.bench.prompts import token_counter

        bench = ctx.run.benchmark
        assert isinstance(bench, MultimodalBenchmarkConfig)
        assert bench.image is not None  # a config rule
        self.ctx = ctx
        self.bench = bench
        tokenizer = load_tokenizer(ctx)
        self.count_tokens = token_counter(tokenizer)
        text = self._text(tokenizer)
        content = [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": image_url(bench.image)}},
        ]
        self.payload = request_payload(
            model=ctx.served_name,
            endpoint="chat",
            content=content,
            output_len=bench.output_len,
            stream=bench.stream,
            ignore_eos=bench.ignore_eos,
            min_tokens=bench.min_tokens,
            temperature=bench.temperature,
        )
        self.levels = [Level(f"c{c}", c) for c in bench.concurrency]
        shown = bench.image if not bench.image.startswith("data:") else bench.image[:40] + "..."
        ctx.summary.update({"endpoint": "chat", "image": shown, "levels": []})

    def _text(self, tokenizer: Any) -> str:
        bench = self.bench
        if bench.prompt is not None:
            return bench.prompt
        if bench.input_len is None:
            return DEFAULT_PROMPT
        from llmstack.bench.fixed_text import fixed_text
        from llmstack.bench.prompts import truncated_prompt

        # The chat template and the image add their own tokens: this is the text part's length only.
        return truncated_prompt(tokenizer, fixed_text(bench.input_len), bench.input_len).text

    def run(self, server: Any) -> None:
        bench, ctx = self.bench, self.ctx
        endpoint = ENDPOINTS["chat"]
        self._first_request(server, endpoint)
        warm = bench.warmup_requests - 1
        if warm > 0:
            warm_up(
                ctx,
                server,
                [self.payload] * warm,
                endpoint=endpoint,
                concurrency=min(warm, max(bench.concurrency)),
                timeout_s=bench.timeout_s,
            )
        summaries = []
        for level in self.levels:
            from llmstack.bench.loadgen import run_load_sync

            logger.info("benchmark %s: %d image requests at concurrency %s", level.label, bench.num_prompts,
                        level.concurrency)  # fmt: skip
            check_engine(server, f"before load level {level.label}")
            result = run_load_sync(
                ctx.base_url,
                [self.payload] * bench.num_prompts,
                endpoint=endpoint,
                concurrency=level.concurrency,
                api_key=ctx.api_key,
                timeout_s=bench.timeout_s,
                progress=progress_bar(level.label),
                should_stop=ctx.should_stop(server),
            )
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

    def _first_request(self, server: Any, endpoint: str) -> None:
        """One request alone; the server's refusal (no vision support, bad image) ends the phase clearly."""
        from llmstack.bench.loadgen import run_load_sync

        logger.info("first image request, alone")
        first = run_load_sync(
            self.ctx.base_url,
            [self.payload],
            endpoint=endpoint,
            concurrency=1,
            api_key=self.ctx.api_key,
            timeout_s=self.bench.timeout_s,
            should_stop=self.ctx.should_stop(server),
        ).records[0]
        check_engine(server, "after the first image request")
        if first.success:
            return
        raise BenchmarkError(
            f"the server at {self.ctx.base_url} did not take an image request for model "
            f"'{self.ctx.served_name}' ({self.ctx.run.model.name}): {first.error}. The multimodal benchmark "
            "needs a vision-language model and a server that accepts image_url parts."
        )
