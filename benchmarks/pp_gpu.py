"""engine=pp on N GPUs vs engine=lightweight on one, both through the launcher, in one process (issue 17).

Workload: the lightweight GPU benchmark's (benchmarks/lightweight_gpu.py, whose model builder, tokenizer and
prompts are reused): a random-weight Qwen2-0.5B-shape model in bf16, 128 prompt tokens, 256 output tokens,
ignore_eos, streamed chat completions, temperature 0. Phases, in this order:

  1. build the model directory (--smoke: the tiny SMOKE shape; served in float32 on a cpu);
  2. memory fit: from the launcher's own per-stage estimate (two dry runs) pick device.memory_gib between
     the largest stage of a 2-stage pipeline and the one stage of engine.pipeline_parallel_size=1; then
     `dry_run=true` with it must refuse pipeline_parallel_size=1 (exit 2, "does not fit") and accept 2
     (planned with device.count=2: only a 2-GPU machine can serve it, and the pp run below then does);
  3. greedy equivalence in float32: both engines started by the launcher (benchmark=none), the same prompts
     as /v1/completions with return_token_ids, temperature 0, ignore_eos, one at a time and (pp) all at
     once; the token ids must be equal;
  4. `python -m llmstack engine=pp engine.pipeline_parallel_size=N benchmark=online` and the same with
     engine=lightweight (one GPU), levels c1 and c64 (each level runs --duration-s, closed loop); rank 0's
     /metrics is sampled meanwhile, and each stage's busy (wall) and CPU seconds over the c64 level give
     its busy fraction. NCCL transfer time per step is not measured by the worker: reported as such.
The NCCL_* variables of this environment are passed through untouched (the launcher inherits them) and
printed, with rank 0's own (/proc/<pid>/environ). A short table is printed last; OUT/results.json has it all.

    python3 benchmarks/pp_gpu.py --out $OUT                                     # on the GPU machine(s)
On the lent machine (its torch and transformers; the rest as wheels: the launcher's supervisor needs psutil,
the load generator's fast paths httptools and uvloop): `../shared/tools/device-wheels.sh psutil httptools
uvloop` here, then carry .whl and install it as that script says before the command above. --nproc-per-node
defaults to the visible GPUs (at most 2): one GPU runs engine.pipeline_parallel_size=1.
    .venv/bin/python benchmarks/pp_gpu.py --smoke --device cpu --nproc-per-node 2 --out /tmp/ppg   # the flow
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import lightweight_gpu as lw  # noqa: E402

SERVED_NAME = lw.SERVED_NAME
# Per-stage counters (labels: model_name, stage) and the steps counter (stage -1 here) of rank 0's /metrics.
METRIC = re.compile(r"^llmstack:(pipeline_stage_\w+|pipeline_steps_total)\{([^}]*)\}\s+(\S+)$")
STAGE = re.compile(r'stage="(\d+)"')
# Marks this run's processes, so that rank 0 can be found by its environment without psutil.
MARKER = "PP_GPU_BENCH_RUN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_argv(
    engine: str, args: argparse.Namespace, port: int, *extra: str, device: str | None = None
) -> list[str]:
    return [
        sys.executable, "-m", "llmstack", f"engine={engine}", f"device={device or args.device}",
        "model=local", f"model.path={args.model_dir}", f"model.served_name={SERVED_NAME}",
        f"engine.port={port}", f"results_dir={args.out / 'launcher'}", *extra,
    ]  # fmt: skip


def engine_keys(engine: str, n: int, concurrency: int, dtype: str, max_len: int) -> list[str]:
    """Batch sizes for `concurrency` sequences in flight: lightweight one batch, pp a micro-batch a stage."""
    keys = [f"engine.dtype={dtype}", f"engine.max_model_len={max_len}"]
    if engine == "pp":
        keys += [f"engine.pipeline_parallel_size={n}", f"engine.max_num_seqs={max(1, concurrency // n)}"]
    else:
        keys += [f"engine.max_batch_size={concurrency}"]
    return keys


# -- 2. memory fit -------------------------------------------------------------------------------------------
def stage_gib(text: str) -> list[float]:
    """Per-stage totals from the dry run's 'Memory estimate per stage' line (GiB, two decimals)."""
    line = next((ln for ln in text.splitlines() if "Memory estimate per stage" in ln), "")
    return [float(v) for v in re.findall(r"= ([0-9.]+) GiB", line)]


