"""Benchmark datasets with the tiny model's real tokenizer: exact lengths, ShareGPT filter, JSONL parsing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmstack.bench.datasets import (
    fixed_samples,
    jsonl_samples,
    random_lengths,
    random_samples,
    sharegpt_samples,
)
from llmstack.bench.errors import BenchInputError
from llmstack.bench.fixed_text import PARAGRAPHS, fixed_text
from llmstack.bench.prompts import exact_prompts, load_tokenizer, random_prompts, truncated_prompt
from llmstack.errors import BenchmarkError
from llmstack.phases.samples import load_samples


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmstack.models.tiny import ensure_tiny_model

    return load_tokenizer(ensure_tiny_model())


def count(tokenizer: Any, text: str) -> int:
    """Tokens as the server counts a prompt: with the tokenizer's special tokens (BOS)."""
    return len(tokenizer.encode(text).ids)


# -- random ------------------------------------------------------------------------------------------------


def test_random_without_range_ratio_is_exact(tokenizer: Any) -> None:
    samples = random_samples(tokenizer, 20, input_len=48, output_len=7, range_ratio=0.0, seed=3)
    assert [s.input_tokens for s in samples] == [48] * 20
    assert [count(tokenizer, s.prompt) for s in samples] == [48] * 20
    assert {s.output_len for s in samples} == {7}
    assert len({s.prompt for s in samples}) == 20, "prompts repeat: the server's prefix cache would hide work"


def test_random_range_ratio_bounds_spread_and_exactness(tokenizer: Any) -> None:
    samples = random_samples(tokenizer, 200, input_len=41, output_len=20, range_ratio=0.5, seed=1)
    inputs = [s.input_tokens for s in samples]
    outputs = [s.output_len for s in samples]
    # vLLM's interval on the content (BOS taken off first): [floor(40*0.5), ceil(40*1.5)] + 1.
    assert min(inputs) >= 21 and max(inputs) <= 61
    assert min(outputs) >= 10 and max(outputs) <= 30
    assert max(inputs) - min(inputs) > 20 and max(outputs) - min(outputs) > 10  # really spread
    assert [count(tokenizer, s.prompt) for s in samples] == inputs  # each one exact


def test_random_lengths_follow_vllms_interval() -> None:
    lengths = random_lengths(5000, input_len=101, output_len=10, range_ratio=0.3, seed=0, special_tokens=1)
    ins = {n for n, _ in lengths}
    outs = {n for _, n in lengths}
    # content 100 -> [70, 130], plus one special token; output [7, 13]: both ends reached.
    assert (min(ins), max(ins)) == (71, 131)
    assert (min(outs), max(outs)) == (7, 13)
    assert random_lengths(10, 101, 10, 0.3, seed=0, special_tokens=1) == lengths[:10]
    assert random_lengths(3, 101, 10, 0.0, seed=9, special_tokens=1) == [(101, 10)] * 3


def test_random_output_length_never_below_one() -> None:
    assert min(n for _, n in random_lengths(500, 10, 1, 0.9, seed=2)) == 1


def test_random_prompts_are_reproducible_and_unchanged_by_the_generalisation(tokenizer: Any) -> None:
    assert random_prompts(tokenizer, 4, 30, seed=5) == exact_prompts(tokenizer, [30] * 4, seed=5)
    assert exact_prompts(tokenizer, [30, 12], seed=5)[0] == random_prompts(tokenizer, 1, 30, seed=5)[0]
    assert random_prompts(tokenizer, 2, 30, seed=6) != random_prompts(tokenizer, 2, 30, seed=5)


# -- fixed -------------------------------------------------------------------------------------------------


# From 2: one token is the BOS the server adds, so a prompt has at least two.
@pytest.mark.parametrize("input_len", [2, 3, 17, 128, 1000])
def test_fixed_is_the_text_cut_to_exactly_input_len_tokens(tokenizer: Any, input_len: int) -> None:
    samples = fixed_samples(tokenizer, 3, input_len, output_len=5)
    assert len({s.prompt for s in samples}) == 1, "fixed means one prompt for every request"
    assert samples[0].input_tokens == input_len == count(tokenizer, samples[0].prompt)
    assert fixed_text(input_len).startswith(samples[0].prompt.rstrip())


