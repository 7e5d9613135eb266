"""Will the model fit? Weights for the chosen low_bit plus KV cache, per card, against the card's memory.

Users otherwise find the limits by trial and error (ipex-llm issues #11424, #11910, #11798). The estimate
follows what vLLM itself needs at startup, per card after tensor (tp) and pipeline (pp) parallelism:

  weights  = transformer-layer matrices x low_bit.bits_per_weight / 8
             + embedding, separate lm_head and norms at 16 bits (engines keep them unquantized)
             split over tp; each pipeline stage holds its share of the layers
  KV/token = 2 (K and V) x layers per stage x ceil(KV heads / tp) x head_dim x KV bytes
             (2 for fp16/bf16, 1 for an fp8 KV cache, 4 for float32)
  budget   = device.memory_gib x engine.gpu_memory_utilization (vLLM's default 0.9 when unset)

A config is rejected when the weights plus the KV cache of ONE sequence of max_model_len tokens (rounded up
to whole blocks) exceed the budget: vLLM refuses to start then ("To serve at least one request with the
model's max seq len ... KV cache is needed", llm-scaler README 2.7). KV for max_num_seqs sequences of full
length is reported, not required: vLLM pages the KV cache and runs fewer sequences at once when they are
long. Activations and the runtime's own overhead are not modelled, so passing is necessary, not sufficient.
Left out of the count: QKV biases (Qwen: under 0.01 % of the weights). MLPs are counted as gated
(gate, up, down: Llama, Qwen, Mistral); set model.arch.num_parameters for other shapes.

Separately, on devices with a single-allocation limit (device.max_alloc_gib; Arc: 4 GB, ipex-llm #11798),
the largest single tensors are estimated and a warning is logged when one exceeds it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from llmstack.config.schema import LowBitConfig, ModelArchitecture, RunConfig
from llmstack.engines.vllm.config import VllmEngineConfig
from llmstack.errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 1024**3
# vLLM's --gpu-memory-utilization default (quoted by ipex-llm's docs: "If unspecified, will use the default
# value of 0.9") and its --max-num-seqs default ("Default: 256").
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
VLLM_DEFAULT_MAX_NUM_SEQS = 256
# Bytes of one unquantized value: float32 when engine.dtype asks for it, else fp16/bf16.
FULL_PRECISION_DTYPES = ("float32", "float")
# vLLM's sampler upcasts logits to float32; non-fused attention softmax is computed in float32 too.
FLOAT32_BYTES = 4
TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Shape:
    """model.arch with its defaults applied; every fact known."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    num_parameters: int | None = None

    @classmethod
    def of(cls, arch: ModelArchitecture) -> Shape | None:
        """None when a fact the estimate needs is unknown."""
        needed = (
            arch.hidden_size,
            arch.intermediate_size,
            arch.num_hidden_layers,
            arch.num_attention_heads,
            arch.vocab_size,
        )
        if not all(needed) or not arch.hidden_size or not arch.num_attention_heads:
            return None
        return cls(
            hidden=arch.hidden_size,
            intermediate=int(arch.intermediate_size or 0),
            layers=int(arch.num_hidden_layers or 0),
            heads=arch.num_attention_heads,
            kv_heads=arch.num_key_value_heads or arch.num_attention_heads,
            head_dim=arch.head_dim or arch.hidden_size // arch.num_attention_heads,
            vocab=int(arch.vocab_size or 0),
            tied=bool(arch.tie_word_embeddings),
            num_parameters=arch.num_parameters,
        )


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by how engines store them: `linear` takes the low_bit format, the rest stays 16-bit."""

    linear: int
    embedding: int  # the input embedding plus a separate lm_head
    norm: int

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.norm


def parameter_count(shape: Shape) -> ParameterCount:
    q_width = shape.heads * shape.head_dim
    kv_width = shape.kv_heads * shape.head_dim
    attention = shape.hidden * q_width + 2 * shape.hidden * kv_width + q_width * shape.hidden
    mlp = 3 * shape.hidden * shape.intermediate
    embedding = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    # Two RMSNorms per layer and a final one.
    norm = shape.layers * 2 * shape.hidden + shape.hidden
    linear = shape.layers * (attention + mlp)
    if shape.num_parameters is not None:
        linear = max(0, shape.num_parameters - embedding - norm)
    return ParameterCount(linear=linear, embedding=embedding, norm=norm)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-card figures in bytes, for one resolved run."""

    params: ParameterCount
    linear_bits: float
    other_bits: float
    tp: int
    pp: int
    weights_bytes: int
    kv_bytes_per_token: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    device_gib: float
    utilization: float

    @property
    def budget_bytes(self) -> int:
        return int(self.device_gib * GIB * self.utilization)

    @property
    def kv_one_sequence_bytes(self) -> int:
        tokens = math.ceil(self.max_model_len / self.block_size) * self.block_size
        return tokens * self.kv_bytes_per_token

    @property
    def fits(self) -> bool:
        return self.weights_bytes + self.kv_one_sequence_bytes <= self.budget_bytes

    @property
    def full_length_sequences(self) -> int:
        """How many max_model_len sequences the KV budget holds at once."""
        room = self.budget_bytes - self.weights_bytes
        return max(0, room // self.kv_one_sequence_bytes) if self.kv_one_sequence_bytes else 0

    @property
    def largest_max_model_len(self) -> int:
        """The longest context whose KV cache still fits beside the weights (whole blocks)."""
        room = self.budget_bytes - self.weights_bytes
        if room <= 0 or not self.kv_bytes_per_token:
            return 0
        return room // self.kv_bytes_per_token // self.block_size * self.block_size

    def summary(self) -> str:
        return (
            f"{_cards(self)}: weights {gib(self.weights_bytes)} GiB + KV cache of one "
            f"{self.max_model_len}-token sequence {gib(self.kv_one_sequence_bytes)} GiB = "
            f"{gib(self.weights_bytes + self.kv_one_sequence_bytes)} GiB of {gib(self.budget_bytes)} GiB "
            f"usable ({self.device_gib:g} GiB x gpu_memory_utilization {self.utilization:g}); room for "
            f"{self.full_length_sequences} full-length sequences (max_num_seqs={self.max_num_seqs})"
        )


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def vllm_config(run: RunConfig) -> VllmEngineConfig | None:
    """run.engine when it is vLLM's: the estimate models vLLM's memory layout (gpu_memory_utilization,
    parallelism, KV blocks) and says nothing about other engines."""
    return run.engine if isinstance(run.engine, VllmEngineConfig) else None


def weight_bits(e: VllmEngineConfig, low_bit: LowBitConfig) -> tuple[float, float]:
    """(bits of a transformer-layer weight, bits of an unquantized weight) for this run."""
    full = 32.0 if e.dtype in FULL_PRECISION_DTYPES else 16.0
    if low_bit.name in ("none", "auto"):
        return full, full
    return low_bit.bits_per_weight, full


def kv_bytes(e: VllmEngineConfig) -> int:
    if (e.kv_cache_dtype or "auto").startswith("fp8"):
        return 1
    return 4 if e.dtype in FULL_PRECISION_DTYPES else 2


def estimate(
    run: RunConfig, low_bit: LowBitConfig | None = None, tp: int | None = None
) -> MemoryEstimate | None:
    """The per-card estimate, or None when the device's memory or the model's shape is unknown."""
    shape = Shape.of(run.model.arch)
    e = vllm_config(run)
    if shape is None or run.device.memory_gib is None or e is None:
        return None
    low_bit = low_bit or run.low_bit
    tp = tp or e.tensor_parallel_size
    pp = e.pipeline_parallel_size
    params = parameter_count(shape)
    linear_bits, other_bits = weight_bits(e, low_bit)

    layers_per_stage = math.ceil(shape.layers / pp)
    linear = params.linear * layers_per_stage / shape.layers / tp
    # vLLM splits the vocabulary over tp; with pp the embedding sits on the first stage, lm_head on the last.
    embedding = (params.embedding if pp == 1 else shape.vocab * shape.hidden) / tp
    # Norm weights are replicated on every tensor-parallel rank.
    norm = layers_per_stage * 2 * shape.hidden + shape.hidden
    weights = math.ceil(linear * linear_bits / 8 + (embedding + norm) * other_bits / 8)

    kv_per_token = 2 * layers_per_stage * math.ceil(shape.kv_heads / tp) * shape.head_dim * kv_bytes(e)
    return MemoryEstimate(
        params=params,
        linear_bits=linear_bits,
        other_bits=other_bits,
        tp=tp,
        pp=pp,
        weights_bytes=weights,
        kv_bytes_per_token=kv_per_token,
        # Unknown block size: no rounding (it moves the estimate by less than one block).
        block_size=e.block_size or 1,
        max_model_len=int(e.max_model_len or run.model.max_model_len),
        max_num_seqs=e.max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS,
        device_gib=float(run.device.memory_gib),
        utilization=e.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
    )


def fit_problems(
    run: RunConfig, low_bits: Callable[[], Sequence[LowBitConfig]] = tuple
) -> Iterator[ConfigError]:
    """A ConfigError when the run cannot fit; logs the estimate and any single-allocation warning.

    `low_bits()`: the formats valid for this engine and device, offered when the weights do not fit (only
    then read: loading every low_bit YAML costs launch time).
    """
    est = estimate(run)
    if est is None:
        return
    logger.info("memory estimate: %s", est.summary())
    if est.weights_bytes > est.budget_bytes:
        yield _weights_error(run, est, low_bits)
        return
    if not est.fits:
        yield _kv_error(run, est)
        return
    for warning in allocation_warnings(run):
        logger.warning("%s", warning)


def _weights_error(
    run: RunConfig, est: MemoryEstimate, low_bits: Callable[[], Sequence[LowBitConfig]]
) -> ConfigError:
    fitting = [lb.name for lb in low_bits() if (alt := estimate(run, low_bit=lb)) is not None and alt.fits]
    wider = [
        tp for tp in TP_CHOICES if tp > est.tp and (alt := estimate(run, tp=tp)) is not None and alt.fits
    ]
    ways = ["a format among the choices above (those this engine runs on this device that fit)"]
    if wider:
        tp = wider[0]
        ways.append(f"engine.tensor_parallel_size={tp} (with a profile or device.count that has {tp} cards)")
    ways.append("device.memory_gib, if the card has more memory than the profile says")
    return ConfigError(
        "low_bit",
        run.low_bit.name,
        f"model={run.model.name} needs {gib(est.weights_bytes)} GiB of weights per card "
        f"({est.params.total / 1e9:.2f} B parameters, layer weights at {est.linear_bits:g} bits, "
        f"{_cards(est)}), more than the {gib(est.budget_bytes)} GiB usable "
        f"({est.device_gib:g} GiB x gpu_memory_utilization {est.utilization:g}).",
        fitting,
        hint="To fit, change one of: " + "; ".join(ways) + ".",
    )


def _cards(est: MemoryEstimate) -> str:
    if est.tp * est.pp == 1:
        return "on one card"
    return f"over {est.tp} x {est.pp} cards (tensor x pipeline parallel)"


def _kv_error(run: RunConfig, est: MemoryEstimate) -> ConfigError:
    longest = est.largest_max_model_len
    ways = [f"engine.max_model_len to at most {longest}", "a lower-bit low_bit"]
    shape = Shape.of(run.model.arch)
    e = vllm_config(run)
    if (e is not None and e.flavour != "ipex") or (shape is not None and shape.kv_heads < shape.heads):
        ways.append("engine.kv_cache_dtype=fp8")
    ways.append("more cards (engine.tensor_parallel_size)")
    return ConfigError(
        "engine.max_model_len",
        est.max_model_len,
        f"the KV cache of one {est.max_model_len}-token sequence needs {gib(est.kv_one_sequence_bytes)} GiB "
        f"per card beside {gib(est.weights_bytes)} GiB of weights, more than the {gib(est.budget_bytes)} GiB "
        f"usable ({est.device_gib:g} GiB x gpu_memory_utilization {est.utilization:g}); vLLM would refuse "
        f"to start.",
        hint="To fit, change one of: " + "; ".join(ways) + ".",
    )


def allocation_warnings(run: RunConfig) -> list[str]:
    """Single tensors larger than device.max_alloc_gib, each with what to change."""
    limit_gib = run.device.max_alloc_gib
    shape = Shape.of(run.model.arch)
    e = vllm_config(run)
    if limit_gib is None or shape is None or e is None:
        return []
    limit = limit_gib * GIB
    tp = e.tensor_parallel_size
    context = int(e.max_model_len or run.model.max_model_len)
    seqs = e.max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS
    batched = e.max_num_batched_tokens
    _, other_bits = weight_bits(e, run.low_bit)
    act_bytes = other_bits / 8

    candidates: list[tuple[str, float, str]] = [
        (
            "the embedding table",
            math.ceil(shape.vocab / tp) * shape.hidden * act_bytes,
            "raise engine.tensor_parallel_size",
        ),
        (
            f"the float32 logits of {min(seqs, batched or seqs)} sampled sequences",
            min(seqs, batched or seqs) * shape.vocab * FLOAT32_BYTES,
            "lower engine.max_num_seqs",
        ),
    ]
    if batched is not None:
        candidates.append(
            (
                f"the MLP activation of a {batched}-token prefill batch",
                batched * 2 * math.ceil(shape.intermediate / tp) * act_bytes,
                "lower engine.max_num_batched_tokens or raise engine.tensor_parallel_size",
            )
        )
        if e.flavour == "ipex":
            # The fork's prefill attention materializes the float32 scores of the padded batch: at most
            # `batched` query tokens against sequences of up to max_model_len keys, per local head.
            candidates.append(
                (
                    f"the attention scores of a {batched}-token prefill batch (max_model_len {context})",
                    math.ceil(shape.heads / tp) * batched * min(context, batched) * FLOAT32_BYTES,
                    "lower engine.max_num_batched_tokens and engine.max_model_len, or raise "
                    "engine.tensor_parallel_size",
                )
            )
    return [
        f"{what} would take {gib(size)} GiB in one allocation per card, above the device's single-allocation "
        f"limit device.max_alloc_gib={limit_gib:g} (on Arc: 'Current platform can NOT allocate memory block "
        f"with size larger than 4GB!', ipex-llm #11798). To stay under it: {remedy}."
        for what, size, remedy in candidates
        if size > limit
    ]