def dry_run(engine_args: list[str], env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [*engine_args, "dry_run=true"], capture_output=True, text=True, env=env, timeout=120
    )
    return done.returncode, done.stdout + done.stderr


def memory_fit(args: argparse.Namespace, env: dict[str, str], max_len: int) -> dict[str, Any]:
    # Plans for a cuda machine of 1 and 2 cards (device.count), so that this also runs on a cpu: on cpu the
    # ranks of a node share the host's memory, and no split helps.
    def plan(n: int, *extra: str) -> tuple[int, str]:
        argv = launcher_argv("pp", args, 18900, f"device.count={n}", "benchmark=none", device="cuda")
        argv += engine_keys("pp", n, args.concurrency[-1], args.dtype, max_len) + list(extra)
        return dry_run(argv, env)

    rc1, text1 = plan(1)
    rc2, text2 = plan(2)
    one, two = stage_gib(text1), stage_gib(text2)
    if rc1 or rc2 or len(one) != 1 or len(two) != 2:
        raise RuntimeError(f"dry runs without a memory limit: rc {rc1}/{rc2}, estimates {one} / {two}")
    if not max(two) < one[0]:
        raise RuntimeError(
            f"a 2-stage pipeline's largest stage ({max(two)} GiB) is not smaller than one stage"
        )
    gib = round((max(two) + one[0]) / 2, 3)
    rc_refuse, refuse = plan(1, f"device.memory_gib={gib}")
    rc_accept, _ = plan(2, f"device.memory_gib={gib}")
    message = next((ln for ln in refuse.splitlines() if "does not fit" in ln), refuse.strip()[-400:])
    return {
        "memory_gib": gib,
        "estimate_1_stage_gib": one,
        "estimate_2_stages_gib": two,
        "refused_pp1": rc_refuse == 2 and "does not fit" in refuse,
        "refuse_rc": rc_refuse,
        "refuse_message": message,
        "accepted_pp2_plan": rc_accept == 0,
        "accept_rc": rc_accept,
        "served_across_2": None,  # set after the pp run when it ran on 2 GPUs under this limit
    }


