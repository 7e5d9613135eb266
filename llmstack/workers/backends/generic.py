"""The model's own forward() over a batched, left-padded KV cache that this backend manages.

Works for any Hugging Face causal LM whose cache is a DynamicCache (transformers 4.37 to 5.x), including
models whose modules ipex-llm replaced with its low-bit ones: the forward pass is theirs, only the cache
layout is ours. The batch cache has one row per live sequence and M columns; each row's real tokens are
right-aligned, with the padding columns masked out by a 2-D attention mask and positions passed
explicitly per row:

    row 0 (len 5):  [pad pad  t0 t1 t2 t3 t4]      mask 0 0 1 1 1 1 1    next position 5
    row 1 (len 7):  [ t0  t1  t2 t3 t4 t5 t6]      mask 1 1 1 1 1 1 1    next position 7

A decode step feeds one token per row, so every row grows by one column. New sequences are prefilled
together (left-padded among themselves), then joined to the batch by left-padding whichever side is
shorter. A released row is cut out, and leading columns that are padding in every row are dropped.
A decode over a subset of the live sequences feeds the others a masked-out pad column.
"""

from __future__ import annotations

import collections
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from llmstack.workers.backends.base import BackendInfo

logger = logging.getLogger(__name__)


class GenericBackend:
    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int,
        max_model_len: int,
        pad_token_id: int,
        info: BackendInfo,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        # Not the lm_head's weight shape: ipex-llm packs quantized weights into other shapes.
        self.vocab_size = int(model.config.vocab_size)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.pad_token_id = pad_token_id
        self._info = info
        params = inspect.signature(model.forward).parameters
        # Only the last position's logits: what generate() asks for too, where the model allows it.
        self._keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._cache_position = "cache_position" in params
        self._cache: Any = None
        self._rows: list[int] = []  # seq_id of each cache row
        self._mask: torch.Tensor | None = None  # [rows, columns], 1 = real token
        self._next_pos: list[int] = []  # per row: position of the next token = its real length

    def info(self) -> BackendInfo:
        return self._info

    # -- the Backend contract ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        # As generate() computes them for left-padded rows.
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        kwargs = self._forward_kwargs(width, 0)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **kwargs,
        )
        logits = out.logits[:, -1, :].float()
        self._join(out.past_key_values, list(seq_ids), mask, [len(p) for p in prompts])
        return logits

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        assert self._mask is not None
        row_of = {seq_id: row for row, seq_id in enumerate(self._rows)}
        rows = [row_of[s] for s in seq_ids]
        batch = len(self._rows)
        ids = [self.pad_token_id] * batch
        fed = [0] * batch
        for row, token in zip(rows, token_ids, strict=True):
            ids[row] = token
            fed[row] = 1
        columns = self._mask.shape[1]
        new_column = torch.tensor(fed, dtype=torch.long).unsqueeze(1)
        self._mask = torch.cat([self._mask, new_column], dim=1)
        positions = torch.tensor(self._next_pos, dtype=torch.long).unsqueeze(1)
        out = self.model(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device).unsqueeze(1),
            attention_mask=self._mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self._cache,
            use_cache=True,
            **self._forward_kwargs(1, columns),
        )
        self._cache = out.past_key_values
        for row in rows:
            self._next_pos[row] += 1
        logits = out.logits[:, -1, :]
        if rows != list(range(batch)):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        return logits.float()

    def release(self, seq_id: int) -> None:
        if seq_id not in self._rows:
            return
        row = self._rows.index(seq_id)
        keep = [i for i in range(len(self._rows)) if i != row]
        del self._rows[row]
        del self._next_pos[row]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        mask = self._mask[keep]
        # Leading columns that are padding in every remaining row carry nothing.
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        index = torch.tensor(keep, device=self.device)
        layers = [
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v in _cache_tensors(self._cache)
        ]
        _set_cache_tensors(self._cache, layers)
        self._mask = mask[:, first:].contiguous()

    # -- internals ---------------------------------------------------------------------------------------
    def _forward_kwargs(self, new_tokens: int, past: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._keep_kwarg:
            kwargs[self._keep_kwarg] = 1
        if self._cache_position:
            kwargs["cache_position"] = torch.arange(past, past + new_tokens, device=self.device)
        return kwargs

    def _join(self, cache: Any, seq_ids: list[int], mask: torch.Tensor, lengths: list[int]) -> None:
        if isinstance(cache, tuple):  # older models hand back legacy tuples when given no cache
            from transformers import DynamicCache

            cache = DynamicCache.from_legacy_cache(cache)
        if self._cache is None:
            self._cache, self._mask = cache, mask
            self._rows, self._next_pos = seq_ids, lengths
            return
        assert self._mask is not None
        old_width, new_width = self._mask.shape[1], mask.shape[1]
        width = max(old_width, new_width)
        layers = []
        for (old_k, old_v), (new_k, new_v) in zip(
            _cache_tensors(self._cache), _cache_tensors(cache), strict=True
        ):
            layers.append(
                (
                    torch.cat([_left_pad(old_k, width), _left_pad(new_k, width)], dim=0),
                    torch.cat([_left_pad(old_v, width), _left_pad(new_v, width)], dim=0),
                )
            )
        _set_cache_tensors(self._cache, layers)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        self._rows += seq_ids
        self._next_pos += lengths


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (missing, 0))


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, [batch, kv_heads, columns, head_dim], for every transformers version."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # 4.36 - 4.55, and ipex-llm's DynamicNormalCache
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]  # legacy tuples


def _set_cache_tensors(cache: Any, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, layers, strict=True):
            layer.keys, layer.values = k, v
        return
    if hasattr(cache, "key_cache"):
        # Contiguous, never a view: ipex-llm's caches treat any room past a tensor's end (in its strides) as
        # theirs and append into it; a contiguous tensor has none, so they reallocate with spare room.
        cache.key_cache[:] = [k.contiguous() for k, _ in layers]
        cache.value_cache[:] = [v.contiguous() for _, v in layers]
        columns = layers[0][0].shape[-2] if layers else 0
        for counter in ("seen_tokens", "_seen_tokens"):
            if hasattr(cache, counter):
                setattr(cache, counter, columns)
        return
    raise TypeError(f"cannot manage a KV cache of type {type(cache).__name__}")


def count_module_types(model: Any) -> dict[str, int]:
    return dict(collections.Counter(type(m).__name__ for m in model.modules()))
