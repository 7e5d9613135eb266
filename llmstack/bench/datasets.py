"""Benchmark prompts: `random`, `fixed`, `sharegpt` and `jsonl`, each sample with its token counts.

- random: words drawn at random, exactly `input_len` tokens as the server counts them (special tokens
  included). With `range_ratio` r, input and output lengths are drawn uniformly from
  [floor(L(1-r)), ceil(L(1+r))], as vLLM's random dataset does (special tokens taken off the input first).
- fixed: one long text of our own (`fixed_text.py`), cut to exactly `input_len` tokens: every request
  sends the same prompt, as the seed's online benchmark did.
- sharegpt: a local ShareGPT-format JSON file (a list of {"conversations": [{"from", "value"}, ...]}),
  sampled exactly as vLLM's ShareGPTDataset and the seed's offline script do: keep conversations with at least
  two turns, shuffle with `seed`, prompt = turn 0, reply = turn 1, both counted with the tokenizer's special
  tokens (as `tokenizer(text).input_ids`); drop a pair whose prompt or reply is under 4 tokens, whose prompt
  is over `max_input_len` or whose sum is over `max_total_len`; stop at the count asked for. Output length is
  the reply's length, or `output_len` for all (then the reply's length is not checked). Too few left: the
  rest is drawn again from those kept, as vLLM oversamples.
- jsonl: one JSON object per line, {"prompt": str, "output_len": int (optional)}; other keys and blank lines
  are ignored. The file is used in order, from the top, and repeated when more samples are needed.

Which dataset a benchmark config names, and that its samples fit the served context, is the phases'
business (`llmstack.phases.samples`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.bench.errors import BenchInputError

__all__ = [
    "Sample",
    "fixed_samples",
    "jsonl_samples",
    "random_lengths",
    "random_samples",
    "sharegpt_samples",
]

logger = logging.getLogger(__name__)

SHAREGPT_MIN_LEN = 4


@dataclass(frozen=True)
class Sample:
    prompt: str
    # Prompt tokens as the server will count them (special tokens included); None when no tokenizer.
    input_tokens: int | None
    # max_tokens asked for.
    output_len: int


def random_lengths(
    count: int, input_len: int, output_len: int, range_ratio: float, seed: int, special_tokens: int = 0
) -> list[tuple[int, int]]:
    """(input, output) token lengths, uniform in [floor(L(1-r)), ceil(L(1+r))] like vLLM; exact when r=0.

    As vLLM, the tokenizer's special tokens are taken off the input length before the range is computed and
    added back after; output lengths are at least 1.
    """
    content = max(0, input_len - special_tokens)
    in_low, in_high = math.floor(content * (1 - range_ratio)), math.ceil(content * (1 + range_ratio))
    out_low = max(1, math.floor(output_len * (1 - range_ratio)))
    out_high = max(1, math.ceil(output_len * (1 + range_ratio)))
    rng = random.Random(seed)
    lengths = []
    for _ in range(count):
        n_in = rng.randint(in_low, in_high) if range_ratio else content
        n_out = rng.randint(out_low, out_high) if range_ratio else output_len
        lengths.append((max(1, n_in + special_tokens), n_out))
    return lengths


def random_samples(
    tokenizer: Any | None, count: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[Sample]:
    from llmstack.bench.prompts import exact_prompts, special_token_overhead

    special = special_token_overhead(tokenizer) if tokenizer is not None else 0
    lengths = random_lengths(count, input_len, output_len, range_ratio, seed, special)
    prompts = exact_prompts(tokenizer, [n_in for n_in, _ in lengths], seed)
    return [
        Sample(p.text, p.tokens if tokenizer is not None else None, n_out)
        for p, (_, n_out) in zip(prompts, lengths, strict=True)
    ]


def fixed_samples(tokenizer: Any | None, count: int, input_len: int, output_len: int) -> list[Sample]:
    from llmstack.bench.fixed_text import fixed_text
    from llmstack.bench.prompts import truncated_prompt

    # Every word is at least one token, so input_len words are enough text.
    prompt = truncated_prompt(tokenizer, fixed_text(input_len), input_len)
    if tokenizer is not None and prompt.tokens != input_len:
        logger.warning("fixed prompt is %d tokens, not %d (merges at the cut)", prompt.tokens, input_len)
    tokens = prompt.tokens if tokenizer is not None else None
    return [Sample(prompt.text, tokens, output_len)] * count


def sharegpt_samples(
    path: str | Path,
    tokenizer: Any | None,
    count: int,
    *,
    seed: int,
    max_input_len: int = 1024,
    max_total_len: int = 2048,
    output_len: int | None = None,
) -> list[Sample]:
    if tokenizer is None:
        raise BenchInputError("the sharegpt dataset needs the model's tokenizer (tokenizer.json) to filter")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise BenchInputError(f"cannot read the ShareGPT file {path}: {exc}") from exc
    if not isinstance(data, list):
        raise BenchInputError(f"{path} is not a ShareGPT file: its top level is not a list of conversations")
    conversations = [
        entry["conversations"]
        for entry in data
        if isinstance(entry, dict)
        and isinstance(entry.get("conversations"), list)
        and len(entry["conversations"]) >= 2
    ]
    rng = random.Random(seed)
    rng.shuffle(conversations)
    samples: list[Sample] = []
    for turns in conversations:
        if len(samples) >= count:
            break
        prompt, reply = _turn_text(turns[0]), _turn_text(turns[1])
        if prompt is None or reply is None:
            continue
        prompt_len = len(tokenizer.encode(prompt).ids)
        new_output_len = len(tokenizer.encode(reply).ids) if output_len is None else output_len
        too_short = prompt_len < SHAREGPT_MIN_LEN or (
            output_len is None and new_output_len < SHAREGPT_MIN_LEN
        )
        too_long = prompt_len > max_input_len or prompt_len + new_output_len > max_total_len
        if too_short or too_long:
            continue
        samples.append(Sample(prompt, prompt_len, new_output_len))
    if not samples:
        raise BenchInputError(
            f"no conversation in {path} passes the ShareGPT filter (two turns, each >= {SHAREGPT_MIN_LEN} "
            f"tokens, prompt <= {max_input_len}, prompt + reply <= {max_total_len})"
        )
    if len(samples) < count:
        missing = count - len(samples)
        logger.info("sharegpt: %d conversations pass the filter; drawing %d again", len(samples), missing)
        samples += rng.choices(samples, k=count - len(samples))
    return samples


def _turn_text(turn: object) -> str | None:
    if isinstance(turn, dict) and isinstance(turn.get("value"), str):
        return turn["value"]
    return None


def jsonl_samples(
    path: str | Path, tokenizer: Any | None, count: int, default_output_len: int
) -> list[Sample]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchInputError(f"cannot read the JSONL file {path}: {exc}") from exc
    rows: list[Sample] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rows.append(_jsonl_row(path, number, line, tokenizer, default_output_len))
    if not rows:
        raise BenchInputError(f"{path} has no prompts (one JSON object per line, with a 'prompt' string)")
    if len(rows) < count:
        logger.info("jsonl: %d prompts in %s, repeated to make %d", len(rows), path, count)
    return [rows[i % len(rows)] for i in range(count)]


def _jsonl_row(
    path: str | Path, number: int, line: str, tokenizer: Any | None, default_output_len: int
) -> Sample:
    where = f"{path}, line {number}"
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise BenchInputError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise BenchInputError(f"{where}: expected an object with a non-empty 'prompt' string")
    output_len = row.get("output_len", default_output_len)
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
        raise BenchInputError(f"{where}: 'output_len' must be a positive integer, got {output_len!r}")
    tokens = len(tokenizer.encode(row["prompt"]).ids) if tokenizer is not None else None
    return Sample(row["prompt"], tokens, output_len)