# -- 3. greedy equivalence -----------------------------------------------------------------------------------
@contextlib.contextmanager
def launcher(argv: list[str], log_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """The launcher in its own session; stopped by SIGTERM to the launcher alone (it stops its engine, all
    ranks), then SIGKILL to the whole session if it has not gone in time."""
    with open(log_path, "ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of its session left over
            proc.wait()


def greedy_tokens(port: int, prompts: list[str], max_tokens: int, concurrent: bool) -> list[list[int]]:
    def one(prompt: str) -> list[int]:
        body = {
            "model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True,
        }  # fmt: skip
        with httpx.Client(timeout=lw.time_left(300), trust_env=False) as client:
            reply = client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"/v1/completions: {reply.status_code} {reply.text[:300]}")
            return list(reply.json()["choices"][0]["token_ids"])

    if not concurrent:
        return [one(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]

    def put(i: int) -> None:
        out[i] = one(prompts[i])

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def equivalence(args: argparse.Namespace, env: dict[str, str], words: Any, max_len: int) -> dict[str, Any]:
    import random

    rng = random.Random(17)
    lengths = [lw.PROMPT_TOKENS, 77, 31, 100]
    low, high = lw.PROMPT_IDS
    prompts = [words([rng.randrange(low, high) for _ in range(n)]) for n in lengths]
    new = 8 if args.smoke else 64
    max_len = max(max_len, max(lengths) + new)
    got: dict[str, list[list[int]]] = {}
    for engine in ("lightweight", "pp"):
        port = free_port()
        keys = engine_keys(engine, args.nproc, len(prompts), "float32", max_len)
        argv = launcher_argv(engine, args, port, "benchmark=none", "experiment_name=equiv", *keys)
        with launcher(argv, args.out / f"equiv-{engine}.log", env) as proc:
            ready = lw.wait_ready(port, proc, lw.time_left(600), "/v1/models")
            lw.log(f"equiv: {engine} ready after {ready:.1f} s")
            got[engine] = greedy_tokens(port, prompts, new, concurrent=False)
            if engine == "pp":
                got["pp_concurrent"] = greedy_tokens(port, prompts, new, concurrent=True)
    ref = got["lightweight"]
    agree = {
        name: [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(y))
               for x, y in zip(got[name], ref, strict=True)]
        for name in ("pp", "pp_concurrent")
    }  # fmt: skip
    return {
        "dtype": "float32",
        "prompts": len(prompts),
        "prompt_tokens": lengths,
        "new_tokens": new,
        "equal": got["pp"] == ref and got["pp_concurrent"] == ref,
        "agreeing_prefix": agree,
    }


# -- 4. the benchmark through the launcher -------------------------------------------------------------------
class MetricsSampler(threading.Thread):
    """rank 0's /metrics every 0.5 s, with the launcher's log lines that open and close the last level."""

    def __init__(self, port: int, logs: list[Path], level: str) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.logs, self.start_mark = logs, f"benchmark {level}:"
        self.samples: list[tuple[float, bool, dict[str, dict[int, float]]]] = []
        self.done = threading.Event()

    def in_level(self) -> bool:
        text = ""
        for pattern in self.logs:
            for path in pattern.parent.glob(pattern.name):
                with contextlib.suppress(OSError):
                    text += path.read_text(errors="replace")
        at = text.find(self.start_mark)
        return at >= 0 and "stopping pp-" not in text[at:]

    def run(self) -> None:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while not self.done.wait(0.5):
                with contextlib.suppress(Exception):
                    text = client.get(self.url).text
                    figures: dict[str, dict[int, float]] = {}
                    for line in text.splitlines():
                        if m := METRIC.match(line):
                            stage = STAGE.search(m[2])
                            figures.setdefault(m[1], {})[int(stage[1]) if stage else -1] = float(m[3])
                    self.samples.append((time.monotonic(), self.in_level(), figures))

    def fractions(self) -> dict[str, Any] | None:
        inside = [s for s in self.samples if s[1]]
        if len(inside) < 2:
            return None
        (t0, _, a), (t1, _, b) = inside[0], inside[-1]
        out: dict[str, Any] = {"window_s": round(t1 - t0, 2)}
        for name in (
            "pipeline_stage_busy_seconds_total",
            "pipeline_stage_cpu_seconds_total",
            "pipeline_steps_total",
        ):
            if name in a and name in b:
                out[name] = {s: round((b[name][s] - a[name].get(s, 0.0)) / (t1 - t0), 3) for s in b[name]}
        return out


def rank0_nccl_env() -> dict[str, str] | None:
    """NCCL_* of the rank-0 worker process of this run (found by MARKER and RANK=0 in its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        environ = dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
        if (MARKER in environ and environ.get("RANK") == "0" and "llmstack.workers.pipeline" in cmd
                and "torchrun" not in cmd):  # fmt: skip
            return {k: v for k, v in environ.items() if k.startswith("NCCL_")}
    return None


def bench(
    engine: str, args: argparse.Namespace, env: dict[str, str], max_len: int, memory_gib: float | None
) -> dict[str, Any]:
    port = free_port()
    name = f"bench-{engine}"
    hi = args.concurrency[-1]
    levels = ",".join(str(c) for c in args.concurrency)
    load = [
        "benchmark=online", f"benchmark.concurrency=[{levels}]", f"benchmark.input_len={args.input_len}",
        f"benchmark.output_len={args.output_len}", "benchmark.endpoint=chat", "benchmark.stream=true",
        "benchmark.ignore_eos=true", "benchmark.temperature=0.0", f"benchmark.warmup_requests={hi}",
        f"benchmark.num_prompts={args.num_prompts}", f"benchmark.timeout_s={int(lw.time_left(600))}",
    ]  # fmt: skip
    if args.duration_s:
        load.append(f"benchmark.duration_s={args.duration_s}")
    n = args.nproc if engine == "pp" else 1
    keys = engine_keys(engine, n, hi, args.dtype, max_len)
    if memory_gib is not None:
        keys.append(f"device.memory_gib={memory_gib}")
    argv = launcher_argv(engine, args, port, f"experiment_name={name}", *keys, *load)
    console = args.out / f"{name}.log"
    sampler = MetricsSampler(port, [console, args.out / "launcher" / name / "*" / "llmstack.log"], f"c{hi}")
    if engine == "pp":
        sampler.start()
    nccl_rank0: dict[str, str] | None = None
    started = time.monotonic()
    with launcher(argv, console, env) as proc:
        while proc.poll() is None:
            if engine == "pp" and nccl_rank0 is None:
                nccl_rank0 = rank0_nccl_env()
            if time.monotonic() > lw.DEADLINE[0]:
                raise TimeoutError(f"{name} still running at the deadline")
            time.sleep(1.0)
    sampler.done.set()
    runs = sorted((args.out / "launcher" / name).glob("*/summary.json"))
    if not runs:
        raise RuntimeError(f"{name}: no summary.json (launcher exit {proc.returncode}); see {console}")
    summary = json.loads(runs[-1].read_text())
    result: dict[str, Any] = {
        "exit_code": proc.returncode,
        "status": summary.get("status"),
        "run_dir": str(runs[-1].parent),
        "ready_s": summary.get("ready_s"),
        "wall_s": round(time.monotonic() - started, 1),
    }
    for level in (summary.get("benchmark") or {}).get("levels", []):
        result[level["label"]] = {
            k: level.get(k)
            for k in ("completed", "failed", "duration", "output_throughput", "mean_ttft_ms",
                      "median_ttft_ms", "mean_tpot_ms", "p99_tpot_ms")
        }  # fmt: skip
    if engine == "pp":
        result["stages"] = sampler.fractions()
        result["nccl_env_rank0"] = nccl_rank0
        result["nccl_transfer_ms_per_step"] = "not measured (the worker does not time its send/recv)"
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: launcher exit {proc.returncode}: {json.dumps(result)}; see {console}")
    return result


# -- the run ------------------------------------------------------------------------------------------------
def main() -> int:
    # SIGTERM (timeout, kill) as an exit, so that the finally: blocks stop the servers this started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/pp_gpu")))
    parser.add_argument("--model-dir", type=Path, default=None, help="default: OUT/../qwen2-0.5b-random")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--nproc-per-node", dest="nproc", type=int, default=None,
                        help="pp ranks (default: the visible GPUs, at most 2; 2 on a cpu)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny model and short levels: checks the flow")
    parser.add_argument("--duration-s", type=float, default=None, help="per level (0: --num-prompts each)")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument(
        "--skip", default="", help="comma list of phases to skip: memory,equiv,pp,lightweight"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="skip phases that would start after this"
    )
    args = parser.parse_args()
    lw.DEADLINE[0] = lw.T0 + args.budget_s + 40.0
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    args.model_dir = args.model_dir or Path("/tmp/qwen2-0.5b-random" if not args.smoke else "/tmp/ppg-smoke")
    import torch

    if args.nproc is None:
        args.nproc = min(2, torch.cuda.device_count()) if args.device == "cuda" else 2
    if args.nproc < 1:
        parser.error("--nproc-per-node must be at least 1 (no GPU visible? use --device cpu)")
    args.concurrency = [1, 4] if args.smoke else [1, 64]
    args.input_len = 16 if args.smoke else lw.PROMPT_TOKENS
    args.output_len = 8 if args.smoke else lw.OUTPUT_TOKENS
    if args.duration_s is None:
        args.duration_s = 4.0 if args.smoke else 20.0  # smoke: long enough for a few /metrics samples
    args.num_prompts = args.num_prompts or (8 if args.smoke else 64)
    # bf16 on the GPU, as the lightweight benchmark; float32 on a cpu (its bf16 kernels are slow).
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    max_len = args.input_len + args.output_len + (64 if args.smoke else 0)  # room for the chat template
    # The memory check sizes the KV cache for a context where it dominates the tiny smoke model.
    mem_len = 32768 if args.smoke else max_len
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    results["env"] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "python": sys.version.split()[0],
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
    }
    lw.log(f"env {results['env']}")

    def phase(name: str, fn: Any, *fn_args: Any) -> Any:
        if name in skip:
            return None
        if time.monotonic() - lw.T0 > args.budget_s:
            lw.log(f"{name}: skipped (over the time budget)")
            results.setdefault("skipped", []).append(name)
            return None
        lw.log(f"{name}: start")
        try:
            value = fn(*fn_args)
        except Exception as exc:  # one failed phase must not cost the others: report it and go on
            lw.log(f"{name}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
            results.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"
            return None
        results[name] = value
        lw.log(f"{name}: {json.dumps(value)}")
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        return value

    shape = lw.SMOKE if args.smoke else lw.QWEN2_05B
    phase("build", lambda: (lw.build_model(args.model_dir, shape, args.device), str(args.model_dir))[1])
    env = dict(os.environ)  # NCCL_* and the rest as they are: nothing here sets or clears them
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[MARKER] = str(os.getpid())
    import transformers

    words = transformers.AutoTokenizer.from_pretrained(args.model_dir).decode
    fit = phase("memory", memory_fit, args, env, mem_len)
    phase("equiv", equivalence, args, env, words, max_len)
    # Served under the memory limit only where it can fit: 2 or more cards.
    limit = fit["memory_gib"] if fit and args.nproc >= 2 and not args.smoke else None
    pp = phase("pp", bench, "pp", args, env, max_len, limit)
    if fit:
        fit["served_across_2"] = bool(pp and limit is not None and pp.get("status") == "ok")
    phase("lightweight", bench, "lightweight", args, env, max_len, None)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, args)
    return 0


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    lo, hi = (f"c{c}" for c in args.concurrency)

    def get(*keys: Any) -> Any:
        node: Any = results
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def fmt(v: Any, spec: str = ",.0f") -> str:
        return "-" if v is None else format(v, spec)

    env = results["env"]
    print()
    print(f"GPU: {env['gpu']} x{env['gpus']}  torch {env['torch']}  device {args.device}  "
          f"model {'SMOKE' if args.smoke else 'Qwen2-0.5B shape'} {args.dtype}, "
          f"{args.input_len} in / {args.output_len} out, streamed chat, ignore_eos")  # fmt: skip
    print(f"NCCL_* of this environment: {env['nccl_env'] or 'none'}; rank 0's: {get('pp', 'nccl_env_rank0')}")
    print(f"{'engine':24} {'level':>6} {'out tok/s':>10} {'mean TTFT ms':>13} {'mean TPOT ms':>13} {'ok':>5}")
    rows = (
        (f"pp ({args.nproc} rank{'s' if args.nproc > 1 else ''})", "pp"),
        ("lightweight (1 dev)", "lightweight"),
    )
    for label, key in rows:
        for level in (lo, hi):
            f = get(key, level) or {}
            print(f"{label:24} {level:>6} {fmt(f.get('output_throughput')):>10} "
                  f"{fmt(f.get('mean_ttft_ms'), ',.1f'):>13} {fmt(f.get('mean_tpot_ms'), ',.2f'):>13} "
                  f"{fmt(f.get('completed'), 'd'):>5}")  # fmt: skip
    a, b = get("pp", hi, "output_throughput"), get("lightweight", hi, "output_throughput")
    ratio = a / b if a and b else None
    target = "target >= 1.6 with 2 GPUs" + ("" if args.nproc >= 2 and args.device == "cuda" else ": n/a here")
    print(f"ratio pp / lightweight at {hi}: {fmt(ratio, '.2f')} ({target})")
    stages = get("pp", "stages")
    if stages:
        busy = stages.get("pipeline_stage_busy_seconds_total", {})
        cpu = stages.get("pipeline_stage_cpu_seconds_total", {})
        shown = ", ".join(f"s{s} {busy[s]:.0%} (cpu {cpu.get(s, 0):.2f} cores)" for s in sorted(busy))
        steps = stages.get("pipeline_steps_total", {}).get(-1)
        rate = f"; {steps:,.0f} micro-batch steps/s" if steps is not None else ""
        print(f"stage busy over {hi} ({stages['window_s']} s window): {shown or 'no stage metrics'}{rate}")
    else:
        print(f"stage busy over {hi}: not sampled (no /metrics figures inside the level)")
    print("NCCL transfer time per step: not measured (the worker does not time its send/recv)")
    e = get("equiv")
    if e:
        print(f"greedy float32 pp == lightweight ({e['prompts']} prompts x {e['new_tokens']} tokens, "
              f"alone and concurrent): {e['equal']} (agreeing prefix {e['agreeing_prefix']})")  # fmt: skip
    m = get("memory")
    if m:
        served = m["served_across_2"]
        two_gpus = args.nproc >= 2 and args.device == "cuda"
        across = (
            "served and benchmarked across 2 GPUs under it"
            if served
            else "NOT served across 2"
            if two_gpus
            else "serving across 2 needs 2 GPUs (not run here)"
        )
        print(f"memory fit at device.memory_gib={m['memory_gib']} (estimate 1 stage "
              f"{m['estimate_1_stage_gib']}, 2 stages {m['estimate_2_stages_gib']} GiB): pp=1 refused "
              f"(exit {m['refuse_rc']}): {m['refused_pp1']}; pp=2 plan accepted: "
              f"{m['accepted_pp2_plan']}; {across}")  # fmt: skip
    if results.get("failures"):
        print(f"FAILED phases: {results['failures']}")


if __name__ == "__main__":
    sys.exit(main())
