"""One stage's share of a checkpoint: its decoder layers, plus the embedding (first stage) or the final norm
and LM head (last stage), read tensor by tensor from the safetensors files, so that a rank holds only what it
runs and a model larger than one device's memory serves across several.

Hugging Face's Llama layout (Llama, Mistral, Qwen2): `model.embed_tokens`, `model.layers.<i>.*`,
`model.norm`, `lm_head` (absent when the embedding is tied to it). The layers are fused as llmstack's own
decoders fuse them (`workers/backends/layers.py`: Q/K/V and gate/up concatenated), so the arithmetic is the
lightweight worker's, operation for operation. A checkpoint without safetensors (pytorch_model*.bin) is read
whole and cut (memory-mapped where torch can).
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmstack.workers.backends.layers import Layer, config_unsupported_reason, rotary_tables

logger = logging.getLogger(__name__)


class StageLoadError(Exception):
    """The checkpoint cannot be served as a pipeline (said as one line)."""


@dataclass
class QuantizedLayer:
    """A layer's projections as modules (engine.backend=ipex_llm: ipex-llm's low-bit linears, `lowbit.py`),
    called in place of F.linear on the Layer's tensors."""

    qkv: Any
    o: Any
    gate_up: Any
    down: Any


@dataclass
class StageWeights:
    first: bool
    last: bool
    # Decoder layers [start, stop) of the model.
    start: int
    stop: int
    layers: list[Layer]
    embed: torch.Tensor | None
    norm: torch.Tensor | None
    norm_eps: float
    lm_head: torch.Tensor | None
    lm_head_bias: torch.Tensor | None
    cos: torch.Tensor
    sin_signed: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    # Set by `lowbit.quantize_stage`: one per layer, the LM head's module, their bytes, and how many linears
    # hold each format ({"sym_int4": 4}).
    quantized: list[QuantizedLayer] | None = None
    lm_head_module: Any = None
    quantized_bytes: int = 0
    qtypes: dict[str, int] = field(default_factory=dict)

    def parameter_bytes(self) -> int:
        tensors = [getattr(self, name) for name in _STAGE_PARAMETERS]
        tensors += [getattr(layer, name) for layer in self.layers for name in _LAYER_TENSORS]
        return self.quantized_bytes + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def move_to(self, device: torch.device) -> None:
        """Every tensor to `device` (ipex-llm converts a stage on the CPU, which is then moved)."""
        for owner, names in [(self, (*_STAGE_PARAMETERS, "cos", "sin_signed"))] + [
            (layer, _LAYER_TENSORS) for layer in self.layers
        ]:
            for name in names:
                if (value := getattr(owner, name)) is not None:
                    setattr(owner, name, value.to(device))
        self.device = device


_STAGE_PARAMETERS = ("embed", "norm", "lm_head", "lm_head_bias")
_LAYER_TENSORS = ("ln1", "w_qkv", "b_qkv", "w_o", "b_o", "ln2", "w_gate_up", "b_gate_up", "w_down", "b_down")


