"""What llmstack's own decoders (`fused`, `fast_llama`) share: the layers, and the slots of the KV cache.

A Llama-family layer's weights as one QKV and one gate/up matmul (concatenated at load, the separate
projections dropped), RMSNorm and the gated MLP: transformers' Llama/Mistral/Qwen2 arithmetic operation
for operation, so that rounding matches; the rotary tables built once with the model's own rotary module;
which checkpoints these layers can run (`unsupported_reason`). `SlotDecoder` holds a checkpoint's weights
and the slots of a per-slot KV cache: a sequence owns a slot, live sequences occupy slots 0..n-1, and a
released slot is refilled by moving the last one, so that a batch's keys are a view of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Imported only by the backends that run a loaded model.
import torch
import torch.nn.functional as F

from llmstack.workers.backends.base import BackendInfo
from llmstack.workers.protocol import FUSED_MODEL_TYPES

# Rotary variants whose frequencies do not depend on the sequence length (a table is exact for them).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class Layer:
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
    # Width of the MLP's hidden layer: where gate ends and up begins in w_gate_up's output.
    intermediate: int


def unsupported_reason(model: Any, max_model_len: int) -> str | None:
    """Why these layers cannot run `model`, or None if they can."""
    cfg = model.config
    if cfg.model_type not in FUSED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {', '.join(FUSED_MODEL_TYPES)}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb"):
        return "the model does not have the Llama module layout (model.layers, model.rotary_emb)"
    problem = config_unsupported_reason(cfg, getattr(inner.rotary_emb, "rope_type", "default"), max_model_len)
    if problem is not None:
        return problem
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            projection = getattr(attn, name, None)
            if projection is None:
                return "attention has no separate q/k/v/o projections"
            # Exactly nn.Linear: quantized layers (bitsandbytes, ipex-llm) subclass it, with other weights.
            if type(projection) is not torch.nn.Linear:
                return f"{name} is {type(projection).__name__}, not a plain nn.Linear (quantized?)"
        if any(getattr(attn, n, None) is not None for n in ("q_norm", "k_norm")):
            return "attention normalizes queries and keys (not implemented)"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "the MLP is not a gated (gate/up/down) MLP"
    return None


def config_unsupported_reason(cfg: Any, rope_type: str, max_model_len: int) -> str | None:
    """The checks of `unsupported_reason` that need only the config (and the rotary variant): what the
    pipeline's stages, which build no model, check too."""
    if cfg.model_type not in FUSED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {', '.join(FUSED_MODEL_TYPES)}"
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} depends on the sequence length"
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", cfg.model_type == "mistral")
    if window and uses_window and max_model_len > window:
        return f"sliding-window attention ({window}) is shorter than max_model_len ({max_model_len})"
    return None


