"""A decoder for Llama-family checkpoints built for GPUs: batched prefill, CUDA-graph decode, slot KV cache.

On a small model the GPU finishes a decode step's arithmetic long before Python has launched its few
hundred kernels (HF `generate` on a 0.5B model is launch-bound at any batch size). This backend removes
the launches from the decode step:

  - the KV cache is one preallocated tensor, [2, layers, slots, kv_heads, cache_len, head_dim]; a live
    sequence owns a slot, and live sequences occupy slots 0..n-1 (a released slot is refilled by moving
    the last one: one copy), so a decode step's keys are a view of the cache, never a gather;
  - a decode step reads its inputs (token, position and output order of each row) from one static device
    buffer, filled by a single host-to-device copy, and runs as a replay of a CUDA graph captured at load
    for each (batch bucket, attention width) pair: batch buckets 1, 2, 4, ... up to max_batch_size (rows
    past the live ones are padding: token 0 at position 0 of a free slot), widths 128, 256, 512, ... up
    to the cache length (keys past a row's position are masked), so the attention reads what the longest
    row needs, rounded up;
  - decode attention reads grouped-query heads without repeating K/V: the query heads that share a KV
    head are laid out as that head's queries ([B, kv_heads, group, head_dim] against
    [B, kv_heads, width, head_dim]) with an additive per-row length mask;
  - prefill runs all admitted prompts as one right-padded batch (split by a token budget), with
    causal SDPA, and writes each prompt's K/V into its slot with one slice copy per layer;
  - while the GPU runs a step, the scheduler thread waits on a CUDA event, which releases the GIL (a
    blocking copy to the host would hold it), so other threads of the process run meanwhile.

The arithmetic is transformers' Llama/Mistral/Qwen2 code operation for operation (RMSNorm in float32 then
cast, rotary as q*cos + rotate_half(q)*sin with the model's own cos/sin table, SiLU-gated MLP), on the
checkpoint's own weights, with Q/K/V and gate/up concatenated into one matmul each (`layers.py`, shared
with `fused`, as is the slot bookkeeping). Without CUDA (CPU,
XPU) the same step functions run eagerly; `static_shapes=True` pads them to the buckets as on CUDA, which
the CPU tests use to check the graph-shaped path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

# This module is the GPU backend itself and is imported only when a model is loaded with it.
import torch
import torch.nn.functional as F

from llmstack.workers.backends.base import BackendInfo
from llmstack.workers.backends.layers import SlotDecoder, mlp, rms_norm

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Attention widths are powers of two from this one, then the cache length.
MIN_WIDTH = 128
# Prompt tokens (padded) run by one prefill forward; more admitted prompts are split into several.
DEFAULT_PREFILL_TOKENS = 16384


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a decode step is padded to: powers of two below max_batch_size, then max_batch_size."""
    return [b for b in BATCH_BUCKETS if b < max_batch_size] + [max_batch_size]


def width_buckets(cache_len: int, min_width: int = MIN_WIDTH) -> list[int]:
    """Attention widths a decode step is padded to: powers of two from `min_width`, then cache_len."""
    widths = []
    width = min_width
    while width < cache_len:
        widths.append(width)
        width *= 2
    return [*widths, cache_len]


