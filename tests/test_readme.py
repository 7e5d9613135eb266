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


# "The first five minutes": what command (1) shows on stderr, line by line, in order. README's block must
# show each; tests/test_vllm_integration.py::test_default_run_end_to_end checks a real run's stderr.
FIRST_FIVE_MINUTES = [
    r"run directory: \S+/\d{8}-\d{6}$",
    r"starting vllm-upstream: \S+python -m vllm\.entrypoints\.openai\.api_server --model \S+tiny-llama-v1 ",
    r"\[ +\d+ s\] waiting for vllm-upstream — ",
    r"vllm-upstream ready at http://127\.0\.0\.1:\d+ after [\d.]+ s$",
    r"warm-up: \d+ requests at concurrency \d+$",
    r"benchmark c\d+: \d+ requests at concurrency \d+$",
    r"stopping vllm-upstream \(pid \d+\): waiting up to \d+ s for it to exit \(its main process first\)$",
    # one "c<N>: ..." per load level, separated by "; "
    r"results in \S+/\d{8}-\d{6} \(ok\): "
    r"(c\d+: [\d.]+ output tok/s, TTFT p50 [\d.]+ ms, \d+ ok / 0 failed(; |$))+$",
]


def launcher_lines(stderr: str) -> list[str]:
    """The launcher's own log lines, their `[hh:mm:ss] ` stamp removed."""
    return [m.group(1) for m in re.finditer(r"^\[\d\d:\d\d:\d\d\] (.*)$", stderr, flags=re.M)]


def assert_in_order(patterns: list[str], lines: list[str]) -> None:
    at = 0
    for pattern in patterns:
        found = next((i for i in range(at, len(lines)) if re.search(pattern, lines[i])), None)
        assert found is not None, f"no line matching {pattern!r} after line {at} of:\n" + "\n".join(lines)
        at = found + 1


def test_first_five_minutes_shows_what_a_run_prints() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The first five minutes") :]
    block = re.search(r"^```text\n(.*?)^```", section, flags=re.S | re.M)
    assert block is not None
    assert_in_order(FIRST_FIVE_MINUTES, launcher_lines(block.group(1)))


@pytest.mark.integration
def test_readme_report_commands_run_on_the_results_they_name(tmp_path: Path) -> None:
    """README's report examples, on what the commands before them make: the checked-in grid, two single
    runs and the settings search (engine=lightweight, so that this takes seconds, not minutes); `<date>`,
    `<run>`, `<run_a>` and `<run_b>` stand for the directories a user has."""
    reports = [c for c in COMMANDS if c.startswith("python -m llmstack.report ")]
    assert len(reports) >= 3, reports
    make = [
        ["-m", "+experiment=low_bit_comparison", "benchmark.num_prompts=4", "benchmark.concurrency=1,4"],
        ["run_name=run_a", "benchmark=smoke"],
        ["run_name=run_b", "benchmark=smoke"],
        # README's settings search, capped (two batch sizes, 1 s probes): the grid its report command names.
        [
            "-m",
            "model=tiny",
            "engine.max_batch_size=2,4",
            "benchmark=capacity",
            "benchmark.load=concurrency",
            "benchmark.concurrency=[1,8]",
            "benchmark.duration_s=1",
            "benchmark.slo.p90_ttft_ms=100",
            "experiment_name=capacity_batch",
        ],
    ]
    for overrides in make:
        argv = [sys.executable, "-m", "llmstack", *overrides, "engine=lightweight", "engine.port=0"]
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{overrides}\n{out.stderr[-3000:]}"
    named = ("low_bit_comparison", "capacity_batch")
    (day,) = [p.name for p in (tmp_path / "results").iterdir() if p.name not in named]
    names = {"<date>": day, "<run>": "run_a", "<run_a>": "run_a", "<run_b>": "run_b"}
    for command in reports:
        for placeholder, name in names.items():
            command = command.replace(placeholder, name)
        out = subprocess.run(_argv(command), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        assert out.stdout.strip(), command
