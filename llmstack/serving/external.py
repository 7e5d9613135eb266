"""A server that llmstack did not start (engine=external): the run's server object for it, over HTTP only.

It has the interface the run and the phases use of `ServerProcess` (wait_ready, health_problem,
check_healthy, alive, log_tail, stop, a context manager), but starts nothing and stops nothing: llmstack
never owns, signals or kills a process here. Ready means: `/v1/models` answers 200 with a model list, and
`/health` answers 200 where the server has one (a 404 there: it has none, and `/v1/models` is the health
check). What the server says about itself (its `/v1/models` answer, `/version` where it has one) is kept in
`facts` for the run's records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from llmstack import interrupts
from llmstack.errors import EngineError
from llmstack.progress import StatusLine
from llmstack.serving.plan import LaunchPlan

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

_HTTP_TIMEOUT_S = 5.0
# Answers that no amount of waiting changes: fail at once instead of at the timeout.
_FINAL_STATUSES = {401: "it needs an API key (or another one)", 403: "the API key is refused"}


class ExternalServer:
    # No process of ours: nothing to record, signal or wait for.
    pid = None
    log_path = None
    log_error = None
    log_dropped_bytes = 0

    def __init__(self, plan: LaunchPlan, echo: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        self.echo = echo  # kept for the run's interface; an external server's log is not ours to read
        # None until ready: whether the server has a /health route.
        self._health_path: str | None = None
        self.facts: dict[str, Any] = {"url": plan.probe.base_url}

    def __enter__(self) -> ExternalServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Nothing: llmstack did not start this server, so it leaves it running."""

    def settle(self) -> None:
        """Nothing to wait for: no process of ours."""

    def alive(self) -> bool:
        return True  # there is no process to look at; health_problem asks the server itself

    def log_tail(self, lines: int = 20) -> list[str]:
        return []

    @property
    def models(self) -> dict[str, Any]:
        """The server's `/v1/models` answer at readiness."""
        return self.facts.get("models") or {}

    def wait_ready(self) -> float:
        """Block until the server answers; returns the seconds waited. EngineError (exit 3) at the timeout
        or on an answer that waiting cannot change (401, 403); Interrupted on a stop signal."""
        probe = self.plan.probe
        started = time.monotonic()
        deadline = started + probe.timeout_s
        status = StatusLine(f"waiting for the external server at {probe.base_url}")
        with self._client() as client, status:
            while True:
                interrupts.check()
                problem = self._probe_once(client)
                if problem is None:
                    status.close()
                    elapsed = time.monotonic() - started
                    self.facts["version"] = _json_or_none(client, "/version")
                    self.facts["health_path"] = self._health_path
                    logger.info("external server at %s answers (after %.1f s)", probe.base_url, elapsed)
                    return elapsed
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the external server at {probe.base_url} was not ready after {probe.timeout_s:g} s "
                        f"(engine.startup_timeout_s): {problem}. Is it running, and is engine.url right?"
                    )
                status.update(note=problem)
                interrupts.sleep(probe.interval_s)

    def health_problem(self) -> str | None:
        """Why the server does not answer as healthy now, or None (its /health, else its /v1/models)."""
        import httpx

        path = self._health_path or self.plan.probe.models_path
        try:
            with self._client() as client:
                status = client.get(path).status_code
        except httpx.HTTPError as exc:
            return f"GET {path} failed ({type(exc).__name__}: {exc})"
        return None if status == 200 else f"GET {path} answered {status}"

    def check_healthy(self, when: str) -> None:
        problem = self.health_problem()
        if problem is not None:
            raise EngineError(f"the external server at {self.plan.probe.base_url} is not healthy {when}: "
                              f"{problem}")  # fmt: skip

    def wait(self) -> None:
        """Until a stop signal, or the server stops answering (an error)."""
        while True:
            interrupts.check()
            self.check_healthy("while serving")
            interrupts.sleep(5.0)

    # -- internals ---------------------------------------------------------------------------------------
    def _client(self) -> httpx.Client:
        import httpx

        probe = self.plan.probe
        headers = {"Authorization": f"Bearer {probe.api_key}"} if probe.api_key else {}
        return httpx.Client(
            base_url=probe.base_url, timeout=_HTTP_TIMEOUT_S, headers=headers, trust_env=False
        )

    def _probe_once(self, client: httpx.Client) -> str | None:
        """None when ready (facts["models"] filled), else what is not ready yet."""
        import httpx

        probe = self.plan.probe
        try:
            health = client.get(probe.health_path).status_code
            # No such route, or one behind the key: /v1/models is the health check (and says 401 itself).
            if health not in (200, 401, 403, 404, 405):
                return f"GET {probe.health_path} answered {health}"
            answer = client.get(probe.models_path)
        except httpx.HTTPError as exc:
            return f"GET {probe.health_path} failed ({type(exc).__name__}: {exc})"
        if answer.status_code in _FINAL_STATUSES:
            raise EngineError(
                f"the external server at {probe.base_url} answered GET {probe.models_path} with "
                f"{answer.status_code}: {_FINAL_STATUSES[answer.status_code]}. Set engine.api_key, or "
                "LLMSTACK_API_KEY or OPENAI_API_KEY in the environment"
            )
        if answer.status_code != 200:
            return f"GET {probe.models_path} answered {answer.status_code}"
        try:
            models = answer.json()
            listed = models.get("data")
        except (ValueError, AttributeError):
            return f"GET {probe.models_path} answered no JSON model list"
        if not isinstance(listed, list):
            return f"GET {probe.models_path} answered no model list"
        self._health_path = probe.health_path if health == 200 else None
        self.facts["models"] = models
        return None


def _json_or_none(client: httpx.Client, path: str) -> Any:
    """A JSON answer of GET `path`, or None where the server has no such route."""
    import httpx

    try:
        answer = client.get(path)
        return answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
