"""llmstack's own decoder forward for Llama-family checkpoints, over a static per-slot KV cache.

The model's forward() pays for generality on every step (module hooks, mask construction, cache objects,
output dataclasses): on a small model that overhead is most of the step. This backend runs the same
arithmetic as transformers' Llama/Mistral/Qwen2 code, on the checkpoint's own weights, with less of it:
  - Q, K and V are one matmul (weights concatenated at load), as are the gate and up projections;
  - rotary cos/sin come from a table built once with the model's own rotary module;
  - the KV cache is one preallocated tensor per layer, [max_batch_size, kv_heads, max_model_len, head_dim];
    a sequence owns a slot and its positions; live sequences occupy slots 0..n-1 (a released slot is
    refilled by moving the last one), so the batch's keys are a view, not a gather;
  - decode attention reads grouped-query heads without repeating K/V: the query heads that share a KV head
    are laid out as that head's queries ([B, kv_heads, group, head_dim] against [B, kv_heads, L, head_dim]),
    with a per-row length mask.
The fused layers, the rotary table and the slots come from `layers.py` (shared with `fast_llama`); on CPU
in float32 attention runs in llmstack's C kernel (`cpu_kernels.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from llmstack.workers.backends.base import BackendInfo
from llmstack.workers.backends.layers import Layer, SlotDecoder, linear, mlp, pack_linears, rms_norm

logger = logging.getLogger(__name__)


class FusedDecoderBackend(SlotDecoder):
    def __init__(self, model: Any, *, max_batch_size: int, max_model_len: int, info: BackendInfo) -> None:
        super().__init__(model, max_batch_size=max_batch_size, max_model_len=max_model_len,
                         table_len=max_model_len, info=info)  # fmt: skip
        shape = (max_batch_size, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        element = torch.finfo(self.dtype).bits // 8
        kv_bytes = 2 * len(self.layers) * max_batch_size * self.num_kv_heads * max_model_len * self.head_dim
        info.kv_cache_bytes = kv_bytes * element
        self._arange = torch.arange(max_model_len, device=self.device)
        mask_shape = (max_batch_size, 1, 1, max_model_len)
        self._zero_mask = torch.zeros(mask_shape, dtype=self.dtype, device=self.device)
        self._batch_index = torch.arange(max_batch_size, device=self.device)
        # llmstack's C attention kernel, on CPU in float32 (None: torch's SDPA and cache writes in torch).
        self._attention = None
        if self.device.type == "cpu" and self.dtype == torch.float32:
            from llmstack.workers.backends.cpu_kernels import cache_attention

            self._attention = cache_attention()
        if self._attention is not None:
            self._ones = torch.ones(max_batch_size, dtype=torch.long)
        info.extra["attention"] = "llmstack-cpu" if self._attention is not None else "torch-sdpa"
        info.extra["linear"] = "onednn-packed" if pack_linears(self.layers) else "torch"
        if info.extra["linear"] != "torch":  # the model's own o/down projections are copies now
            for layer in model.model.layers:
                layer.self_attn.o_proj = layer.mlp.down_proj = None

    # -- the Backend contract ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        slots = self._assign_slots(seq_ids, prompts)
        if self._attention is not None:
            return self._prefill_packed(slots, prompts).float()
        rows = [self._prefill_one(slot, prompt) for slot, prompt in zip(slots, prompts, strict=True)]
        return torch.cat(rows, dim=0).float()

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        batch = len(seq_ids)
        slots = [self._slot_of[s] for s in seq_ids]
        if batch == len(self._slot_of):
            # Every live sequence: run in slot order over a view of the cache, then put rows back in order.
            tokens = [0] * batch
            for slot, token in zip(slots, token_ids, strict=True):
                tokens[slot] = token
            positions = self._length[:batch]
            logits = self._decode(tokens, positions, None)
            if slots != list(range(batch)):
                logits = logits.index_select(0, torch.tensor(slots, device=self.device))
        else:
            positions = [self._length[s] for s in slots]
            logits = self._decode(list(token_ids), positions, slots)
        for slot in slots:
            self._length[slot] += 1
        return logits.float()

    def _move_slot(self, source: int, target: int, length: int) -> None:
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]

    # -- the arithmetic ----------------------------------------------------------------------------------
    def _prefill_one(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        n = len(prompt)
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        x = F.embedding(ids, self.embed)
        cos = self.cos[:n].unsqueeze(1)
        sin = self.sin_signed[:n].unsqueeze(1)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            q, k, v = (t.transpose(0, 1) for t in self._rotated_qkv(x, layer, cos, sin))
            k_cache[slot, :, :n] = k
            v_cache[slot, :, :n] = v
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                k.unsqueeze(0),
                v.unsqueeze(0),
                is_causal=True,
                scale=self.scaling,
                enable_gqa=self.groups > 1,
            )
            x = self._rest_of_layer(x, attn[0].transpose(0, 1), layer)
        last = rms_norm(x[-1:], self.norm, self.norm_eps)
        return F.linear(last, self.lm_head, self.lm_head_bias)

    def _prefill_packed(self, slots: list[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Every prompt in one forward pass: the linear layers see all their tokens at once; the C kernel
        writes each prompt's keys and values into its slot and attends causally within it."""
        assert self._attention is not None
        lengths = [len(p) for p in prompts]
        total = sum(lengths)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        positions = torch.cat([self._arange[:n] for n in lengths])
        slots_t = torch.tensor(slots, dtype=torch.long)
        starts = torch.zeros(len(slots), dtype=torch.long)
        counts = torch.tensor(lengths, dtype=torch.long)
        x = F.embedding(ids, self.embed)
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin_signed.index_select(0, positions).unsqueeze(1)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            q, k_new, v_new = self._rotated_qkv(x, layer, cos, sin)
            attn = torch.empty(total, self.num_heads, self.head_dim, dtype=self.dtype)
            self._attention(q, k_new, v_new, attn, k_cache, v_cache, slots_t, starts, counts, self.scaling)
            x = self._rest_of_layer(x, attn, layer)
        last = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
        x = rms_norm(x.index_select(0, last), self.norm, self.norm_eps)
        return F.linear(x, self.lm_head, self.lm_head_bias)

    def _decode(self, tokens: list[int], positions: list[int], slots: list[int] | None) -> torch.Tensor:
        batch = len(tokens)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        rows = self._batch_index[:batch] if slots is None else torch.tensor(slots, device=self.device)
        kernel = self._attention
        if kernel is None:
            width = max(positions) + 1
            # [batch, 1, 1, width], additive: 0 where a key position holds this row's tokens (itself
            # included), -inf past them. (An additive mask is cheaper for SDPA on CPU than a boolean one.)
            beyond = (self._arange[:width].unsqueeze(0) > pos.unsqueeze(1)).view(batch, 1, 1, width)
            mask = self._zero_mask[:batch, :, :, :width].masked_fill(beyond, float("-inf"))
        x = F.embedding(torch.tensor(tokens, dtype=torch.long, device=self.device), self.embed)
        cos = self.cos.index_select(0, pos).unsqueeze(1)
        sin = self.sin_signed.index_select(0, pos).unsqueeze(1)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            q, k_new, v_new = self._rotated_qkv(x, layer, cos, sin)
            if kernel is not None:
                attn = torch.empty(batch, heads, dim, dtype=self.dtype)
                kernel(q, k_new, v_new, attn, k_cache, v_cache, rows, pos, self._ones[:batch], self.scaling)
            else:
                k_cache[rows, :, pos] = k_new
                v_cache[rows, :, pos] = v_new
                if slots is None:
                    keys, values = k_cache[:batch, :, :width], v_cache[:batch, :, :width]
                else:
                    keys, values = k_cache[rows, :, :width], v_cache[rows, :, :width]
                grouped = q.reshape(batch, kv_heads, self.groups, dim)
                attn = F.scaled_dot_product_attention(
                    grouped, keys, values, attn_mask=mask, scale=self.scaling
                )
            x = self._rest_of_layer(x, attn, layer)
        return F.linear(rms_norm(x, self.norm, self.norm_eps), self.lm_head, self.lm_head_bias)

    def _rotated_qkv(
        self, x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's queries and keys (rotary applied) and values for `x`'s tokens: views of one
        projection, [tokens, heads, dim], [tokens, kv_heads, dim], [tokens, kv_heads, dim]."""
        tokens = x.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = linear(rms_norm(x, layer.ln1, layer.ln1_eps), layer.w_qkv, layer.b_qkv)
        qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
        qk = qk * cos + qk.roll(self._half, -1) * sin
        v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        return qk[:, :heads], qk[:, heads:], v

    def _rest_of_layer(self, x: torch.Tensor, attn: torch.Tensor, layer: Layer) -> torch.Tensor:
        """Output projection of the attention ([tokens, heads, dim]) and the MLP, each with its residual."""
        x = x + linear(attn.reshape(x.shape[0], self.num_heads * self.head_dim), layer.w_o, layer.b_o)
        return x + mlp(rms_norm(x, layer.ln2, layer.ln2_eps), layer)
