"""The multimodal phase (replaces vllm_online_benchmark_multimodal.py): chat completions with an image.

Every request is one user message with a text part and an `image_url` part (a URL as given, a local file as
a base64 data URL), at each closed-loop concurrency level in turn. The first request goes alone, before any
other: a server that does not take images (a text-only model) answers it with an error, and the phase stops
there with that error, instead of sending hundreds of requests that fail the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.config.schema import RunConfig
from llmstack.errors import BenchmarkError, ConfigError
from llmstack.phases.common import (
    Level,
    PhaseContext,
    check_engine,
    client_errors,
    load_tokenizer,
    request_payload,
)
from llmstack.phases.http_options import (
    HttpBenchmarkConfig,
    at_least,
    fits_context,
    http_problems,
    levels,
    served_context,
)
from llmstack.phases.runner import HttpPhase

if TYPE_CHECKING:
    from llmstack.bench.loadgen import LoadResult

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "What is in the image?"
IMAGE_SCHEMES = ("http://", "https://", "data:image/")


@dataclass
class MultimodalBenchmarkConfig(HttpBenchmarkConfig):
    phase: str = "multimodal"
    # An http(s) URL (sent as is), a data: URL, or a local file (sent as a base64 data URL). Required.
    image: str | None = None
    # The text part. None: "What is in the image?", or with input_len the fixed text cut to that many tokens.
    prompt: str | None = None
    input_len: int | None = None
    output_len: int = 100
    stream: bool = True
    concurrency: list[int] = field(default_factory=lambda: [1])
    num_prompts: int = 8


CONFIG = MultimodalBenchmarkConfig


def problems(run: RunConfig, b: MultimodalBenchmarkConfig) -> Iterator[ConfigError]:
    yield from http_problems(b, streamed=b.stream)
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
        yield from at_least("benchmark.input_len", b.input_len, 1)
        yield from fits_context(b.input_len, b.output_len, served_context(run))
    yield from levels("benchmark.concurrency", b.concurrency)
    yield from at_least("benchmark.num_prompts", b.num_prompts, 1)


def host_problems(run: RunConfig, b: MultimodalBenchmarkConfig) -> Iterator[ConfigError]:
    if b.image and not b.image.startswith(IMAGE_SCHEMES) and not Path(b.image).is_file():
        yield ConfigError(
            "benchmark.image",
            b.image,
            "is neither an http(s) or data:image URL nor a file on this machine.",
        )


def prepare(ctx: PhaseContext) -> MultimodalPhase:
    return MultimodalPhase(ctx)


class MultimodalPhase(HttpPhase):
    endpoint_name = "chat"

    def __init__(self, ctx: PhaseContext) -> None:
        from llmstack.bench.images import image_url
        from llmstack.bench.prompts import token_counter

        bench = ctx.run.benchmark
        assert isinstance(bench, MultimodalBenchmarkConfig)
        assert bench.image is not None  # a config rule
        super().__init__(ctx, bench)
        self.bench: MultimodalBenchmarkConfig = bench
        tokenizer = load_tokenizer(ctx)
        self.count_tokens = token_counter(tokenizer)
        text = self._text(tokenizer)
        with client_errors():
            url = image_url(bench.image)
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
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
        # The first request of the warm-up goes alone (`before`).
        self.warmup_payloads = [self.payload] * (bench.warmup_requests - 1)
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

    def before(self, server: Any) -> None:
        """One request alone; the server's refusal (no vision support, bad image) ends the phase clearly."""
        logger.info("first image request, alone")
        first = self.load(Level("first", 1), server, [self.payload], quiet=True).records[0]
        check_engine(server, "after the first image request")
        if first.success:
            return
        raise BenchmarkError(
            f"the server at {self.ctx.base_url} did not take an image request for model "
            f"'{self.ctx.served_name}' ({self.ctx.run.model.name}): {first.error}. The multimodal benchmark "
            "needs a vision-language model and a server that accepts image_url parts."
        )

    def measure(self, level: Level, server: Any) -> LoadResult:
        bench = self.bench
        logger.info("benchmark %s: %d image requests at concurrency %s", level.label, bench.num_prompts,
                    level.concurrency)  # fmt: skip
        return self.load(level, server, [self.payload] * bench.num_prompts)
