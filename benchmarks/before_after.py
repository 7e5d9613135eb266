"""Before/after a refactor, side by side in one run: launch overhead and client capacity, two source trees.

Each measurement runs in a fresh process of the same interpreter with `PYTHONPATH` and the working directory
pointing at one tree, the trees alternating (ABAB...), so that a shared machine's noise hits both alike.
Only the public surface both trees have is used:

- launch: wall time of `python -m llmstack device=cpu engine.port=0 benchmark=none dry_run=true` (a repeat
  start of the same command line, so the compose cache is warm after the first, unmeasured, start);
- client: `llmstack.bench.loadgen.run_load_sync` closed loop at concurrency 64 against one
  `benchmarks/sse_stub.py --mode capacity` (pinned to CPU 0, the clients to CPU 1), req/s over the client's
  own window after a warm-up.

    .venv/bin/python benchmarks/before_after.py --before /tmp/before --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
AFTER = BENCH_DIR.parent
LAUNCH = ["-m", "llmstack", "device=cpu", "engine.port=0", "benchmark=none", "dry_run=true"]

CLIENT = """
import json, sys
from llmstack.bench.loadgen import run_load_sync
url, n, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = {"model": "tiny", "prompt": "hello " * 32, "max_tokens": 16, "stream": True,
           "stream_options": {"include_usage": True}, "ignore_eos": True}
payloads = [dict(payload) for _ in range(n)]
options = {"endpoint": "/v1/completions", "timeout_s": 60.0, "concurrency": 64}
run_load_sync(url, payloads[:warmup], **options)
result = run_load_sync(url, payloads, **options)
ok = sum(r.success for r in result.records)
print(json.dumps({"completed": ok, "failed": n - ok, "duration": result.duration}))
"""


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def launch_s(tree: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *LAUNCH], cwd=tree, env=_env(tree), check=True, capture_output=True)
    return time.perf_counter() - t0


def client_rps(tree: Path, url: str, requests: int, warmup: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", sys.executable, "-c", CLIENT, url, str(requests), str(warmup)],
        cwd=tree,
        env=_env(tree),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    reply = json.loads(out.strip().splitlines()[-1])
    if reply["failed"]:
        raise RuntimeError(f"{tree}: {reply['failed']} requests failed")
    return reply["completed"] / reply["duration"]


def _report(name: str, unit: str, values: dict[str, list[float]]) -> None:
    before, after = (statistics.median(values[side]) for side in ("before", "after"))
    pairs = [a / b for a, b in zip(values["after"], values["before"], strict=True)]
    spread = {side: f"{min(v):.3f}-{max(v):.3f}" for side, v in values.items()}
    print(
        f"{name}: before {before:.3f} {unit} (min-max {spread['before']}),"
        f" after {after:.3f} {unit} (min-max {spread['after']});"
        f" ratio after/before of medians {after / before:.3f}, paired median {statistics.median(pairs):.3f}"
        f" (pairs {min(pairs):.3f}-{max(pairs):.3f}, n={len(pairs)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the old tree (e.g. a git worktree)")
    parser.add_argument("--after", type=Path, default=AFTER)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=640)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}

    for tree in trees.values():  # the first start composes with Hydra; not measured
        launch_s(tree)
    launch: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(args.rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for side in order:
            launch[side].append(launch_s(trees[side]))
    _report("launch (dry run wall time)", "s", launch)

    stub = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "sse_stub.py"), "--mode", "capacity", "--cpu", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stub.stdout is not None
        line = stub.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"stub did not start: {line!r}")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        rps: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.rounds):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for side in order:
                rps[side].append(client_rps(trees[side], url, args.requests, args.warmup))
        _report("client capacity (c64, 16 chunks)", "req/s", rps)
    finally:
        stub.terminate()
        stub.communicate(timeout=30)


if __name__ == "__main__":
    main()
