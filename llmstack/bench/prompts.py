"""Prompts of an exact token length, made with the served model's own tokenizer.

Only `tokenizers` is needed (no transformers): it reads the model's tokenizer.json.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Should a prompt not come out exact at once, a few rounds of trimming or topping up make it so.
_MAX_ROUNDS = 16
# Enough distinct words for varied prompts, without decoding all of a 150k vocabulary.
_MAX_WORDS = 4000


@dataclass(frozen=True)
class Prompt:
    text: str
    # Tokens the server will count for it, the tokenizer's special tokens (e.g. BOS) included.
    tokens: int


def load_tokenizer(model_dir: str | Path) -> Any | None:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        logger.warning("no tokenizer.json in %s: prompt lengths are approximate", model_dir)
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def token_counter(tokenizer: Any | None) -> Callable[[str], int] | None:
    if tokenizer is None:
        return None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def random_prompts(tokenizer: Any | None, count: int, input_len: int, seed: int) -> list[Prompt]:
    """`count` prompts of `input_len` tokens each (as the server counts them), reproducible from `seed`."""
    return exact_prompts(tokenizer, [input_len] * count, seed)


def exact_prompts(tokenizer: Any | None, lengths: Sequence[int], seed: int) -> list[Prompt]:
    """One prompt of random words per entry of `lengths` (tokens as the server counts them, special tokens
    included), reproducible from `seed`; prompt i depends only on (seed, i, lengths[i])."""
    if tokenizer is None:
        return [_word_prompt(length, seed + i) for i, length in enumerate(lengths)]
    words = _word_tokens(tokenizer)
    overhead = special_token_overhead(tokenizer)
    return [
        _exact_prompt(tokenizer, words, max(1, length - overhead), random.Random(seed * 1_000_003 + i))
        for i, length in enumerate(lengths)
    ]


def special_token_overhead(tokenizer: Any) -> int:
    """Tokens (BOS and friends) the tokenizer adds to every prompt."""
    return len(tokenizer.encode("").ids)


def truncated_prompt(tokenizer: Any | None, text: str, input_len: int) -> Prompt:
    """The start of `text` that is exactly `input_len` tokens as the server counts them (special tokens
    included), as the seed cut its long prompt, but checked: cutting token ids and decoding can change how
    the text re-tokenizes at the cut, so the cut moves until the count is exact (or the closest found).
    """
    if tokenizer is None:
        words = text.split()[:input_len]
        return Prompt(text=" ".join(words), tokens=len(words))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    target = max(1, input_len - special_token_overhead(tokenizer))
    if len(ids) < target:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {target} asked for")
    best: Prompt | None = None
    cut = target
    for _ in range(_MAX_ROUNDS):
        piece = tokenizer.decode(ids[:cut])
        prompt = Prompt(text=piece, tokens=len(tokenizer.encode(piece).ids))
        if best is None or abs(prompt.tokens - input_len) < abs(best.tokens - input_len):
            best = prompt
        if prompt.tokens == input_len:
            break
        cut = min(len(ids), max(1, cut + input_len - prompt.tokens))
    assert best is not None
    return best


def _word_tokens(tokenizer: Any) -> list[str]:
    """Tokens that are a space and letters and encode back to themselves alone.

    The pre-tokenizers of byte-level BPE (GPT-2, Llama 3, Qwen) and of Metaspace (Llama 2) split text before
    each space, so a string made of such words tokenizes to exactly one token per word.
    """
    special = _special_ids(tokenizer)
    words = []
    for i in range(tokenizer.get_vocab_size()):
        if i in special:
            continue
        text = tokenizer.decode([i])
        is_word = len(text) >= 2 and text[0] == " " and text[1:].isalpha()
        if is_word and tokenizer.encode(text, add_special_tokens=False).ids == [i]:
            words.append(text)
            if len(words) >= _MAX_WORDS:
                break
    return words


def _exact_prompt(tokenizer: Any, words: list[str], length: int, rng: random.Random) -> Prompt:
    text = "".join(rng.choice(words) for _ in range(length)) if words else " a" * length
    for _ in range(_MAX_ROUNDS):
        encoded = tokenizer.encode(text, add_special_tokens=False).ids
        if len(encoded) == length:
            break
        if len(encoded) > length:
            encoded = encoded[:length]
            text = tokenizer.decode(encoded)
        else:
            text += "".join(rng.choice(words) if words else " a" for _ in range(length - len(encoded)))
    return Prompt(text=text, tokens=len(tokenizer.encode(text).ids))


def _special_ids(tokenizer: Any) -> set[int]:
    added = tokenizer.get_added_tokens_decoder() if hasattr(tokenizer, "get_added_tokens_decoder") else {}
    return {i for i, tok in added.items() if getattr(tok, "special", True)}


_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by")


def _word_prompt(input_len: int, seed: int) -> Prompt:
    rng = random.Random(seed)
    return Prompt(text=" ".join(rng.choice(_WORDS) for _ in range(input_len)), tokens=input_len)
