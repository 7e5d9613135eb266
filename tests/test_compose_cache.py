"""The compose cache: a repeated command line skips Hydra, with exactly the same result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config import compose_cache


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["engine=vllm", "engine.max_num_seqs=8", "+engine.extra_env.A=1"], True),
        ([], True),
        (["-m", "engine.max_num_seqs=8,16"], False),
        (["--cfg", "job"], False),
        (["hydra.run.dir=/tmp/x"], False),
        (["--config-dir=/etc/llmstack"], False),
    ],
)
def test_only_plain_overrides_are_cached(args: list[str], expected: bool) -> None:
    assert compose_cache.cacheable(args) is expected


def test_key_changes_with_any_config_file(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    before = compose_cache.cache_key(configs, ["device=cpu"])
    assert compose_cache.cache_key(configs, ["device=cpu"]) == before
    assert compose_cache.cache_key(configs, ["device=xpu"]) != before
    target = configs / "engine" / "vllm.yaml"
    target.write_text(target.read_text().replace("startup_timeout_s: 900", "startup_timeout_s: 901"))
    assert compose_cache.cache_key(configs, ["device=cpu"]) != before


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmstack", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_second_run_skips_hydra_and_renders_the_same_plan(tmp_path: Path) -> None:
    env = {**os.environ, "LLMSTACK_CACHE": str(tmp_path), "LLMSTACK_MODELS": "/models/a"}
    args = ["model=qwen2_5_7b", "device=cpu", "engine.max_num_seqs=8", "dry_run=true"]
    first, second = _run(args, env), _run(args, env)
    assert first.returncode == second.returncode == 0, first.stderr[-2000:]
    assert "| hydra\n" in first.stderr and "| hydra\n" not in second.stderr
    assert first.stdout == second.stdout
    # The cache holds the config unresolved: the environment is read again at each run.
    third = _run(args, {**env, "LLMSTACK_MODELS": "/models/b"})
    assert "--model /models/b/Qwen2.5-7B-Instruct" in third.stdout
    assert "| hydra\n" not in third.stderr


def test_errors_are_the_same_from_the_cache(tmp_path: Path) -> None:
    env = {**os.environ, "LLMSTACK_CACHE": str(tmp_path)}
    args = ["device=cpu", "low_bit=fp6"]
    first, second = _run(args, env), _run(args, env)
    assert first.returncode == second.returncode == 2
    assert "| hydra\n" not in second.stderr
    message = [line for line in first.stderr.splitlines() if line.startswith("llmstack:")]
    assert message == [line for line in second.stderr.splitlines() if line.startswith("llmstack:")]
