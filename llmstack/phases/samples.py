"""The prompts of the phases that draw them from a dataset (online, offline_throughput): the config's dataset
knobs, their rules, and the samples they name, checked against the served context before anything is sent.

The datasets themselves are the client's (`llmstack.bench.datasets`); this module maps a config onto them and
reports their errors as BenchmarkError.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmstack.errors import BenchmarkError, ConfigError
from llmstack.phases.common import client_errors
from llmstack.phases.http_options import at_least, fits_context

if TYPE_CHECKING:  # the client is imported when samples are made
    from llmstack.bench.datasets import Sample

logger = logging.getLogger(__name__)

DATASET_CHOICES = ("random", "fixed", "sharegpt", "jsonl")
DATASETS_WITH_FILE = ("sharegpt", "jsonl")
# vLLM's and the seed's ShareGPT filter drops prompts and replies shorter than this.
SHAREGPT_MIN_LEN = 4


class DatasetOptions(Protocol):
    """The dataset knobs, as OnlineBenchmarkConfig and OfflineThroughputConfig both have them."""

    dataset: str
    dataset_path: str | None
    input_len: int
    output_len: int
    range_ratio: float
    seed: int
    sharegpt_max_input_len: int
    sharegpt_max_total_len: int
    sharegpt_fixed_output_len: bool


def load_samples(b: DatasetOptions, tokenizer: Any | None, count: int, context: int | None) -> list[Sample]:
    """`count` samples from the dataset `b` names; BenchmarkError for an unusable file or a sample that
    cannot fit the served context."""
    with client_errors():
        samples = _load(b, tokenizer, count, context)
    fit_context(samples, context, f"dataset {b.dataset}")
    return samples


def _load(b: DatasetOptions, tokenizer: Any | None, count: int, context: int | None) -> list[Sample]:
    from llmstack.bench import datasets

    if b.dataset == "random":
        return datasets.random_samples(tokenizer, count, b.input_len, b.output_len, b.range_ratio, b.seed)
    if b.dataset == "fixed":
        return datasets.fixed_samples(tokenizer, count, b.input_len, b.output_len)
    if b.dataset == "sharegpt":
        assert b.dataset_path is not None  # a config rule
        max_total = b.sharegpt_max_total_len
        if context is not None and context < max_total:
            logger.info("sharegpt: prompt + reply capped at the served context, %d tokens", context)
            max_total = context
        return datasets.sharegpt_samples(
            b.dataset_path,
            tokenizer,
            count,
            seed=b.seed,
            max_input_len=b.sharegpt_max_input_len,
            max_total_len=max_total,
            output_len=b.output_len if b.sharegpt_fixed_output_len else None,
        )
    if b.dataset == "jsonl":
        assert b.dataset_path is not None  # a config rule
        return datasets.jsonl_samples(b.dataset_path, tokenizer, count, b.output_len)
    raise BenchmarkError(f"unknown dataset {b.dataset!r}")


def fit_context(samples: Sequence[Sample], context: int | None, source: str) -> None:
    """A sample that cannot fit the served context would only fail at the server: say so before sending."""
    if context is None:
        return
    for i, sample in enumerate(samples):
        if sample.input_tokens is not None and sample.input_tokens + sample.output_len > context:
            raise BenchmarkError(
                f"{source}: sample {i} needs {sample.input_tokens} prompt + {sample.output_len} output "
                f"tokens, more than the served context engine.max_model_len={context}"
            )


def dataset_problems(b: DatasetOptions, context: int | None) -> Iterator[ConfigError]:
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
        yield from at_least("benchmark.input_len", b.input_len, 1)
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
        yield from fits_context(b.input_len, b.output_len, context, widened)
    elif b.dataset == "fixed":
        yield from fits_context(b.input_len, b.output_len, context)
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


def dataset_host_problems(b: DatasetOptions) -> Iterator[ConfigError]:
    if b.dataset_path is not None and not Path(b.dataset_path).is_file():
        yield ConfigError("benchmark.dataset_path", b.dataset_path, "is not a file on this machine.")
