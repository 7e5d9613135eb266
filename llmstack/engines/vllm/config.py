"""engine=vllm's schema: the knobs of start-vllm-service.sh and more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmstack.config.schema import EngineConfig


@dataclass
class VllmEngineConfig(EngineConfig):
    """Knobs of start-vllm-service.sh and more. Seed defaults are documented in configs/engine/vllm*.yaml."""

    name: str = "vllm"
    # upstream: `python -m vllm.entrypoints.openai.api_server` (cpu, cuda, xpu).
    # ipex: ipex-llm's fork `python -m ipex_llm.vllm.xpu.entrypoints.openai.api_server` (xpu).
    flavour: str = "upstream"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    gpu_memory_utilization: Optional[float] = None
    block_size: Optional[int] = None
    enforce_eager: bool = False
    dtype: str = "auto"
    distributed_executor_backend: Optional[str] = None
    # None: the engine's default (upstream vLLM V1: on; ipex-llm's V0 fork: off).
    enable_chunked_prefill: Optional[bool] = None
    disable_async_output_proc: bool = False
    # vLLM on CPU reserves this much host RAM (GiB) for its KV cache (VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_space_gib: int = 2
    # --kv-cache-dtype: auto (the model's dtype) or an fp8 variant; None: not passed (the engine's auto).
    kv_cache_dtype: Optional[str] = None

    def label(self) -> str:
        return f"engine={self.name} ({self.flavour})"

    def devices_needed(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size
