"""What an engine hands the supervisor: a pure description of one server process."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass

SECRET_ENV_KEYS = ("VLLM_API_KEY", "OPENAI_API_KEY", "HF_TOKEN", "LLMSTACK_API_KEY")


@dataclass(frozen=True)
class ReadyProbe:
    """Ready = `method health_path` answers 200 AND the process is alive AND `models_path` lists served_name
    (in the JSON's `names_field`: OpenAI's list of {"id": ...}, or a list of names)."""

    base_url: str
    served_name: str
    health_path: str = "/health"
    # None: a process that serves no model list (FastChat's controller): its health answer is enough.
    models_path: str | None = "/v1/models"
    api_key: str | None = None
    timeout_s: float = 900.0
    interval_s: float = 0.25
    method: str = "GET"  # of both requests: FastChat's worker answers POST only
    names_field: str = "data"

    def describe(self) -> str:
        """When this probe says ready, in words (dry runs print it)."""
        health = f"{self.method} {self.base_url}{self.health_path} = 200"
        if self.models_path is None:
            return health
        return f"{health} and {self.models_path} lists '{self.served_name}'"


@dataclass(frozen=True)
class LaunchPlan:
    engine: str
    argv: tuple[str, ...]
    # Only what llmstack adds to (or changes in) the inherited environment.
    env: dict[str, str]
    probe: ReadyProbe
    cwd: str | None = None
    log_name: str = "server.log"
    shutdown_grace_s: float = 15.0
    # Stop the main process alone first and let it stop its own children within the grace period (vLLM:
    # its API server shuts the engine core down); False: SIGTERM to every process at once.
    stop_main_first: bool = False
    # A server llmstack did not start and must not stop (engine=external): argv is empty, only the probe
    # (its URL, served name, key) is used.
    external: bool = False
    # A server spread over several machines (engine=pp with engine.nnodes > 1): every node's command in
    # node order, `argv` (this machine's) among them, each run on its node with `env`. Empty: one machine.
    node_argvs: tuple[tuple[str, ...], ...] = ()
    # A server made of cooperating processes (engine=fastchat: controller, model worker, API server), each a
    # plan of its own with its probe and log: started in this order, each ready before the next starts, and
    # stopped in the reverse order; one dying is the engine's death. The plan's own argv, env, probe and log
    # are its last member's (the one that serves). Empty: one process.
    members: tuple[LaunchPlan, ...] = ()

    @property
    def interpreter(self) -> str:
        """The engine's interpreter; an external plan runs nothing, so the launcher's own."""
        return self.argv[0] if self.argv else sys.executable

    def shell_command(self, mask_secrets: bool = True) -> str:
        """The plan as a shell snippet a user can paste: exports, then the command."""
        if self.external:
            return f"# nothing to start: the server at {self.probe.base_url} was started outside llmstack"
        if self.members:
            n = len(self.members)
            sections = [
                f"# {i}/{n} {m.engine}, ready when {m.probe.describe()}; log: {m.log_name}\n"
                + m.shell_command(mask_secrets)
                for i, m in enumerate(self.members, 1)
            ]
            head = f"# {n} processes, each in a shell of its own, in order, each once the previous is ready:"
            return "\n".join([head, *sections])
        lines = [
            f"export {k}={shlex.quote(self._shown(k, v, mask_secrets))}" for k, v in sorted(self.env.items())
        ]
        lines.append(" \\\n  ".join(_argv_lines(self.argv)))
        return "\n".join(lines)

    def to_dict(self, mask_secrets: bool = True) -> dict:
        data = asdict(self)
        data["argv"] = list(self.argv)
        data["env"] = {k: self._shown(k, v, mask_secrets) for k, v in sorted(self.env.items())}
        if mask_secrets and self.probe.api_key:
            data["probe"]["api_key"] = "***"
        data["members"] = [m.to_dict(mask_secrets) for m in self.members]
        return data

    @staticmethod
    def _shown(key: str, value: str, mask: bool) -> str:
        return "***" if mask and key in SECRET_ENV_KEYS else value


def _argv_lines(argv: tuple[str, ...]) -> list[str]:
    """Group `--flag value` pairs so a printed command reads one option per line."""
    quoted = [shlex.quote(a) for a in argv]
    lines: list[str] = []
    i = 0
    while i < len(quoted):
        start = i
        i += 1
        if start == 0 and i < len(quoted) and argv[i] == "-m":
            i += 2  # python -m module
        elif argv[start] == "-m" and i < len(quoted):
            i += 1  # the module a launcher runs (torchrun's options, then -m module and its own)
        elif (
            argv[start].startswith("-")
            and "=" not in argv[start]
            and i < len(quoted)
            and not argv[i].startswith("--")
            and argv[i] != "-m"
        ):
            i += 1
        lines.append(" ".join(quoted[start:i]))
    return lines
