"""The benchmark group: every phase composes into its own typed schema, and every knob has its rule."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

from llmstack.cli import CONFIG_DIR
from llmstack.config import compose_cache
from llmstack.config.resolve import resolve, to_run_config
from llmstack.config.schema import BenchmarkConfig
from llmstack.devices import Inventory
from llmstack.errors import ConfigError
from llmstack.phases.capacity import CapacityBenchmarkConfig
from llmstack.phases.multimodal import MultimodalBenchmarkConfig
from llmstack.phases.offline_throughput import OfflineThroughputConfig
from llmstack.phases.online import OnlineBenchmarkConfig
from llmstack.phases.registry import benchmark_problems, benchmark_schema
from llmstack.phases.rps import RpsBenchmarkConfig
from llmstack.validation import validate

CPU_ONLY = Inventory()
PHASE_OF_OPTION = {
    "none": BenchmarkConfig,
    "smoke": OnlineBenchmarkConfig,
    "online": OnlineBenchmarkConfig,
    "multimodal": MultimodalBenchmarkConfig,
    "rps": RpsBenchmarkConfig,
    "offline_throughput": OfflineThroughputConfig,
    "capacity": CapacityBenchmarkConfig,
}


def resolved(compose_cfg, *overrides: str):
    return resolve(to_run_config(compose_cfg(*overrides)), Path(CONFIG_DIR), CPU_ONLY)


def check(compose_cfg, *overrides: str, host_checks: bool = False) -> None:
    validate(resolved(compose_cfg, *overrides), Path(CONFIG_DIR), host_checks=host_checks)


@pytest.mark.parametrize(("option", "schema"), PHASE_OF_OPTION.items())
def test_every_benchmark_option_composes_into_its_phase_schema(
    compose_cfg, option: str, schema: type
) -> None:
    run = to_run_config(compose_cfg(f"benchmark={option}"))
    assert type(run.benchmark) is schema
    assert run.benchmark.name == option
    assert benchmark_schema(run.benchmark.phase) is schema


def test_the_options_are_exactly_the_phases_and_presets() -> None:
    options = {p.stem for p in (Path(CONFIG_DIR) / "benchmark").glob("*.yaml")}
    assert set(PHASE_OF_OPTION) <= options


@pytest.mark.parametrize(
    ("option", "key"),
    [("online", "image"), ("rps", "concurrency"), ("multimodal", "dataset"),
     ("offline_throughput", "endpoint"), ("none", "num_prompts")],
)  # fmt: skip
def test_a_key_of_another_phase_is_rejected(compose_cfg, option: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(f"benchmark={option}", f"benchmark.{key}=1")
    assert isinstance(info.value.__cause__, ConfigAttributeError)


def test_list_and_nested_overrides_reach_the_typed_config(compose_cfg) -> None:
    run = to_run_config(
        compose_cfg("benchmark=online", "benchmark.request_rate=[2,8.5]", "benchmark.burstiness=inf",
                    "benchmark.slo.ttft_ms=250", "benchmark.percentiles=[50,99.9]")
    )  # fmt: skip
    b = run.benchmark
    assert b.request_rate == [2.0, 8.5] and b.burstiness == float("inf")
    assert b.slo.ttft_ms == 250.0 and b.slo.e2el_ms is None and b.percentiles == [50.0, 99.9]


def test_the_compose_cache_restores_the_phase_schema(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path))
    args = ["benchmark=rps", "benchmark.connections=3"]
    compose_cache.store(Path(CONFIG_DIR), args, compose_cfg(*args))
    cached = compose_cache.load(Path(CONFIG_DIR), args)
    assert cached is not None
    run = to_run_config(cached)
    assert type(run.benchmark) is RpsBenchmarkConfig and run.benchmark.connections == 3


def test_every_preset_is_valid_for_the_tiny_model_once_it_fits(compose_cfg) -> None:
    check(compose_cfg, "benchmark=smoke")
    check(compose_cfg, "benchmark=none")
    check(compose_cfg, "benchmark=online", "benchmark.input_len=256", "benchmark.output_len=64")
    check(compose_cfg, "benchmark=multimodal", "benchmark.image=https://example.com/cat.png")
    check(compose_cfg, "benchmark=rps", "benchmark.input_len=512")
    check(compose_cfg, "benchmark=offline_throughput")


# (overrides, key, fragments of the message): one rule per line.
RULES = [
    # which phase
    (["benchmark.phase=rps"], "benchmark.phase", ["benchmark=smoke", "online phase", "benchmark=rps"]),
    (["benchmark.phase=latency"], "benchmark.phase", ["Valid choices: ", "offline_throughput"]),
    # shared by the phases that send requests
    (["benchmark.warmup_requests=-1"], "benchmark.warmup_requests", ["0 or more"]),
    (["benchmark.output_len=0"], "benchmark.output_len", ["at least 1"]),
    (["benchmark.min_tokens=33"], "benchmark.min_tokens", ["between 0 and benchmark.output_len (32)"]),
    (["benchmark.min_tokens=-1"], "benchmark.min_tokens", ["between 0"]),
    (["benchmark.temperature=-0.5"], "benchmark.temperature", ["0 (greedy) or more"]),
    (["benchmark.timeout_s=0"], "benchmark.timeout_s", ["positive number of seconds"]),
    (["benchmark.slo.ttft_ms=0"], "benchmark.slo.ttft_ms", ["positive number of ms"]),
    (["benchmark.slo.e2el_ms=-5"], "benchmark.slo.e2el_ms", ["positive number of ms"]),
    (["benchmark.stream=false", "benchmark.slo.tpot_ms=20"], "benchmark.slo.tpot_ms", ["streamed requests"]),
    (["benchmark.percentiles=[50,101]"], "benchmark.percentiles", ["0-100"]),
    # online
    (["benchmark.endpoint=embeddings"], "benchmark.endpoint", ["completions, chat"]),
    (["benchmark.request_rate=[4,0]"], "benchmark.request_rate", ["positive, finite"]),
    (["benchmark.request_rate=[inf]"], "benchmark.request_rate", ["closed-loop levels"]),
    (["benchmark.concurrency=[]"], "benchmark.concurrency", ["at least one load level"]),
    (["benchmark.concurrency=[4,0]"], "benchmark.concurrency", ["at least 1"]),
    (["benchmark.max_concurrency=8"], "benchmark.max_concurrency", ["open-loop levels only"]),
    (["benchmark.request_rate=[2]", "benchmark.max_concurrency=0"], "benchmark.max_concurrency",
     ["at least 1"]),
    (["benchmark.burstiness=0"], "benchmark.burstiness", ["1 = Poisson"]),
    (["benchmark.num_prompts=0"], "benchmark.num_prompts", ["at least 1"]),
    (["benchmark.duration_s=0"], "benchmark.duration_s", ["positive number of seconds"]),
    (["benchmark.dataset=sonnet"], "benchmark.dataset", ["random, fixed, sharegpt, jsonl"]),
    (["benchmark.dataset=sharegpt"], "benchmark.dataset_path", ["required for benchmark.dataset=sharegpt"]),
    (["benchmark.dataset=jsonl"], "benchmark.dataset_path", ["required for benchmark.dataset=jsonl"]),
    (["benchmark.dataset_path=/data/x.json"], "benchmark.dataset_path", ["only read by the file datasets"]),
    (["benchmark.input_len=0"], "benchmark.input_len", ["at least 1"]),
    (["benchmark.range_ratio=1.0"], "benchmark.range_ratio", ["[0, 1)"]),
    (["benchmark.dataset=fixed", "benchmark.range_ratio=0.2"], "benchmark.range_ratio", ["dataset=random"]),
    (["benchmark.input_len=600", "benchmark.output_len=100", "benchmark.range_ratio=0.5"],
     "benchmark.input_len", ["900 prompt + 150 output = 1050", "range_ratio", "1024"]),
    (["benchmark.dataset=fixed", "benchmark.input_len=1000"], "benchmark.input_len", ["1032", "1024"]),
    (["benchmark.sharegpt_max_input_len=3"], "benchmark.sharegpt_max_input_len", ["at least 4"]),
    (["benchmark.sharegpt_max_total_len=7"], "benchmark.sharegpt_max_total_len", ["at least 8"]),
    # multimodal
    (["benchmark=multimodal"], "benchmark.image", ["required"]),
    (["benchmark=multimodal", "benchmark.image=ftp://host/cat.png"], "benchmark.image", ["http, https"]),
    (["benchmark=multimodal", "benchmark.image=/x.png", "benchmark.prompt=hi", "benchmark.input_len=64"],
     "benchmark.input_len", ["give one of them"]),
    (["benchmark=multimodal", "benchmark.image=/x.png", "benchmark.input_len=0"], "benchmark.input_len",
     ["at least 1"]),
    (["benchmark=multimodal", "benchmark.image=/x.png", "benchmark.input_len=1000"], "benchmark.input_len",
     ["1100", "1024"]),
    (["benchmark=multimodal", "benchmark.image=/x.png", "benchmark.concurrency=[0]"], "benchmark.concurrency",
     ["at least 1"]),
    (["benchmark=multimodal", "benchmark.image=/x.png", "benchmark.num_prompts=0"], "benchmark.num_prompts",
     ["at least 1"]),
    # rps
    (["benchmark=rps"], "benchmark.input_len", ["1152", "1024"]),
    (["benchmark=rps", "benchmark.input_len=0"], "benchmark.input_len", ["at least 1"]),
    (["benchmark=rps", "benchmark.input_len=512", "benchmark.connections=0"], "benchmark.connections",
     ["at least 1"]),
    (["benchmark=rps", "benchmark.input_len=512", "benchmark.duration_s=0"], "benchmark.duration_s",
     ["positive number of seconds"]),
    (["benchmark=rps", "benchmark.input_len=512", "benchmark.wrk=sometimes"], "benchmark.wrk",
     ["auto, never, always"]),
    (["benchmark=rps", "benchmark.input_len=512", "benchmark.wrk_threads=13"], "benchmark.wrk_threads",
     ["between 1 and benchmark.connections (12)"]),
    (["benchmark=rps", "benchmark.input_len=512", "benchmark.wrk_timeout_s=3600"], "benchmark.wrk_timeout_s",
     ["(0, 600]", "8 bytes"]),
    (["benchmark=rps", "benchmark.input_len=512", "benchmark.slo.ttft_ms=100"], "benchmark.slo.ttft_ms",
     ["streamed requests"]),
    # offline_throughput
    (["benchmark=offline_throughput", "benchmark.num_prompts=0"], "benchmark.num_prompts", ["at least 1"]),
    (["benchmark=offline_throughput", "benchmark.warmup_requests=-2"], "benchmark.warmup_requests",
     ["0 or more"]),
    (["benchmark=offline_throughput", "benchmark.output_len=0"], "benchmark.output_len", ["at least 1"]),
    (["benchmark=offline_throughput", "benchmark.temperature=-1"], "benchmark.temperature", ["greedy"]),
    (["benchmark=offline_throughput", "benchmark.top_p=0"], "benchmark.top_p", ["(0, 1]"]),
    (["benchmark=offline_throughput", "benchmark.timeout_s=-1"], "benchmark.timeout_s", ["positive"]),
    (["benchmark=offline_throughput", "benchmark.dataset=jsonl"], "benchmark.dataset_path", ["required"]),
    (["benchmark=offline_throughput", "benchmark.input_len=1000"], "benchmark.input_len", ["1128", "1024"]),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "key", "fragments"), RULES)
def test_benchmark_rule(compose_cfg, overrides: list[str], key: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, *overrides)
    assert info.value.key == key, str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_offline_needs_a_vllm_engine(compose_cfg) -> None:
    # Only vLLM is registered today; the rule guards engines to come (our own workers).
    run = resolved(compose_cfg, "benchmark=offline_throughput")
    other = dataclasses.replace(run, engine=dataclasses.replace(run.engine, name="lightweight"))
    problems = list(benchmark_problems(other))
    assert [p.key for p in problems] == ["benchmark"]
    assert "engine=lightweight has none" in str(problems[0])


def test_dataset_file_missing_is_a_host_problem(compose_cfg, tmp_path: Path) -> None:
    missing = tmp_path / "sharegpt.json"
    overrides = ["benchmark.dataset=sharegpt", f"benchmark.dataset_path={missing}"]
    check(compose_cfg, *overrides)  # a dry run may plan for another machine
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, *overrides, host_checks=True)
    assert info.value.key == "benchmark.dataset_path" and "not a file" in str(info.value)


def test_local_image_missing_is_a_host_problem(compose_cfg, tmp_path: Path) -> None:
    overrides = ["benchmark=multimodal", f"benchmark.image={tmp_path / 'cat.png'}"]
    check(compose_cfg, *overrides)
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, *overrides, host_checks=True)
    assert info.value.key == "benchmark.image"
    check(compose_cfg, "benchmark=multimodal", "benchmark.image=https://example.com/a.png", host_checks=True)


def test_wrk_always_needs_wrk_on_path(compose_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        check(
            compose_cfg, "benchmark=rps", "benchmark.input_len=512", "benchmark.wrk=always", host_checks=True
        )
    assert info.value.key == "benchmark.wrk" and "apt-get install -y wrk" in str(info.value)
    check(compose_cfg, "benchmark=rps", "benchmark.input_len=512", "benchmark.wrk=auto", host_checks=True)


def test_offline_binds_no_port_so_a_busy_one_is_fine(compose_cfg) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        check(compose_cfg, "benchmark=offline_throughput", f"engine.port={port}", host_checks=True)
        with pytest.raises(ConfigError) as info:
            check(compose_cfg, "benchmark=smoke", f"engine.port={port}", host_checks=True)
    assert info.value.key == "engine.port"
