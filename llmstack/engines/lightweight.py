"""llmstack's lightweight worker: our own batched OpenAI-compatible server on transformers or ipex-llm.

The worker is a separate program (`python -m llmstack.workers.lightweight`); this module only renders its
command line (through `llmstack.workers.protocol.WorkerOptions`, which the worker parses) and checks that
the backend can run the asked format on the asked device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from llmstack.config.schema import EngineConfig, LowBitConfig, RunConfig
from llmstack.engines.base import (
    device_and_key_env,
    ready_probe,
    source_first_pythonpath,
    with_server_defaults,
)
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan
from llmstack.workers.protocol import (
    API_KEY_ENV,
    BACKEND_DEVICES,
    BACKENDS,
    DTYPES,
    LIGHTWEIGHT_MODULE,
    MODEL_IMPLS,
    WorkerOptions,
)

# The transformers backend serves unquantized weights: low_bit picks the torch dtype.
TRANSFORMERS_LOW_BITS = {"none": None, "fp16": "float16", "bf16": "bfloat16"}
# ipex-llm's lightweight serving defaults to --low-bit sym_int4.
IPEX_DEFAULT_LOW_BIT = "sym_int4"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class LightweightEngineConfig(EngineConfig):
    """llmstack's own worker (`python -m llmstack.workers.lightweight`): continuous batching over transformers
    or ipex-llm, OpenAI-compatible HTTP. Defaults are documented in configs/engine/lightweight.yaml."""

    name: str = "lightweight"
    # transformers (cpu, cuda, xpu; low_bit none/fp16/bf16) | ipex_llm (cpu, xpu; ipex-llm's low-bit formats)
    backend: str = "transformers"
    # auto | fused (llmstack's decoder for Llama/Mistral/Qwen2) | generic (the model's own forward)
    # | fast (fused arithmetic, batched prefill, CUDA-graph decode on cuda; workers/backends/fast_llama.py)
    model_impl: str = "auto"
    # Sequences decoded together; beyond them up to max_waiting_requests queue, then 503.
    max_batch_size: int = 16
    max_waiting_requests: int = 256
    # auto | float32 | bfloat16 | float16 (low_bit fp16/bf16 set it for the transformers backend)
    dtype: str = "auto"
    # torch.set_num_threads in the worker; None: on cpu all cores but one (left to HTTP), else torch's.
    torch_threads: Optional[int] = None
    # The scheduler and model in their own process (no GIL shared with HTTP); false: a thread of the server.
    model_process: bool = True
    log_level: str = "info"
    # Request limits (llmstack.workers.protocol.WorkerOptions says why each is there).
    max_stop_strings: int = 4
    max_stop_string_chars: int = 1024
    max_request_bytes: int = 16 * 1024 * 1024
    max_prompt_chars: Optional[int] = None
    trust_request_chat_template: bool = False
    stall_timeout_s: float = 60.0
    startup_timeout_s: float = 600.0


# The worker's request limits (WorkerOptions says why each is there): keys of every engine that runs it.
REQUEST_LIMITS = (
    "max_stop_strings",
    "max_stop_string_chars",
    "max_request_bytes",
    "max_prompt_chars",
    "trust_request_chat_template",
    "stall_timeout_s",
)


def worker_fields(run: RunConfig) -> dict[str, Any]:
    """The WorkerOptions that every engine running our worker renders the same way from its config (the
    lightweight worker, the pipeline's rank 0): model, address, backend and dtype, queue, limits."""
    e = run.engine
    ipex = e.backend == "ipex_llm"
    # The transformers backend serves unquantized weights: low_bit picks the dtype.
    dtype = e.dtype if ipex else TRANSFORMERS_LOW_BITS.get(run.low_bit.name) or e.dtype
    return {
        "model": str(run.model.path),
        "served_model_name": str(e.served_model_name),
        "tokenizer": run.model.tokenizer,
        "host": e.host,
        "port": e.port,
        "backend": e.backend,
        "device": run.device.name,
        "dtype": dtype,
        "low_bit": run.low_bit.ipex if ipex else None,
        "max_waiting_requests": e.max_waiting_requests,
        "max_model_len": e.max_model_len,
        "trust_remote_code": bool(e.trust_remote_code),
        "torch_threads": e.torch_threads,
        "log_level": e.log_level,
        **{name: getattr(e, name) for name in REQUEST_LIMITS},
    }


def ipex_device_problem(low_bit: LowBitConfig, device: str) -> str | None:
    """Why ipex-llm cannot run one of its formats on `device` (the format's note says why), or None."""
    if device in low_bit.ipex_devices:
        return None
    where = ", ".join(low_bit.ipex_devices) or "no device"
    reason = f"ipex-llm runs {low_bit.name} only on {where}"
    return f"{reason} ({low_bit.note.rstrip('.')})." if low_bit.note else reason + "."


class LightweightEngine:
    name = "lightweight"
    launches = True

    def default_low_bit(self, engine_cfg: LightweightEngineConfig) -> str:
        return IPEX_DEFAULT_LOW_BIT if engine_cfg.backend == "ipex_llm" else "none"

    def resolve(self, run: RunConfig) -> LightweightEngineConfig:
        return with_server_defaults(run.engine, run)

    def low_bit_problem(self, run: RunConfig, low_bit: LowBitConfig) -> str | None:
        device = run.device.name
        if run.engine.backend == "ipex_llm":
            if low_bit.ipex is None:
                return (
                    "engine.backend=ipex_llm loads weights through ipex-llm's load_in_low_bit and needs one "
                    "of its formats; engine.backend=transformers serves unconverted weights."
                )
            return ipex_device_problem(low_bit, device)
        if low_bit.name in TRANSFORMERS_LOW_BITS:
            return None
        if low_bit.ipex is not None:
            where = ", ".join(low_bit.ipex_devices)
            if device not in low_bit.ipex_devices:  # fp8 on cpu: not offered, ipex_llm would refuse it too
                return f"an ipex-llm weight format, which ipex-llm runs only on {where}, not on {device}."
            backend = "engine.backend=ipex_llm"
            return f"an ipex-llm weight format: set {backend} (ipex-llm runs it on {where})."
        return "the transformers backend serves unquantized weights only (none, fp16, bf16)."

    def check(self, run: RunConfig) -> list[ConfigError]:
        e: LightweightEngineConfig = run.engine
        errors: list[ConfigError] = []
        if e.backend not in BACKENDS:
            return [
                ConfigError("engine.backend", e.backend, "is not a lightweight-worker backend.", BACKENDS)
            ]
        devices = BACKEND_DEVICES[e.backend]
        if run.device.name not in devices:
            errors.append(
                ConfigError(
                    "device", run.device.name, f"the {e.backend} backend does not run there.", devices
                )
            )
        if e.model_impl not in MODEL_IMPLS:
            errors.append(
                ConfigError("engine.model_impl", e.model_impl, "is not a model implementation.", MODEL_IMPLS)
            )
        elif e.backend == "ipex_llm" and e.model_impl in ("fused", "fast"):
            errors.append(
                ConfigError(
                    "engine.model_impl",
                    e.model_impl,
                    "runs unquantized transformers models; ipex-llm's low-bit layers need the model's own "
                    "forward.",
                    ["auto", "generic"],
                )
            )
        if e.dtype not in DTYPES:
            errors.append(
                ConfigError("engine.dtype", e.dtype, "is not a torch dtype the worker knows.", DTYPES)
            )
        wanted = TRANSFORMERS_LOW_BITS.get(run.low_bit.name) if e.backend == "transformers" else None
        if wanted and e.dtype not in ("auto", wanted):
            errors.append(
                ConfigError(
                    "engine.dtype",
                    e.dtype,
                    f"conflicts with low_bit={run.low_bit.name}, which serves {wanted}.",
                    ["auto", wanted],
                )
            )
        if e.max_batch_size < 1:
            errors.append(ConfigError("engine.max_batch_size", e.max_batch_size, "must be at least 1."))
        if e.max_waiting_requests < 0:
            errors.append(
                ConfigError("engine.max_waiting_requests", e.max_waiting_requests, "must be 0 or more.")
            )
        if e.torch_threads is not None and e.torch_threads < 1:
            errors.append(
                ConfigError("engine.torch_threads", e.torch_threads, "must be at least 1 (or null).")
            )
        if e.log_level not in LOG_LEVELS:
            errors.append(ConfigError("engine.log_level", e.log_level, "is not a log level.", LOG_LEVELS))
        return errors

    def device_problems(
        self, run: RunConfig, low_bits: Callable[[], Sequence[LowBitConfig]]
    ) -> Iterator[ConfigError]:
        return iter(())  # one device, and no model of the worker's memory (yet): nothing is claimed

    def memory_summary(self, run: RunConfig) -> str | None:
        return None

    def required_module(self, run: RunConfig) -> str:
        return "ipex_llm" if run.engine.backend == "ipex_llm" else "transformers"

    def worker_options(self, run: RunConfig) -> WorkerOptions:
        e: LightweightEngineConfig = run.engine
        return WorkerOptions(
            **worker_fields(run),
            model_impl=e.model_impl,
            max_batch_size=e.max_batch_size,
            model_process=e.model_process,
        )

    def plan(self, run: RunConfig) -> LaunchPlan:
        e: LightweightEngineConfig = run.engine
        argv = [str(e.python), "-m", LIGHTWEIGHT_MODULE, *self.worker_options(run).to_argv(), *e.extra_args]
        # The worker's code comes from this checkout, so its flags always match the ones rendered here.
        env: dict[str, str] = {"PYTHONPATH": source_first_pythonpath(os.environ.get("PYTHONPATH", ""))}
        env.update(device_and_key_env(run, API_KEY_ENV))
        return LaunchPlan(
            engine=f"lightweight-{e.backend}",
            argv=tuple(argv),
            env=env,
            probe=ready_probe(e),
            shutdown_grace_s=e.shutdown_grace_s,
        )
