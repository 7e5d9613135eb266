"""One pipeline stage's forward pass: its decoder layers over a packed step, with its own KV cache.

A step is a ragged batch of sequences, each bringing `count` new tokens at positions start..start+count-1
(a prefill: its prompt from 0; a decode: one token). The tokens are packed one after another, so every
linear layer sees all of them in one matmul. Each sequence owns a KV slot, named by rank 0 in the step;
every stage keeps the keys and values of its own layers in that slot (no stage has bookkeeping of its own:
a released slot is simply overwritten by its next owner, and steps reach every stage in the order rank 0
issued them). The first stage embeds token ids; the last applies the final norm and the LM head to each
sequence's last token and returns its logits.

The arithmetic is the lightweight worker's `fused` decoder's, operation for operation (`layers.py`): on the
CPU in float32, attention runs in llmstack's C kernel, which takes exactly this packed form; elsewhere torch's
SDPA, per prompt for prefills and over a gathered batch for decodes. There the decodes' indices and mask are
built once per step, not per layer, and their attention width is rounded up to a power of two (the mask hides
the rest), and cuDNN's SDPA is left out: it plans a graph for every new shape (measured on an H200: 3.2 ms of
CPU per call, 80 ms per step of a 24-layer model, when each decode step's width is new). Under
engine.backend=ipex_llm the projections (and the LM head) are ipex-llm's low-bit linears (`lowbit.py`),
called where the others call F.linear; everything else is the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmstack.workers.backends.layers import Layer, linear, mlp, pack_linears, rms_norm
from llmstack.workers.pipeline.weights import QuantizedLayer, StageWeights

# Decode attention widths are rounded up to a power of two from this one (fewer distinct kernel shapes).
MIN_DECODE_WIDTH = 64


@dataclass
class _Decodes:
    """The single-token sequences of a step, for the torch attention path: where their rows are in the
    packed step, their slots and positions, the attention width and mask they share."""

    which: list[int]
    index: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    width: int
    mask: torch.Tensor


class StageModel:
    def __init__(self, weights: StageWeights, *, slots: int, max_model_len: int) -> None:
        self.w = weights
        self.device = weights.device
        self.dtype = weights.dtype
        self.slots = slots
        self.max_model_len = max_model_len
        shape = (slots, weights.num_kv_heads, max_model_len, weights.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        self.kv_cache_bytes = 2 * sum(t.numel() * t.element_size() for t in self.k_cache)
        self._arange = torch.arange(max_model_len, device=self.device)
        self._scaling = weights.head_dim**-0.5
        self._half = weights.head_dim // 2
        self._attention = None
        if self.device.type == "cpu" and self.dtype == torch.float32:
            from llmstack.workers.backends.cpu_kernels import cache_attention

            self._attention = cache_attention()
        self.attention = "llmstack-cpu" if self._attention is not None else "torch-sdpa"
        # ipex-llm's low-bit stages run its own linears.
        self.linear = "onednn-packed" if not weights.quantized and pack_linears(weights.layers) else "torch"

    @property
    def first(self) -> bool:
        return self.w.first

    @property
    def last(self) -> bool:
        return self.w.last

    @torch.inference_mode()
    def forward(
        self, inputs: torch.Tensor, slots: Sequence[int], starts: Sequence[int], counts: Sequence[int]
    ) -> torch.Tensor:
        """`inputs`: token ids [tokens] (first stage) or hidden states [tokens, hidden]. Returns hidden
        states [tokens, hidden], or on the last stage float32 logits [sequences, vocab]."""
        w = self.w
        positions = torch.cat([self._arange[s : s + n] for s, n in zip(starts, counts, strict=True)])
        x = F.embedding(inputs.to(self.device), w.embed) if w.first else inputs.to(self.device, self.dtype)
        cos = w.cos.index_select(0, positions).unsqueeze(1)
        sin = w.sin_signed.index_select(0, positions).unsqueeze(1)
        if self._attention is not None:
            meta = tuple(torch.tensor(list(v), dtype=torch.long) for v in (slots, starts, counts))
        else:
            offsets = [0]
            for n in counts:
                offsets.append(offsets[-1] + n)
            decodes = self._decodes(offsets, slots, starts, counts)
        quantized = w.quantized or [None] * len(w.layers)
        for layer, low, k_cache, v_cache in zip(w.layers, quantized, self.k_cache, self.v_cache, strict=True):
            q, k_new, v_new = self._rotated_qkv(x, layer, low, cos, sin)
            if self._attention is not None:
                attn = torch.empty(x.shape[0], w.num_heads, w.head_dim, dtype=self.dtype)
                self._attention(q, k_new, v_new, attn, k_cache, v_cache, *meta, self._scaling)
            else:
                with _sdpa_without_cudnn():
                    attn = self._torch_attention(q, k_new, v_new, k_cache, v_cache, offsets, slots, starts,
                                                 counts, decodes)  # fmt: skip
            attn = attn.reshape(x.shape[0], w.num_heads * w.head_dim)
            x = x + (linear(attn, layer.w_o, layer.b_o) if low is None else low.o(attn))
            h = rms_norm(x, layer.ln2, layer.ln2_eps)
            x = x + (mlp(h, layer) if low is None else _low_bit_mlp(h, layer, low))
        if not w.last:
            return x
        assert w.norm is not None
        ends = torch.tensor(list(counts), dtype=torch.long, device=self.device).cumsum(0) - 1
        last = rms_norm(x.index_select(0, ends), w.norm, w.norm_eps)
        if w.lm_head_module is not None:
            # [sequences, 1, hidden]: ipex-llm's LM head keeps the last position of a 3-D input only.
            return w.lm_head_module(last.unsqueeze(1)).squeeze(1).float()
        assert w.lm_head is not None
        return F.linear(last, w.lm_head, w.lm_head_bias).float()

    def _rotated_qkv(
        self, x: torch.Tensor, layer: Layer, low: QuantizedLayer | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `FusedDecoderBackend._rotated_qkv`: [tokens, heads, dim], [tokens, kv_heads, dim] x 2."""
        w = self.w
        tokens, heads, kv_heads, dim = x.shape[0], w.num_heads, w.num_kv_heads, w.head_dim
        h = rms_norm(x, layer.ln1, layer.ln1_eps)
        qkv = linear(h, layer.w_qkv, layer.b_qkv) if low is None else low.qkv(h)
        qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
        qk = qk * cos + qk.roll(self._half, -1) * sin
        v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        return qk[:, :heads], qk[:, heads:], v

    def _torch_attention(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        offsets: list[int],
        slots: Sequence[int],
        starts: Sequence[int],
        counts: Sequence[int],
        decodes: _Decodes | None,
    ) -> torch.Tensor:
        """Attention of each sequence's new tokens over its slot (a prompt or a chunk of one, a decode of one
        token), new keys and values written into the cache first. [tokens, heads, dim]."""
        w = self.w
        out = torch.empty_like(q)
        for i, (slot, start, n) in enumerate(zip(slots, starts, counts, strict=True)):
            if n == 1:
                continue
            rows = slice(offsets[i], offsets[i + 1])
            k_cache[slot, :, start : start + n] = k_new[rows].transpose(0, 1)
            v_cache[slot, :, start : start + n] = v_new[rows].transpose(0, 1)
            k, v = k_cache[slot, :, : start + n], v_cache[slot, :, : start + n]
            # Token i of the chunk is at position start + i: it sees keys 0 .. start + i.
            causal = (
                None
                if start == 0
                else torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(start)
            )
            attn = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=causal,
                is_causal=causal is None, scale=self._scaling, enable_gqa=w.num_heads != w.num_kv_heads,
            )  # fmt: skip
            out[rows] = attn[0].transpose(0, 1)
        if decodes is not None:
            d = decodes
            k_cache[d.slots, :, d.positions] = k_new.index_select(0, d.index)
            v_cache[d.slots, :, d.positions] = v_new.index_select(0, d.index)
            batch, groups = len(d.which), w.num_heads // w.num_kv_heads
            grouped = q.index_select(0, d.index).reshape(batch, w.num_kv_heads, groups, w.head_dim)
            keys, values = k_cache[d.slots, :, : d.width], v_cache[d.slots, :, : d.width]
            attn = F.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=d.mask, scale=self._scaling
            )
            out.index_copy_(0, d.index, attn.reshape(batch, w.num_heads, w.head_dim))
        return out

    def _decodes(
        self, offsets: list[int], slots: Sequence[int], starts: Sequence[int], counts: Sequence[int]
    ) -> _Decodes | None:
        which = [i for i, n in enumerate(counts) if n == 1]
        if not which:
            return None
        needed = max(starts[i] for i in which) + 1
        width = MIN_DECODE_WIDTH
        while width < needed:
            width *= 2
        width = min(width, self.max_model_len)
        # One host-to-device copy for the three index vectors.
        columns = [[offsets[i] for i in which], [slots[i] for i in which], [starts[i] for i in which]]
        rows = torch.tensor(columns, dtype=torch.long).to(self.device, non_blocking=True)
        index, slot_t, pos = rows[0], rows[1], rows[2]
        beyond = (self._arange[:width].unsqueeze(0) > pos.unsqueeze(1)).view(len(which), 1, 1, width)
        mask = torch.zeros(beyond.shape, dtype=self.dtype, device=self.device).masked_fill(
            beyond, float("-inf")
        )
        return _Decodes(which, index, slot_t, pos, width, mask)


def _low_bit_mlp(h: torch.Tensor, layer: Layer, low: QuantizedLayer) -> torch.Tensor:
    """`layers.mlp` through the layer's low-bit modules."""
    gate_up = low.gate_up(h)
    gate, up = gate_up[..., : layer.intermediate], gate_up[..., layer.intermediate :]
    return low.down(layer.act(gate) * up)


def _sdpa_without_cudnn() -> contextlib.AbstractContextManager[None]:
    """SDPA with every backend but cuDNN's (see the module's docstring); a no-op context where torch has no
    backend selection."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