class FastLlamaBackend(SlotDecoder):
    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int,
        max_model_len: int,
        info: BackendInfo,
        cuda_graphs: bool | None = None,
        static_shapes: bool | None = None,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        min_width: int = MIN_WIDTH,
    ) -> None:
        device = model.model.embed_tokens.weight.device
        # Checked before the layers are fused: a refused model is left as it was.
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        # Graphs need the bucketed shapes; without them, exact shapes waste nothing.
        self.static_shapes = self.cuda_graphs or bool(static_shapes)
        self.prefill_tokens = prefill_tokens
        # Multiples of 16 positions keep the attention views aligned for the fused SDPA kernels.
        self.cache_len = -(-max_model_len // 16) * 16
        super().__init__(model, max_batch_size=max_batch_size, max_model_len=max_model_len,
                         table_len=self.cache_len, info=info)  # fmt: skip
        self._qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        self.batch_buckets = batch_buckets(max_batch_size)
        self.width_buckets = width_buckets(self.cache_len, min_width)

        # Zeros, not empty: a masked key must still hold a finite value (0 * NaN is NaN in the softmax sum).
        shape = (2, len(self.layers), max_batch_size, self.num_kv_heads, self.cache_len, self.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        info.kv_cache_bytes = self.kv.numel() * self.kv.element_size()

        # A decode step's inputs: row 0 tokens, row 1 positions (by slot), row 2 output order (slots).
        self._io = torch.zeros((3, max_batch_size), dtype=torch.long, device=self.device)
        cuda = self.device.type == "cuda"
        # Staged on the host, copied whole (one contiguous copy; a strided slice would go through pageable
        # memory, synchronously).
        self._host_io = torch.zeros((3, max_batch_size), dtype=torch.long, pin_memory=cuda)
        self._rows = torch.arange(max_batch_size, device=self.device)
        self._positions = torch.arange(self.cache_len, device=self.device)
        self._step_done = torch.cuda.Event() if cuda else None

        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        capture_s = 0.0
        if self.cuda_graphs:
            capture_s = self._capture_graphs()
        info.extra.update(
            cuda_graphs=len(self._graphs),
            graph_capture_s=round(capture_s, 2),
            batch_buckets=self.batch_buckets,
            width_buckets=self.width_buckets,
        )

    # -- the Backend contract ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        first = self._assign_slots(seq_ids, prompts)[0]
        rows = []
        start = 0
        while start < len(prompts):
            # The longest prompts set the padded width: take prompts while the padded batch fits the budget.
            end = start + 1
            width = len(prompts[start])
            while end < len(prompts):
                wider = max(width, len(prompts[end]))
                if wider * (end + 1 - start) > self.prefill_tokens:
                    break
                width = wider
                end += 1
            rows.append(self._prefill_batch(first + start, prompts[start:end]))
            start = end
        logits = torch.cat(rows, dim=0).float() if len(rows) > 1 else rows[0].float()
        self._wait()
        return logits

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        slots = [self._slot_of[s] for s in seq_ids]
        bucket = self._bucket(slots)
        tokens = [0] * bucket
        for slot, token in zip(slots, token_ids, strict=True):
            tokens[slot] = token
        self._stage_inputs(slots, bucket, tokens)
        out = self._run_step(slots, bucket)
        logits = self._logits_in_order(out, slots)
        self._commit(slots)
        self._wait()
        return logits

    def _move_slot(self, source: int, target: int, length: int) -> None:
        self.kv[:, :, target, :, :length] = self.kv[:, :, source, :, :length]

    # -- one decode step ---------------------------------------------------------------------------------
    def _bucket(self, slots: list[int]) -> int:
        if self.static_shapes:
            return next(b for b in self.batch_buckets if b > max(slots))
        return max(slots) + 1

    def _stage_inputs(self, slots: list[int], bucket: int, tokens: list[int]) -> None:
        """Tokens (by slot), positions and output order into `self._io` (one host-to-device copy)."""
        length = self._length
        # Rows outside this call (padding, or live sequences left out of a subset call) write K/V at a
        # position nothing reads before it is written again: a free slot's 0, a live one's next position.
        positions = [min(length[s], self.cache_len - 1) for s in range(bucket)]
        order = slots + [0] * (bucket - len(slots))
        host = self._host_io
        host[:, :bucket] = torch.tensor([tokens, positions, order], dtype=torch.long)
        self._io.copy_(host, non_blocking=True)

    def _run_step(self, slots: list[int], bucket: int) -> torch.Tensor:
        """The step over rows 0..bucket-1 with the staged inputs: logits [bucket, vocab] by slot."""
        longest = max(self._length[s] for s in slots) + 1
        width = next(w for w in self.width_buckets if w >= longest) if self.static_shapes else longest
        if self.cuda_graphs:
            graph, out = self._graphs[(bucket, width)]
            graph.replay()
            return out
        return self._decode_step(bucket, width)

    def _logits_in_order(self, out: torch.Tensor, slots: list[int]) -> torch.Tensor:
        # Rows come out by slot; the caller wants them in the order of seq_ids (staged in self._io[2]).
        n = len(slots)
        in_order = slots == list(range(n))
        return (out[:n] if in_order else out.index_select(0, self._io[2, :n])).float()

    def _commit(self, slots: list[int]) -> None:
        for slot in slots:
            self._length[slot] += 1

    # -- CUDA graphs -------------------------------------------------------------------------------------
    def _capture_graphs(self) -> float:
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self._io.zero_()
        side = torch.cuda.Stream()
        # Largest first, so the smaller graphs reuse the pool's blocks.
        for bucket in reversed(self.batch_buckets):
            for width in reversed(self.width_buckets):
                with torch.inference_mode():
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):  # warm-up: lazy cuBLAS/SDPA initialisation stays out of the graph
                            self._decode_step(bucket, width)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self._decode_step(bucket, width)
                self._graphs[(bucket, width)] = (graph, out)
        torch.cuda.synchronize()
        # The warm-ups wrote K/V of token 0 into free slots: harmless, but start from a clean cache.
        self.kv.zero_()
        elapsed = time.perf_counter() - started
        logger.info(
            "captured %d CUDA graphs (batch %s x width %s) in %.1f s",
            len(self._graphs),
            self.batch_buckets,
            self.width_buckets,
            elapsed,
        )
        return elapsed

    def _wait(self) -> None:
        # Waiting on an event releases the GIL (a blocking .tolist() would hold it): the event loop
        # streams the last step's tokens while the GPU runs this one.
        if self._step_done is not None:
            self._step_done.record()
            self._step_done.synchronize()

    # -- the arithmetic ----------------------------------------------------------------------------------
    def _decode_step(self, bucket: int, width: int) -> torch.Tensor:
        """One token for rows 0..bucket-1 (slots), inputs from `self._io`; logits [bucket, vocab]."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        tokens = self._io[0, :bucket]
        pos = self._io[1, :bucket]
        rows = self._rows[:bucket]
        visible = self._positions[:width].unsqueeze(0) <= pos.unsqueeze(1)
        mask = torch.zeros((bucket, width), dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~visible, float("-inf")).view(bucket, 1, 1, width)
        x = F.embedding(tokens, self.embed)
        cos = self.cos.index_select(0, pos).unsqueeze(1)
        sin = self.sin_signed.index_select(0, pos).unsqueeze(1)
        k_all, v_all = self.kv[0], self.kv[1]
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, layer.ln1_eps)
            qkv = F.linear(h, layer.w_qkv, layer.b_qkv)
            qk = qkv[:, : self._qk_width].view(bucket, heads + kv_heads, dim)
            qk = qk * cos + qk.roll(self._half, -1) * sin
            k_cache, v_cache = k_all[index], v_all[index]
            k_cache[rows, :, pos] = qk[:, heads:]
            v_cache[rows, :, pos] = qkv[:, self._qk_width :].view(bucket, kv_heads, dim)
            q = qk[:, :heads].reshape(bucket, kv_heads, self.groups, dim)
            keys, values = k_cache[:bucket, :, :width], v_cache[:bucket, :, :width]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            x = x + F.linear(attn.reshape(bucket, heads * dim), layer.w_o, layer.b_o)
            x = x + mlp(rms_norm(x, layer.ln2, layer.ln2_eps), layer)
        return F.linear(rms_norm(x, self.norm, self.norm_eps), self.lm_head, self.lm_head_bias)

    def _prefill_batch(self, first_slot: int, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prompts into slots first_slot.. (right-padded to the longest); logits after each prompt's end."""
        n = len(prompts)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        padded = [list(p) + [0] * (width - len(p)) for p in prompts]
        ids = torch.tensor(padded, dtype=torch.long).to(self.device, non_blocking=True)
        x = F.embedding(ids, self.embed)
        cos = self.cos[:width].view(1, width, 1, dim)
        sin = self.sin_signed[:width].view(1, width, 1, dim)
        slots = slice(first_slot, first_slot + n)
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, layer.ln1_eps)
            qkv = F.linear(h, layer.w_qkv, layer.b_qkv)
            qk = qkv[..., : self._qk_width].view(n, width, heads + kv_heads, dim)
            qk = qk * cos + qk.roll(self._half, -1) * sin
            q = qk[:, :, :heads].transpose(1, 2)
            k = qk[:, :, heads:].transpose(1, 2)
            v = qkv[..., self._qk_width :].view(n, width, kv_heads, dim).transpose(1, 2)
            # Padding positions past a prompt's end get K/V too; decode overwrites each before reading it.
            self.kv[0, index, slots, :, :width] = k
            self.kv[1, index, slots, :, :width] = v
            if self.groups > 1:
                # As transformers' repeat_kv: query head j reads KV head j // groups.
                k = k.repeat_interleave(self.groups, dim=1)
                v = v.repeat_interleave(self.groups, dim=1)
            # Right padding under a causal mask: a real token never sees a padding one.
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
            x = x + F.linear(attn.transpose(1, 2).reshape(n, width, heads * dim), layer.w_o, layer.b_o)
            x = x + mlp(rms_norm(x, layer.ln2, layer.ln2_eps), layer)
        last_index = torch.tensor([length - 1 for length in lengths], device=self.device)
        last = x[torch.arange(n, device=self.device), last_index]
        return F.linear(rms_norm(last, self.norm, self.norm_eps), self.lm_head, self.lm_head_bias)
