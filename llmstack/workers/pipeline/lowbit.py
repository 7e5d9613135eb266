"""engine.backend=ipex_llm: a stage's projections as ipex-llm's low-bit linears, the rest as it was.

Each rank converts only what it holds: its layers' fused Q/K/V, O, fused gate/up and down projections, and
the LM head on the last stage (ipex-llm's own `load_in_low_bit` converts the same linears of a Llama model,
its Q/K/V merged into one `qkv_proj` too; the embedding and the norms stay in the activation dtype). The
conversion is ipex-llm's public `optimize_model` on a module of plain `nn.Linear`s, named as ipex-llm names
them in its converted model (`model.layers.<i>.self_attn.qkv_proj`, ..., `lm_head`), with
`optimize_llm=False`: only the linears are replaced, so its rules apply as they would to the model (a
linear whose input width is not a multiple of 64 stays unquantized, a format falls back where the width
needs it, the LM head is marked as such). The block formats quantize each output row on its own, so the
fused matrices hold the same blocks as the separate ones would, and a layer's weights do not depend on
where the model is cut: the stages of any split compute what one stage computes.

ipex-llm quantizes on the CPU (from float32) and moves the packed weights to the device (xpu) afterwards:
the stage is loaded on the CPU, converted here, and only then moved.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch

from llmstack.workers.backends.loader import ipex_qtype_counts
from llmstack.workers.pipeline.weights import QuantizedLayer, StageLoadError, StageWeights

logger = logging.getLogger(__name__)


def import_ipex_llm() -> Any:
    """ipex_llm.optimize_model, imported quietly: without vLLM's layers (the stages never use them; an
    installed vLLM would otherwise switch ipex-llm's conversion to vLLM's modules, convert.py
    is_vllm_available) and without transformers' deprecation warnings that its import triggers."""
    os.environ.setdefault("IPEX_LLM_NOT_USE_VLLM", "True")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            from ipex_llm import optimize_model
    except ImportError as exc:
        raise StageLoadError(f"backend ipex_llm: cannot import ipex_llm in this interpreter ({exc})") from exc
    return optimize_model


def quantize_stage(weights: StageWeights, low_bit: str, config: Any, device: torch.device) -> dict[str, int]:
    """Replace the stage's projection matrices with ipex-llm `low_bit` linears on `device` (the stage's
    other tensors are moved there too). Returns how many linears hold each format, e.g. {"sym_int4": 4}."""
    from torch import nn

    optimize_model = import_ipex_llm()
    if weights.device.type != "cpu":
        raise ValueError("ipex-llm quantizes on the CPU: load the stage there first")
    root = nn.Module()
    # ipex-llm's rules read the model's config (the LM head's width, per-model format choices).
    root.config = config
    layers = nn.ModuleDict()
    for index, layer in zip(range(weights.start, weights.stop), weights.layers, strict=True):
        block = nn.Module()
        block.self_attn = nn.Module()
        block.mlp = nn.Module()
        block.self_attn.qkv_proj = _linear(layer.w_qkv, layer.b_qkv)
        block.self_attn.o_proj = _linear(layer.w_o, layer.b_o)
        block.mlp.gate_up_proj = _linear(layer.w_gate_up, layer.b_gate_up)
        block.mlp.down_proj = _linear(layer.w_down, layer.b_down)
        layers[str(index)] = block
    root.model = nn.Module()
    root.model.layers = layers
    if weights.last:
        assert weights.lm_head is not None
        root.lm_head = _linear(weights.lm_head, weights.lm_head_bias)
    # torch_dtype: the activation dtype, which linears left unquantized are given (ipex-llm's CPU path).
    root.eval()  # ipex-llm keeps a linear's mode; inference, not training
    root = optimize_model(root, low_bit=low_bit, optimize_llm=False, torch_dtype=weights.dtype)
    root.to(device)
    root.requires_grad_(False)
    weights.quantized = [
        QuantizedLayer(
            qkv=b.self_attn.qkv_proj, o=b.self_attn.o_proj, gate_up=b.mlp.gate_up_proj, down=b.mlp.down_proj
        )
        for b in layers.values()
    ]
    weights.lm_head_module = root.lm_head if weights.last else None
    weights.quantized_bytes = sum(p.numel() * p.element_size() for p in root.parameters())
    _drop_float_projections(weights)
    weights.move_to(device)
    weights.qtypes = ipex_qtype_counts(root, unquantized=True)
    return weights.qtypes


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    from torch import nn

    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return module


def _drop_float_projections(weights: StageWeights) -> None:
    """The unquantized copies are not used again: free them (the point of low-bit weights)."""
    empty = torch.empty(0, dtype=weights.dtype)
    for layer in weights.layers:
        layer.w_qkv = layer.w_o = layer.w_gate_up = layer.w_down = empty
        layer.b_qkv = layer.b_o = layer.b_gate_up = layer.b_down = None
    if weights.last:
        weights.lm_head = weights.lm_head_bias = None
