"""Incremental detokenization and stop strings: token ids in, text deltas out.

Decoding token by token is wrong for byte-level BPE (a character may span tokens) and for SentencePiece
(a token's leading space depends on what precedes it). So each step decodes a short window twice, as TGI
and vLLM do: the text of the window before the new tokens and with them; the difference is the delta,
held back while it ends in an incomplete character (U+FFFD). The window starts with the prompt's last
tokens, so the first generated word gets its leading space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Prompt tokens kept as context for the first delta.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"

Decode = Callable[[list[int]], str]
# A Decode for each value of skip_special_tokens (requests choose per request).
Decoders = dict[bool, Decode]


def decoder_for(tokenizer: Any, skip_special_tokens: bool = True) -> Decode:
    """The fastest decode available: the Rust tokenizer directly when the tokenizer is a fast one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    # Fast tokenizers' decode() only adds Python-side clean-up on top of this (off for modern models).
    cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
    if backend is not None and hasattr(backend, "decode") and not cleans_up:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def decoders_for(tokenizer: Any) -> Decoders:
    """decoder_for each value of skip_special_tokens (requests choose per request)."""
    return {skip: decoder_for(tokenizer, skip) for skip in (True, False)}


class IncrementalDetokenizer:
    __slots__ = ("_decode", "_ids", "_prefix_offset", "_read_offset")

    def __init__(self, decode: Decode, prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is still incomplete)."""
        ids = self._ids
        ids.append(token_id)
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text) :]
        # Slide the window: only the last emitted tokens are needed as context from now on.
        drop = self._read_offset
        del ids[:drop]
        self._prefix_offset = 0
        self._read_offset = len(ids)
        return delta

    def flush(self) -> str:
        """Whatever text is still held back at the end of the output, without the replacement characters
        of a character left incomplete."""
        ids = self._ids
        if self._read_offset >= len(ids):
            return ""
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        self._read_offset = len(ids)
        rest = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        # An output cut off inside a character: its bytes are not text (vLLM emits nothing for them).
        return rest.rstrip(_REPLACEMENT)


class StopChecker:
    """Finds stop strings in the generated text and holds back what could be the start of one.

    vLLM semantics: the text ends just before the stop string (not included); while generating, the last
    len(longest stop) - 1 characters are not released, since they may turn out to begin a stop string.
    """

    __slots__ = ("_held", "_stops", "text")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = max((len(s) for s in self._stops), default=1) - 1
        # All text accepted so far (released or held back).
        self.text = ""

    def add(self, delta: str) -> tuple[str, str | None]:
        """Append `delta`; return (text now safe to release, the stop string found or None)."""
        released_before = max(0, len(self.text) - self._held)
        search_from = max(0, len(self.text) - self._held)
        self.text += delta
        found_at, found = -1, None
        for stop in self._stops:
            at = self.text.find(stop, search_from)
            if at != -1 and (found_at == -1 or at < found_at):
                found_at, found = at, stop
        if found is not None:
            self.text = self.text[:found_at]
            return self.text[released_before:], found
        return self.text[released_before : max(released_before, len(self.text) - self._held)], None

    def finish(self) -> str:
        """The held-back tail, released when generation ends for another reason."""
        return self.text[max(0, len(self.text) - self._held) :] if self._held else ""
