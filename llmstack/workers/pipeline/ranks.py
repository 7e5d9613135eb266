"""What every rank does: decide its layers, load them, join the ring; and ranks 1..N-1's whole life.

Rank r runs decoder layers `stage_bounds(split)[r]` (`workers/partition.py`, the rule the launcher's memory
check uses) on device `<device>:<LOCAL_RANK>`. The process group is initialised only after the stage is
loaded, with a long timeout (loading takes what it takes); the groups the ring uses carry the collective
timeout, so a stuck step is found in seconds, not an hour.

A rank other than 0 then loops: a header from the previous rank, its tensor, its layers, on to the next
rank (the last one returns logits to rank 0). It stops on STOP (after passing it on), and exits quietly on
SIGTERM/SIGINT (torchrun stops its ranks that way); if the ring breaks it exits 1 with the reason.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from llmstack.workers.partition import split_layers, stage_bounds
from llmstack.workers.protocol import PipelineOptions, parse_layer_split

# ipex-llm's formats whose linears compute in (and return) a half dtype: the stage's activations are that.
IPEX_HALF_LOW_BITS = {"fp16": "float16", "bf16": "bfloat16"}

logger = logging.getLogger("llmstack.workers.pipeline")

# Seconds every rank may take to load its stage before the group gives up on the slowest.
LOAD_TIMEOUT_S = 3600.0
# Seconds a rank whose peer is gone waits before it exits (see `main`).
PEER_LOSS_EXIT_DELAY_S = 3.0


@dataclass(frozen=True)
class StagePlan:
    world: int
    rank: int
    bounds: list[tuple[int, int]]
    lanes: int
    max_model_len: int
    vocab_size: int
    hidden_size: int
    model_type: str

    def describe(self) -> str:
        return ", ".join(f"rank {r}: {a}-{b - 1}" for r, (a, b) in enumerate(self.bounds))

    def ranges_as_lists(self) -> list[list[int]]:
        return [[a, b] for a, b in self.bounds]


def world_and_rank() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) from torchrun's environment; a lone process is a pipeline of one."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))


def plan_stages(options: PipelineOptions, config: Any, world: int, rank: int) -> StagePlan:
    layers = int(config.num_hidden_layers)
    if options.layer_split:
        split = parse_layer_split(options.layer_split)
        if len(split) != world or sum(split) != layers:
            raise ValueError(
                f"--layer-split {options.layer_split} does not give {layers} layers to {world} stages"
            )
    elif options.partition == "bytes":
        per_layer, embed, head = _parameter_bytes(config)
        split = split_layers(layers, world, [per_layer] * layers, first_extra=embed, last_extra=head)
    else:
        split = split_layers(layers, world)
    return StagePlan(
        world=world,
        rank=rank,
        bounds=stage_bounds(split),
        lanes=options.micro_batches or world,
        max_model_len=options.max_model_len or int(getattr(config, "max_position_embeddings", 0) or 2048),
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        model_type=str(config.model_type),
    )


def _parameter_bytes(config: Any) -> tuple[int, int, int]:
    """Parameters of one decoder layer, of the embedding, and of the final norm + LM head (element counts:
    every tensor has the same dtype, so counts compare as bytes do)."""
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    dim = int(getattr(config, "head_dim", None) or hidden // heads)
    layer = hidden * dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    embed = int(config.vocab_size) * hidden
    return layer, embed, embed + hidden


def load_my_stage(options: PipelineOptions, rank: int) -> tuple[Any, StagePlan]:
    import torch

    from llmstack.workers.backends.loader import BackendError
    from llmstack.workers.pipeline.stage import StageModel
    from llmstack.workers.pipeline.weights import StageLoadError, dtype_of, load_config, load_stage

    world, _, local_rank = world_and_rank()
    if world != options.pipeline_parallel_size:
        raise BackendError(f"--pipeline-parallel-size {options.pipeline_parallel_size} but torchrun started "
                           f"{world} ranks (WORLD_SIZE)")  # fmt: skip
    low_bit = options.low_bit if options.backend == "ipex_llm" else None
    if options.backend == "ipex_llm" and not low_bit:
        raise BackendError("backend ipex_llm needs --low-bit (e.g. sym_int4)")
    device = _device(options.device, local_rank)
    if device.type == "cpu":
        from llmstack.workers.backends.heap import keep_freed_memory

        keep_freed_memory()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(options.torch_threads or max(1, (cores - 1) // world))
    elif options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    try:
        config = load_config(options.model, options.trust_remote_code, options.max_model_len)
        plan = plan_stages(options, config, world, rank)
        start, stop = plan.bounds[rank]
        started = time.perf_counter()
        dtype = _ipex_dtype(options.dtype, low_bit, device) if low_bit else dtype_of(config, options.dtype)
        # ipex-llm quantizes on the CPU: the stage is loaded there, converted, then moved.
        weights = load_stage(
            options.model, config, start, stop, first=rank == 0, last=rank == world - 1, dtype=dtype,
            device=device if low_bit is None else torch.device("cpu"), table_len=plan.max_model_len,
        )  # fmt: skip
        if low_bit is not None:
            from llmstack.workers.pipeline.lowbit import quantize_stage

            quantize_stage(weights, low_bit, config, device)
            logger.info("rank %d: ipex-llm %s linears: %s", rank, low_bit,
                        ", ".join(f"{n} {name}" for name, n in weights.qtypes.items()))  # fmt: skip
    except (StageLoadError, ValueError) as exc:
        raise BackendError(str(exc)) from exc
    stage = StageModel(weights, slots=plan.lanes * options.max_batch_size, max_model_len=plan.max_model_len)
    ends = (" + embedding" if weights.first else "") + (" + norm + LM head" if weights.last else "")
    logger.info(
        "rank %d loaded layers %d-%d%s in %.1f s on %s: %.1f MiB of weights, %.1f MiB of KV cache, %s",
        rank, start, stop - 1, ends, time.perf_counter() - started, device, weights.parameter_bytes() / 2**20,
        stage.kv_cache_bytes / 2**20, stage.attention,
    )  # fmt: skip
    return stage, plan


def join_pipeline(options: PipelineOptions, plan: StagePlan, rank: int, device: Any) -> Any:
    from llmstack.workers.pipeline.transport import Link

    return Link(
        rank=rank,
        world=plan.world,
        backend=options.dist_backend,
        device=device,
        timeout_s=options.collective_timeout_s,
        init_timeout_s=LOAD_TIMEOUT_S,
        max_seqs=plan.lanes * options.max_batch_size,
    )


def gather_qtypes(link: Any, qtypes: dict[str, int]) -> list[dict[str, int]]:
    """Every stage's low-bit formats (`StageWeights.qtypes`), on every rank: a collective, so every rank
    calls it once after joining (engine.backend=ipex_llm only, which every rank knows from its flags)."""
    if link.world == 1:
        return [qtypes]
    gathered: list[Any] = [None] * link.world
    link.dist.all_gather_object(gathered, qtypes, group=link.control)
    return gathered


def _ipex_dtype(name: str, low_bit: str, device: Any) -> Any:
    """The activations' dtype under ipex_llm, for dtype=auto as the lightweight worker's: float16 on Intel
    GPUs (ipex-llm's serving), float32 on the CPU (its CPU kernels, and llmstack's attention kernel, want
    float32); the dtype itself for low_bit fp16 and bf16 (ipex-llm's FP16Linear / BF16Linear return it)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if low_bit in IPEX_HALF_LOW_BITS:
        return getattr(torch, IPEX_HALF_LOW_BITS[low_bit])
    return torch.float32 if device.type == "cpu" else torch.float16


def _device(name: str, local_rank: int) -> Any:
    import torch

    from llmstack.workers.backends.loader import BackendError

    if name == "cpu":
        return torch.device("cpu")
    backend = getattr(torch, name, None)
    if backend is None or not backend.is_available():
        raise BackendError(f"device {name}: torch.{name}.is_available() is False in this interpreter")
    if local_rank >= backend.device_count():
        raise BackendError(f"rank with LOCAL_RANK {local_rank} has no {name} device "
                           f"(this process sees {backend.device_count()})")  # fmt: skip
    backend.set_device(local_rank)
    return torch.device(name, local_rank)


def eos_token_ids(model_dir: str, tokenizer: Any) -> list[int]:
    """generation_config.json's EOS ids (else config.json's), then the tokenizer's, as the worker's loader
    (which reads them from the loaded model; the stages load none)."""
    import json
    from pathlib import Path

    from llmstack.workers.backends.loader import merge_eos_ids

    configured = None
    for name in ("generation_config.json", "config.json"):
        try:
            configured = json.loads((Path(model_dir) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if configured is not None:
            break
    return merge_eos_ids(configured, tokenizer)


# -- ranks 1..N-1 -------------------------------------------------------------------------------------------
def main(options: PipelineOptions, rank: int) -> int:
    from llmstack.pdeathsig import die_with_parent
    from llmstack.workers.backends.loader import BackendError
    from llmstack.workers.model_process import fast_exit

    # torchrun's agent stops its ranks with SIGTERM: a rank between steps has nothing to finish.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: fast_exit(0))
    die_with_parent(signal.SIGKILL)
    try:
        stage, plan = load_my_stage(options, rank)
    except BackendError as exc:
        logger.error("rank %d cannot serve %s: %s", rank, options.model, exc)
        return 2
    link = join_pipeline(options, plan, rank, stage.device)
    if options.backend == "ipex_llm":
        gather_qtypes(link, stage.w.qtypes)
    from llmstack.workers.pipeline.transport import PipelineBroken

    try:
        serve_stage(link, stage, plan)
    except PipelineBroken as exc:
        logger.error("%s", exc)
        # The rank that broke the ring should be the one torchrun sees fail first (it names the first
        # failure): a rank that only lost its peer leaves a moment later, unless torchrun stops it first.
        time.sleep(PEER_LOSS_EXIT_DELAY_S)
        return 1
    return 0


def serve_stage(link: Any, stage: Any, plan: StagePlan) -> None:
    import torch

    from llmstack.workers.pipeline.transport import PING, STOP

    rank = link.rank
    busy_s = cpu_s = 0.0
    logger.info("rank %d ready", rank)
    while True:
        header = link.receive_header()
        if header.kind in (PING, STOP):
            link.send(header)
            if header.kind == STOP:
                link.flush()
                logger.info("rank %d stopping", rank)
                return
            continue
        hidden = link.receive_payload((header.tokens, plan.hidden_size), stage.dtype)
        started, cpu_started = time.perf_counter(), time.thread_time()
        out = stage.forward(hidden, header.slots, header.starts, header.counts)
        if stage.device.type != "cpu":
            torch.accelerator.synchronize(stage.device)
        busy_s += time.perf_counter() - started
        cpu_s += time.thread_time() - cpu_started
        header.busy_us = _with_mine(header.busy_us, rank, link.world, busy_s)
        header.cpu_us = _with_mine(header.cpu_us, rank, link.world, cpu_s)
        link.send(header, out)


def _with_mine(per_stage: tuple[int, ...], rank: int, world: int, seconds: float) -> tuple[int, ...]:
    values = list(per_stage) + [0] * (world - len(per_stage))
    values[rank] = int(seconds * 1e6)
    return tuple(values)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
