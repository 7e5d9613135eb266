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

REPO = Path(__file__).resolve().parent.parent


def llmstack(*args: str, cache: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
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
        cwd=REPO,
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
            ["engine.max_num_seq=64", "engine=vllm has no such key", "did you mean engine.max_num_seqs"],
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
        (["engine=vlm"], ["engine=vlm", "did you mean engine=vllm", "lightweight, vllm"]),
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
    text = one_paragraph(llmstack("-m", "engine=vlm,lightweight", "dry_run=true"))
    assert "did you mean engine=vllm" in text


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