class SlotDecoder:
    """A checkpoint's weights (its layers fused), its shape, and which KV-cache slot each sequence holds.

    Subclasses own the cache and its arithmetic; they move a slot's keys and values in `_move_slot`.
    """

    def __init__(
        self, model: Any, *, max_batch_size: int, max_model_len: int, table_len: int, info: BackendInfo
    ) -> None:
        """`table_len`: positions of the rotary tables (at least max_model_len)."""
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
        self.embed = embed.detach()
        self.layers = [fuse_layer(layer) for layer in inner.layers]
        self.norm, self.norm_eps = inner.norm.weight.detach(), float(inner.norm.variance_epsilon)
        head = model.lm_head
        self.lm_head = head.weight.detach()
        self.lm_head_bias = None if head.bias is None else head.bias.detach()
        self.vocab_size = int(self.lm_head.shape[0])
        self.cos, self.sin_signed = rotary_tables(inner.rotary_emb, table_len, self.dtype, self.device)
        self._half = self.head_dim // 2
        self._info = info
        self._slot_of: dict[int, int] = {}
        self._seq_in_slot: list[int | None] = [None] * max_batch_size
        self._length = [0] * max_batch_size

    def info(self) -> BackendInfo:
        return self._info

    def _assign_slots(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> list[int]:
        """The next free slots to new sequences, their prompts as what they hold."""
        slots = []
        for seq_id, prompt in zip(seq_ids, prompts, strict=True):
            slot = len(self._slot_of)
            self._slot_of[seq_id] = slot
            self._seq_in_slot[slot] = seq_id
            self._length[slot] = len(prompt)
            slots.append(slot)
        return slots

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
                self._move_slot(last, slot, length)
            self._slot_of[moved] = slot
            self._seq_in_slot[slot] = moved
            self._length[slot] = length
        self._seq_in_slot[last] = None
        self._length[last] = 0

    def _move_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source`'s keys and values to slot `target`."""
        raise NotImplementedError


def fuse_layer(layer: Any) -> Layer:
    """The layer's weights, Q/K/V and gate/up concatenated; the separate projections are dropped."""
    attn, mlp = layer.self_attn, layer.mlp
    fused = Layer(
        ln1=layer.input_layernorm.weight.detach(),
        ln1_eps=float(layer.input_layernorm.variance_epsilon),
        w_qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
        b_qkv=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj),
        w_o=attn.o_proj.weight.detach(),
        b_o=_bias(attn.o_proj),
        ln2=layer.post_attention_layernorm.weight.detach(),
        ln2_eps=float(layer.post_attention_layernorm.variance_epsilon),
        w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
        b_gate_up=_cat_bias(mlp.gate_proj, mlp.up_proj),
        w_down=mlp.down_proj.weight.detach(),
        b_down=_bias(mlp.down_proj),
        act=mlp.act_fn,
        intermediate=int(mlp.down_proj.weight.shape[1]),
    )
    # The separate projections are now copies: drop them so the weights are not held twice.
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        for name in names:
            setattr(owner, name, None)
    return fused


def rotary_tables(
    rotary_emb: Any, length: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, [length, head_dim], from the model's own rotary module: with them
    rotate_half(x) * sin == roll(x, head_dim // 2) * sin_signed (one roll instead of two slices, neg, cat)."""
    with torch.inference_mode():
        positions = torch.arange(length, device=device).unsqueeze(0)
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = rotary_emb(probe, positions)
    half = cos.shape[-1] // 2
    sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()
    return cos[0].contiguous(), sin_signed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        # One fused op; in float32 it rounds exactly as transformers' LlamaRMSNorm (checked by the tests).
        return F.rms_norm(x, weight.shape, weight, eps)
    # transformers' LlamaRMSNorm, operation for operation (so rounding matches): float32 inside.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def mlp(h: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The SiLU-gated (act_fn) MLP of `layer` on `h`."""
    gate_up = linear(h, layer.w_gate_up, layer.b_gate_up)
    gate, up = gate_up[..., : layer.intermediate], gate_up[..., layer.intermediate :]
    return linear(layer.act(gate) * up, layer.w_down, layer.b_down)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or oneDNN's on a weight `pack_linears` packed."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_linears(layers: Sequence[Layer]) -> bool:
    """On CPU in float32: the layers' projections in oneDNN's packed layout, in place; whether it did.

    Measured here (one thread, the pp_cpu.py model's 4 layers): 8.3 ms a decode step of 8 tokens against
    F.linear's 21.8 (16 tokens: 11.5 vs 30.4; a prefill of 512: 2.2x): F.linear's kernel streams the weights
    far slower at a few rows. The same float32 arithmetic summed in another order (relative differences
    ~1e-6). `LLMSTACK_CPU_KERNELS=0` keeps F.linear, as it keeps torch's attention."""
    import os

    from llmstack.workers.backends.cpu_kernels import DISABLE_ENV

    if os.environ.get(DISABLE_ENV, "1") == "0" or not layers:
        return False
    first = layers[0].w_qkv
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if first.device.type != "cpu" or first.dtype != torch.float32 or reorder is None:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    packed = False
    for layer in layers:
        for name in ("w_qkv", "w_o", "w_gate_up", "w_down"):
            weight = getattr(layer, name)
            if min(weight.shape) < _PACK_MIN_WIDTH:
                continue  # oneDNN's ~10 us a call costs more than it saves on small matrices
            # The batch-size hint only tunes the layout: the packed weight serves any number of rows.
            setattr(layer, name, reorder(weight.contiguous(), _PACK_ROWS_HINT))
            packed = True
    return packed


_PACK_ROWS_HINT = 16
# benchmarks/cpu_linear.py (one thread): 128 wide, F.linear is faster up to 8 rows; 256, packed is 1.6-2.3x
# from 8 rows but 0.67x at 1; from 384 packed wins at every row count (1.5x at 1 row, 2.2x at 8).
_PACK_MIN_WIDTH = 384


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
