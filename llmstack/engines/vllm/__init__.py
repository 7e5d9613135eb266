"""vLLM's OpenAI-compatible server, upstream or ipex-llm's XPU fork: its planner and rules (its schema is in
`config.py`, its memory-fit estimate in `memory.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from llmstack.config.schema import LowBitConfig, RunConfig
from llmstack.engines.base import device_and_key_env, ready_probe, with_server_defaults
from llmstack.engines.vllm import memory
from llmstack.engines.vllm.config import VllmEngineConfig
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan

FLAVOURS = {
    "upstream": "vllm.entrypoints.openai.api_server",
    "ipex": "ipex_llm.vllm.xpu.entrypoints.openai.api_server",
}
FLAVOUR_DEVICES = {"upstream": ("cpu", "cuda", "xpu"), "ipex": ("xpu",)}
# start-vllm-service.sh: LOAD_IN_LOW_BIT defaults to fp8.
IPEX_DEFAULT_LOW_BIT = "fp8"
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


class VllmEngine:
    name = "vllm"
    launches = True

    def default_low_bit(self, engine_cfg: VllmEngineConfig) -> str:
        return IPEX_DEFAULT_LOW_BIT if engine_cfg.flavour == "ipex" else "none"

    def resolve(self, run: RunConfig) -> VllmEngineConfig:
        return with_server_defaults(run.engine, run)

    def low_bit_problem(self, run: RunConfig, low_bit: LowBitConfig) -> str | None:
        device = run.device.name
        if run.engine.flavour == "ipex":
            if low_bit.ipex is None:
                return low_bit.note or "ipex-llm has no such format"
            if device not in low_bit.ipex_devices:
                return low_bit.note or f"ipex-llm runs it only on {', '.join(low_bit.ipex_devices)}"
            return None
        if low_bit.name != "none" and low_bit.vllm_dtype is None and low_bit.vllm_quantization is None:
            return low_bit.note or "upstream vLLM has no such format"
        if device not in low_bit.vllm_devices:
            return low_bit.note or f"upstream vLLM runs it only on {', '.join(low_bit.vllm_devices)}"
        return None

    def check(self, run: RunConfig) -> list[ConfigError]:
        e: VllmEngineConfig = run.engine
        errors: list[ConfigError] = list(_range_problems(e))
        if e.flavour not in FLAVOURS:
            errors.append(
                ConfigError("engine.flavour", e.flavour, "is not a vLLM flavour.", sorted(FLAVOURS))
            )
            return errors
        if run.device.name not in FLAVOUR_DEVICES[e.flavour]:
            errors.append(
                ConfigError(
                    "device",
                    run.device.name,
                    f"the {e.flavour} vLLM flavour does not run there.",
                    FLAVOUR_DEVICES[e.flavour],
                    hint="ipex-llm's vLLM fork is built for Intel GPUs; use engine=vllm elsewhere."
                    if e.flavour == "ipex"
                    else None,
                )
            )
        if e.block_size is not None and e.block_size not in BLOCK_SIZES:
            errors.append(
                ConfigError("engine.block_size", e.block_size, "is not a vLLM block size.", BLOCK_SIZES)
            )
        if e.kv_cache_dtype is not None and e.kv_cache_dtype not in KV_CACHE_DTYPES:
            errors.append(
                ConfigError(
                    "engine.kv_cache_dtype", e.kv_cache_dtype, "is not a KV cache dtype.", KV_CACHE_DTYPES
                )
            )
        arch = run.model.arch
        if (
            e.flavour == "ipex"
            and (e.kv_cache_dtype or "auto") != "auto"
            and arch.num_attention_heads is not None
            and (arch.num_key_value_heads or arch.num_attention_heads) == arch.num_attention_heads
        ):
            # ipex-llm's vLLM docs: "Currently, we only support FP8 KV Cache with GQA models".
            errors.append(
                ConfigError(
                    "engine.kv_cache_dtype",
                    e.kv_cache_dtype,
                    f"ipex-llm's fork supports an fp8 KV cache only for grouped-query-attention models, and "
                    f"model={run.model.name} has as many KV heads as attention heads.",
                    ["auto"],
                )
            )
        if e.disable_async_output_proc and e.flavour == "upstream":
            errors.append(
                ConfigError(
                    "engine.disable_async_output_proc",
                    True,
                    "is a V0-engine flag that upstream vLLM (V1) no longer accepts.",
                    [False],
                )
            )
        wanted_dtype = run.low_bit.vllm_dtype
        if e.flavour == "upstream" and wanted_dtype and e.dtype not in ("auto", wanted_dtype):
            errors.append(
                ConfigError(
                    "engine.dtype",
                    e.dtype,
                    f"conflicts with low_bit={run.low_bit.name}, which serves {wanted_dtype}.",
                    ["auto", wanted_dtype],
                )
            )
        chunked = e.enable_chunked_prefill
        chunked_off = chunked is False or (chunked is None and e.flavour == "ipex")
        if (
            chunked_off
            and e.max_num_batched_tokens is not None
            and e.max_num_batched_tokens < e.max_model_len
        ):
            errors.append(
                ConfigError(
                    "engine.max_num_batched_tokens",
                    e.max_num_batched_tokens,
                    f"must be >= engine.max_model_len ({e.max_model_len}) when chunked prefill is off, "
                    "or no prompt of full length could ever be scheduled.",
                    hint=f"Raise it to at least {e.max_model_len}, lower engine.max_model_len, "
                    "or set engine.enable_chunked_prefill=true.",
                )
            )
        return errors

    def device_problems(
        self, run: RunConfig, low_bits: Callable[[], Sequence[LowBitConfig]]
    ) -> Iterator[ConfigError]:
        yield from _parallelism_problems(run, run.engine)
        if run.device.memory_gib is not None:
            yield from memory.fit_problems(run, low_bits)

    def memory_summary(self, run: RunConfig) -> str | None:
        est = memory.estimate(run)
        return None if est is None else est.summary()

    def required_module(self, run: RunConfig) -> str:
        return FLAVOURS[run.engine.flavour].split(".")[0]

    def plan(self, run: RunConfig) -> LaunchPlan:
        e: VllmEngineConfig = run.engine
        low_bit = run.low_bit
        argv: list[str] = [e.python, "-m", FLAVOURS[e.flavour]]
        argv += ["--model", str(run.model.path), "--served-model-name", e.served_model_name]
        if run.model.tokenizer:
            argv += ["--tokenizer", run.model.tokenizer]
        argv += ["--host", e.host, "--port", str(e.port)]
        argv += ["--tensor-parallel-size", str(e.tensor_parallel_size)]
        argv += ["--pipeline-parallel-size", str(e.pipeline_parallel_size)]
        argv += ["--max-model-len", str(e.max_model_len)]
        argv += _optional("--max-num-seqs", e.max_num_seqs)
        argv += _optional("--max-num-batched-tokens", e.max_num_batched_tokens)
        argv += _optional("--gpu-memory-utilization", e.gpu_memory_utilization)
        argv += _optional("--block-size", e.block_size)
        argv += _optional("--kv-cache-dtype", e.kv_cache_dtype)
        argv += _optional("--distributed-executor-backend", e.distributed_executor_backend)

        dtype = e.dtype
        if e.flavour == "ipex":
            argv += ["--device", "xpu", "--load-in-low-bit", str(low_bit.ipex)]
        else:
            dtype = low_bit.vllm_dtype or dtype
            argv += _optional("--quantization", low_bit.vllm_quantization)
        argv += ["--dtype", dtype]
        if e.enforce_eager:
            argv.append("--enforce-eager")
        if e.trust_remote_code:
            argv.append("--trust-remote-code")
        if e.enable_chunked_prefill is not None:
            argv.append(
                "--enable-chunked-prefill" if e.enable_chunked_prefill else "--no-enable-chunked-prefill"
            )
        if e.disable_async_output_proc:
            argv.append("--disable-async-output-proc")
        argv += list(e.extra_args)

        env: dict[str, str] = {}
        if run.device.name == "cpu" and e.flavour == "upstream":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(e.cpu_kvcache_space_gib)
        if run.device.name == "xpu" and e.flavour == "upstream":
            # vLLM: "spawn is the only supported multiprocessing method on XPU".
            env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        if e.flavour == "ipex":
            # The fork reads it for MoE layers; it must equal --load-in-low-bit.
            env["IPEX_LLM_LOWBIT"] = str(low_bit.ipex)
        env.update(device_and_key_env(run, "VLLM_API_KEY"))
        return LaunchPlan(
            engine=f"vllm-{e.flavour}",
            argv=tuple(argv),
            env=env,
            probe=ready_probe(e),
            shutdown_grace_s=e.shutdown_grace_s,
            # vLLM's API server handles SIGTERM by shutting its engine client and core down itself
            # (entrypoints/launchers/launcher.py); a core TERMed beside it dies under the server first.
            stop_main_first=True,
        )


def _optional(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _range_problems(e: VllmEngineConfig) -> Iterator[ConfigError]:
    for key, value in {
        "engine.tensor_parallel_size": e.tensor_parallel_size,
        "engine.pipeline_parallel_size": e.pipeline_parallel_size,
        "engine.max_num_seqs": e.max_num_seqs,
        "engine.max_num_batched_tokens": e.max_num_batched_tokens,
        "engine.cpu_kvcache_space_gib": e.cpu_kvcache_space_gib,
    }.items():
        if value is not None and value < 1:
            yield ConfigError(key, value, "must be at least 1.")
    gmu = e.gpu_memory_utilization
    if gmu is not None and not 0 < gmu <= 1:
        yield ConfigError("engine.gpu_memory_utilization", gmu, "is a fraction of device memory, in (0, 1].")


def _parallelism_problems(run: RunConfig, e: VllmEngineConfig) -> Iterator[ConfigError]:
    wanted = e.tensor_parallel_size * e.pipeline_parallel_size
    available = run.device.count
    if run.device.ids is not None:
        available = len(run.device.ids) if available is None else min(available, len(run.device.ids))
    if available is not None and wanted > available:
        yield ConfigError(
            "engine.tensor_parallel_size",
            e.tensor_parallel_size,
            f"tensor x pipeline parallel = {e.tensor_parallel_size} x {e.pipeline_parallel_size} = {wanted} "
            f"devices, but device={run.device.name} has {available}.",
            hint="Lower engine.tensor_parallel_size or engine.pipeline_parallel_size, or set device.count "
            "when planning for another machine.",
        )
