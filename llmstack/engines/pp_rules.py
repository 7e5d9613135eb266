"""engine=pp's rules: the pipeline against its backend, the model's layers, the devices, the nodes and each
stage's memory. Each error is one paragraph naming the key and what it may be (llmstack.errors.ConfigError).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from llmstack.config.schema import RunConfig
from llmstack.errors import ConfigError
from llmstack.workers.protocol import (
    BACKEND_DEVICES,
    BACKENDS,
    DIST_BACKENDS,
    DTYPES,
    FUSED_MODEL_TYPES,
    PARTITIONS,
)

# BACKEND_DEVICES (the worker's): under ipex_llm the stages' projections are ipex-llm's low-bit linears
# (workers/pipeline/lowbit.py), whose kernels exist for Intel GPUs and CPUs (which formats where:
# low_bit.ipex_devices, the engine's low_bit_problem); ipex-llm's own pipeline_parallel_stages was xpu-only.
DIST_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "xccl": ("xpu",), "ccl": ("xpu",)}
LOG_LEVELS = ("debug", "info", "warning", "error")
ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def config_problems(run: RunConfig) -> Iterator[ConfigError]:
    e = run.engine
    if e.backend not in BACKENDS:
        yield ConfigError("engine.backend", e.backend, "is not a pipeline-worker backend.", BACKENDS)
        return
    devices = BACKEND_DEVICES[e.backend]
    if run.device.name not in devices:
        yield ConfigError(
            "device",
            run.device.name,
            f"engine=pp's {e.backend} backend does not run there.",
            devices,
            hint="ipex-llm's low-bit kernels run on Intel GPUs (xpu) and CPUs; on cuda use "
            "engine.backend=transformers."
            if e.backend == "ipex_llm"
            else None,
        )
    yield from _range_problems(run)
    yield from _dtype_problems(run)
    yield from _layer_problems(run)
    yield from _dist_problems(run)
    yield from _node_problems(run)
    if e.log_level not in LOG_LEVELS:
        yield ConfigError("engine.log_level", e.log_level, "is not a log level.", LOG_LEVELS)


def _range_problems(run: RunConfig) -> Iterator[ConfigError]:
    e = run.engine
    for key, value, floor in (
        ("engine.pipeline_parallel_size", e.pipeline_parallel_size, 1),
        ("engine.max_num_seqs", e.max_num_seqs, 1),
        ("engine.micro_batches", e.micro_batches, 0),
        ("engine.max_prefilled_seqs", e.max_prefilled_seqs, 0),
        ("engine.prefill_chunk", e.prefill_chunk, 0),
        ("engine.max_waiting_requests", e.max_waiting_requests, 0),
        ("engine.nnodes", e.nnodes, 1),
    ):
        if value < floor:
            yield ConfigError(key, value, f"must be at least {floor}.")
    if e.torch_threads is not None and e.torch_threads < 1:
        yield ConfigError("engine.torch_threads", e.torch_threads, "must be at least 1 (or null).")
    if not e.collective_timeout_s > 0:
        yield ConfigError("engine.collective_timeout_s", e.collective_timeout_s, "must be a positive number.")


def _dtype_problems(run: RunConfig) -> Iterator[ConfigError]:
    from llmstack.engines.lightweight import TRANSFORMERS_LOW_BITS

    e = run.engine
    if e.dtype not in DTYPES:
        yield ConfigError("engine.dtype", e.dtype, "is not a torch dtype the worker knows.", DTYPES)
        return
    # transformers: low_bit fp16/bf16 is the dtype; ipex_llm: its FP16Linear / BF16Linear compute in it.
    wanted = TRANSFORMERS_LOW_BITS.get(run.low_bit.name)
    if wanted and e.dtype not in ("auto", wanted):
        yield ConfigError(
            "engine.dtype",
            e.dtype,
            f"conflicts with low_bit={run.low_bit.name}, which serves {wanted}.",
            ["auto", wanted],
        )


def _layer_problems(run: RunConfig) -> Iterator[ConfigError]:
    e = run.engine
    n = e.pipeline_parallel_size
    layers = run.model.arch.num_hidden_layers
    if layers is not None and n > layers:
        yield ConfigError(
            "engine.pipeline_parallel_size",
            n,
            f"is more stages than model={run.model.name} has decoder layers ({layers}); every stage needs "
            "at least one.",
            hint=f"Use 1 to {layers} stages.",
        )
    if e.partition not in PARTITIONS:
        yield ConfigError("engine.partition", e.partition, "is not a way to split the layers.", PARTITIONS)
    model_type = getattr(run.model.arch, "model_type", None)
    if model_type is not None and model_type not in FUSED_MODEL_TYPES:
        yield ConfigError(
            "model",
            run.model.name,
            f"is a {model_type} model; engine=pp runs llmstack's own decoder layers (under either backend), "
            "which exist for these model types only.",
            FUSED_MODEL_TYPES,
        )
    split = e.layer_split
    if split is None:
        return
    shown = "[" + ",".join(str(x) for x in split) + "]"
    if len(split) != n:
        yield ConfigError(
            "engine.layer_split",
            shown,
            f"has {len(split)} entries for engine.pipeline_parallel_size={n}: one per stage.",
            hint="Give one layer count per stage, or null to compute the split.",
        )
    elif any(count < 1 for count in split):
        yield ConfigError("engine.layer_split", shown, "gives a stage no layers; every stage needs one.")
    elif layers is not None and sum(split) != layers:
        yield ConfigError(
            "engine.layer_split",
            shown,
            f"sums to {sum(split)} layers, but model={run.model.name} has {layers}.",
            hint=f"Make the counts add up to {layers}, or null to compute the split.",
        )


def _dist_problems(run: RunConfig) -> Iterator[ConfigError]:
    e = run.engine
    device = run.device.name
    if e.dist_backend not in DIST_BACKENDS:
        yield ConfigError(
            "engine.dist_backend", e.dist_backend, "is not a collective backend.", ("auto", *DIST_BACKENDS)
        )
        return
    if device not in DIST_BACKEND_DEVICES[e.dist_backend]:
        fitting = [b for b, where in DIST_BACKEND_DEVICES.items() if device in where]
        yield ConfigError(
            "engine.dist_backend",
            e.dist_backend,
            f"does not run on device={device}.",
            ["auto", *fitting],
            hint="gloo is for cpu, nccl for cuda, xccl or ccl (oneCCL) for xpu; auto picks the device's.",
        )


def _node_problems(run: RunConfig) -> Iterator[ConfigError]:
    e = run.engine
    if e.nnodes < 1:
        return
    if e.nnodes == 1:
        if e.rdzv_endpoint:
            yield ConfigError(
                "engine.rdzv_endpoint",
                e.rdzv_endpoint,
                "is only used when engine.nnodes > 1; one node rendezvous on a free port of its own "
                "(torchrun --standalone).",
                hint="Set engine.rdzv_endpoint=null, or engine.nnodes to the number of nodes.",
            )
        if e.node_rank != 0:
            yield ConfigError("engine.node_rank", e.node_rank, "must be 0 on one node.", [0])
        return
    if e.pipeline_parallel_size % e.nnodes:
        yield ConfigError(
            "engine.pipeline_parallel_size",
            e.pipeline_parallel_size,
            f"does not divide over engine.nnodes={e.nnodes}: every node runs as many stages.",
            hint=f"Use a multiple of {e.nnodes}.",
        )
    if not 0 <= e.node_rank < e.nnodes:
        yield ConfigError(
            "engine.node_rank", e.node_rank, f"is not a node of engine.nnodes={e.nnodes}.", range(e.nnodes)
        )
    elif e.node_rank != 0 and not run.dry_run:
        yield ConfigError(
            "engine.node_rank",
            e.node_rank,
            "is not node 0: llmstack starts and watches node 0, whose rank 0 serves HTTP.",
            [0],
            hint="Run llmstack with engine.node_rank=0 on node 0; start the other nodes' commands (which "
            "dry_run=true prints) on their machines.",
        )
    endpoint = e.rdzv_endpoint
    if not endpoint or not (match := ENDPOINT.match(endpoint)) or not 0 < int(match.group(2)) < 65536:
        yield ConfigError(
            "engine.rdzv_endpoint",
            endpoint,
            f"must be node 0's host:port when engine.nnodes={e.nnodes} > 1: every node's torchrun meets "
            "there (a static rendezvous: node 0 listens on that port).",
            hint="E.g. engine.rdzv_endpoint=10.0.0.1:29400, a port free on node 0 and reachable from the "
            "other nodes.",
        )


def device_count_problems(run: RunConfig) -> Iterator[ConfigError]:
    e = run.engine
    if run.device.name == "cpu" or e.nnodes < 1:
        return  # ranks on a cpu are processes: as many as asked
    per_node = e.devices_needed()
    available = run.device.count
    if run.device.ids is not None:
        available = len(run.device.ids) if available is None else min(available, len(run.device.ids))
    if available is not None and per_node > available:
        nodes = f" on each of engine.nnodes={e.nnodes} nodes" if e.nnodes > 1 else ""
        yield ConfigError(
            "engine.pipeline_parallel_size",
            e.pipeline_parallel_size,
            f"needs {per_node} {run.device.name} devices{nodes} (one per stage), but "
            f"device={run.device.name} has {available}.",
            hint="Lower engine.pipeline_parallel_size, add nodes (engine.nnodes), or set device.count when "
            "planning for another machine.",
        )


def memory_problems(run: RunConfig, env: dict[str, str]) -> Iterator[ConfigError]:
    from llmstack.engines import pp_memory
    from llmstack.engines.vllm.memory import gib

    e = run.engine
    if run.device.memory_gib is None:
        return
    est = pp_memory.estimate(run, env)
    if est is None or (over := est.overflow()) is None:
        return
    group, excess = over
    n = len(est.stages)
    stages = " and ".join(est.stages[i].describe(n) for i in group)
    weights = sum(est.stages[i].weights_bytes for i in group)
    kv = sum(est.stages[i].kv_bytes for i in group)
    where = "the host's memory" if run.device.name == "cpu" else "one device's memory"
    budget = est.budget_bytes or 0
    ways = []
    layers = run.model.arch.num_hidden_layers or 0
    for more in range(n + 1, layers + 1):
        alt = pp_memory.estimate(run, env, stages=more)
        if alt is not None and alt.overflow() is None:
            ways.append(f"engine.pipeline_parallel_size={more} (with as many devices)")
            break
    longest = pp_memory.largest_fitting(est, "len")
    if longest >= 1:
        ways.append(f"engine.max_model_len={longest} or less")
    seqs = pp_memory.largest_fitting(est, "seqs")
    if seqs >= 1:
        ways.append(f"engine.max_num_seqs={seqs} or less")
    if kv and est.micro_batches > 1:
        ways.append("engine.micro_batches=1 (the KV cache of one micro-batch in flight, not overlapped)")
    if e.backend == "ipex_llm":
        ways.append("a low_bit of fewer bits")
    elif run.low_bit.name == "none":
        ways.append("low_bit=bf16 or fp16 (half the bytes of float32 weights)")
    weights_only = weights > budget
    yield ConfigError(
        "engine.pipeline_parallel_size" if weights_only else "engine.max_model_len",
        e.pipeline_parallel_size if weights_only else est.max_model_len,
        f"{stages} does not fit {where}: weights {gib(weights)} GiB + KV cache {gib(kv)} GiB "
        f"({pp_memory.kv_shape(est)}) = "
        f"{gib(weights + kv)} GiB, {gib(excess)} GiB more than device.memory_gib={est.device_gib:g}.",
        hint="To fit, change one of: " + "; ".join(ways) + ".",
    )
