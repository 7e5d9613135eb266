"""The typed run config. Hydra composes `configs/` on top of these dataclasses.

Every group's YAML starts from one of these schemas (registered in `store.py`), so a key that does not exist
is rejected at composition time, and every value is type-checked. `None` means "let the engine decide"
unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

# OmegaConf 2.3 rejects PEP 604 unions in dataclass fields, hence typing.Optional (ruff told in pyproject).


@dataclass
class ModelArchitecture:
    """Shape facts from the model's config.json, for the memory estimate (llmstack/engines/vllm/memory.py).

    None: unknown. The checked-in models carry their published values; model=local and model=tiny fill the
    unknown ones from config.json in model.path when it is there.
    """

    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    # None: num_attention_heads (no grouped-query attention).
    num_key_value_heads: Optional[int] = None
    # None: hidden_size // num_attention_heads.
    head_dim: Optional[int] = None
    vocab_size: Optional[int] = None
    # None: false (a separate lm_head, the larger estimate).
    tie_word_embeddings: Optional[bool] = None
    # When set, used instead of the count derived from the shape above (e.g. for MoE models).
    num_parameters: Optional[int] = None


@dataclass
class ModelConfig:
    name: str = MISSING
    # A local directory with the weights. None only for generated models (see `generator`).
    path: Optional[str] = None
    # "tiny": made locally on first use by llmstack.models.tiny (no download).
    generator: Optional[str] = None
    # Where the weights are published; documentation only, nothing is ever downloaded.
    hf_id: Optional[str] = None
    # The name clients use in requests; None: the name of the directory `path` (else `name`).
    served_name: Optional[str] = None
    # The context length we serve it with (engine.max_model_len overrides it per engine).
    max_model_len: int = 2048
    trust_remote_code: bool = False
    # A tokenizer directory when it is not next to the weights.
    tokenizer: Optional[str] = None
    arch: ModelArchitecture = field(default_factory=ModelArchitecture)


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
    # Formats to suggest when this one is refused; a message names only those valid for the engine and
    # device (fp8_e4m3 for fp8 on CUDA, nothing on CPU, where no fp8 runs).
    instead: list[str] = field(default_factory=list)


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
    # Memory of one device in GiB (a card, or a tile where the driver exposes tiles); None: unknown, and the
    # memory-fit check (llmstack/engines/vllm/memory.py) is skipped. Profiles set it with its source.
    memory_gib: Optional[float] = None
    # The largest single allocation the device allows, in GiB (Arc: 4); None: no known limit. Only warns.
    max_alloc_gib: Optional[float] = None
    # What the driver calls the card a profile is written for (a case-insensitive regular expression
    # matched by `python -m llmstack.doctor` against detected names); None: any card of this kind.
    product: Optional[str] = None


@dataclass
class EngineConfig:
    """Base of every engine's schema: what every OpenAI-server engine has. Each engine's own schema lives
    beside its planner in llmstack/engines/ (`llmstack.engines.ENGINE_SCHEMAS`); its YAMLs in
    configs/engine/ document the defaults."""

    name: str = MISSING
    # The interpreter that runs the engine; None: the one running llmstack.
    python: Optional[str] = None
    host: str = "127.0.0.1"
    # 0 picks a free port at launch.
    port: int = 8000
    # None: model.served_name.
    served_model_name: Optional[str] = None
    # None: model.max_model_len.
    max_model_len: Optional[int] = None
    # None: model.trust_remote_code.
    trust_remote_code: Optional[bool] = None
    api_key: Optional[str] = None
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    # Seconds to wait for readiness, and to wait after SIGTERM before SIGKILL.
    startup_timeout_s: float = 900.0
    shutdown_grace_s: float = 15.0

    def label(self) -> str:
        """How messages name this engine (with its flavour where it has one)."""
        return f"engine={self.name}"

    def devices_needed(self) -> int:
        """How many devices the plan uses: what a dry run assumes where this machine has none."""
        return 1

    def port_keys(self) -> tuple[str, ...]:
        """The keys of the ports the engine listens on (0: llmstack picks a free one at launch)."""
        return ("port",)


@dataclass
class BenchmarkConfig:
    """Base of every benchmark phase's schema; each phase's own lives beside its code in llmstack/phases/
    (`llmstack.phases.registry.benchmark_schemas`). `phase` picks the code that runs; `name` is the option's
    own name (smoke and online are both the online phase). Seed defaults and every knob are documented in
    configs/benchmark/*.yaml."""

    name: str = "none"
    # none: serve until interrupted. online | multimodal | rps | offline_throughput: see their schemas.
    phase: str = "none"


@dataclass
class RunConfig:
    # An engine's subclass (llmstack/engines/), chosen by the engine group option.
    engine: EngineConfig = MISSING
    model: ModelConfig = MISSING
    low_bit: LowBitConfig = MISSING
    device: DeviceConfig = MISSING
    # A phase's subclass (llmstack/phases/), chosen by the benchmark group option: OmegaConf keeps the
    # subclass a group option's schema merges into this base-typed node.
    benchmark: BenchmarkConfig = MISSING
    # Print the launch plan (command, environment) and stop; nothing starts.
    dry_run: bool = False
    # results/<experiment_name>/<run_name>/
    results_dir: str = "results"
    experiment_name: str = "default"
    # None: a timestamp. Grid jobs are named by their overrides instead.
    run_name: Optional[str] = None
    # In a grid, run a job again even if its result exists.
    rerun: bool = False
    # Echo every line of the engine's log on the console (it is always in server.log; warnings and errors
    # are echoed either way).
    show_engine_log: bool = False
