"""engine=pp, the launcher side (issue 14): the torchrun plan against the seed's start-pp_serving-service.sh,
the layer split both sides use (llmstack/workers/partition.py), the pipeline's rules and its per-stage
memory fit. Nothing here starts a rank: the worker is its own program."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.config.schema import ModelArchitecture, RunConfig
from llmstack.devices import Inventory
from llmstack.engines import ENGINE_SCHEMAS, get_engine, pp_memory
from llmstack.engines.lightweight import REQUEST_LIMITS, LightweightEngineConfig
from llmstack.engines.pp import PipelineEngineConfig
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan
from llmstack.validation.rules import config_problems
from llmstack.workers.partition import split_layers, stage_bounds
from llmstack.workers.protocol import (
    PIPELINE_MODULE,
    PIPELINE_TORCHRUN_MODULE,
    PipelineOptions,
    WorkerOptions,
)
from tests.test_first_contact_errors import llmstack, one_paragraph

# docker/llm/serving/xpu/docker/start-pp_serving-service.sh (../shared/reference/ipex-llm-serving.md §1.2):
#   CCL_ZE_IPC_EXCHANGE=sockets torchrun --standalone --nnodes=1 --nproc-per-node $num_gpus \
#     pipeline_serving.py --repo-id-or-model-path $model_path --low-bit $low_bit \
#     --max-num-seqs $max_num_seqs --max-prefilled-seqs $max_prefilled_seqs
# with num_gpus=2, model_path=/llm/models/Llama-2-7b-chat-hf, low_bit=fp8, max_num_seqs=4,
# max_prefilled_seqs=0.
SEED_TORCHRUN = ["--standalone", "--nnodes=1", "--nproc-per-node=2"]
SEED_WORKER = {
    "--model": "/llm/models/Llama-2-7b-chat-hf",
    "--low-bit": "fp8",
    "--max-batch-size": "4",  # the seed's --max-num-seqs: per micro-batch ("on a single card")
    "--max-prefilled-seqs": "0",
    "--pipeline-parallel-size": "2",  # num_gpus
    "--port": "8000",
    "--device": "xpu",
    "--backend": "ipex_llm",
    "--dist-backend": "ccl",  # pipeline_parallel.py: dist.init_process_group('ccl')
}
SEED_ENV = {
    "CCL_ZE_IPC_EXCHANGE": "sockets",
    "FI_PROVIDER": "tcp",
    "USE_XETLA": "OFF",
    "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS": "1",  # KERNEL_VERSION is never set: always 1
    "TORCH_LLM_ALLREDUCE": "0",
    "IPEX_LLM_LAST_LM_HEAD": "1",
    "IPEX_LLM_QUANTIZE_KV_CACHE": "1",
    "IPEX_LLM_LOW_MEM": "1",
    "IPEX_LLM_NOT_USE_VLLM": "True",
    "ZE_AFFINITY_MASK": "0,1",  # run.sh
}
MANY = Inventory(cuda=8, xpu=8)


def resolved(compose_cfg, *overrides: str, inventory: Inventory = MANY) -> RunConfig:
    return resolve(to_run_config(compose_cfg("engine=pp", *overrides)), Path(CONFIG_DIR), inventory)


def plan_of(compose_cfg, *overrides: str) -> LaunchPlan:
    run = resolved(compose_cfg, *overrides)
    return get_engine("pp").plan(run)


def problems(compose_cfg, *overrides: str) -> list[ConfigError]:
    return list(config_problems(resolved(compose_cfg, *overrides), Path(CONFIG_DIR)))


def split_argv(argv: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, the worker's), checking the frame around them."""
    assert argv[1:3] == ("-m", PIPELINE_TORCHRUN_MODULE)
    cut = argv.index(PIPELINE_MODULE)
    assert argv[cut - 1] == "-m"
    return list(argv[3 : cut - 1]), list(argv[cut + 1 :])


