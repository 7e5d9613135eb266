"""Results a user can read without the docs (issue 13, items 10 and 12).

- report.txt and the console say in one line which output token count every figure uses, and why the
  tokenizer's re-count differs;
- requests.jsonl has wall-clock dates beside the perf_counter times;
- every run records the llmstack version and the git commit (read from .git without running git) and
  whether the tree had uncommitted changes;
- model=local is served under its directory's name;
- the compose cache keeps at most MAX_ENTRIES files, the least recently used go first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llmstack.bench.metrics import request_metrics
from llmstack.bench.records import RequestRecord, WallClock, load_records, records_jsonl
from llmstack.cli import CONFIG_DIR
from llmstack.config import compose_cache
from llmstack.config.resolve import resolve, to_run_config
from llmstack.devices import Inventory
from llmstack.engines import get_engine
from llmstack.results import provenance
from llmstack.results.text_report import format_seed_report, output_token_count_line
from tests.procs import wait_no_processes

REPO = Path(__file__).resolve().parent.parent
MARK_KEY = "LLMSTACK_TEST_MARK"


def streamed(index: int, text: str, usage: int | None) -> RequestRecord:
    chunks = [1.0 + 0.01 * i for i in range(max(usage or 2, 2))]
    return RequestRecord(
        index=index, sent_at=0.9, first_content_at=chunks[0], done_at=chunks[-1] + 0.001,
        chunk_times=chunks, output_text=text, prompt_tokens=4, completion_tokens=usage, success=True,
    )  # fmt: skip


# -- the output token count, in one line --------------------------------------------------------------------
def count_line(report: str) -> str:
    (line,) = [line for line in report.splitlines() if line.startswith("Output tokens:")]
    return line


def test_report_says_which_count_is_used_and_that_the_tokenizer_agrees() -> None:
    # A tokenizer of one token per character: it agrees with the server on all three texts.
    records = [streamed(0, "ab", 2), streamed(1, "x\ufffdy", 3), streamed(2, "cd", 2)]
    line = count_line(format_seed_report(records, 0.0, 2.0, concurrency=1, count_tokens=len))
    assert line == (
        "Output tokens: 7, counted by the server (usage.completion_tokens) for all 3 requests, used in every "
        "figure above; the tokenizer's re-count of the generated text agrees (7)."
    )


def test_report_explains_a_disagreement_with_its_numbers() -> None:
    records = [streamed(0, "hello", 2), streamed(1, "a\ufffdb", 2), streamed(2, "ok", 2)]
    report = format_seed_report(records, 0.0, 2.0, concurrency=4, count_tokens=len)
    line = count_line(report)
    assert "Output tokens: 6, counted by the server (usage.completion_tokens) for all 3 requests" in line
    assert "re-count of the generated text gives 10 (2 of 3 requests differ) because decoded text" in line
    assert "1 of 3 texts hold U+FFFD" in line
    merged = [streamed(0, "hello", 2)]
    assert "(neighbouring tokens can merge into one)." in count_line(
        format_seed_report(merged, 0.0, 2.0, concurrency=1, count_tokens=lambda text: 1)
    )
    assert "\n" not in line and line.isascii()  # one line, printable on any console


def test_count_line_names_each_source_and_the_missing_tokenizer() -> None:
    assert output_token_count_line(0, {}) == "Output tokens: none (no successful request)."
    mixed = output_token_count_line(9, {"usage": 2, "tokenizer": 1}, tokenizer_total=9, mismatches=0)
    assert "counted by the server (usage.completion_tokens) for 2 requests; by the model's tokenizer" in mixed
    assert "for 1 request, used in every figure above" in mixed and "agrees (9)" in mixed
    no_tokenizer = output_token_count_line(5, {"usage": 1})
    assert "for the one request" in no_tokenizer and "no tokenizer was loaded" in no_tokenizer
    lower_bound = output_token_count_line(3, {"chunk_count": 1})
    assert "as text chunks (no usage, no tokenizer: a lower bound)" in lower_bound


def test_the_line_agrees_with_result_json_keys() -> None:
    from llmstack.bench.metrics import summarize

    records = [streamed(0, "hello", 2), streamed(1, "ok", 2)]
    summary = summarize(records, 0.0, 2.0, count_tokens=len)
    line = count_line(format_seed_report(records, 0.0, 2.0, concurrency=1, count_tokens=len))
    expected = output_token_count_line(
        summary["total_output_tokens"],
        summary["output_tokens_source_counts"],
        tokenizer_total=summary["total_output_tokens_tokenizer"],
        mismatches=summary["output_token_count_mismatches"],
    )
    assert line == expected and f"gives {summary['total_output_tokens_tokenizer']} (" in line
    assert [request_metrics(r, len).tokenizer_output_tokens for r in records] == [5, 2]


# -- wall-clock dates in requests.jsonl ---------------------------------------------------------------------
def test_requests_jsonl_has_epoch_times_beside_the_perf_counter_ones(tmp_path: Path) -> None:
    record = streamed(0, "ab", 2)
    record.scheduled_at = 0.8
    clock = WallClock(epoch=1_700_000_000.0, perf=1.0)
    (row,) = [json.loads(line) for line in records_jsonl([record], clock).splitlines()]
    assert row["sent_at"] == 0.9 and row["sent_at_epoch"] == pytest.approx(1_699_999_999.9)
    assert row["scheduled_at_epoch"] == pytest.approx(1_699_999_999.8)
    assert row["first_content_at_epoch"] == pytest.approx(1_700_000_000.0)
    assert row["done_at_epoch"] == pytest.approx(1_700_000_000.011)
    path = tmp_path / "requests.jsonl"
    path.write_text(records_jsonl([record], clock))
    assert load_records(path) == [record]  # readers ignore the added keys
    unsent = json.loads(records_jsonl([RequestRecord(index=1)], clock))
    assert unsent["sent_at_epoch"] is None


def test_the_clock_pair_converts_now_to_now() -> None:
    clock = WallClock.now()
    assert abs(clock.epoch_of(time.perf_counter()) - time.time()) < 0.05


# -- which llmstack ran -------------------------------------------------------------------------------------
def fake_checkout(root: Path, head: str, refs: dict[str, str], packed: str = "") -> Path:
    git = root / ".git"
    git.mkdir(parents=True)
    (git / "HEAD").write_text(head + "\n")
    for ref, sha in refs.items():
        (git / ref).parent.mkdir(parents=True, exist_ok=True)
        (git / ref).write_text(sha + "\n")
    if packed:
        (git / "packed-refs").write_text(packed)
    return root


SHA_A, SHA_B = "a" * 40, "0123456789abcdef" * 2 + "01234567"


def test_commit_from_a_loose_ref_a_packed_ref_and_a_detached_head(tmp_path: Path) -> None:
    loose = fake_checkout(tmp_path / "loose", "ref: refs/heads/main", {"refs/heads/main": SHA_A})
    assert provenance.git_commit(loose) == SHA_A
    packed = fake_checkout(
        tmp_path / "packed", "ref: refs/heads/dev", {},
        f"# pack-refs with: peeled fully-peeled sorted\n{SHA_A} refs/heads/main\n{SHA_B} refs/heads/dev\n",
    )  # fmt: skip
    assert provenance.git_commit(packed) == SHA_B
    assert provenance.git_commit(fake_checkout(tmp_path / "detached", SHA_B, {})) == SHA_B
    assert provenance.git_commit(fake_checkout(tmp_path / "unborn", "ref: refs/heads/main", {})) is None
    assert provenance.git_commit(tmp_path / "no-checkout") is None


def test_commit_of_a_linked_worktree(tmp_path: Path) -> None:
    main = fake_checkout(tmp_path / "main", "ref: refs/heads/main", {"refs/heads/feature": SHA_B})
    worktree_git = main / ".git" / "worktrees" / "wt"
    worktree_git.mkdir(parents=True)
    (worktree_git / "HEAD").write_text("ref: refs/heads/feature\n")
    (worktree_git / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {worktree_git}\n")
    assert provenance.git_commit(tmp_path / "wt") == SHA_B


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a checkout")
def test_this_checkout_is_recorded_as_git_says() -> None:
    from llmstack.results.git_status import checked_provenance

    source = checked_provenance()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert source["version"] and source["git_commit"] == head.stdout.strip()
    assert isinstance(source["git_dirty"], bool) and provenance.llmstack_provenance() == source


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dirty_means_uncommitted_changes_staged_or_not(tmp_path: Path) -> None:
    from llmstack.results.git_status import tree_dirty

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})  # fmt: skip

    assert tree_dirty(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    assert tree_dirty(tmp_path) is False
    assert provenance.git_commit(tmp_path) is not None
    (tmp_path / "a.py").write_text("x = 2\n")
    git("add", "a.py")  # staged, not committed: still dirty
    assert tree_dirty(tmp_path) is True


# -- model=local is served under its directory's name -------------------------------------------------------
def test_model_local_is_served_under_its_directory_name(compose_cfg, tmp_path: Path) -> None:
    model_dir = tmp_path / "Qwen2.5-0.5B-Instruct"
    model_dir.mkdir()
    cfg = compose_cfg("model=local", f"model.path={model_dir}/", "device=cpu")
    run = resolve(to_run_config(cfg), Path(CONFIG_DIR), Inventory())
    assert run.model.served_name == "Qwen2.5-0.5B-Instruct"
    plan = get_engine(run.engine.name).plan(run)
    assert plan.probe.served_name == "Qwen2.5-0.5B-Instruct"
    assert "--served-model-name Qwen2.5-0.5B-Instruct" in plan.shell_command()
    named = compose_cfg("model=local", f"model.path={model_dir}", "model.served_name=mine", "device=cpu")
    assert resolve(to_run_config(named), Path(CONFIG_DIR), Inventory()).model.served_name == "mine"


# -- the compose cache is bounded ---------------------------------------------------------------------------
def test_compose_cache_keeps_the_most_recently_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path))
    monkeypatch.delenv("LLMSTACK_NO_COMPOSE_CACHE", raising=False)
    monkeypatch.setattr(compose_cache, "MAX_ENTRIES", 3)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"engine": {"name": "vllm"}, "benchmark": {"phase": "none"}})
    args = [[f"engine.port={8000 + i}"] for i in range(5)]
    for i, arg in enumerate(args[:3]):
        compose_cache.store(CONFIG_DIR, arg, cfg)
        os.utime(compose_cache.cache_path(CONFIG_DIR, arg), (1000 + i, 1000 + i))
    assert compose_cache.load(CONFIG_DIR, args[0]) is not None  # a hit: now the most recent
    compose_cache.store(CONFIG_DIR, args[3], cfg)  # the 4th entry pushes out the least recently used
    directory = compose_cache.cache_path(CONFIG_DIR, args[0]).parent
    left = {p.name for p in directory.iterdir()}
    assert len(left) == 3
    assert compose_cache.cache_path(CONFIG_DIR, args[1]).name not in left
    assert compose_cache.cache_path(CONFIG_DIR, args[0]).name in left
    stale = directory / "x.123.tmp"
    stale.write_text("half")
    os.utime(stale, (1, 1))
    compose_cache.store(CONFIG_DIR, args[4], cfg)
    assert not stale.exists() and len(list(directory.iterdir())) == 3


# -- a real short run ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_lightweight_run_is_readable_without_the_docs(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    head_before = provenance.git_commit(REPO)
    before = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "llmstack", "engine=lightweight", "benchmark=smoke", "device=cpu",
         "engine.port=0", f"results_dir={tmp_path / 'results'}", f"+engine.extra_env.{MARK_KEY}={mark}"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    after = time.time()
    assert done.returncode == 0, done.stderr[-3000:]
    assert wait_no_processes(f"{MARK_KEY}={mark}", timeout=10) == []
    (run_dir,) = sorted((tmp_path / "results").glob("*/*/"))
    level = run_dir / "bench-c4"

    result = json.loads((level / "result.json").read_text())
    line = count_line((level / "report.txt").read_text())
    assert line.startswith(
        f"Output tokens: {result['total_output_tokens']}, counted by the server (usage.completion_tokens) "
        "for all 16 requests, used in every figure above; the tokenizer's re-count"
    )
    if result["output_token_count_mismatches"]:
        assert f"gives {result['total_output_tokens_tokenizer']} " in line
        assert f"({result['output_token_count_mismatches']} of 16 requests differ)" in line
    assert line in done.stdout  # the console says it too

    rows = [json.loads(row) for row in (level / "requests.jsonl").read_text().splitlines()]
    offsets = {round(row["sent_at_epoch"] - row["sent_at"], 4) for row in rows}
    assert len(offsets) == 1  # one clock pair for all
    for row in rows:
        assert before < row["sent_at_epoch"] <= row["first_content_at_epoch"] <= row["done_at_epoch"] < after

    environment = json.loads((run_dir / "environment.json").read_text())
    import llmstack

    assert environment["llmstack"] == result["llmstack"]["version"] == llmstack.__version__
    commit = environment["llmstack_git_commit"]
    assert commit == result["llmstack"]["git_commit"]
    assert environment["llmstack_git_dirty"] == result["llmstack"]["git_dirty"]
    if (REPO / ".git").exists():
        # The checkout's HEAD at the time of the run: between HEAD before it and HEAD now (others may commit).
        assert commit is not None and is_ancestor(head_before, commit) and is_ancestor(commit, "HEAD")
        assert isinstance(environment["llmstack_git_dirty"], bool) or shutil.which("git") is None


def is_ancestor(older: str | None, newer: str) -> bool:
    if older is None or shutil.which("git") is None:
        return True
    check = ["git", "-C", str(REPO), "merge-base", "--is-ancestor", older, newer]
    return subprocess.run(check, capture_output=True).returncode == 0
