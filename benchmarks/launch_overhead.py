"""Launch overhead: time-to-ready through llmstack vs the same vLLM command started directly.

Both are started the same way from this script and polled the same way (GET /v1/models every 50 ms until it
lists the served name), alternating llmstack and direct starts so drift on a noisy machine hits both alike.
Also measured: the time from `python -m llmstack` starting to the engine process being spawned, read from
the kernel's process start times (/proc/<pid>/stat), so no instrumentation runs inside llmstack.

    .venv/bin/python benchmarks/launch_overhead.py --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.procs import free_port, port_is_free  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_ticks(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def wait_ready(port: int, name: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before ready")
            try:
                r = client.get(f"http://127.0.0.1:{port}/v1/models")
                if r.status_code == 200 and any(m["id"] == name for m in r.json()["data"]):
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise TimeoutError("not ready")


def stop(proc: subprocess.Popen, port: int | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while port is not None and not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)


def direct_plan(port: int) -> tuple[list[str], dict[str, str]]:
    """The exact argv and env llmstack would use, from its own dry run."""
    out = subprocess.run(
        [sys.executable, "-m", "llmstack", "device=cpu", f"engine.port={port}", "dry_run=true"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    env: dict[str, str] = {}
    body = [line for line in out.splitlines() if not line.startswith("#")]
    cmd_lines = []
    for line in body:
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value
        else:
            cmd_lines.append(line.rstrip("\\").strip())
    import shlex

    return shlex.split(" ".join(cmd_lines)), env


def one_llmstack(cache: Path) -> tuple[float, float]:
    """Ready and spawn times of one launch. engine.port=0 keeps the command line the same every time."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmstack", "device=cpu", "engine.port=0", "benchmark=none",
         "results_dir=/tmp/llmstack-launch-bench"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "LLMSTACK_CACHE": str(cache)},
    )  # fmt: skip
    try:  # whatever happens, the launcher and its engine go down with this function
        spawn, port = None, None
        while spawn is None and proc.poll() is None:
            for kid in children(proc.pid):  # other children may come first
                try:
                    argv = Path(f"/proc/{kid}/cmdline").read_bytes().decode().split("\0")
                except OSError:
                    continue
                if "--port" in argv:
                    spawn = (start_ticks(kid) - start_ticks(proc.pid)) / CLK_TCK
                    port = int(argv[argv.index("--port") + 1])
                    break
            else:
                time.sleep(0.005)
        if port is None:
            raise RuntimeError(f"llmstack exited with {proc.returncode} before spawning the engine")
        ready = wait_ready(port, "tiny", proc) - t0
    finally:
        stop(proc, port)
    return ready, spawn if spawn is not None else float("nan")


def one_direct(port: int) -> float:
    argv, env = direct_plan(port)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return wait_ready(port, "tiny", proc) - t0
    finally:
        stop(proc, port)


def main() -> int:
    # SIGTERM (timeout, kill) as an exit, so that the finally: blocks stop the servers this started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    import tempfile

    from llmstack.models.tiny import ensure_tiny_model

    cache = Path(tempfile.mkdtemp(prefix="llmstack-bench-cache-"))
    ensure_tiny_model(cache)  # generated once, outside the timings; the compose cache starts empty
    via, direct, spawns = [], [], []
    for rep in range(args.reps):
        for kind in ("llmstack", "direct") if rep % 2 == 0 else ("direct", "llmstack"):
            if kind == "llmstack":
                ready, spawn = one_llmstack(cache)
                via.append(ready)
                spawns.append(spawn)
            else:
                direct.append(one_direct(free_port()))
            print(
                f"rep {rep} {kind:8s} ready {via[-1] if kind == 'llmstack' else direct[-1]:.2f} s", flush=True
            )

    ratio = statistics.median(via) / statistics.median(direct)
    print()
    print("| measure | llmstack | direct | ratio (target) |")
    print("|---|---|---|---|")
    print(
        f"| time to ready, median of {args.reps} (s) | {statistics.median(via):.2f} | "
        f"{statistics.median(direct):.2f} | {ratio:.3f} (<= 1.02) |"
    )
    print(f"| `python -m llmstack` to engine spawn, first run: Hydra composes (s) | {spawns[0]:.2f} | - | |")
    if len(spawns) > 1:
        repeat = statistics.median(spawns[1:])
        label = "`python -m llmstack` to engine spawn, repeat runs: compose cache (s)"
        print(f"| {label} | {repeat:.2f} | - | (< 0.5) |")
    if args.json:
        args.json.write_text(json.dumps({"llmstack": via, "direct": direct, "spawn": spawns, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
