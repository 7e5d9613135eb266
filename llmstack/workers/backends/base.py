"""The contract between the scheduler and the code that runs the model.

A backend runs forward passes over a batch of sequences, each with its own KV state, and returns logits.
It knows nothing of requests, sampling, text, stop conditions or HTTP: the scheduler
(`llmstack.workers.scheduler`) owns those, and calls a backend from a single thread only.

Sequences are named by integer ids that the scheduler chooses. The life of one sequence:

    logits = backend.prefill([seq_id], [prompt_ids])[0]     # KV state for the prompt now held under seq_id
    token = sample(logits)
    logits = backend.decode([seq_id], [token])[0]           # token appended at position len(prompt_ids)
    ...                                                     # one decode per generated token
    backend.release(seq_id)                                 # finished or aborted: its KV state is freed

Guarantees the scheduler gives (a backend may rely on them, and need not check them):
  - at most `max_batch_size` sequences are live (prefilled and not yet released) at any time;
  - a live sequence never exceeds `max_model_len` positions (prompt + fed tokens);
  - the seq_ids of one call are distinct; `prefill` gets ids that are not live; `decode` gets live ids;
  - `decode` is usually called with every live sequence, in the same order from step to step (order of
    admission; finished sequences drop out), but any subset in any order must work;
  - calls never overlap (one scheduler thread).

What a backend promises:
  - logits rows follow the order of the ids passed in; dtype float32, shape [len(ids), vocab_size], on
    `self.device`; row i is the distribution for the token after the last one fed for ids[i];
  - a sequence's logits do not depend on which other sequences share the batch (up to floating-point
    rounding): greedy decoding must give the same tokens as `model.generate` on the prompt alone;
  - `release` of an unknown or already released id is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class BackendInfo:
    """What /info reports about the loaded model: for people and for tests."""

    backend: str
    model_impl: str
    device: str
    dtype: str
    low_bit: str | None
    model_type: str
    # Count of each module class in the loaded model, e.g. {"LowBitLinear": 15, "LlamaRMSNorm": 5}.
    module_types: dict[str, int] = field(default_factory=dict)
    # Bytes of KV cache reserved up front (0 where the cache grows on demand).
    kv_cache_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    device: torch.device
    # Width of the logits rows (may exceed the tokenizer's vocabulary: padded embeddings).
    vocab_size: int
    max_batch_size: int
    max_model_len: int

    def prefill(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start each sequence from its prompt token ids; return the logits after each prompt's last token."""
        ...

    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """Append one token to each sequence; return the logits after it."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget the sequence and free its KV state."""
        ...

    def info(self) -> BackendInfo: ...