def test_fixed_text_is_ours_and_grows_by_chapters() -> None:
    long = fixed_text(20_000)
    assert len(long.split()) >= 20_000
    assert long.startswith("Chapter 1.\n\n" + PARAGRAPHS[0])
    assert "Chapter 2." in long and fixed_text(10) == fixed_text(3)


def test_truncation_that_cannot_be_exact_returns_the_closest_and_says_its_length(tokenizer: Any) -> None:
    prompt = truncated_prompt(tokenizer, fixed_text(5), 1)  # BOS alone is one: no text is that short
    assert prompt.tokens == count(tokenizer, prompt.text) == 2


def test_truncation_errors_on_a_too_short_text(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="fewer than"):
        truncated_prompt(tokenizer, "short", 100)


# -- sharegpt ----------------------------------------------------------------------------------------------


def conversation(prompt: str, *replies: str) -> dict[str, Any]:
    turns = [{"from": "human", "value": prompt}]
    turns += [{"from": "gpt", "value": r} for r in replies]
    return {"id": prompt[:10], "conversations": turns}


@pytest.fixture
def sharegpt_file(tmp_path: Path) -> Path:
    data = [
        conversation("Explain why the sky looks blue in the afternoon.", "Because of scattering of light."),
        conversation("Name three rivers in Europe, please.", "The Danube, the Rhine and the Loire."),
        conversation("Write a haiku about autumn leaves falling.", "Red leaves drift and fall."),
        conversation("hi", "Hello, how can I help you today?"),  # prompt under 4 tokens
        conversation("Say nothing at all in your answer please.", "ok"),  # reply under 4 tokens
        conversation("Only one turn in this conversation, no reply."),  # fewer than two turns
        conversation("Describe the ocean. " * 30, "It is large and deep and blue."),  # prompt too long
        conversation("A short prompt about a long answer.", "word " * 200),  # total too long
        {"id": "no conversations key"},
        conversation("How do bees make honey from nectar?", "They process nectar in their hive.", "more"),
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return path


LIMITS = {"max_input_len": 150, "max_total_len": 400}


def test_sharegpt_filter_keeps_exactly_the_valid_pairs(tokenizer: Any, sharegpt_file: Path) -> None:
    # Precondition: the fixture's "too long" entries really are, with this tokenizer.
    assert count(tokenizer, "Describe the ocean. " * 30) > 150
    assert count(tokenizer, "word " * 200) > 400
    samples = sharegpt_samples(sharegpt_file, tokenizer, 6, seed=0, **LIMITS)
    kept = {s.prompt for s in samples[:4]}
    assert kept == {
        "Explain why the sky looks blue in the afternoon.",
        "Name three rivers in Europe, please.",
        "Write a haiku about autumn leaves falling.",
        "How do bees make honey from nectar?",
    }
    replies = {
        "Explain why the sky looks blue in the afternoon.": "Because of scattering of light.",
        "How do bees make honey from nectar?": "They process nectar in their hive.",
    }
    for s in samples:
        assert s.input_tokens == count(tokenizer, s.prompt)
        if s.prompt in replies:  # as vLLM: the reply counted as tokenizer(text).input_ids
            assert s.output_len == count(tokenizer, replies[s.prompt])
    # Fewer valid pairs than asked: the rest are drawn again from those kept (vLLM's oversampling).
    assert len(samples) == 6 and {s.prompt for s in samples[4:]} <= kept


def test_sharegpt_order_follows_the_seed(tokenizer: Any, sharegpt_file: Path) -> None:
    first = [s.prompt for s in sharegpt_samples(sharegpt_file, tokenizer, 4, seed=0, **LIMITS)]
    again = [s.prompt for s in sharegpt_samples(sharegpt_file, tokenizer, 4, seed=0, **LIMITS)]
    other = [s.prompt for s in sharegpt_samples(sharegpt_file, tokenizer, 4, seed=7, **LIMITS)]
    assert first == again and sorted(first) == sorted(other)
    assert any(
        [s.prompt for s in sharegpt_samples(sharegpt_file, tokenizer, 4, seed=k, **LIMITS)] != first
        for k in range(1, 6)
    )


def test_sharegpt_fixed_output_len_skips_the_reply_check(tokenizer: Any, sharegpt_file: Path) -> None:
    samples = sharegpt_samples(sharegpt_file, tokenizer, 5, seed=0, output_len=9, **LIMITS)
    assert {s.output_len for s in samples} == {9}
    # The "ok" reply (too short as a reply) is kept: its length is not used.
    assert "Say nothing at all in your answer please." in {s.prompt for s in samples}


def test_sharegpt_total_limit_is_capped_at_the_served_context(tokenizer: Any, sharegpt_file: Path) -> None:
    @dataclass
    class Bench:
        dataset: str = "sharegpt"
        dataset_path: str = str(sharegpt_file)
        seed: int = 0
        sharegpt_max_input_len: int = 1024
        sharegpt_max_total_len: int = 2048
        sharegpt_fixed_output_len: bool = False
        output_len: int = 16

    samples = load_samples(Bench(), tokenizer, 8, context=40)
    assert samples and all(s.input_tokens + s.output_len <= 40 for s in samples)


def test_sharegpt_errors_are_clear(tokenizer: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BenchInputError, match="cannot read the ShareGPT file"):
        sharegpt_samples(bad, tokenizer, 1, seed=0)
    bad.write_text(json.dumps({"conversations": []}))
    with pytest.raises(BenchInputError, match="not a list"):
        sharegpt_samples(bad, tokenizer, 1, seed=0)
    bad.write_text(json.dumps([conversation("hi", "yo")]))
    with pytest.raises(BenchInputError, match="passes the ShareGPT filter"):
        sharegpt_samples(bad, tokenizer, 1, seed=0)


# -- jsonl -------------------------------------------------------------------------------------------------


def test_jsonl_rows_in_order_with_default_output_len(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "first prompt", "output_len": 12}\n'
        "\n"
        '{"prompt": "second prompt", "id": "kept-but-unused"}\n'
        '{"prompt": "third \\u00e9 prompt", "output_len": 3}\n'
    )
    samples = jsonl_samples(path, tokenizer, 5, default_output_len=8)
    assert [(s.prompt, s.output_len) for s in samples] == [
        ("first prompt", 12), ("second prompt", 8), ("third é prompt", 3), ("first prompt", 12),
        ("second prompt", 8),
    ]  # fmt: skip
    assert samples[0].input_tokens == count(tokenizer, "first prompt")
    assert jsonl_samples(path, None, 1, 8)[0].input_tokens is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\nnot json\n', "line 2: not JSON"),
        ('["a list"]\n', "line 1: expected an object"),
        ('{"text": "no prompt key"}\n', "non-empty 'prompt'"),
        ('{"prompt": ""}\n', "non-empty 'prompt'"),
        ('{"prompt": "x", "output_len": 0}\n', "'output_len' must be a positive integer"),
        ('{"prompt": "x", "output_len": "64"}\n', "'output_len' must be a positive integer"),
        ('{"prompt": "x", "output_len": true}\n', "'output_len' must be a positive integer"),
        ("\n\n", "has no prompts"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(BenchInputError, match=message):
        jsonl_samples(path, None, 2, 8)


def test_samples_that_cannot_fit_the_context_fail_before_sending(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a fairly ordinary prompt", "output_len": 60}\n')

    @dataclass
    class Bench:
        dataset: str = "jsonl"
        dataset_path: str = str(path)
        output_len: int = 8

    with pytest.raises(BenchmarkError, match=r"sample 0 needs .* more than the served context"):
        load_samples(Bench(), tokenizer, 1, context=64)
    assert math.isfinite(load_samples(Bench(), tokenizer, 1, context=None)[0].output_len)
