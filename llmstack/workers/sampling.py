"""Per-request sampling parameters and the batched sampler that turns a step's logits into tokens.

One call per step samples every sequence of the batch. The common case (every row greedy, nothing to mask)
is a single argmax; otherwise rows are processed in groups: logit processors (min_tokens, penalties) per
row, argmax for greedy rows, and for sampled rows temperature, top-k and top-p over the group at once,
then the exponential race (argmax of p / Exp(1) noise), which draws from each row's own generator so that
a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Below this temperature a request is greedy (as in vLLM).
GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1: no top-k.
    top_k: int = 0
    seed: int | None = None
    # EOS and stop_token_ids are masked out until this many tokens were generated.
    min_tokens: int = 0
    # Keep generating after EOS (it is still emitted as a token).
    ignore_eos: bool = False
    # Generation stops when the text contains one of these; the text ends just before it.
    stop: tuple[str, ...] = ()
    # Generation stops after one of these tokens (finish_reason "stop"), as with EOS.
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(slots=True)
class SamplerRow:
    """What the sampler needs of one sequence at one step."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    # Token ids that end the sequence unless ignore_eos (EOS) or always (stop_token_ids); masked under
    # min_tokens.
    eos_ids: frozenset[int]
    generator: torch.Generator | None = field(default=None)
    # Decided once: whether some token must be masked while fewer than min_tokens were generated, and
    # whether the row is greedy with nothing to mask or penalize at any step (its token is the argmax).
    masks_under_min_tokens: bool = field(init=False)
    argmax_only: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.masks_under_min_tokens = p.min_tokens > 0 and bool(self.eos_ids or p.stop_token_ids)
        self.argmax_only = p.greedy and not p.penalized and not self.masks_under_min_tokens


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request generator: seeded requests repeat; the others draw a fresh seed."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return generator


def sample(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> list[int]:
    """One token per row of `logits` ([len(rows), vocab], float32)."""
    import torch

    if all(row.argmax_only for row in rows):
        return _argmax_rows(logits)
    needs_processing = [i for i, row in enumerate(rows) if _needs_processing(row)]
    if not needs_processing and all(row.params.greedy for row in rows):
        return _argmax_rows(logits)

    logits = logits.clone()
    for i in needs_processing:
        _process_row(logits[i], rows[i])
    tokens = [0] * len(rows)
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if len(greedy) == len(rows):
        return _argmax_rows(logits)
    if greedy:
        picked = _argmax_rows(logits[greedy])
        for i, token in zip(greedy, picked, strict=True):
            tokens[i] = token
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = _probabilities(logits.index_select(0, index), [rows[i].params for i in sampled])
        for j, i in enumerate(sampled):
            noise = torch.empty_like(probs[j]).exponential_(generator=rows[i].generator)
            tokens[i] = int((probs[j] / noise).argmax())
    return tokens


def _argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's first maximal index. On the CPU through numpy: torch's argmax over the last dimension
    costs ~2.5 us per row of 1,024 logits here, numpy's ~0.2 us (measured; same first-maximum rule)."""
    if logits.device.type == "cpu":
        return logits.contiguous().numpy().argmax(axis=1).tolist()
    return logits.argmax(dim=-1).tolist()


def _needs_processing(row: SamplerRow) -> bool:
    p = row.params
    return p.penalized or (row.masks_under_min_tokens and len(row.output_ids) < p.min_tokens)


def _process_row(row_logits: torch.Tensor, row: SamplerRow) -> None:
    import torch

    p = row.params
    if len(row.output_ids) < p.min_tokens:
        banned = [t for t in (*row.eos_ids, *p.stop_token_ids) if 0 <= t < row_logits.shape[-1]]
        if banned:
            row_logits[banned] = float("-inf")
    if not p.penalized:
        return
    device = row_logits.device
    vocab = row_logits.shape[-1]
    if p.repetition_penalty != 1.0:
        # As in transformers' RepetitionPenaltyLogitsProcessor: prompt and output tokens alike.
        seen = torch.tensor(sorted({*row.prompt_ids, *row.output_ids}), dtype=torch.long, device=device)
        seen = seen[seen < vocab]
        values = row_logits[seen]
        row_logits[seen] = torch.where(
            values > 0, values / p.repetition_penalty, values * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        # As in OpenAI's definition: output tokens only.
        counts = torch.bincount(torch.tensor(list(row.output_ids), device=device), minlength=vocab)[:vocab]
        counts = counts.to(row_logits.dtype)
        row_logits -= counts * p.frequency_penalty + (counts > 0).to(row_logits.dtype) * p.presence_penalty


def _probabilities(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    import torch

    temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    logits = logits / temperatures.unsqueeze(1)
    vocab = logits.shape[-1]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_ks):
        k_max = max(top_ks)
        kth = logits.topk(k_max, dim=-1).values
        index = torch.tensor([k - 1 for k in top_ks], device=logits.device).unsqueeze(1)
        threshold = kth.gather(1, index)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        limit = torch.tensor(top_ps, dtype=logits.dtype, device=logits.device).unsqueeze(1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = before >= limit
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)
