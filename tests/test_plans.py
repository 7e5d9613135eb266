"""Golden launch plans: argv and environment per engine flavour and device, checked against the seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.devices import Inventory
from llmstack.engines import get_engine
from llmstack.serving.plan import LaunchPlan

# docker/llm/serving/xpu/docker/start-vllm-service.sh (final), with its defaults substituted.
SEED_COMMAND = """python -m ipex_llm.vllm.xpu.entrypoints.openai.api_server
  --served-model-name Qwen1.5-14B-Chat --port 8000 --model /llm/models/Qwen1.5-14B-Chat
  --trust-remote-code --block-size 8 --gpu-memory-utilization 0.95
  --device xpu --dtype float16 --enforce-eager
  --load-in-low-bit fp8
  --max-model-len 2000 --max-num-batched-tokens 3000
  --max-num-seqs 256 --tensor-parallel-size 1
  --disable-async-output-proc --distributed-executor-backend ray"""
SEED_ENV = {
    "USE_XETLA": "OFF",
    "SYCL_CACHE_PERSISTENT": "1",
    "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS": "2",
    "FI_PROVIDER": "shm",
    "TORCH_LLM_ALLREDUCE": "0",
    "CCL_WORKER_COUNT": "2",
    "CCL_ATL_TRANSPORT": "ofi",
    "CCL_ZE_IPC_EXCHANGE": "sockets",
    "CCL_ATL_SHM": "1",
    "CCL_SAME_STREAM": "1",
    "CCL_BLOCKING_WAIT": "0",
    "VLLM_USE_V1": "0",
    "IPEX_LLM_LOWBIT": "fp8",
    "CCL_DG2_ALLREDUCE": "1",  # from /opt/intel/1ccl-wks/setvars.sh, which the script sources
}


def flags(argv: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """--flag value pairs (None for switches) after `python -m module`."""
    out: dict[str, str | None] = {}
    rest = list(argv[3:])
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), flag
        out[flag] = rest.pop(0) if rest and not rest[0].startswith("--") else None
    return out


def plan_for(compose_cfg, *overrides: str, inventory: Inventory | None = None) -> LaunchPlan:
    run = resolve(to_run_config(compose_cfg(*overrides)), Path(CONFIG_DIR), inventory or Inventory())
    return get_engine(run.engine.name).plan(run)


def test_ipex_flavour_renders_the_seed_script(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSTACK_MODELS", raising=False)
    plan = plan_for(
        compose_cfg, "engine=vllm_ipex", "model=qwen14b", "device=xpu", inventory=Inventory(xpu=1)
    )
    assert plan.argv[1:3] == ("-m", "ipex_llm.vllm.xpu.entrypoints.openai.api_server")
    ours, seed = flags(plan.argv), flags(SEED_COMMAND.split())
    assert {k: ours.get(k, "<missing>") for k in seed} == seed
    # What we add on top of the seed: loopback by default, and pp=1 spelled out.
    assert set(ours) - set(seed) == {"--host", "--pipeline-parallel-size"}
    assert ours["--host"] == "127.0.0.1"
    assert {k: plan.env.get(k) for k in SEED_ENV} == SEED_ENV


def test_upstream_cpu_golden(compose_cfg) -> None:
    plan = plan_for(compose_cfg, "device=cpu", "engine.max_num_seqs=64")
    model_dir = plan.argv[plan.argv.index("--model") + 1]
    assert plan.argv == (
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", "8000",
        "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
        "--max-model-len", "1024", "--max-num-seqs", "64", "--dtype", "auto",
    )  # fmt: skip
    assert model_dir.endswith("models/tiny-llama-v1")
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert plan.probe.base_url == "http://127.0.0.1:8000" and plan.probe.served_name == "tiny"


def test_upstream_cuda_tp2_fp8(compose_cfg, tmp_path: Path) -> None:
    plan = plan_for(
        compose_cfg,
        "model=local", f"model.path={tmp_path}", "device=cuda", "device.ids=[2,3]",
        "engine.tensor_parallel_size=2", "low_bit=fp8_e4m3", "engine.gpu_memory_utilization=0.9",
        inventory=Inventory(cuda=4),
    )  # fmt: skip
    f = flags(plan.argv)
    assert f["--tensor-parallel-size"] == "2" and f["--quantization"] == "fp8"
    assert f["--gpu-memory-utilization"] == "0.9" and f["--model"] == str(tmp_path)
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_upstream_xpu_env_and_dtype(compose_cfg) -> None:
    plan = plan_for(
        compose_cfg, "device=xpu", "low_bit=fp16", "device.ids=[0,1]", "engine.tensor_parallel_size=2",
        "engine.block_size=64", inventory=Inventory(xpu=2),
    )  # fmt: skip
    f = flags(plan.argv)
    assert f["--dtype"] == "float16" and f["--block-size"] == "64" and "--device" not in f
    assert plan.env == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "ZE_AFFINITY_MASK": "0,1"}


@pytest.mark.parametrize(
    "low_bit", ["sym_int4", "asym_int4", "sym_int8", "woq_int4", "fp8", "fp8_e4m3", "fp6", "fp16"]
)
def test_ipex_low_bit_flag_and_env_agree(compose_cfg, low_bit: str) -> None:
    plan = plan_for(
        compose_cfg, "engine=vllm_ipex", "device=xpu", f"low_bit={low_bit}", inventory=Inventory(xpu=1)
    )
    assert flags(plan.argv)["--load-in-low-bit"] == low_bit
    assert plan.env["IPEX_LLM_LOWBIT"] == low_bit


def test_api_key_travels_in_env_and_is_masked(compose_cfg) -> None:
    plan = plan_for(compose_cfg, "device=cpu", "engine.api_key=s3cret", "engine.extra_args=[--seed,7]")
    assert "s3cret" not in " ".join(plan.argv)
    assert plan.env["VLLM_API_KEY"] == "s3cret" and plan.probe.api_key == "s3cret"
    assert "s3cret" not in plan.shell_command() and "s3cret" not in str(plan.to_dict())
    assert plan.argv[-2:] == ("--seed", "7")


def test_user_env_wins_over_engine_env(compose_cfg) -> None:
    plan = plan_for(compose_cfg, "device=cpu", "+engine.extra_env.VLLM_CPU_KVCACHE_SPACE=5")
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "5"


def test_dry_run_prints_plan_and_starts_nothing(llmstack_cmd: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [*llmstack_cmd, "engine=vllm", "model=tiny", "engine.max_num_seqs=64", "dry_run=true",
         f"results_dir={tmp_path / 'results'}"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "LLMSTACK_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "-m vllm.entrypoints.openai.api_server" in done.stdout
    assert "--max-num-seqs 64" in done.stdout and "export VLLM_CPU_KVCACHE_SPACE=2" in done.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache" / "models").exists()
