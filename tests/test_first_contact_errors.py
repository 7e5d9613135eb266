"""Issue 13 items 1, 4, 5 and 6: the errors a new user meets while composing and validating a command line.

Each runs the real CLI (`python -m llmstack ...`) as a user would, and checks that the error is one paragraph
starting `llmstack: `, with exit status 2, that names the key and what to do, and that nothing was started
(every case is refused before a plan is printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmstack import devices
from llmstack.config import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent


def llmstack(
    *args: str, cache: Path | None = None, cwd: Path = REPO, **env: str
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; the compose cache off unless `cache` is given."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LLMSTACK_FULL_ERROR")}
    environ.pop("LLMSTACK_NO_COMPOSE_CACHE", None)
    if cache is None:
        environ["LLMSTACK_NO_COMPOSE_CACHE"] = "1"
    else:
        environ["LLMSTACK_CACHE"] = str(cache)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "llmstack", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_paragraph(result: subprocess.CompletedProcess[str]) -> str:
    """The config error a refused command printed: exit 2, nothing on stdout, one `llmstack: ` line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "", result.stdout
    text = result.stderr.strip()
    assert text.startswith("llmstack: "), text
    assert "\n" not in text, text
    for noise in ("HYDRA_FULL_ERROR", "Config search path", "EngineConfig", "full_key", "Traceback"):
        assert noise not in text, text
    return text


# Item 1: a key the chosen schema does not have, appended with `+`, ran with the key nowhere.
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["+engine.max_num_seq=64"],
            [
                "engine.max_num_seq=64",
                "engine=vllm (upstream) has no such key",
                "did you mean engine.max_num_seqs",
            ],
        ),
        (
            ["engine=lightweight", "+engine.max_num_seqs=8"],
            ["engine.max_num_seqs=8", "engine=lightweight has no such key", "engine=vllm"],
        ),
        (
            ["benchmark=none", "+benchmark.concurrency=[1]"],
            ["benchmark.concurrency=[1]", "benchmark=none has no such key", "benchmark=online"],
        ),
        (["+model.arch.hidden_sizes=3"], ["model.arch.hidden_sizes", "did you mean model.arch.hidden_size"]),
        (["+foo=1"], ["foo=1", "has no such key", "engine, model"]),
    ],
)
def test_appended_key_the_schema_lacks_is_a_config_error(args: list[str], fragments: list[str]) -> None:
    text = one_paragraph(llmstack(*args, "dry_run=true"))
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_appended_key_is_refused_again_when_composition_is_cached(tmp_path: Path) -> None:
    for _ in range(2):
        text = one_paragraph(llmstack("+engine.max_num_seq=64", "dry_run=true", cache=tmp_path))
        assert "did you mean engine.max_num_seqs" in text
    assert not list(tmp_path.glob("compose/*.yaml")), "a config that is refused must not be cached"


def test_cached_config_with_a_key_the_schema_lacks_is_recomposed(tmp_path: Path) -> None:
    """A cached file that has such a key (written by another version) is not trusted: Hydra composes."""
    assert llmstack("dry_run=true", cache=tmp_path).returncode == 0
    (cached,) = tmp_path.glob("compose/*.yaml")
    cached.write_text(cached.read_text().replace("engine:\n", "engine:\n  max_num_seq: 64\n", 1))
    result = llmstack("dry_run=true", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_num_seq" not in result.stdout + result.stderr


# Item 4: Hydra's own composition errors, said as llmstack says its own.
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["engine=vlm"], ["engine=vlm", "did you mean engine=vllm", "lightweight, pp, vllm"]),
        (["model=qwen"], ["model=qwen", "qwen14b", "tiny"]),
        (
            ["engine.max_num_seq=64"],
            ["engine.max_num_seq=64", "engine=vllm has no such key", "did you mean engine.max_num_seqs"],
        ),
        (
            ["engine=lightweight", "engine.max_num_seqs=4"],
            ["engine=lightweight has no such key", "engine=vllm"],
        ),
        (["profil=cpu"], ["profil=cpu", "did you mean profile"]),
        (["engine.port=abc"], ["engine.port=abc", "must be an integer"]),
        (["benchmark.concurrency=[1,x]"], ["benchmark.concurrency[1] must be an integer"]),
        (["dry_run=maybe"], ["dry_run=maybe", "true or false"]),
        (["benchmark.concurrency=1,4"], ["benchmark.concurrency=1,4", "-m", "benchmark.concurrency=[1,4]"]),
        (["engine.port=[1"], ["engine.port", "cannot be parsed"]),
        (["~engine.port"], ["engine.port", "cannot be deleted"]),
    ],
)
def test_hydra_composition_error_is_one_paragraph(args: list[str], fragments: list[str]) -> None:
    text = one_paragraph(llmstack(*args, "dry_run=true"))
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_composition_error_in_a_grid_is_one_paragraph() -> None:
    # A grid checks every job first: one paragraph per invalid job, then the count, and none starts.
    result = llmstack("-m", "engine=vlm,lightweight", "dry_run=true")
    assert result.returncode == 2 and result.stdout == "", (result.returncode, result.stdout)
    job, count = result.stderr.strip().splitlines()
    assert job.startswith("llmstack: grid job engine=vlm") and "did you mean engine=vllm" in job
    assert count.startswith("llmstack: 1 of 2 grid jobs are invalid, so none was started")
    for noise in ("HYDRA_FULL_ERROR", "Config search path", "EngineConfig", "full_key", "Traceback"):
        assert noise not in result.stderr


