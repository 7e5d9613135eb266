"""Every command in README.md's shell blocks is exercised here, so the README cannot drift from the code.

Each `python -m llmstack ...` line runs as written with `dry_run=true` added: that composes, resolves and
validates exactly what a user would run (a benchmark longer than the model's context, an unknown key, a
missing device all fail there) and starts nothing. Commands that run on this machine in seconds (`--help`,
`--cfg job`, doctor) run as written. A command this file cannot run (Docker, Slurm, a template with `...`)
must name the test that covers it, or why nothing can; a README command that fits no rule fails
`test_every_readme_command_is_exercised`. The real, full-size runs of the CPU examples are in
`test_readme_examples_run_for_real` (integration), capped in size only.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Commands README shows that these tests do not start, and what covers them instead.
COVERED_ELSEWHERE = {
    "scripts/setup.sh": ".ci/run runs scripts/setup.sh --ipex and --test on a clean checkout; "
    "tests/test_vllm_integration.py::test_default_run_end_to_end runs command (1)'s `python -m llmstack`",
    "docker": "tests/test_docker.py lints the Dockerfile and renders the entrypoint's plan for every profile",
    "LLMSTACK_FLAVOUR=": "tests/test_docker.py (no Docker engine runs here)",
    "export DOCKER_IMAGE": "tests/test_docker.py (no Docker engine runs here)",
    "sudo docker": "tests/test_docker.py (no Docker engine runs here)",
    "hydra/launcher=joblib": "tests/test_grid_integration.py::test_parallel_jobs_get_their_own_ports",
    "hydra/launcher=ray": "tests/test_grid_integration.py::test_grid_on_a_local_ray_cluster",
    "hydra/launcher=submitit_slurm": "no Slurm cluster here (README says so)",
}


def readme_commands() -> list[str]:
    """The commands of README's ```bash blocks, continuation lines joined, comments dropped."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if pending and line.lstrip().startswith("#"):
                continue  # a comment line inside a continued command
            pending += line
            if pending.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1] + " "
                continue
            text = " ".join(shlex.split(pending, comments=True))
            if text:
                commands.append(text)
            pending = ""
    return commands


def how_exercised(command: str) -> str:
    """'dry' (run with dry_run=true), 'run' (as written), or 'covered: <where>'."""
    for marker, where in COVERED_ELSEWHERE.items():
        if marker in command:
            return f"covered: {where}"
    argv = shlex.split(command)
    if argv[:3] in (["python", "-m", "llmstack.doctor"], ["python", "-m", "llmstack.report"]):
        return "run"
    if argv[:3] == ["python", "-m", "llmstack"]:
        return "run" if {"--help", "--cfg"} & set(argv) else "dry"
    return "unknown"


COMMANDS = readme_commands()


def test_every_readme_command_is_exercised() -> None:
    assert len(COMMANDS) >= 20, COMMANDS  # the parser found the blocks
    unknown = [c for c in COMMANDS if how_exercised(c) == "unknown"]
    assert unknown == [], f"README commands no test exercises (add a rule in tests/test_readme.py): {unknown}"
    assert not [c for c in COMMANDS if "..." in c and not how_exercised(c).startswith("covered")]


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] in ("python", ".venv/bin/python"), argv
    return [sys.executable, *argv[1:]]


@pytest.mark.parametrize("command", [c for c in COMMANDS if how_exercised(c) == "dry"], ids=str)
def test_readme_command_is_valid_as_written(command: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    argv = [*_argv(command), "dry_run=true", f"results_dir={results}"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
    assert "# llmstack dry run" in out.stdout
    assert not results.exists() or not any(results.rglob("*")), "a dry run wrote results"


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if how_exercised(c) == "run" and "llmstack.report" not in c], ids=str
)
def test_readme_command_runs_as_written(command: str) -> None:
    out = subprocess.run(_argv(command), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
    assert out.stdout.strip()


# The README examples that run on this machine, run for real with only their size capped (fewer prompts, a
# shorter duration), so a CI run stays short; each must still be in README as written.
REAL_RUNS = {
    "python -m llmstack benchmark=online benchmark.request_rate=[2,8]": ["benchmark.num_prompts=8"],
    "python -m llmstack engine=lightweight engine.max_batch_size=32": ["benchmark.num_prompts=16"],
    "python -m llmstack engine=lightweight": [],
}


def _readme_command(prefix: str) -> str:
    matches = [c for c in COMMANDS if c == prefix] or [c for c in COMMANDS if c.startswith(prefix + " ")]
    assert matches, f"README no longer has `{prefix} ...`: update REAL_RUNS"
    return matches[0]


@pytest.mark.integration
@pytest.mark.parametrize("prefix", sorted(REAL_RUNS))
def test_readme_examples_run_for_real(prefix: str, tmp_path: Path) -> None:
    command = _readme_command(prefix)
    argv = [*_argv(command), *REAL_RUNS[prefix], "engine.port=0", f"results_dir={tmp_path / 'results'}"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
    (summary,) = (tmp_path / "results").glob("*/*/summary.json")
    assert json.loads(summary.read_text())["status"] == "ok"