def flag_values(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs (None for switches)."""
    out: dict[str, str | None] = {}
    rest = list(argv)
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), flag
        out[flag] = rest.pop(0) if rest and not rest[0].startswith("--") else None
    return out


@pytest.fixture(autouse=True)
def _checked_in_models_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSTACK_MODELS", raising=False)


# --- the layer split both sides use ---------------------------------------------------------------------


def test_split_by_count_gives_the_remainder_to_earlier_stages() -> None:
    assert split_layers(7, 3) == [3, 2, 2]
    assert split_layers(32, 2) == [16, 16]
    assert split_layers(2, 2) == [1, 1]
    for layers, stages in itertools.product(range(1, 30), range(1, 9)):
        if stages > layers:
            continue
        split = split_layers(layers, stages)
        assert len(split) == stages and sum(split) == layers and min(split) >= 1
        assert split == sorted(split, reverse=True) and split[0] - split[-1] <= 1
    assert stage_bounds([3, 2, 2]) == [(0, 3), (3, 5), (5, 7)]


def test_split_by_bytes_balances_the_largest_stage() -> None:
    # Uniform layers without extras split as by count.
    for layers, stages in [(7, 3), (32, 2), (9, 4)]:
        assert split_layers(layers, stages, [10] * layers) == split_layers(layers, stages)
    # The embedding on stage 0 and the head on the last push layers to the middle.
    assert split_layers(4, 2, [1, 1, 1, 1], first_extra=2) == [1, 3]
    assert split_layers(6, 3, [1] * 6, first_extra=3, last_extra=3) == [1, 4, 1]
    # Ties go to earlier stages: [2, 3, 1] and [1, 4, 1] both have a largest stage of 4.
    assert split_layers(6, 3, [1] * 6, first_extra=2, last_extra=2) == [2, 3, 1]
    # Against every contiguous split of small cases: none has a smaller largest stage.
    for weights, stages, first, last in [([5, 1, 1, 7, 2, 3, 3], 3, 0, 4), ([2, 9, 4, 4, 1], 2, 3, 0)]:
        split = split_layers(len(weights), stages, weights, first, last)
        assert len(split) == stages and sum(split) == len(weights) and min(split) >= 1

        def largest(counts: tuple[int, ...] | list[int], w=weights, f=first, la=last) -> int:
            bounds = stage_bounds(list(counts))
            totals = [sum(w[a:b]) for a, b in bounds]
            totals[0] += f
            totals[-1] += la
            return max(totals)

        every = [
            c for c in itertools.product(range(1, len(weights) + 1), repeat=stages) if sum(c) == len(weights)
        ]
        assert largest(split) == min(largest(c) for c in every)


def test_split_refuses_what_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        split_layers(2, 3)
    with pytest.raises(ValueError, match="at least one stage"):
        split_layers(2, 0)
    with pytest.raises(ValueError, match="entries"):
        split_layers(3, 2, [1, 1])


# --- plans -----------------------------------------------------------------------------------------------


def test_xpu_ipex_plan_renders_the_seed_script(compose_cfg) -> None:
    # low_bit=fp8 as the seed script sets it (llmstack's ipex_llm default is sym_int4, which runs on cpu too).
    seed = ["engine.backend=ipex_llm", "low_bit=fp8", "device=xpu", "device.count=2", "model=llama2_7b"]
    plan = plan_of(compose_cfg, *seed)
    torchrun, worker = split_argv(plan.argv)
    assert torchrun[: len(SEED_TORCHRUN)] == SEED_TORCHRUN
    # Each rank's output in its own log and in server.log; no fixed rendezvous port (--standalone).
    assert torchrun[len(SEED_TORCHRUN) :] == ["--redirects=3", "--tee=3"]
    flags = flag_values(worker)
    assert {k: flags.get(k) for k in SEED_WORKER} == SEED_WORKER
    assert {k: plan.env.get(k) for k in SEED_ENV} == SEED_ENV
    # The worker parses what the launcher rendered: the contract of workers/protocol.py.
    options = PipelineOptions.parse(worker)
    assert (options.max_batch_size, options.pipeline_parallel_size, options.low_bit) == (4, 2, "fp8")
    assert (options.micro_batches, options.max_prefilled_seqs, options.dist_backend) == (0, 0, "ccl")
    assert plan.engine == "pp-ipex_llm" and plan.stop_main_first and plan.node_argvs == ()
    assert plan.probe.base_url == "http://127.0.0.1:8000"
    assert not any(k.startswith("NCCL_") for k in plan.env)


def test_ipex_llm_plans_sym_int4_by_default_on_cpu_and_xpu(compose_cfg) -> None:
    python = "engine.python=.venv-ipex/bin/python"
    run = resolved(compose_cfg, "device=cpu", "engine.backend=ipex_llm", python)
    assert get_engine("pp").required_module(run) == "ipex_llm"  # the host check asks this interpreter for it
    plan = get_engine("pp").plan(run)
    assert plan.argv[0] == ".venv-ipex/bin/python" and plan.engine == "pp-ipex_llm"
    options = PipelineOptions.parse(split_argv(plan.argv)[1])
    assert (options.backend, options.low_bit, options.device, options.dist_backend) == (
        "ipex_llm", "sym_int4", "cpu", "gloo",
    )  # fmt: skip
    assert options.dtype == "auto" and set(plan.env) == {"PYTHONPATH"}  # no XPU settings on cpu
    assert problems(compose_cfg, "device=cpu", "engine.backend=ipex_llm", python) == []
    # On xpu: the same format, oneCCL (ccl) and the seed's ipex-llm environment.
    xpu = plan_of(compose_cfg, "device=xpu", "device.count=2", "model=llama2_7b", "engine.backend=ipex_llm")
    options = PipelineOptions.parse(split_argv(xpu.argv)[1])
    assert (options.low_bit, options.dist_backend) == ("sym_int4", "ccl")
    assert {k: xpu.env.get(k) for k in SEED_ENV} == SEED_ENV
    # ipex-llm's name of a format is what the ranks get (low_bit.ipex).
    int8 = plan_of(compose_cfg, "device=cpu", "engine.backend=ipex_llm", "low_bit=sym_int8")
    assert PipelineOptions.parse(split_argv(int8.argv)[1]).low_bit == "sym_int8"


def test_ipex_llm_dry_run_prints_the_xpu_plan() -> None:
    done = llmstack(
        "engine=pp", "engine.backend=ipex_llm", "device=xpu", "device.count=2", "model=llama2_7b",
        "engine.python=.venv-ipex/bin/python", "dry_run=true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "# llmstack dry run: pp-ipex_llm" in out and "--low-bit sym_int4" in out
    assert "--dist-backend ccl" in out and "export IPEX_LLM_NOT_USE_VLLM=True" in out
    assert "stage 1 (layers 16-31 + final norm and LM head)" in out


def test_xpu_transformers_uses_xccl_without_ipex_llm_settings(compose_cfg) -> None:
    plan = plan_of(compose_cfg, "device=xpu", "device.count=4", "engine.pipeline_parallel_size=2")
    _, worker = split_argv(plan.argv)
    assert PipelineOptions.parse(worker).dist_backend == "xccl"
    assert plan.env["CCL_ZE_IPC_EXCHANGE"] == "sockets" and plan.env["ZE_AFFINITY_MASK"] == "0,1"
    assert not any(k.startswith("IPEX_LLM_") for k in plan.env)
    # device.ids picks the cards, over the default 0..N-1.
    picked = plan_of(compose_cfg, "device=xpu", "device.ids=[2,3]")
    assert picked.env["ZE_AFFINITY_MASK"] == "2,3"


def test_cpu_plan_uses_gloo_and_no_device_environment(compose_cfg) -> None:
    plan = plan_of(compose_cfg, "device=cpu")
    torchrun, worker = split_argv(plan.argv)
    assert torchrun == ["--standalone", "--nnodes=1", "--nproc-per-node=2", "--redirects=3", "--tee=3"]
    options = PipelineOptions.parse(worker)
    assert (options.dist_backend, options.device, options.backend) == ("gloo", "cpu", "transformers")
    assert set(plan.env) == {"PYTHONPATH"}
    assert plan.engine == "pp-transformers"


def test_cuda_plan_uses_nccl_and_keeps_the_machines_nccl_settings(compose_cfg) -> None:
    plan = plan_of(compose_cfg, "device=cuda", "engine.pipeline_parallel_size=4", "model=llama2_7b")
    torchrun, worker = split_argv(plan.argv)
    assert "--nproc-per-node=4" in torchrun
    assert PipelineOptions.parse(worker).dist_backend == "nccl"
    assert not any(k.startswith(("NCCL_", "CUDA_VISIBLE")) for k in plan.env)
    ids = plan_of(compose_cfg, "device=cuda", "device.ids=[4,5]")
    assert ids.env["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_worker_flags_follow_the_engine_keys(compose_cfg) -> None:
    plan = plan_of(
        compose_cfg,
        "device=cpu",
        "model=llama2_7b",
        "engine.pipeline_parallel_size=3",
        "engine.layer_split=[12,10,10]",
        "engine.micro_batches=2",
        "engine.max_num_seqs=8",
        "engine.partition=bytes",
        "engine.max_stop_strings=9",
        "engine.collective_timeout_s=30",
        "engine.extra_args=[--foo]",
    )
    _, worker = split_argv(plan.argv)
    assert worker[-1] == "--foo"
    options = PipelineOptions.parse(worker[:-1])
    assert options.layer_split == "12,10,10" and options.partition == "bytes"
    assert (options.micro_batches, options.max_batch_size, options.max_stop_strings) == (2, 8, 9)
    assert options.collective_timeout_s == 30 and options.pipeline_parallel_size == 3


def test_request_limits_are_the_lightweight_workers(compose_cfg) -> None:
    pp, lw = PipelineEngineConfig(), LightweightEngineConfig(name="lightweight")
    worker = WorkerOptions(model="m", served_model_name="m")
    for name in REQUEST_LIMITS:
        assert getattr(pp, name) == getattr(lw, name) == getattr(worker, name), name
    # The YAML's values are the schema's.
    run = resolved(compose_cfg, "device=cpu")
    assert {n: getattr(run.engine, n) for n in REQUEST_LIMITS} == {n: getattr(pp, n) for n in REQUEST_LIMITS}


def test_multi_node_renders_every_node_differing_only_in_node_rank(compose_cfg) -> None:
    plan = plan_of(
        compose_cfg,
        "device=cuda",
        "model=llama2_7b",
        "engine.pipeline_parallel_size=4",
        "engine.nnodes=2",
        "engine.rdzv_endpoint=10.0.0.1:29400",
    )
    assert len(plan.node_argvs) == 2 and plan.argv == plan.node_argvs[0]
    torchrun, _ = split_argv(plan.argv)
    assert "--standalone" not in torchrun
    assert {
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=static",
        "--rdzv-endpoint=10.0.0.1:29400",
    } <= set(torchrun)
    (rdzv_id,) = [a for a in torchrun if a.startswith("--rdzv-id=")]
    assert rdzv_id.startswith("--rdzv-id=llmstack-pp-")
    first, second = plan.node_argvs
    differing = [(a, b) for a, b in zip(first, second, strict=True) if a != b]
    assert differing == [("--node-rank=0", "--node-rank=1")]
    # A stable id: the same config renders the same id.
    again = plan_of(
        compose_cfg,
        "device=cuda",
        "model=llama2_7b",
        "engine.pipeline_parallel_size=4",
        "engine.nnodes=2",
        "engine.rdzv_endpoint=10.0.0.1:29400",
    )
    assert again.node_argvs == plan.node_argvs
    assert PipelineEngineConfig(pipeline_parallel_size=4, nnodes=2).devices_needed() == 2


def test_dry_run_prints_the_xpu_plan_and_every_node() -> None:
    done = llmstack("engine=pp", "device=xpu", "device.count=2", "model=llama2_7b", "dry_run=true")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "# llmstack dry run: pp-transformers" in out and "-m llmstack.workers.pipeline.torchrun" in out
    assert "--nproc-per-node=2" in out and "export ZE_AFFINITY_MASK=0,1" in out
    assert "# Memory estimate per stage" in out and "stage 1 (layers 16-31 + final norm and LM head)" in out
    multi = llmstack(
        "engine=pp",
        "device=cuda",
        "model=llama2_7b",
        "engine.pipeline_parallel_size=4",
        "engine.nnodes=2",
        "engine.rdzv_endpoint=node0:29400",
        "dry_run=true",
    )
    assert multi.returncode == 0, multi.stderr
    assert "--node-rank=0" in multi.stdout and "# node 1:" in multi.stdout and "--node-rank=1" in multi.stdout


# --- rules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (
            "device=cpu model=llama2_7b engine.pipeline_parallel_size=33",
            "engine.pipeline_parallel_size",
            "decoder layers (32)",
        ),
        (
            "device=cuda device.count=2 model=llama2_7b engine.pipeline_parallel_size=4",
            "engine.pipeline_parallel_size",
            "needs 4 cuda devices",
        ),
        ("device=xpu device.ids=[0] model=llama2_7b", "engine.pipeline_parallel_size", "has 1"),
        ("device=cpu model=llama2_7b engine.layer_split=[16]", "engine.layer_split", "1 entries"),
        ("device=cpu model=llama2_7b engine.layer_split=[16,15]", "engine.layer_split", "sums to 31"),
        ("device=cpu model=llama2_7b engine.layer_split=[32,0]", "engine.layer_split", "no layers"),
        ("device=cpu low_bit=sym_int4", "low_bit", "engine.backend=ipex_llm"),
        ("device=cuda engine.backend=ipex_llm", "device", "Valid choices: cpu, xpu"),
        ("device=xpu engine.backend=ipex_llm low_bit=none", "low_bit", "load_in_low_bit"),
        ("device=cpu engine.backend=ipex_llm low_bit=fp8", "low_bit", "only on xpu"),
        ("device=cpu engine.backend=ipex_llm low_bit=fp8", "low_bit", "sym_int4"),  # among the valid
        ("device=cpu engine.backend=ipex_llm low_bit=bf16 engine.dtype=float32", "engine.dtype", "bfloat16"),
        ("device=cpu engine.backend=vllm", "engine.backend", "transformers, ipex_llm"),
        ("device=cpu engine.dist_backend=nccl", "engine.dist_backend", "auto, gloo"),
        ("device=cuda engine.dist_backend=gloo", "engine.dist_backend", "auto, nccl"),
        ("device=xpu engine.dist_backend=nccl", "engine.dist_backend", "auto, xccl, ccl"),
        ("device=cpu engine.dist_backend=mpi", "engine.dist_backend", "auto, gloo, nccl, xccl, ccl"),
        ("device=cpu engine.max_num_seqs=0", "engine.max_num_seqs", "at least 1"),
        ("device=cpu engine.partition=heads", "engine.partition", "layers, bytes"),
        ("device=cpu engine.dtype=float16 low_bit=bf16", "engine.dtype", "bfloat16"),
        (
            "device=cpu model=llama2_7b engine.nnodes=2 engine.pipeline_parallel_size=3 "
            "engine.rdzv_endpoint=h:1",
            "engine.pipeline_parallel_size",
            "does not divide",
        ),
        ("device=cpu model=llama2_7b engine.nnodes=2", "engine.rdzv_endpoint", "host:port"),
        (
            "device=cpu model=llama2_7b engine.nnodes=2 engine.rdzv_endpoint=nohost",
            "engine.rdzv_endpoint",
            "host:port",
        ),
        (
            "device=cpu model=llama2_7b engine.nnodes=2 engine.rdzv_endpoint=h:1 engine.node_rank=2",
            "engine.node_rank",
            "Valid choices: 0, 1",
        ),
        (
            "device=cpu model=llama2_7b engine.nnodes=2 engine.rdzv_endpoint=h:1 engine.node_rank=1",
            "engine.node_rank",
            "is not node 0",
        ),
        ("device=cpu engine.rdzv_endpoint=h:1", "engine.rdzv_endpoint", "only used when engine.nnodes > 1"),
    ],
)
def test_rule(compose_cfg, overrides: str, key: str, fragment: str) -> None:
    found = problems(compose_cfg, *overrides.split())
    assert found, overrides
    assert found[0].key == key, str(found[0])
    assert fragment in str(found[0]), str(found[0])


def test_other_nodes_are_rendered_in_a_dry_run(compose_cfg) -> None:
    # node_rank=1 is refused for a run (node 0 is the one llmstack starts) but planned in a dry run.
    base = ["device=cpu", "model=llama2_7b", "engine.nnodes=2", "engine.rdzv_endpoint=h:1"]
    assert problems(compose_cfg, *base, "engine.node_rank=1", "dry_run=true") == []
    plan = plan_of(compose_cfg, *base, "engine.node_rank=1", "dry_run=true")
    assert plan.argv == plan.node_argvs[1]


def test_valid_configs_pass(compose_cfg) -> None:
    assert problems(compose_cfg, "device=cpu") == []
    for device in ("cpu", "xpu"):
        assert problems(compose_cfg, f"device={device}", "engine.backend=ipex_llm", "model=llama2_7b") == []
    assert problems(compose_cfg, "device=cpu", "model=llama2_7b", "engine.layer_split=[20,12]") == []


def test_model_type_outside_the_fused_decoders_is_refused(compose_cfg) -> None:
    @dataclasses.dataclass
    class TypedArch(ModelArchitecture):  # where model.arch says the model_type
        model_type: str | None = None

    run = resolved(compose_cfg, "device=cpu", "model=llama2_7b")
    for model_type, refused in [("gpt2", True), ("qwen2", False)]:
        arch = TypedArch(**dataclasses.asdict(run.model.arch), model_type=model_type)
        typed = dataclasses.replace(run, model=dataclasses.replace(run.model, arch=arch))
        keys = [e.key for e in get_engine("pp").check(typed)]
        assert ("model" in keys) == refused, (model_type, keys)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ("device=cpu model=llama2_7b engine.pipeline_parallel_size=33", "engine.pipeline_parallel_size=33"),
        ("device=cpu engine.dist_backend=nccl", "engine.dist_backend=nccl"),
        ("device=cuda device.count=1 model=llama2_7b", "needs 2 cuda devices"),
    ],
)
def test_refused_on_the_command_line_with_exit_2(overrides: str, fragment: str) -> None:
    text = one_paragraph(llmstack("engine=pp", *overrides.split(), "dry_run=true"))
    assert fragment in text, text


# --- memory fit per stage --------------------------------------------------------------------------------

# Llama-2-7B in float16 on 8 GiB cards, 1024-token sequences.
SMALL_CARD = [
    "device=xpu",
    "low_bit=fp16",
    "model=llama2_7b",
    "device.memory_gib=8",
    "engine.max_model_len=1024",
]


def test_a_stage_that_does_not_fit_is_refused_and_more_stages_fit(compose_cfg) -> None:
    (error,) = [e for e in problems(compose_cfg, *SMALL_CARD) if "does not fit" in str(e)]
    text = str(error)
    # The last stage is the larger by its final norm: it is the one named.
    assert (
        "stage 1 (layers 16-31 + final norm and LM head)" in text and "more than device.memory_gib=8" in text
    )
    assert "engine.pipeline_parallel_size=3" in text and "engine.max_model_len=" in text
    assert problems(compose_cfg, *SMALL_CARD, "engine.pipeline_parallel_size=3") == []
    summary = get_engine("pp").memory_summary(
        resolved(compose_cfg, *SMALL_CARD, "engine.pipeline_parallel_size=3")
    )
    assert (
        summary is not None
        and summary.count(" GiB; stage ") == 2
        and "stage 2 (layers 22-31 + final norm and LM head)" in summary
        and "of 8 GiB per device" in summary
    )


def test_kv_cache_and_weights_per_stage(compose_cfg) -> None:
    run = resolved(compose_cfg, "device=cuda", "model=llama2_7b", "low_bit=fp16", "engine.max_num_seqs=3")
    est = pp_memory.estimate(run, {})
    assert est is not None and [s.layers for s in est.stages] == [16, 16]
    # layers x seqs x micro-batches (0 = one per stage) x max_model_len x KV heads x head_dim x K,V x fp16
    assert est.stages[0].kv_bytes == 16 * 3 * 2 * 4096 * 32 * 128 * 2 * 2
    # Llama-2-7B's published 6,738,415,616 parameters at 16 bits over two stages; the embedding and the LM
    # head are equal tables, so the stages differ by the final norm only.
    assert sum(s.weights_bytes for s in est.stages) == 6_738_415_616 * 2
    assert est.stages[1].weights_bytes - est.stages[0].weights_bytes == 4096 * 2
    # Tied embeddings: the last stage keeps a copy, so two stages weigh the same; one stage holds one table.
    tied = dataclasses.replace(run.model.arch, tie_word_embeddings=True)
    tied_run = dataclasses.replace(run, model=dataclasses.replace(run.model, arch=tied))
    assert pp_memory.estimate(tied_run, {}).stages == est.stages
    one = pp_memory.estimate(run, {}, stages=1).stages[0].weights_bytes
    one_tied = pp_memory.estimate(tied_run, {}, stages=1).stages[0].weights_bytes
    assert one - one_tied == 32000 * 4096 * 2
    # ipex_llm on xpu: the stages' own KV cache in float16 (dtype=auto there), 2 bytes a value, although the
    # plan sets the seed's IPEX_LLM_QUANTIZE_KV_CACHE=1 (which only ipex-llm's own attention reads).
    ipex = resolved(compose_cfg, "device=xpu", "engine.backend=ipex_llm", "model=llama2_7b")
    env = get_engine("pp").environment(ipex)
    assert env["IPEX_LLM_QUANTIZE_KV_CACHE"] == "1"
    assert pp_memory.estimate(ipex, env).stages[0].kv_bytes == 16 * 4 * 2 * 4096 * 32 * 128 * 2 * 2
    # The bytes partition moves layers off the stages holding the embedding and the LM head.
    # Llama-3-8B: its 128256 x 4096 embedding weighs about 2.4 decoder layers (Llama-2's 32000 x 4096 less
    # than one, which moves nothing).
    by_bytes = resolved(
        compose_cfg,
        "device=cuda",
        "model=llama3_8b",
        "engine.pipeline_parallel_size=4",
        "engine.partition=bytes",
    )
    split = [s.layers for s in pp_memory.estimate(by_bytes, {}).stages]
    assert sum(split) == 32 and split[0] < split[1] and split[-1] < split[2], split


def test_ipex_llm_weights_are_counted_at_the_low_bit_width(compose_cfg) -> None:
    def stages(*overrides: str) -> tuple[pp_memory.StageEstimate, ...]:
        run = resolved(compose_cfg, "model=llama2_7b", *overrides)
        est = pp_memory.estimate(run, get_engine("pp").environment(run))
        assert est is not None
        return est.stages

    layer_matrices = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o; gate, up, down
    table, norms = 32000 * 4096, 32 * 2 * 4096 + 4096
    # xpu (float16 activations): layers and LM head at sym_int4's 4.5 bits, embedding and norms at 16.
    int4 = stages("device=xpu", "engine.backend=ipex_llm", "low_bit=sym_int4")
    want = (layer_matrices + table) * 4.5 / 8 + (table + norms) * 2
    assert abs(sum(s.weights_bytes for s in int4) - want) <= 2
    fp16 = stages("device=xpu", "low_bit=fp16")
    assert sum(s.weights_bytes for s in fp16) == 6_738_415_616 * 2
    # sym_int8 (8.5 bits) weighs more than sym_int4 and less than fp16; the last stage holds the LM head.
    int8 = stages("device=xpu", "engine.backend=ipex_llm", "low_bit=sym_int8")
    assert int4[1].weights_bytes < int8[1].weights_bytes < fp16[1].weights_bytes
    # cpu: float32 activations (dtype=auto), so the embedding, norms and KV cache take 4 bytes a value.
    cpu = stages("device=cpu", "engine.backend=ipex_llm", "low_bit=sym_int4")
    assert cpu[0].kv_bytes == 2 * int4[0].kv_bytes
    assert cpu[0].weights_bytes - int4[0].weights_bytes == table * 2 + 16 * 2 * 4096 * 2


def test_engine_is_registered() -> None:
    assert "pp" in ENGINE_SCHEMAS.names() and ENGINE_SCHEMAS["pp"] is PipelineEngineConfig
    assert get_engine("pp").name == "pp"