def test_full_error_shows_hydras_own_text() -> None:
    result = llmstack("engine=vlm", "dry_run=true", LLMSTACK_FULL_ERROR="1")
    assert result.returncode == 2
    assert "Config search path" in result.stderr  # Hydra's full text, its traceback with it
    assert result.stderr.strip().splitlines()[-1].startswith("llmstack: Invalid config: engine=vlm")


def test_missing_launcher_plugin_points_to_the_grid_extra() -> None:
    """Hydra's launchers come with the `grid` extra; without it `hydra/launcher=joblib` must say so."""
    script = textwrap.dedent(
        """
        import runpy, sys
        import hydra_plugins
        # This interpreter without the grid extra: only the checkout's own plugin (the llmstack sweeper).
        hydra_plugins.__path__ = [p for p in hydra_plugins.__path__ if "site-packages" not in p]
        sys.argv = ["llmstack", *sys.argv[1:]]
        runpy.run_module("llmstack", run_name="__main__")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "-m", "hydra/launcher=joblib", "dry_run=true"],
        cwd=REPO,
        env={**os.environ, "LLMSTACK_NO_COMPOSE_CACHE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = one_paragraph(result)
    assert "hydra/launcher=joblib" in text
    assert "scripts/setup.sh --test" in text and ".[grid]" in text


# Item 5: wrong fixes suggested.
def _without(kind: str) -> None:
    if devices.detect().count(kind):
        pytest.skip(f"this machine has a {kind} device")


@pytest.mark.parametrize("kind", ["xpu", "cuda"])
def test_device_this_machine_lacks_says_so(kind: str) -> None:
    _without(kind)
    text = one_paragraph(llmstack(f"device={kind}"))
    assert f"device={kind}: this machine has no {kind} device" in text
    assert "dry_run=true" in text and "device.count=N" in text
    assert "tensor_parallel_size" not in text  # the old message blamed it and said to lower it


def test_dry_run_plans_for_another_machines_devices() -> None:
    """README's example: a dry run on a machine without XPUs assumes the two its plan needs, and says so."""
    _without("xpu")
    args = [
        "engine=vllm_ipex",
        "device=xpu",
        "model=qwen14b",
        "engine.tensor_parallel_size=2",
        "dry_run=true",
    ]
    result = llmstack(*args)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert "device=xpu (x2; this machine has none" in header and "device.count=N" in header
    assert "--tensor-parallel-size 2" in result.stdout
    explicit = llmstack(*args, "device.count=4")
    assert explicit.returncode == 0 and "device=xpu (x4;" in explicit.stdout.splitlines()[0]


@pytest.mark.parametrize(
    "combination",
    [
        ("engine=vllm",),
        ("engine=vllm_ipex",),
        ("engine=lightweight",),
        ("engine=lightweight", "engine.backend=ipex_llm"),
    ],
)
def test_low_bit_errors_suggest_only_valid_formats(compose_cfg, combination: tuple[str, ...]) -> None:
    """Every `low_bit=X` a refusal names (besides the refused one) and every `engine.backend=Y` it suggests
    passes for that engine and device: `low_bit=fp8` on cpu named fp8_e4m3, refused there too."""
    import re

    from llmstack.config.groups import config_groups
    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.errors import ConfigError
    from llmstack.validation import config_problems, valid_low_bits

    def problem(*overrides: str) -> ConfigError | None:
        run = resolve(to_run_config(compose_cfg(*overrides)), CONFIG_DIR, devices.Inventory())
        return next(iter(config_problems(run, CONFIG_DIR)), None)

    checked = 0
    for device in ("cpu", "xpu", "cuda"):
        where = (f"device={device}", "device.count=1")
        for low_bit in config_groups(CONFIG_DIR).options("low_bit"):
            error = problem(*combination, *where, f"low_bit={low_bit}")
            if error is None or error.key != "low_bit":
                continue
            checked += 1
            run = resolve(to_run_config(compose_cfg(*combination, *where)), CONFIG_DIR, devices.Inventory())
            valid = valid_low_bits(run, CONFIG_DIR)
            named = set(re.findall(r"low_bit=(\w+)", str(error))) - {low_bit}
            assert named <= set(valid), (combination, device, low_bit, str(error))
            for backend in re.findall(r"set engine\.backend=(\w+)", str(error)):
                fix = (*combination, *where, f"low_bit={low_bit}", f"engine.backend={backend}")
                assert problem(*fix) is None, (fix, str(error))
    assert checked  # every combination refuses some format somewhere


def test_fp8_on_cpu_suggests_nothing_refused_there() -> None:
    text = one_paragraph(llmstack("low_bit=fp8", "dry_run=true"))
    assert "fp8_e4m3" not in text and "Valid choices: bf16, fp16, none." in text
    on_cuda = one_paragraph(llmstack("low_bit=fp8", "device=cuda", "device.count=1", "dry_run=true"))
    assert "Use low_bit=fp8_e4m3 instead." in on_cuda


@pytest.mark.parametrize(("profile", "refused"), [("cpu", ["vllm_ipex"]), ("arc_a770", [])])
def test_profile_with_a_foreign_engine_lists_only_engines_that_fit(profile: str, refused: list[str]) -> None:
    text = one_paragraph(llmstack(f"profile={profile}", "engine=lightweight", "dry_run=true"))
    listed = text.split("Valid choices: ", 1)[1].split(".", 1)[0].split(", ")
    assert listed and not set(listed) & set(refused), text
    for engine in listed:  # each one offered really runs with the profile
        result = llmstack(f"profile={profile}", f"engine={engine}", "dry_run=true")
        assert result.returncode == 0, (engine, result.stderr)


# Item 6: install hints that name the real way to install.
def test_missing_ipex_llm_points_to_setup_ipex() -> None:
    import importlib.util

    if importlib.util.find_spec("ipex_llm") is not None:
        pytest.skip("this interpreter has ipex-llm")
    text = one_paragraph(llmstack("engine=lightweight", "engine.backend=ipex_llm", "low_bit=sym_int4"))
    assert "cannot import 'ipex_llm'" in text and "scripts/setup.sh --ipex" in text
    assert ".[cpu]" not in text  # that extra has no ipex-llm


def test_missing_ipex_venv_points_to_setup_ipex(tmp_path: Path) -> None:
    args = [
        "engine=lightweight",
        "engine.backend=ipex_llm",
        "low_bit=sym_int4",
        "engine.python=.venv-ipex/bin/python",
    ]
    text = one_paragraph(llmstack(*args, cwd=tmp_path))
    assert "is not an executable interpreter" in text and "scripts/setup.sh --ipex" in text
    assert str(tmp_path) in text  # a relative path: where it was looked for


def test_missing_ipex_vllm_fork_points_to_its_image() -> None:
    import importlib.util

    if importlib.util.find_spec("ipex_llm") is not None:
        pytest.skip("this interpreter has ipex-llm")
    text = one_paragraph(llmstack("engine=vllm_ipex", "device=xpu", "device.count=1"))
    assert "cannot import 'ipex_llm'" in text and "FLAVOUR=ipex" in text and ".[cpu]" not in text