def load_config(model_dir: str, trust_remote_code: bool = False, max_model_len: int | None = None) -> Any:
    """The checkpoint's config, if the stages can run it with sequences of `max_model_len` (None: the
    model's max_position_embeddings)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    length = max_model_len or int(getattr(config, "max_position_embeddings", 0) or 2048)
    problem = unsupported_reason(config, length)
    if problem is not None:
        raise StageLoadError(f"the pipeline cannot run {model_dir}: {problem}")
    return config


def unsupported_reason(config: Any, max_model_len: int) -> str | None:
    """Why the pipeline's layers cannot run this config, or None: the fused decoders' own config checks
    (`layers.config_unsupported_reason`), the rotary variant read from the config, and the activation."""
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    rope_type = "default"
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    problem = config_unsupported_reason(config, rope_type, max_model_len)
    if problem is not None:
        return problem
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        return f"hidden_act {config.hidden_act!r} is not a gated MLP activation these layers know"
    return None


def dtype_of(config: Any, name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(configured, torch.dtype):
        return configured
    if isinstance(configured, str) and configured not in ("auto", ""):
        return getattr(torch, configured)
    return torch.float32


def load_stage(
    model_dir: str,
    config: Any,
    start: int,
    stop: int,
    *,
    first: bool,
    last: bool,
    dtype: torch.dtype,
    device: torch.device,
    table_len: int,
) -> StageWeights:
    """Layers [start, stop) of the checkpoint, and the embedding / head when this stage is first / last."""
    wanted = [f"model.layers.{i}." for i in range(start, stop)]
    names = ["model.embed_tokens.weight"] if first else []
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if last:
        names += ["model.norm.weight", "lm_head.weight", "lm_head.bias"]
        if tied:
            names.append("model.embed_tokens.weight")
    tensors = _read(Path(model_dir), lambda key: key in names or key.startswith(tuple(wanted)))

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise StageLoadError(f"{model_dir} has no tensor {key}")
        return tensors[key].to(device=device, dtype=dtype)

    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    layers = [_layer(take, tensors, i, config) for i in range(start, stop)]
    lm_head = lm_head_bias = norm = None
    if last:
        norm = take("model.norm.weight")
        lm_head = take("lm_head.weight") if "lm_head.weight" in tensors else take("model.embed_tokens.weight")
        lm_head_bias = take("lm_head.bias") if "lm_head.bias" in tensors else None
    cos, sin_signed = rotary_tables(_rotary_module(config, head_dim, device), table_len, dtype, device)
    return StageWeights(
        first=first, last=last, start=start, stop=stop, layers=layers,
        embed=take("model.embed_tokens.weight") if first else None,
        norm=norm, norm_eps=float(config.rms_norm_eps), lm_head=lm_head, lm_head_bias=lm_head_bias,
        cos=cos, sin_signed=sin_signed, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        hidden_size=int(config.hidden_size), vocab_size=int(config.vocab_size), dtype=dtype, device=device,
    )  # fmt: skip


def _layer(take: Any, tensors: dict[str, torch.Tensor], index: int, config: Any) -> Layer:
    from transformers.activations import ACT2FN

    p = f"model.layers.{index}."

    def bias(*names: str) -> torch.Tensor | None:
        present = [f"{p}{n}.bias" in tensors for n in names]
        if not any(present):
            return None
        parts = []
        for name, has in zip(names, present, strict=True):
            rows = tensors[f"{p}{name}.weight"].shape[0]
            parts.append(take(f"{p}{name}.bias") if has else take(f"{p}{name}.weight").new_zeros(rows))
        return torch.cat(parts)

    eps = float(config.rms_norm_eps)
    attn, mlp = "self_attn.", "mlp."
    return Layer(
        ln1=take(p + "input_layernorm.weight"),
        ln1_eps=eps,
        w_qkv=torch.cat([take(f"{p}{attn}{n}_proj.weight") for n in "qkv"]),
        b_qkv=bias(*(f"{attn}{n}_proj" for n in "qkv")),
        w_o=take(f"{p}{attn}o_proj.weight"),
        b_o=take(f"{p}{attn}o_proj.bias") if f"{p}{attn}o_proj.bias" in tensors else None,
        ln2=take(p + "post_attention_layernorm.weight"),
        ln2_eps=eps,
        w_gate_up=torch.cat([take(f"{p}{mlp}gate_proj.weight"), take(f"{p}{mlp}up_proj.weight")]),
        b_gate_up=bias(f"{mlp}gate_proj", f"{mlp}up_proj"),
        w_down=take(f"{p}{mlp}down_proj.weight"),
        b_down=take(f"{p}{mlp}down_proj.bias") if f"{p}{mlp}down_proj.bias" in tensors else None,
        act=ACT2FN[config.hidden_act],
        intermediate=int(tensors[f"{p}{mlp}down_proj.weight"].shape[1]),
    )


def _rotary_module(config: Any, head_dim: int, device: torch.device) -> Any:
    """The model's own rotary embedding module (so the cos/sin table is the one its forward would use), as
    `rotary_tables` calls it: (x, position_ids) -> cos, sin [1, positions, head_dim]."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.model_type
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type].removesuffix("ForCausalLM")
    cls = getattr(module, prefix + "RotaryEmbedding")
    try:
        return cls(config=config).to(device)
    except TypeError:
        return _LegacyRotary(module, prefix, config, head_dim, device)


class _LegacyRotary:
    """transformers < 4.45 (ipex-llm's 4.37): the rotary module takes (dim, max_position_embeddings, base)
    and returns its tables for `seq_len` positions. Built as that version's attention builds it
    (LlamaAttention._init_rope: linear scaling is Llama's own class; Mistral's and Qwen2's have none, and
    the dynamic variants are refused by `unsupported_reason`)."""

    def __init__(self, module: Any, prefix: str, config: Any, head_dim: int, device: torch.device) -> None:
        args = (head_dim, int(config.max_position_embeddings), float(getattr(config, "rope_theta", 10000.0)))
        scaling = getattr(config, "rope_scaling", None) or {}
        linear = getattr(module, prefix + "LinearScalingRotaryEmbedding", None)
        if scaling.get("type") == "linear" and linear is not None:
            self.module = linear(*args, device=device, scaling_factor=float(scaling["factor"]))
        else:
            self.module = getattr(module, prefix + "RotaryEmbedding")(*args, device=device)

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.module(x, seq_len=int(position_ids.shape[-1]))
        return cos.unsqueeze(0), sin.unsqueeze(0)


def _read(model_dir: Path, keep: Any) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names `keep` accepts, read one by one where the format allows."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            if keep(key):
                files.setdefault(file, []).append(key)
        return _read_safetensors({model_dir / f: keys for f, keys in files.items()})
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt", device="cpu") as handle:
            keys = [k for k in handle.keys() if keep(k)]  # noqa: SIM118 (safe_open has no __iter__)
        return _read_safetensors({single: keys})
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise StageLoadError(f"{model_dir} has neither model.safetensors nor pytorch_model*.bin")
    logger.warning("%s has no safetensors: each rank reads the whole checkpoint, keeps its part", model_dir)
    out: dict[str, torch.Tensor] = {}
    for path in bins:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        out.update({k: v for k, v in state.items() if keep(k)})
    return out


def _read_safetensors(files: dict[Path, list[str]]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path, keys in files.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in keys:
                out[key] = handle.get_tensor(key)
    return out
