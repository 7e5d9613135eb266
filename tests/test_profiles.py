"""Per-GPU profiles: each composes, picks the engine flavour that runs on its GPU, validates against a
simulated inventory of its device kind, and gives every number and environment variable a source comment."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.devices import Inventory
from llmstack.errors import ConfigError
from llmstack.validation import validate

CONFIG = Path(CONFIG_DIR)
PROFILES = sorted(p.stem for p in (CONFIG / "profile").glob("*.yaml"))

# What the issue asks for, and what really runs there (reference/vllm-xpu-upstream.md 1.1, 5: upstream vLLM's
# XPU kernels are built for Battlemage and Data Center GPU Max only).
EXPECTED = {
    # profile: (device kind, count, engine flavour, tensor parallel)
    "arc_a770": ("xpu", 1, "ipex", 1),
    "arc_a770x2": ("xpu", 2, "ipex", 2),
    "arc_a770x4": ("xpu", 4, "ipex", 4),
    "arc_b580": ("xpu", 1, "upstream", 1),
    "arc_pro_b60": ("xpu", 1, "upstream", 1),
    "arc_pro_b60x2": ("xpu", 2, "upstream", 2),
    "arc_pro_b60x4": ("xpu", 4, "upstream", 4),
    "max_1550": ("xpu", 2, "upstream", 1),
    "max_1100": ("xpu", 1, "upstream", 1),
    "flex_170": ("xpu", 1, "ipex", 1),
    "core_ultra_igpu": ("xpu", 1, "ipex", 1),
    "cpu": ("cpu", 1, "upstream", 1),
    "h100": ("cuda", 1, "upstream", 1),
}


def resolved(compose_cfg, *overrides: str, inventory: Inventory):
    return resolve(to_run_config(compose_cfg(*overrides)), CONFIG, inventory)


def inventory_of(kind: str, count: int) -> Inventory:
    return Inventory(**{kind: count}) if kind != "cpu" else Inventory()


def test_every_target_has_a_profile() -> None:
    assert set(PROFILES) == set(EXPECTED)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_composes_and_validates(compose_cfg, profile: str) -> None:
    kind, count, flavour, tp = EXPECTED[profile]
    run = resolved(compose_cfg, f"profile={profile}", "model=llama2_7b", inventory=inventory_of(kind, count))
    assert (run.device.name, run.device.count, run.engine.flavour) == (kind, count, flavour)
    assert run.engine.tensor_parallel_size * run.engine.pipeline_parallel_size == tp
    validate(run, CONFIG, host_checks=False)
    if kind != "cpu":
        assert run.device.memory_gib is not None and run.device.product is not None


@pytest.mark.parametrize("profile", [p for p in PROFILES if EXPECTED[p][0] != "cpu"])
def test_detected_inventory_decides(compose_cfg, profile: str) -> None:
    """With device.count left to detection, the simulated inventory of the profile's kind passes; one device
    fewer, or only devices of another kind, is rejected before launch: blaming the parallel size when some
    are here, and saying there is no such device here when none are (issue 13 item 5)."""
    kind, count, _, tp = EXPECTED[profile]
    detect = (f"profile={profile}", "model=llama2_7b", "device.count=null")
    run = resolved(compose_cfg, *detect, inventory=inventory_of(kind, count))
    assert run.device.count == count
    validate(run, CONFIG, host_checks=False)
    other = "cuda" if kind == "xpu" else "xpu"
    for inventory in (inventory_of(kind, tp - 1), inventory_of(other, 8)):
        with pytest.raises(ConfigError) as info:
            validate(resolved(compose_cfg, *detect, inventory=inventory), CONFIG, host_checks=False)
        if inventory.count(kind) == 0:
            assert (info.value.key, info.value.value) == ("device", kind)
            message = str(info.value)
            assert f"this machine has no {kind} device" in message and "dry_run=true" in message
        else:
            assert info.value.key == "engine.tensor_parallel_size"


@pytest.mark.parametrize("profile", PROFILES)
def test_the_profiles_own_example_validates(compose_cfg, profile: str) -> None:
    """The `python -m llmstack profile=... model=...` line in each profile's header is a valid plan."""
    text = (CONFIG / "profile" / f"{profile}.yaml").read_text()
    examples = re.findall(r"^#\s+python -m llmstack (.+)$", text, re.MULTILINE)
    if profile == "cpu":
        examples = examples or ["profile=cpu model=tiny"]
    assert examples, f"{profile}.yaml has no example command"
    kind, count, _, _ = EXPECTED[profile]
    for example in examples:
        overrides = shlex.split(example)
        assert f"profile={profile}" in overrides
        run = resolved(compose_cfg, *overrides, inventory=inventory_of(kind, count))
        validate(run, CONFIG, host_checks=False)


_ASSIGNMENT = re.compile(r"^(?P<indent>\s*)(?P<key>[\w./-]+):\s*(?P<value>[^#]*?)\s*(?P<comment>#.*)?$")


@pytest.mark.parametrize("profile", PROFILES)
def test_every_number_and_environment_variable_has_a_source(profile: str) -> None:
    lines = (CONFIG / "profile" / f"{profile}.yaml").read_text().splitlines()
    in_env = False
    missing = []
    for number, line in enumerate(lines, 1):
        match = _ASSIGNMENT.match(line)
        if not match or line.lstrip().startswith(("#", "-")):
            continue
        key, value, comment = match.group("key"), match.group("value"), match.group("comment")
        if not match.group("indent"):
            in_env = False
        elif key in ("env", "extra_env"):
            in_env = True
            continue
        numeric = re.fullmatch(r"-?\d+(\.\d+)?", value) is not None
        env_var = in_env and len(match.group("indent")) > 2
        if (numeric or env_var or value not in ("", "{}")) and not comment:
            missing.append(f"{profile}.yaml:{number}: {line.strip()}")
    assert not missing, "values without a source comment:\n" + "\n".join(missing)


def test_a_wrong_kind_of_engine_is_still_caught(compose_cfg) -> None:
    # The ipex fork is for Intel GPUs only: forcing it onto the H100 profile is rejected.
    with pytest.raises(ConfigError) as info:
        run = resolved(compose_cfg, "profile=h100", "engine=vllm_ipex", inventory=Inventory(cuda=1))
        validate(run, CONFIG, host_checks=False)
    assert info.value.key == "device"
