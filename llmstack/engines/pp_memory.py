"""Will each pipeline stage fit on its device? engine=pp's per-stage memory estimate, checked before launch.

Each stage holds its own decoder layers (`llmstack.workers.partition.split_layers`, the worker's rule),
the embedding on the first stage, the final norm and LM head on the last (a tied LM head is a copy there),
and the KV cache of its layers for every micro-batch in flight:

  weights  = layers x (layer matrices x bits / 8 + 2 norms at 16 bits) [+ embedding] [+ norm + LM head]
  KV       = layers x max_num_seqs x micro-batches x max_model_len x KV heads x head_dim x 2 (K, V) x bytes
  budget   = device.memory_gib, one device per stage (cuda, xpu); on cpu a node's stages share the host

Under engine.backend=ipex_llm the layer matrices and the LM head take low_bit.bits_per_weight (each rank
converts them with ipex-llm: workers/pipeline/lowbit.py), otherwise the dtype's width; the embedding and the
norms stay in the activation dtype: 16-bit, 32 for float32 (ipex_llm's dtype=auto: float32 on cpu, float16
on xpu, as the worker picks it). The KV cache holds the activation dtype under either backend (the stages'
own cache; IPEX_LLM_QUANTIZE_KV_CACHE is read by ipex-llm's attention only). The KV cache is the worker's
static per-slot cache, so it is required in full, not only reported. Activations and the runtime are not
modelled: passing is necessary, not sufficient.

The `bytes` partition balances checkpoint parameter counts (every weight at one width), as the worker
balances the checkpoint's tensors; the low-bit widths above only size the stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmstack.config.schema import RunConfig
from llmstack.engines.vllm.memory import GIB, Shape, gib, parameter_count
from llmstack.workers.partition import split_layers, stage_bounds

FULL_PRECISION_DTYPES = ("float32",)


@dataclass(frozen=True)
class StageEstimate:
    stage: int
    first_layer: int
    layers: int
    weights_bytes: int
    kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def describe(self, stages: int) -> str:
        parts = [f"layers {self.first_layer}-{self.first_layer + self.layers - 1}"]
        if self.stage == 0:
            parts.insert(0, "embedding")
        if self.stage == stages - 1:
            parts.append("final norm and LM head")
        return f"stage {self.stage} ({' + '.join(parts)})"


@dataclass(frozen=True)
class PipelineEstimate:
    stages: tuple[StageEstimate, ...]
    device_gib: float | None
    # Stages that share one budget: one per device on cuda/xpu; each node's stages on cpu.
    groups: tuple[tuple[int, ...], ...]
    micro_batches: int
    max_num_seqs: int
    max_model_len: int
    kv_bytes_per_token_layer: int

    @property
    def budget_bytes(self) -> int | None:
        return None if self.device_gib is None else int(self.device_gib * GIB)

    def group_bytes(self, group: tuple[int, ...]) -> int:
        return sum(self.stages[i].total_bytes for i in group)

    def overflow(self) -> tuple[tuple[int, ...], int] | None:
        """The group that exceeds its budget the most, and by how many bytes; None when all fit."""
        budget = self.budget_bytes
        if budget is None:
            return None
        worst = max(self.groups, key=self.group_bytes)
        over = self.group_bytes(worst) - budget
        return (worst, over) if over > 0 else None

    def summary(self) -> str:
        n = len(self.stages)
        per_stage = "; ".join(
            f"{s.describe(n)}: weights {gib(s.weights_bytes)} + KV {gib(s.kv_bytes)} = "
            f"{gib(s.total_bytes)} GiB"
            for s in self.stages
        )
        of = "" if self.device_gib is None else f" of {self.device_gib:g} GiB per device"
        return f"per stage{of} (KV for {kv_shape(self)}): {per_stage}"


def kv_shape(est: PipelineEstimate) -> str:
    """What the KV cache holds: '2 micro-batches x 4 sequences x 4096 tokens'."""
    micro = f"{est.micro_batches} micro-batch" + ("es" if est.micro_batches != 1 else "")
    seqs = f"{est.max_num_seqs} sequence" + ("s" if est.max_num_seqs != 1 else "")
    return f"{micro} x {seqs} x {est.max_model_len} tokens"


def kv_value_bytes(run: RunConfig, env: dict[str, str]) -> int:
    return 4 if _dtype(run) in FULL_PRECISION_DTYPES else 2


def _dtype(run: RunConfig) -> str:
    """The stages' activation dtype (auto: the checkpoint's, taken as 16-bit, under transformers)."""
    from llmstack.engines.lightweight import TRANSFORMERS_LOW_BITS

    # low_bit fp16/bf16 is the dtype under transformers, and what ipex-llm's FP16/BF16 linears compute in.
    dtype = TRANSFORMERS_LOW_BITS.get(run.low_bit.name) or run.engine.dtype
    if dtype == "auto" and run.engine.backend == "ipex_llm":
        return "float32" if run.device.name == "cpu" else "float16"
    return dtype


def split_for(run: RunConfig, shape: Shape, stages: int) -> list[int]:
    """The layers per stage the worker will use: engine.layer_split (for its own stage count), else
    engine.partition's rule."""
    e = run.engine
    if e.layer_split and stages == e.pipeline_parallel_size:
        return list(e.layer_split)
    if e.partition != "bytes":
        return split_layers(shape.layers, stages)
    per_layer = parameter_count(shape).linear // shape.layers + 2 * shape.hidden
    table = shape.vocab * shape.hidden
    first = table
    last = shape.hidden + (table if stages > 1 or not shape.tied else 0)
    return split_layers(shape.layers, stages, [per_layer] * shape.layers, first, last)


