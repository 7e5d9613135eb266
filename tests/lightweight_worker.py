"""A lightweight worker started from a composed config through the supervisor, for the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.devices import Inventory
from llmstack.engines import get_engine
from llmstack.models.tiny import ensure_tiny_model
from llmstack.serving.supervisor import ServerProcess
from llmstack.validation import validate
from tests.procs import free_port, port_is_free, wait_no_processes

MARK_KEY = "LLMSTACK_TEST_MARK"
API_KEY = "test-key"


@dataclass
class Worker:
    proc: ServerProcess
    base_url: str

    def client(self):  # the official OpenAI client
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=API_KEY, max_retries=0)

    def post(self, path: str, body: object, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        return httpx.post(self.base_url + path, json=body, headers=headers, timeout=60, **kwargs)


def start_worker(
    tmp_path_factory: pytest.TempPathFactory, *overrides: str, engine: str = "lightweight"
) -> Iterator[Worker]:
    """A worker of `engine` (lightweight, or pp: the pipeline, whose rank 0 serves the same API)."""
    from hydra import compose, initialize_config_dir

    from llmstack.config.store import register_schemas

    mark = uuid.uuid4().hex
    port = free_port()
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"engine={engine}", "device=cpu", f"engine.port={port}", f"engine.api_key={API_KEY}",
                       "engine.torch_threads=1", f"+engine.extra_env.{MARK_KEY}={mark}", *overrides],
        )  # fmt: skip
    run = resolve(to_run_config(cfg), Path(CONFIG_DIR), Inventory())
    ensure_tiny_model()
    validate(run, Path(CONFIG_DIR))
    plan = get_engine(engine).plan(run)
    proc = ServerProcess(plan, tmp_path_factory.mktemp("worker") / "server.log")
    try:
        proc.start()
        proc.wait_ready()
        yield Worker(proc, plan.probe.base_url)
    finally:
        proc.stop()
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == [], "worker processes survived stop()"
    assert port_is_free(port)
