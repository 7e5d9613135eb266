"""The typed run config. Hydra composes `configs/` on top of these dataclasses.

Every group's YAML starts from one of these schemas (registered in `store.py`), so a key that does not exist
is rejected at composition time, and every value is type-checked. `None` means "let the engine decide"
unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

# OmegaConf 2.3 rejects PEP 604 unions in dataclass fields, hence typing.Optional (ruff told in pyproject).


@dataclass
class ModelConfig:
    name: str = MISSING
    # A local directory with the weights. None only for generated models (see `generator`).
    path: Optional[str] = None
    # "tiny": made locally on first use by llmstack.models.tiny (no download).
    generator: Optional[str] = None
    # Where the weights are published; documentation only, nothing is ever downloaded.
    hf_id: Optional[str] = None
    # The name clients use in requests; defaults to `name`.
    served_name: Optional[str] = None
    # The context length we serve it with (engine.max_model_len overrides it per engine).
    max_model_len: int = 2048
    trust_remote_code: bool = False
    # A tokenizer directory when it is not next to the weights.
    tokenizer: Optional[str] = None


@dataclass
class LowBitConfig:
    """Facts about one weight format: how each engine spells it and where it runs."""

    name: str = MISSING
    # Effective bits per weight including scales (for memory estimates).
    bits_per_weight: float = 16.0
    # ipex-llm's `load_in_low_bit` / `--load-in-low-bit` value; None: ipex-llm has no such format.
    ipex: Optional[str] = None
    # Devices where ipex-llm can run the format (checked on CPU in reference/environment.md).
    ipex_devices: list[str] = field(default_factory=lambda: ["xpu"])
    # Upstream vLLM: the --dtype and/or --quantization it maps to, and the devices that run it.
    vllm_dtype: Optional[str] = None
    vllm_quantization: Optional[str] = None
    vllm_devices: list[str] = field(default_factory=list)
    # Why a device or engine is missing from the lists above; shown in validation errors.
    note: str = ""


@dataclass
class DeviceConfig:
    # auto | cpu | xpu | cuda. `auto` picks cuda, then xpu, then cpu, by what is present.
    name: str = "auto"
    # How many devices of this kind to assume; None detects them. Set it to plan for another machine.
    count: Optional[int] = None
    # Which cards to use (CUDA_VISIBLE_DEVICES / ZE_AFFINITY_MASK); None uses all visible ones.
    ids: Optional[list[int]] = None
    # Environment every engine gets on this device.
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class VllmEngineConfig:
    """Knobs of start-vllm-service.sh and more. Seed defaults are documented in configs/engine/*.yaml."""

    name: str = "vllm"
    # upstream: `python -m vllm.entrypoints.openai.api_server` (cpu, cuda, xpu).
    # ipex: ipex-llm's fork `python -m ipex_llm.vllm.xpu.entrypoints.openai.api_server` (xpu).
    flavour: str = "upstream"
    # The interpreter that runs the engine; None: the one running llmstack.
    python: Optional[str] = None
    host: str = "127.0.0.1"
    # 0 picks a free port at launch.
    port: int = 8000
    # None: model.served_name.
    served_model_name: Optional[str] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    # None: model.max_model_len.
    max_model_len: Optional[int] = None
    gpu_memory_utilization: Optional[float] = None
    block_size: Optional[int] = None
    enforce_eager: bool = False
    dtype: str = "auto"
    # None: model.trust_remote_code.
    trust_remote_code: Optional[bool] = None
    distributed_executor_backend: Optional[str] = None
    # None: the engine's default (upstream vLLM V1: on; ipex-llm's V0 fork: off).
    enable_chunked_prefill: Optional[bool] = None
    disable_async_output_proc: bool = False
    api_key: Optional[str] = None
    # vLLM on CPU reserves this much host RAM (GiB) for its KV cache (VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_space_gib: int = 2
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    # Seconds to wait for readiness, and to wait after SIGTERM before SIGKILL.
    startup_timeout_s: float = 900.0
    shutdown_grace_s: float = 15.0


# engine.name -> its schema; the engine group's YAMLs start from these.
ENGINE_SCHEMAS: dict[str, type] = {"vllm": VllmEngineConfig}


@dataclass
class BenchmarkConfig:
    # none: serve until interrupted. smoke/online: streamed requests against the live server.
    name: str = "none"
    # completions | chat
    endpoint: str = "completions"
    num_prompts: int = 16
    # Closed-loop load levels, run in order against the same server.
    concurrency: list[int] = field(default_factory=lambda: [4])
    input_len: int = 32
    output_len: int = 32
    # Requests sent before measuring, excluded from the results.
    warmup_requests: int = 2
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 600.0


@dataclass
class RunConfig:
    engine: Any = MISSING
    model: ModelConfig = MISSING
    low_bit: LowBitConfig = MISSING
    device: DeviceConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    # Print the launch plan (command, environment) and stop; nothing starts.
    dry_run: bool = False
    # results/<experiment_name>/<run_name>/
    results_dir: str = "results"
    experiment_name: str = "default"
    # None: a timestamp.
    run_name: Optional[str] = None
    # Echo every line of the engine's log on the console (it is always in server.log; warnings and errors
    # are echoed either way).
    show_engine_log: bool = False
