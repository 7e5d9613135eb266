"""engine=external: llmstack benchmarks a server it did not start, and leaves it running.

The server is a real one, our lightweight worker on the tiny model on loopback (started and stopped by the
test, as the other integration tests do); llmstack runs as a subprocess against its URL. Without a server:
the dry run, the config errors (offline_throughput, a bad URL, keys that mean nothing here) and a URL where
nothing answers (readiness fails at its timeout, exit 3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmstack.config.schema import ModelConfig, RunConfig
from llmstack.engines.external import ExternalEngine, ExternalEngineConfig, adopt_endpoint
from llmstack.errors import ConfigError
from tests.lightweight_worker import API_KEY, Worker, start_worker
from tests.procs import free_port

KEY_ENVS = ("LLMSTACK_API_KEY", "OPENAI_API_KEY")


def llmstack(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    clean = {k: v for k, v in os.environ.items() if k not in KEY_ENVS}
    flags = [a for a in args if a.startswith("-")]  # Hydra's (-m) go before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run(
        [sys.executable, "-m", "llmstack", *flags, "engine=external", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def written_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# -- without a server ------------------------------------------------------------------------------------
def test_dry_run_says_what_it_would_benchmark_and_starts_nothing(tmp_path: Path) -> None:
    out = llmstack("engine.url=http://10.1.2.3:8123/v1/", "engine.api_key=s3cret-key", "dry_run=true",
                   f"results_dir={tmp_path}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "engine=external at http://10.1.2.3:8123," in out.stdout  # /v1 and the slash dropped
    assert "Nothing is started" in out.stdout and "the one model /v1/models lists" in out.stdout
    assert "s3cret-key" not in out.stdout + out.stderr
    assert written_files(tmp_path) == []


def test_offline_throughput_is_refused(tmp_path: Path) -> None:
    out = llmstack("benchmark=offline_throughput", f"results_dir={tmp_path}")
    assert out.returncode == 2, out.stderr
    assert "benchmark=offline_throughput" in out.stderr and "needs a local engine" in out.stderr
    assert "Valid choices: smoke, online, multimodal, rps" in out.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [("engine.url=ftp://host:1", "engine.url"), ("engine.url=http://:80", "engine.url"),
     ("engine.extra_args=[--x]", "engine.extra_args"), ("benchmark=none", "benchmark")],
)  # fmt: skip
def test_what_cannot_apply_to_a_running_server_is_a_config_error(override: str, key: str) -> None:
    out = llmstack(override, "dry_run=true")
    assert out.returncode == 2, out.stderr
    assert f"Invalid config: {key}=" in out.stderr


def test_nothing_answering_fails_readiness_at_its_timeout(tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}"
    out = llmstack(f"engine.url={url}", "engine.startup_timeout_s=2", f"results_dir={tmp_path}")
    assert out.returncode == 3, out.stderr
    assert time.monotonic() - started < 30
    assert f"the external server at http://127.0.0.1:{port} was not ready after 2 s" in out.stderr
    assert "Connection refused" in out.stderr and "engine.url" in out.stderr
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert (summary["status"], summary["phase"], summary["exit_code"]) == ("failed", "startup", 3)


def _run_with(engine: ExternalEngineConfig, model: ModelConfig | None = None) -> RunConfig:
    return RunConfig(engine=engine, model=model or ModelConfig(name="tiny", served_name="tiny"))


def test_the_served_name_is_discovered_only_when_one_model_is_listed() -> None:
    from llmstack.serving.plan import LaunchPlan, ReadyProbe

    engine = ExternalEngine()
    plan = LaunchPlan("external", (), {}, ReadyProbe("http://h:1", ""), external=True)
    one = {"data": [{"id": "qwen", "max_model_len": 4096, "root": "/not/here"}]}
    run, adopted = adopt_endpoint(_run_with(ExternalEngineConfig(url="http://h:1")), plan, one)
    assert adopted.probe.served_name == "qwen" and run.engine.served_model_name == "qwen"
    assert run.engine.max_model_len == 4096
    # The model group (tiny) is not what is served: its tokenizer would make wrong prompt lengths.
    assert (run.model.name, run.model.path) == ("qwen", None)
    named = ExternalEngineConfig(url="http://h:1", served_model_name="tiny", max_model_len=512)
    run, _ = adopt_endpoint(_run_with(named), plan, {"data": [{"id": "tiny", "max_model_len": 1024}]})
    assert run.engine.max_model_len == 512 and run.model.name == "tiny"
    two = {"data": [{"id": "a"}, {"id": "b"}]}
    with pytest.raises(ConfigError, match=r"engine.served_model_name=None: .* lists 2 models.*: a, b"):
        adopt_endpoint(_run_with(ExternalEngineConfig(url="http://h:1")), plan, two)
    wrong = ExternalEngineConfig(url="http://h:1", served_model_name="c")
    with pytest.raises(ConfigError, match=r"served_model_name=c: is not served .* Valid choices: a, b"):
        adopt_endpoint(_run_with(wrong), plan, two)
    assert engine.plan(_run_with(wrong)).external


# -- against a real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """Our worker with an API key (test-key): llmstack must find it in the environment."""
    yield from start_worker(tmp_path_factory)


def assert_still_serving(worker: Worker) -> None:
    assert worker.proc.alive(), "llmstack stopped a server it did not start"
    answer = worker.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text


@pytest.mark.integration
def test_benchmarks_a_running_server_and_leaves_it_running(worker: Worker, tmp_path: Path) -> None:
    out = llmstack(f"engine.url={worker.base_url}", "benchmark=smoke", "benchmark.num_prompts=8",
                   f"results_dir={tmp_path}", "experiment_name=ext",
                   env={"LLMSTACK_API_KEY": API_KEY})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next((tmp_path / "ext").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["engine"], summary["model"]) == ("ok", "external", "tiny")
    assert summary["external"]["url"] == worker.base_url
    assert [m["id"] for m in summary["external"]["models"]["data"]] == ["tiny"]  # the name was discovered
    assert summary["external"]["health_path"] == "/health" and "engine_pid" not in summary
    level = json.loads((run_dir / "bench-c4" / "result.json").read_text())
    assert level["completed"] == 8 and level["failed"] == 0
    assert level["model_id"] == "tiny"
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["external_server"]["models"] == summary["external"]["models"]
    assert json.loads((run_dir / "plan.json").read_text())["external"] is True
    for path in written_files(tmp_path):
        assert API_KEY not in path.read_text(errors="replace"), f"the API key was written to {path}"
    assert_still_serving(worker)


@pytest.mark.integration
def test_a_grid_over_concurrency_with_the_key_from_openai_api_key(worker: Worker, tmp_path: Path) -> None:
    out = llmstack("-m", f"engine.url={worker.base_url}", "benchmark=smoke", "benchmark.num_prompts=4",
                   "benchmark.warmup_requests=1", "benchmark.concurrency=1,2", f"results_dir={tmp_path}",
                   "experiment_name=grid", env={"OPENAI_API_KEY": API_KEY})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "grid").rglob("summary.json")]
    levels = [lvl["label"] for s in summaries for lvl in s.get("benchmark", {}).get("levels", [])]
    assert sorted(levels) == ["c1", "c2"]
    assert all(s["status"] == "ok" and s["engine"] == "external" for s in summaries if "engine" in s)
    for path in written_files(tmp_path):
        assert API_KEY not in path.read_text(errors="replace"), f"the API key was written to {path}"
    assert_still_serving(worker)


@pytest.mark.integration
def test_without_the_key_readiness_fails_at_once(worker: Worker, tmp_path: Path) -> None:
    started = time.monotonic()
    out = llmstack(f"engine.url={worker.base_url}", f"results_dir={tmp_path}")
    assert out.returncode == 3, out.stderr
    assert time.monotonic() - started < 30  # not the 60 s timeout: a 401 does not change by waiting
    assert "answered GET /v1/models with 401" in out.stderr and "LLMSTACK_API_KEY" in out.stderr
    assert_still_serving(worker)


@pytest.mark.integration
def test_a_name_the_server_does_not_serve_names_the_ones_it_does(worker: Worker, tmp_path: Path) -> None:
    out = llmstack(f"engine.url={worker.base_url}", "engine.served_model_name=llama",
                   f"results_dir={tmp_path}", env={"LLMSTACK_API_KEY": API_KEY})  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "engine.served_model_name=llama: is not served at" in out.stderr
    assert "Valid choices: tiny" in out.stderr
    assert_still_serving(worker)


@pytest.mark.integration
def test_rps_against_a_running_server(worker: Worker, tmp_path: Path) -> None:
    out = llmstack(f"engine.url={worker.base_url}", "benchmark=rps", "benchmark.input_len=32",
                   "benchmark.output_len=4", "benchmark.connections=2", "benchmark.duration_s=2",
                   "benchmark.wrk_threads=1", f"results_dir={tmp_path}", "experiment_name=rps",
                   env={"LLMSTACK_API_KEY": API_KEY})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next((tmp_path / "rps").rglob("bench-c2/result.json")).read_text())
    assert result["completed"] > 0 and result["failed"] == 0 and result["model_id"] == "tiny"
    for path in written_files(tmp_path):  # wrk's payload.lua and its command line included
        assert API_KEY not in path.read_text(errors="replace"), f"the API key was written to {path}"
    assert_still_serving(worker)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Real vLLM on CPU, serving the tiny model under another name than the model group's."""
    from hydra import compose, initialize_config_dir

    from llmstack.cli import CONFIG_DIR
    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.config.store import register_schemas
    from llmstack.devices import Inventory
    from llmstack.engines import get_engine
    from llmstack.models.tiny import ensure_tiny_model
    from llmstack.serving.supervisor import ServerProcess

    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "device=cpu", f"engine.port={free_port()}", "engine.enforce_eager=true",
            "engine.served_model_name=tiny-elsewhere",
        ])  # fmt: skip
    run = resolve(to_run_config(cfg), Path(CONFIG_DIR), Inventory())
    ensure_tiny_model()
    plan = get_engine("vllm").plan(run)
    proc = ServerProcess(plan, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        proc.start()
        proc.wait_ready()
        yield plan.probe.base_url
        assert proc.alive(), "llmstack stopped a vLLM it did not start"
    finally:
        proc.stop()


@pytest.mark.integration
def test_real_vllm_name_context_and_version_come_from_the_server(vllm_server: str, tmp_path: Path) -> None:
    out = llmstack(f"engine.url={vllm_server}/v1", "benchmark=smoke", "benchmark.num_prompts=4",
                   f"results_dir={tmp_path}", "experiment_name=vllm")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next((tmp_path / "vllm").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["model"] == "tiny-elsewhere"
    assert summary["external"]["version"]["version"]  # vLLM's /version
    assert summary["external"]["models"]["data"][0]["max_model_len"] == 1024
    config = (run_dir / "config.yaml").read_text()
    assert "max_model_len: 1024" in config and "served_model_name: tiny-elsewhere" in config
    level = json.loads((run_dir / "bench-c4" / "result.json").read_text())
    assert level["completed"] == 4 and level["model_id"] == "tiny-elsewhere"
    # vLLM's `root` (the weights it serves) is a local directory here: its tokenizer makes lengths exact.
    assert level["total_input_tokens"] == 4 * 32


@pytest.mark.integration
def test_health_checks_are_http_checks_of_the_endpoint(worker: Worker) -> None:
    from llmstack.errors import EngineError
    from llmstack.serving.external import ExternalServer
    from llmstack.serving.plan import LaunchPlan, ReadyProbe

    probe = ReadyProbe(worker.base_url, "tiny", api_key=API_KEY, timeout_s=10)
    with ExternalServer(LaunchPlan("external", (), {}, probe, external=True)) as server:
        assert server.pid is None and server.log_tail() == []
        server.wait_ready()
        assert server.facts["health_path"] == "/health" and server.health_problem() is None
        server.check_healthy("after load level c1")
    assert_still_serving(worker)  # leaving the block stopped nothing
    gone = ReadyProbe(f"http://127.0.0.1:{free_port()}", "tiny", timeout_s=10)
    unreachable = ExternalServer(LaunchPlan("external", (), {}, gone, external=True))
    with pytest.raises(EngineError, match=r"not healthy after load level c1: GET /v1/models failed"):
        unreachable.check_healthy("after load level c1")
