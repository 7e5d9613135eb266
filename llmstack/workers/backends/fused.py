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
Static shapes per batch size make this the natural base for CUDA graphs on GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmstack.workers.backends.base import BackendInfo
from llmstack.workers.protocol import FUSED_MODEL_TYPES

logger = logging.getLogger(__name__)

# Rotary variants whose frequencies do not depend on the sequence length (a table is exact for them).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln1_eps: float
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    ln2: torch.Tensor
    ln2_eps: float
    w_gate_up: torch.Tensor
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    act: Any


def unsupported_reason(model: Any, max_model_len: int) -> str | None:
    """Why the fused decoder cannot run `model`, or None if it can."""
    cfg = model.config
    if cfg.model_type not in FUSED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {', '.join(FUSED_MODEL_TYPES)}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb"):
        return "the model does not have the Llama module layout (model.layers, model.rotary_emb)"
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} depends on the sequence length"
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", cfg.model_type == "mistral")
    if window and uses_window and max_model_len > window:
        return f"sliding-window attention ({window}) is shorter than max_model_len ({max_model_len})"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention has no separate q/k/v/o projections"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return "attention normalizes queries and keys (not implemented)"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "the MLP is not a gated (gate/up/down) MLP"
        if type(attn.q_proj) is not torch.nn.Linear:
            return f"projections are {type(attn.q_proj).__name__}, not plain nn.Linear (quantized?)"
    return None


class FusedDecoderBackend:
    def __init__(self, model: Any, *, max_batch_size: int, max_model_len: int, info: BackendInfo) -> None:
        cfg = model.config
        inner = model.model
        embed = inner.embed_tokens.weight
        self.device = embed.device
        self.dtype = embed.dtype
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        attn0 = inner.layers[0].self_attn
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(attn0.head_dim)
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.embed = embed
        self.layers = [self._fuse_layer(layer) for layer in inner.layers]
        self.norm, self.norm_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        head = model.lm_head
        self.lm_head, self.lm_head_bias = head.weight, head.bias
        self.vocab_size = int(self.lm_head.shape[0])
        self.intermediate = self.layers[0].w_down.shape[1]

        with torch.inference_mode():
            positions = torch.arange(max_model_len, device=self.device).unsqueeze(0)
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()
        # rotate_half(x) * sin == roll(x, half) * sin_signed: one roll instead of two slices, neg and cat.
        self.sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()
        self._half = half

        shape = (max_batch_size, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        element = torch.finfo(self.dtype).bits // 8
        kv_bytes = 2 * len(self.layers) * max_batch_size * self.num_kv_heads * max_model_len * self.head_dim
        info.kv_cache_bytes = kv_bytes * element
        self._info = info
        self._slot_of: dict[int, int] = {}
        self._seq_in_slot: list[int | None] = [None] * max_batch_size
        self._length = [0] * max_batch_size
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

    def info(self) -> BackendInfo:
        return self._info

    # -- the Backend contract ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        slots = []
        for seq_id, prompt in zip(seq_ids, prompts, strict=True):
            slot = len(self._slot_of)
            self._slot_of[seq_id] = slot
            self._seq_in_slot[slot] = seq_id
            self._length[slot] = len(prompt)
            slots.append(slot)
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

    def release(self, seq_id: int) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is None:
            return
        last = len(self._slot_of)  # the highest occupied slot, after the pop
        if slot != last:
            moved = self._seq_in_slot[last]
            assert moved is not None
            length = self._length[last]
            with torch.inference_mode():
                for k, v in zip(self.k_cache, self.v_cache, strict=True):
                    k[slot, :, :length] = k[last, :, :length]
                    v[slot, :, :length] = v[last, :, :length]
            self._slot_of[moved] = slot
            self._seq_in_slot[slot] = moved
            self._length[slot] = length
        self._seq_in_slot[last] = None
        self._length[last] = 0

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
        last = _rms_norm(x[-1:], self.norm, self.norm_eps)
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
        x = _rms_norm(x.index_select(0, last), self.norm, self.norm_eps)
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
        return F.linear(_rms_norm(x, self.norm, self.norm_eps), self.lm_head, self.lm_head_bias)

    def _rotated_qkv(
        self, x: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's queries and keys (rotary applied) and values for `x`'s tokens: views of one
        projection, [tokens, heads, dim], [tokens, kv_heads, dim], [tokens, kv_heads, dim]."""
        tokens = x.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(_rms_norm(x, layer.ln1, layer.ln1_eps), layer.w_qkv, layer.b_qkv)
        qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
        qk = qk * cos + qk.roll(self._half, -1) * sin
        v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        return qk[:, :heads], qk[:, heads:], v

    def _rest_of_layer(self, x: torch.Tensor, attn: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """Output projection of the attention ([tokens, heads, dim]) and the MLP, each with its residual."""
        x = x + F.linear(attn.reshape(x.shape[0], self.num_heads * self.head_dim), layer.w_o, layer.b_o)
        return x + self._mlp(_rms_norm(x, layer.ln2, layer.ln2_eps), layer)

    def _mlp(self, h: torch.Tensor, layer: _Layer) -> torch.Tensor:
        gate_up = F.linear(h, layer.w_gate_up, layer.b_gate_up)
        gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate :]
        return F.linear(layer.act(gate) * up, layer.w_down, layer.b_down)

    def _fuse_layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        fused = _Layer(
            ln1=layer.input_layernorm.weight,
            ln1_eps=float(layer.input_layernorm.variance_epsilon),
            w_qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
            b_qkv=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj),
            w_o=attn.o_proj.weight.detach(),
            b_o=_bias(attn.o_proj),
            ln2=layer.post_attention_layernorm.weight,
            ln2_eps=float(layer.post_attention_layernorm.variance_epsilon),
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            b_gate_up=_cat_bias(mlp.gate_proj, mlp.up_proj),
            w_down=mlp.down_proj.weight.detach(),
            b_down=_bias(mlp.down_proj),
            act=mlp.act_fn,
        )
        # The separate projections are now copies: drop them so the weights are not held twice.
        for owner, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
            for name in names:
                setattr(owner, name, None)
        return fused


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        # One fused op; in float32 it rounds exactly as transformers' LlamaRMSNorm (checked by the tests).
        return F.rms_norm(x, weight.shape, weight, eps)
    # transformers' LlamaRMSNorm, operation for operation (so rounding matches): float32 inside.
    dtype = x.dtype
    h = x.float() if dtype != torch.float32 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h.to(dtype) if dtype != torch.float32 else h)


def _bias(linear: Any) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _cat_bias(*linears: Any) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    parts = [
        lin.bias.detach()
        if lin.bias is not None
        else torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
        for lin in linears
    ]
    return torch.cat(parts)
