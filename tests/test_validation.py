"""Every validation rule with a bad input: the key named, the reason and choices given, nothing started."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.devices import Inventory
from llmstack.errors import ConfigError
from llmstack.validation import validate

CPU_ONLY = Inventory()


def check(compose_cfg, *overrides: str, inventory: Inventory = CPU_ONLY, host_checks: bool = False) -> None:
    run = resolve(to_run_config(compose_cfg(*overrides)), Path(CONFIG_DIR), inventory)
    validate(run, Path(CONFIG_DIR), host_checks=host_checks)


@pytest.mark.parametrize(
    ("overrides", "key", "fragments"),
    [
        (["low_bit=sym_int4"], "low_bit", ["sym_int4", "upstream", "cpu", "Valid choices: bf16, fp16, none"]),
        (["low_bit=fp8", "device=cuda", "device.count=1"], "low_bit", ["e5m2", "fp8_e4m3"]),
        (["low_bit=fp8_e4m3"], "low_bit", ["Valid choices: bf16, fp16, none"]),
        (["engine=vllm_ipex"], "device", ["xpu", "Intel GPUs"]),
        (["engine=vllm_ipex", "device=xpu", "device.count=1", "low_bit=none"], "low_bit", ["11330"]),
        (["engine.tensor_parallel_size=2"], "engine.tensor_parallel_size", ["2 x 1 = 2", "has 1"]),
        (
            [
                "device=xpu",
                "device.count=2",
                "engine.tensor_parallel_size=2",
                "engine.pipeline_parallel_size=2",
            ],
            "engine.tensor_parallel_size",
            ["2 x 2 = 4", "has 2"],
        ),
        (
            ["device=cuda", "device.count=4", "device.ids=[0]", "engine.tensor_parallel_size=2"],
            "engine.tensor_parallel_size",
            ["has 1"],
        ),
        (
            ["engine.enable_chunked_prefill=false", "engine.max_num_batched_tokens=512"],
            "engine.max_num_batched_tokens",
            [">= engine.max_model_len (1024)", "chunked prefill"],
        ),
        (
            ["engine=vllm_ipex", "device=xpu", "device.count=1", "engine.max_model_len=4096"],
            "engine.max_num_batched_tokens",
            ["3000", "4096"],
        ),
        (["engine.port=70000"], "engine.port", ["0-65535"]),
        (["engine.max_num_seqs=0"], "engine.max_num_seqs", ["at least 1"]),
        (["engine.gpu_memory_utilization=1.5"], "engine.gpu_memory_utilization", ["(0, 1]"]),
        (["engine.block_size=12"], "engine.block_size", ["Valid choices: 1, 8, 16, 32, 64, 128"]),
        (["engine.flavour=nightly"], "engine.flavour", ["Valid choices: ipex, upstream"]),
        (["engine.disable_async_output_proc=true"], "engine.disable_async_output_proc", ["V0"]),
        (["low_bit=fp16", "engine.dtype=bfloat16"], "engine.dtype", ["float16"]),
        (["device.name=tpu"], "device", ["Valid choices: auto, cpu, xpu, cuda"]),
        (["benchmark.endpoint=embeddings"], "benchmark.endpoint", ["completions, chat"]),
        (["benchmark.concurrency=[4,0]"], "benchmark.concurrency", ["at least 1"]),
        (["benchmark.input_len=1000", "benchmark.output_len=100"], "benchmark.input_len", ["1100", "1024"]),
        (["model=local"], "model.path", ["required"]),
    ],
)
def test_config_rule(compose_cfg, overrides: list[str], key: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, *overrides)
    assert info.value.key == key
    for fragment in fragments:
        assert fragment in str(info.value)


def test_valid_configs_pass(compose_cfg) -> None:
    check(compose_cfg)
    check(compose_cfg, "engine=vllm_ipex", "device=xpu", "device.count=2", "engine.tensor_parallel_size=2",
          "model=qwen14b")  # fmt: skip
    check(
        compose_cfg,
        "low_bit=bf16",
        "engine.enable_chunked_prefill=false",
        "engine.max_num_batched_tokens=1024",
    )


def test_port_in_use(compose_cfg) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            check(compose_cfg, f"engine.port={port}", host_checks=True)
    assert info.value.key == "engine.port" and "already in use" in str(info.value)


def test_model_path_missing(compose_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, "model=local", f"model.path={tmp_path / 'nope'}", host_checks=True)
    assert info.value.key == "model.path" and "does not exist" in str(info.value)


def test_checked_in_model_without_weights(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSTACK_MODELS", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, "model=llama3_8b", host_checks=True)
    assert info.value.value == f"{tmp_path}/Meta-Llama-3-8B-Instruct"


def test_interpreter_missing(compose_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, f"engine.python={tmp_path / 'python9'}", host_checks=True)
    assert info.value.key == "engine.python" and "not an executable" in str(info.value)


def test_interpreter_without_vllm(compose_cfg, tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, f"engine.python={fake}", host_checks=True)
    assert "cannot import 'vllm'" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["low_bit=sym_int4"], "Invalid config: low_bit=sym_int4"),
        (["engine.tensor_parallel_size=4"], "Invalid config: engine.tensor_parallel_size=4"),
        (["model=local", "model.path=/nonexistent/model"], "Invalid config: model.path=/nonexistent/model"),
        (["engine.python=/nonexistent/python"], "Invalid config: engine.python=/nonexistent/python"),
        (["engine.max_num_seqs=-1"], "Invalid config: engine.max_num_seqs=-1"),
        (
            ["profile=cpu", "engine=lightweight"],
            "profile=cpu is written for engine=vllm and sets engine.cpu_kvcache_space_gib, engine.enforce",
        ),
    ],
)
def test_cli_exit_2_one_paragraph_nothing_started(
    llmstack_cmd: list[str], tmp_path: Path, overrides: list[str], fragment: str
) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [*llmstack_cmd, *overrides, "device=cpu", f"results_dir={results}"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "LLMSTACK_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not results.exists(), "a run directory was created for a rejected config"
    assert not (tmp_path / "cache" / "models").exists(), "the tiny model was generated for a rejected config"


def test_full_error_shows_traceback(llmstack_cmd: list[str]) -> None:
    done = subprocess.run(
        [*llmstack_cmd, "low_bit=sym_int4", "device=cpu"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "LLMSTACK_FULL_ERROR": "1"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_profile_engine_conflict_only_for_keys_the_engine_lacks() -> None:
    from llmstack.cli import CONFIG_DIR
    from llmstack.validation.profile_engine import profile_engine_conflict

    error = profile_engine_conflict(CONFIG_DIR, ["profile=arc_a770", "engine=lightweight", "model=qwen14b"])
    assert error is not None and error.key == "engine" and error.value == "lightweight"
    assert error.choices == ["vllm", "vllm_ipex"]  # the engines whose keys the profile sets
    # Engines of the profile's own schema, sweeps, and options Hydra will reject itself: not ours to judge.
    for overrides in (["profile=arc_a770", "engine=vllm"], ["profile=cpu", "engine=vllm,lightweight"],
                      ["profile=nope", "engine=lightweight"], ["engine=lightweight"]):  # fmt: skip
        assert profile_engine_conflict(CONFIG_DIR, overrides) is None, overrides
