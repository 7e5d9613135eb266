"""engine=pp: llmstack's pipeline-parallel worker, the model's decoder layers split across devices.

Every rank runs `python -m llmstack.workers.pipeline` under torchrun (through the worker's thin wrapper
`llmstack.workers.pipeline.torchrun`, which reports the first rank that failed); rank 0 also serves the
lightweight worker's OpenAI API. This module renders that command (the worker's flags through
`llmstack.workers.protocol.PipelineOptions`), the seed's XPU environment, and checks the pipeline against
the model (its layers), the devices and each stage's memory (`pp_memory.py`). It replaces ipex-llm's
pipeline-parallel serving (docker/llm/serving/xpu/docker/start-pp_serving-service.sh; its values are in
configs/engine/pp.yaml).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Optional

from llmstack.config.schema import EngineConfig, LowBitConfig, RunConfig
from llmstack.engines import pp_rules
from llmstack.engines.base import (
    device_and_key_env,
    ready_probe,
    source_first_pythonpath,
    with_server_defaults,
)
from llmstack.engines.lightweight import LightweightEngine, worker_fields
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan
from llmstack.workers.protocol import (
    API_KEY_ENV,
    PIPELINE_MODULE,
    PIPELINE_TORCHRUN_MODULE,
    PipelineOptions,
)

# The lightweight engine's, and pipeline_serving.py's own default; it runs on xpu and cpu.
# start-pp_serving-service.sh sets low_bit="fp8" (xpu only): low_bit=fp8.
IPEX_DEFAULT_LOW_BIT = "sym_int4"
# dist_backend=auto: the device's collective library; on XPU oneCCL through torch's own xccl (torch >= 2.8
# XPU builds), or through oneccl_bindings_for_pytorch (`ccl`), which ipex-llm's stack ships.
AUTO_DIST_BACKEND = {"cpu": "gloo", "cuda": "nccl"}
AUTO_XPU_DIST_BACKEND = {"transformers": "xccl", "ipex_llm": "ccl"}

# The seed's environment on XPU, each value with where it comes from. Both seed launchers set them:
# docker/llm/serving/xpu/docker/start-pp_serving-service.sh (the image's) and the example's
# python/llm/example/GPU/Pipeline-Parallel-Serving/run.sh (see ../shared/reference/ipex-llm-serving.md §1.2).
XPU_ENV: tuple[tuple[str, str, str], ...] = (
    ("CCL_ZE_IPC_EXCHANGE", "sockets", "both scripts, on the torchrun line itself (oneCCL's IPC exchange)"),
    ("FI_PROVIDER", "tcp", "both scripts: export FI_PROVIDER=tcp (libfabric's provider for oneCCL)"),
    ("USE_XETLA", "OFF", "both scripts: export USE_XETLA=OFF"),
    (
        "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS",
        "1",
        "both scripts, under `if [[ $KERNEL_VERSION != *6.5* ]]`; KERNEL_VERSION is never set, so always 1",
    ),
    ("TORCH_LLM_ALLREDUCE", "0", "both scripts: export TORCH_LLM_ALLREDUCE=0"),
)
# Read by ipex-llm only, so set for engine.backend=ipex_llm only. The stages' low-bit linears read
# IPEX_LLM_LAST_LM_HEAD (at conversion), IPEX_LLM_LOW_MEM (the LM head's cache emptying on xpu) and
# IPEX_LLM_NOT_USE_VLLM (at import); IPEX_LLM_QUANTIZE_KV_CACHE only ipex-llm's own attention reads: the
# stages keep their KV cache in the activation dtype (pp_memory.py counts it so). Set as the seed sets them.
IPEX_LLM_ENV: tuple[tuple[str, str, str], ...] = (
    ("IPEX_LLM_LAST_LM_HEAD", "1", "both scripts: export IPEX_LLM_LAST_LM_HEAD=1"),
    ("IPEX_LLM_QUANTIZE_KV_CACHE", "1", "both scripts: export IPEX_LLM_QUANTIZE_KV_CACHE=1 (fp8 KV cache)"),
    ("IPEX_LLM_LOW_MEM", "1", "both scripts: export IPEX_LLM_LOW_MEM=1"),
    (
        "IPEX_LLM_NOT_USE_VLLM",
        "True",
        "start-pp_serving-service.sh: ipex-llm ignores the image's vLLM (convert.py is_vllm_available)",
    ),
)
# What the seed sets that the plan does not, and why (configs/engine/pp.yaml says how to set each):
#   OMP_NUM_THREADS=32   engine.torch_threads instead (null: each cpu rank its share of the cores; torchrun
#                        itself sets OMP_NUM_THREADS=1 for several ranks unless the environment has it)
#   no_proxy=localhost   the environment's business: every engine's probe runs under the launcher's own
#   source setvars.sh    oneAPI and oneCCL's environment (/opt/intel/oneapi, /opt/intel/1ccl-wks): run inside
#                        the serving image, or source them before llmstack
#   LD_PRELOAD=...libtcmalloc.so (run.sh only): engine.extra_env.LD_PRELOAD
# NCCL_* and other collective settings of this machine are inherited untouched.


@dataclass
class PipelineEngineConfig(EngineConfig):
    """llmstack's pipeline-parallel worker (`python -m llmstack.workers.pipeline` under torchrun). Defaults
    and the seed's values are documented in configs/engine/pp.yaml."""

    name: str = "pp"
    # transformers (cpu, cuda, xpu; low_bit none/fp16/bf16) | ipex_llm (cpu, xpu; ipex-llm's low-bit formats)
    backend: str = "transformers"
    # Ranks (stages) in all; one device each on cuda/xpu.
    pipeline_parallel_size: int = 2
    # Sequences per micro-batch (the seed's --max-num-seqs, "maximum batch size on a single card").
    max_num_seqs: int = 4
    # Micro-batches in flight; 0 = one per stage.
    micro_batches: int = 0
    # Prompts prefilled in one step of a micro-batch; 0 = every admitted one.
    max_prefilled_seqs: int = 0
    # Prompt tokens per micro-batch step at most (prompts fed over several steps); 0 = whole prompts.
    prefill_chunk: int = 0
    max_waiting_requests: int = 256
    # auto | float32 | bfloat16 | float16
    dtype: str = "auto"
    # torch.set_num_threads per rank; None: the worker gives each cpu rank its share of the cores.
    torch_threads: Optional[int] = None
    # auto | gloo (cpu) | nccl (cuda) | xccl | ccl (xpu)
    dist_backend: str = "auto"
    # layers (by count) | bytes (by parameter bytes, embedding and LM head counted)
    partition: str = "layers"
    # Decoder layers per stage, e.g. [3, 2, 2]; None: computed by `partition`.
    layer_split: Optional[list[int]] = None
    collective_timeout_s: float = 300.0
    # Nodes of a multi-node pipeline, this machine's rank among them, and node 0's rendezvous host:port.
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: Optional[str] = None
    log_level: str = "info"
    max_stop_strings: int = 4
    max_stop_string_chars: int = 1024
    max_request_bytes: int = 16 * 1024 * 1024
    max_prompt_chars: Optional[int] = None
    trust_request_chat_template: bool = False
    stall_timeout_s: float = 60.0

    def label(self) -> str:
        return f"engine={self.name} ({self.backend})"

    def devices_needed(self) -> int:
        """Devices per node: one per stage on it."""
        return max(1, -(-self.pipeline_parallel_size // max(1, self.nnodes)))


class PipelineEngine:
    name = "pp"
    launches = True

    def default_low_bit(self, engine_cfg: PipelineEngineConfig) -> str:
        return IPEX_DEFAULT_LOW_BIT if engine_cfg.backend == "ipex_llm" else "none"

    def resolve(self, run: RunConfig) -> PipelineEngineConfig:
        e: PipelineEngineConfig = with_server_defaults(run.engine, run)
        if e.dist_backend == "auto":
            device = run.device.name
            auto = AUTO_XPU_DIST_BACKEND.get(e.backend) if device == "xpu" else AUTO_DIST_BACKEND.get(device)
            e = replace(e, dist_backend=auto or "auto")
        return e

    def low_bit_problem(self, run: RunConfig, low_bit: LowBitConfig) -> str | None:
        # The same weights as the lightweight worker's backends: unquantized under transformers, ipex-llm's
        # formats (low_bit.ipex) on the devices ipex-llm runs them on (low_bit.ipex_devices) under ipex_llm.
        return LightweightEngine().low_bit_problem(run, low_bit)

    def check(self, run: RunConfig) -> list[ConfigError]:
        return list(pp_rules.config_problems(run))

    def device_problems(
        self, run: RunConfig, low_bits: Callable[[], Sequence[LowBitConfig]]
    ) -> Iterator[ConfigError]:
        yield from pp_rules.device_count_problems(run)
        yield from pp_rules.memory_problems(run, self.environment(run))

    def memory_summary(self, run: RunConfig) -> str | None:
        from llmstack.engines import pp_memory

        est = pp_memory.estimate(run, self.environment(run))
        return None if est is None else est.summary()

    def required_module(self, run: RunConfig) -> str:
        # torchrun and the collectives come with torch, which transformers needs too.
        return "ipex_llm" if run.engine.backend == "ipex_llm" else "transformers"

    def worker_options(self, run: RunConfig) -> PipelineOptions:
        e: PipelineEngineConfig = run.engine
        return PipelineOptions(
            **worker_fields(run),
            max_batch_size=e.max_num_seqs,
            pipeline_parallel_size=e.pipeline_parallel_size,
            micro_batches=e.micro_batches,
            max_prefilled_seqs=e.max_prefilled_seqs,
            prefill_chunk=e.prefill_chunk,
            dist_backend=e.dist_backend,
            partition=e.partition,
            layer_split=",".join(str(n) for n in e.layer_split or ()),
            collective_timeout_s=e.collective_timeout_s,
        )

    def torchrun_args(self, run: RunConfig, node_rank: int) -> list[str]:
        """torchrun's own arguments for one node. One node: --standalone, a rendezvous on a free port of its
        own (no fixed 29500 to collide on). Several: the static rendezvous at engine.rdzv_endpoint, the only
        one that honours --node-rank (c10d assigns ranks by arrival, pytorch#182223), so that global rank 0,
        which serves HTTP, is on node 0."""
        e: PipelineEngineConfig = run.engine
        # Each rank's output in its own log file and, through the agent, in server.log.
        logs = ["--redirects=3", "--tee=3"]
        if e.nnodes == 1:
            return ["--standalone", "--nnodes=1", f"--nproc-per-node={e.pipeline_parallel_size}", *logs]
        return [
            f"--nnodes={e.nnodes}",
            f"--nproc-per-node={e.pipeline_parallel_size // e.nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={e.rdzv_endpoint}",
            f"--rdzv-id={rendezvous_id(run)}",
            *logs,
        ]

    def node_argv(self, run: RunConfig, node_rank: int) -> tuple[str, ...]:
        e: PipelineEngineConfig = run.engine
        worker = self.worker_options(run).to_argv()
        return (
            str(e.python),
            "-m",
            PIPELINE_TORCHRUN_MODULE,
            *self.torchrun_args(run, node_rank),
            "-m",
            PIPELINE_MODULE,
            *worker,
            *e.extra_args,
        )

    def environment(self, run: RunConfig) -> dict[str, str]:
        e: PipelineEngineConfig = run.engine
        # The worker's code comes from this checkout, so its flags always match the ones rendered here.
        env: dict[str, str] = {"PYTHONPATH": source_first_pythonpath(os.environ.get("PYTHONPATH", ""))}
        if run.device.name == "xpu":
            env.update({name: value for name, value, _ in XPU_ENV})
            if e.backend == "ipex_llm":
                env.update({name: value for name, value, _ in IPEX_LLM_ENV})
            # run.sh: ZE_AFFINITY_MASK=0,1 for its two ranks; device.ids (below) wins.
            env["ZE_AFFINITY_MASK"] = ",".join(str(i) for i in range(e.devices_needed()))
        env.update(device_and_key_env(run, API_KEY_ENV))
        return env

    def plan(self, run: RunConfig) -> LaunchPlan:
        e: PipelineEngineConfig = run.engine
        nodes = tuple(self.node_argv(run, rank) for rank in range(e.nnodes)) if e.nnodes > 1 else ()
        return LaunchPlan(
            engine=f"pp-{e.backend}",
            argv=self.node_argv(run, e.node_rank),
            env=self.environment(run),
            probe=ready_probe(e),
            shutdown_grace_s=e.shutdown_grace_s,
            # torchrun's agent stops its ranks when it is stopped; a rank TERMed beside it is a failure to it.
            stop_main_first=True,
            node_argvs=nodes,
        )


def rendezvous_id(run: RunConfig) -> str:
    """The same on every node (it depends only on what they share), different for another pipeline."""
    e: PipelineEngineConfig = run.engine
    key = f"{run.model.path}|{e.served_model_name}|{e.rdzv_endpoint}|{e.pipeline_parallel_size}|{e.nnodes}"
    return "llmstack-pp-" + hashlib.sha256(key.encode()).hexdigest()[:12]