def estimate(
    run: RunConfig,
    env: dict[str, str],
    *,
    stages: int | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
) -> PipelineEstimate | None:
    """The per-stage estimate, or None when the model's shape is unknown (or cannot be split)."""
    e = run.engine
    shape = Shape.of(run.model.arch)
    if shape is None or not shape.layers:
        return None
    stages = stages or e.pipeline_parallel_size
    try:
        split = split_for(run, shape, stages)
    except ValueError:
        return None
    if len(split) != stages or sum(split) != shape.layers:
        return None
    params = parameter_count(shape)
    full_bits = 32.0 if _dtype(run) in FULL_PRECISION_DTYPES else 16.0
    linear_bits = run.low_bit.bits_per_weight if e.backend == "ipex_llm" else full_bits
    other = full_bits / 8
    layer_bytes = params.linear / shape.layers * linear_bits / 8 + 2 * shape.hidden * other
    table = shape.vocab * shape.hidden * other
    # The LM head is converted with the layers under ipex_llm (the embedding is not).
    head = shape.vocab * shape.hidden * linear_bits / 8
    micro = e.micro_batches or stages
    seqs = max_num_seqs or e.max_num_seqs
    context = int(max_model_len or e.max_model_len or run.model.max_model_len)
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * kv_value_bytes(run, env)
    estimates = []
    for stage, (start, end) in enumerate(stage_bounds(split)):
        layers = end - start
        weights = layers * layer_bytes
        if stage == 0:
            weights += table
        if stage == stages - 1:
            # A tied LM head is the embedding itself on a one-stage pipeline, a copy on the last stage.
            if e.backend == "ipex_llm":
                weights += shape.hidden * other + head
            else:
                weights += shape.hidden * other + (table if stages > 1 or not shape.tied else 0)
        kv = layers * seqs * micro * context * per_token_layer
        estimates.append(StageEstimate(stage, start, layers, math.ceil(weights), kv))
    return PipelineEstimate(
        stages=tuple(estimates),
        device_gib=run.device.memory_gib,
        groups=_groups(run, stages),
        micro_batches=micro,
        max_num_seqs=seqs,
        max_model_len=context,
        kv_bytes_per_token_layer=per_token_layer,
    )


def _groups(run: RunConfig, stages: int) -> tuple[tuple[int, ...], ...]:
    if run.device.name != "cpu":
        return tuple((i,) for i in range(stages))
    per_node = max(1, stages // max(1, run.engine.nnodes))
    return tuple(tuple(range(i, min(i + per_node, stages))) for i in range(0, stages, per_node))


def largest_fitting(est: PipelineEstimate, what: str) -> int:
    """The largest max_model_len (what="len") or max_num_seqs (what="seqs") with which every budget holds."""
    budget = est.budget_bytes or 0
    best: int | None = None
    for group in est.groups:
        weights = sum(est.stages[i].weights_bytes for i in group)
        layers = sum(est.stages[i].layers for i in group)
        unit = layers * est.micro_batches * est.kv_bytes_per_token_layer
        unit *= est.max_num_seqs if what == "len" else est.max_model_len
        room = budget - weights
        fits = 0 if room <= 0 or unit <= 0 else room // unit
        best = fits if best is None else min(best, fits)
    return int(best or 0)
