"""engine=external: benchmark an OpenAI-compatible server that is already running; nothing is started.

The plan holds only the probe (URL, served name, API key) and `external=True`, which makes the run use
`llmstack.serving.external.ExternalServer`: it waits until the server answers, checks its health over HTTP
after each load level, and stops nothing. What llmstack cannot know before it asks the server is filled in
once it answers (`adopt_endpoint`): the served name when engine.served_model_name is null (the one model
`/v1/models` lists), and the context length when engine.max_model_len is null (vLLM's `max_model_len` in
that answer). The model group then only helps with prompts: where its served name is the one served, its
tokenizer makes prompt lengths exact.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from llmstack.config.schema import EngineConfig, LowBitConfig, ModelArchitecture, RunConfig
from llmstack.errors import ConfigError
from llmstack.serving.plan import LaunchPlan, ReadyProbe

# Where a key comes from when engine.api_key is null, first found wins (OpenAI's clients read the last).
API_KEY_ENVS = ("LLMSTACK_API_KEY", "OPENAI_API_KEY")
# Phases that measure a server over HTTP; offline_throughput runs an engine in-process instead.
HTTP_BENCHMARKS = ("smoke", "online", "multimodal", "rps", "capacity")


@dataclass
class ExternalEngineConfig(EngineConfig):
    """A server started outside llmstack. Of the base's keys only served_model_name, max_model_len,
    api_key and startup_timeout_s mean something here (host and port only build the default URL);
    configs/engine/external.yaml documents them."""

    name: str = "external"
    # http(s)://host:port of the server (a trailing /v1 is dropped); None: http://{host}:{port}.
    url: Optional[str] = None
    # Seconds to wait until the server answers /v1/models.
    startup_timeout_s: float = 60.0


class ExternalEngine:
    name = "external"
    launches = False

    def default_low_bit(self, engine_cfg: ExternalEngineConfig) -> str:
        return "none"  # the server serves what it was started with; llmstack cannot change it

    def resolve(self, run: RunConfig) -> ExternalEngineConfig:
        e: ExternalEngineConfig = run.engine
        url = e.url if e.url is not None else f"http://{_url_host(e.host)}:{e.port}"
        url = url.rstrip("/")
        url = url.removesuffix("/v1").rstrip("/")
        api_key = e.api_key or next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)
        return dataclasses.replace(e, url=url, api_key=api_key)

    def low_bit_problem(self, run: RunConfig, low_bit: LowBitConfig) -> str | None:
        return None  # not ours to check: the server runs what it runs (low_bit only labels the results)

    def check(self, run: RunConfig) -> list[ConfigError]:
        from llmstack.phases.registry import needs_server

        e: ExternalEngineConfig = run.engine
        errors: list[ConfigError] = []
        parts = urlsplit(str(e.url))
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            errors.append(
                ConfigError(
                    "engine.url",
                    e.url,
                    "is not the http(s) URL of a server.",
                    hint="Give it as engine.url=http://HOST:PORT (the part before /v1).",
                )
            )
        bench = run.benchmark
        if not needs_server(bench.phase):
            errors.append(
                ConfigError(
                    "benchmark",
                    bench.name,
                    f"runs the engine in-process (the {bench.phase} phase), so it needs a local engine, not "
                    "a server that is already running.",
                    HTTP_BENCHMARKS,
                    hint="Use engine=vllm for it, or an HTTP benchmark against engine.url.",
                )
            )
        elif bench.phase == "none":
            errors.append(
                ConfigError(
                    "benchmark",
                    bench.name,
                    "serves until interrupted; with engine=external llmstack serves nothing, so there is "
                    "nothing to do.",
                    HTTP_BENCHMARKS,
                )
            )
        for key, value, empty in (
            ("engine.python", e.python, None),
            ("engine.extra_args", e.extra_args, []),
            ("engine.extra_env", e.extra_env, {}),
        ):
            if value != empty:
                reason = "means nothing for engine=external: llmstack starts no process."
                errors.append(ConfigError(key, value, reason, hint="Leave it unset; the server has its own."))
        return errors

    def device_problems(
        self, run: RunConfig, low_bits: Callable[[], Sequence[LowBitConfig]]
    ) -> Iterator[ConfigError]:
        return iter(())  # the server's devices are not this machine's business

    def memory_summary(self, run: RunConfig) -> str | None:
        return None

    def required_module(self, run: RunConfig) -> str:
        return "httpx"  # the launcher's own readiness probe; no engine interpreter runs here

    def plan(self, run: RunConfig) -> LaunchPlan:
        e: ExternalEngineConfig = run.engine
        return LaunchPlan(
            engine="external",
            argv=(),
            env={},
            probe=ReadyProbe(
                base_url=str(e.url),
                served_name=e.served_model_name or "",
                api_key=e.api_key,
                timeout_s=e.startup_timeout_s,
            ),
            external=True,
        )


def adopt_endpoint(run: RunConfig, plan: LaunchPlan, models: dict[str, Any]) -> tuple[RunConfig, LaunchPlan]:
    """The run and plan with what the server's `/v1/models` answer says: the served name (the one listed
    when engine.served_model_name is null), its context length when engine.max_model_len is null, and the
    model the prompts are made for. ConfigError when the name cannot be settled."""
    e: ExternalEngineConfig = run.engine
    cards = [m for m in models.get("data") or [] if isinstance(m, dict) and m.get("id") is not None]
    ids = [str(m["id"]) for m in cards]
    served = e.served_model_name
    if served is None:
        if len(ids) != 1:
            many = f"lists {len(ids)} models" if ids else "lists no model"
            raise ConfigError(
                "engine.served_model_name",
                None,
                f"cannot be discovered: the server at {e.url} {many} in /v1/models.",
                ids,
                hint="Name the one to benchmark: engine.served_model_name=NAME." if ids else None,
            )
        served = ids[0]
    elif served not in ids:
        raise ConfigError(
            "engine.served_model_name", served, f"is not served at {e.url} (its /v1/models).", ids
        )
    card = cards[ids.index(served)]
    reported = card.get("max_model_len")
    context = e.max_model_len or (reported if isinstance(reported, int) and reported > 0 else None)
    model = run.model
    if served not in (model.served_name, model.name):
        # The model group describes another model: what the server says (`root`, vLLM's and our worker's
        # weights path) is the only tokenizer there may be; none found: prompt lengths are approximate.
        root = card.get("root")
        local = isinstance(root, str) and (Path(root) / "tokenizer.json").is_file()
        model = dataclasses.replace(
            model, name=served, served_name=served, path=root if local else None, generator=None,
            hf_id=None, arch=ModelArchitecture(), max_model_len=context or model.max_model_len,
        )  # fmt: skip
    engine = dataclasses.replace(e, served_model_name=served, max_model_len=context)
    adopted = dataclasses.replace(run, engine=engine, model=model)
    return adopted, dataclasses.replace(plan, probe=dataclasses.replace(plan.probe, served_name=served))


def describe_dry_run(run: RunConfig, plan: LaunchPlan) -> str:
    e: ExternalEngineConfig = run.engine
    probe = plan.probe
    served = f"'{probe.served_name}'" if probe.served_name else "the one model /v1/models lists"
    context = (
        f"engine.max_model_len={e.max_model_len}"
        if e.max_model_len
        else "the max_model_len /v1/models reports (none: not checked)"
    )
    return "\n".join(
        [
            f"# llmstack dry run: engine=external at {probe.base_url}, benchmark={run.benchmark.name}",
            "# Nothing is started, now or later, and nothing is stopped: the server is already running.",
            f"# Ready when GET {probe.base_url}{probe.models_path} answers 200 (and {probe.health_path} "
            f"where the server has one), within {probe.timeout_s:g} s (engine.startup_timeout_s).",
            f"# Benchmarks {served}, context {context}; "
            + ("an API key is sent (***)." if probe.api_key else "no API key is sent."),
        ]
    )


def _url_host(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host
