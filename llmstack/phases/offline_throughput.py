"""The offline_throughput phase (replaces benchmark_vllm_throughput.py): vLLM's in-process engine, no server.

The prompts are built here, with the same datasets as the online phase; the measurement runs in its own
process, `engine.python -m llmstack.phases.offline_process --spec offline-spec.json` (see that module), with
the engine plan's arguments (model, low_bit's dtype/quantization, parallelism, max_num_seqs, ...) and
environment (VLLM_CPU_KVCACHE_SPACE on CPU, device selection, extra_env). That process is supervised like a
server: its output goes to offline.log, and Ctrl-C, SIGTERM or `timeout_s` stop its whole process group.

Result keys are those of vLLM's `benchmark_throughput.py --output-json` (elapsed_time, num_requests,
total_num_tokens, requests_per_second, tokens_per_second), plus output tokens/s and our provenance. Token
counts come from the engine's outputs (prompt_token_ids and each completion's token_ids), not the dataset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmstack.config.schema import BenchmarkConfig, RunConfig
from llmstack.errors import BenchmarkError, ConfigError, EngineError
from llmstack.phases.common import PhaseContext, load_tokenizer, provenance
from llmstack.phases.http_options import at_least, positive_seconds, served_context
from llmstack.phases.samples import dataset_host_problems, dataset_problems, load_samples
from llmstack.serving.plan import LaunchPlan

logger = logging.getLogger(__name__)

# engine.flavour -> the in-process engine class ("module:name") the offline process builds.
LLM_CLASSES = {
    "upstream": "vllm:LLM",
    "ipex": "ipex_llm.vllm.xpu.engine:IPEXLLMClass",
}
# Server options with no meaning in-process (the rest of the server's command line is EngineArgs).
_FRONTEND_OPTIONS = ("--host", "--port")
HEADLINE_KEYS = (
    "elapsed_time", "num_requests", "total_num_tokens", "requests_per_second", "tokens_per_second",
    "output_tokens_per_second", "total_input_tokens", "total_output_tokens",
)  # fmt: skip


@dataclass
class OfflineThroughputConfig(BenchmarkConfig):
    """vLLM's in-process engine (no server), like vLLM's benchmark_throughput.py."""

    phase: str = "offline_throughput"
    # random | fixed | sharegpt | jsonl
    dataset: str = "random"
    dataset_path: Optional[str] = None
    num_prompts: int = 1000
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    sharegpt_max_input_len: int = 1024
    sharegpt_max_total_len: int = 2048
    sharegpt_fixed_output_len: bool = False
    # Prompts generated (untimed) after the model loads, so warm-up costs stay out of the measurement.
    warmup_requests: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = True
    seed: int = 0
    # The whole process (load, warm-up, measurement) is stopped after this many seconds.
    timeout_s: float = 3600.0


CONFIG = OfflineThroughputConfig


def problems(run: RunConfig, b: OfflineThroughputConfig) -> Iterator[ConfigError]:
    if run.engine.name != "vllm":
        yield ConfigError(
            "benchmark",
            b.name,
            f"runs vLLM's in-process engine; engine={run.engine.name} has none.",
            hint="Use engine=vllm or engine=vllm_ipex, or an online benchmark against this engine.",
        )
    yield from at_least("benchmark.num_prompts", b.num_prompts, 1)
    yield from at_least("benchmark.warmup_requests", b.warmup_requests, 0)
    yield from at_least("benchmark.output_len", b.output_len, 1)
    if not (b.temperature >= 0 and math.isfinite(b.temperature)):
        yield ConfigError("benchmark.temperature", b.temperature, "must be 0 (greedy) or more.")
    if not 0 < b.top_p <= 1:
        yield ConfigError("benchmark.top_p", b.top_p, "is a probability mass, in (0, 1].")
    yield from positive_seconds("benchmark.timeout_s", b.timeout_s)
    yield from dataset_problems(b, served_context(run))


def host_problems(run: RunConfig, b: OfflineThroughputConfig) -> Iterator[ConfigError]:
    yield from dataset_host_problems(b)


def prepare(ctx: PhaseContext) -> OfflineThroughputPhase:
    return OfflineThroughputPhase(ctx)


def engine_args(plan: LaunchPlan, seed: int) -> list[str]:
    """The server's arguments after `python -m <module>`, without the frontend's, plus the sampling seed."""
    argv = list(plan.argv[3:]) if len(plan.argv) > 2 and plan.argv[1] == "-m" else list(plan.argv[1:])
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _FRONTEND_OPTIONS:
            skip = True
            continue
        if arg.split("=", 1)[0] in _FRONTEND_OPTIONS:
            continue
        kept.append(arg)
    return [*kept, "--seed", str(seed)]


def offline_plan(plan: LaunchPlan, spec_path: Path) -> LaunchPlan:
    """The engine plan turned into the offline process: same interpreter and environment, our module."""
    import dataclasses

    from llmstack.engines.base import source_first_pythonpath

    # The engine's interpreter may be another venv without llmstack installed: the offline module needs
    # only the standard library and vLLM, so pointing at the source tree is enough.
    inherited = plan.env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    env = {**plan.env, "PYTHONPATH": source_first_pythonpath(inherited)}
    return dataclasses.replace(
        plan,
        engine=f"{plan.engine} (offline)",
        argv=(plan.interpreter, "-m", "llmstack.phases.offline_process", "--spec", str(spec_path)),
        env=env,
        log_name="offline.log",
    )


def throughput_result(raw: dict[str, Any]) -> dict[str, Any]:
    """vLLM's throughput keys (and ours) from the offline process's raw counts."""
    per_request = raw["per_request_tokens"]
    total_in = sum(p for p, _ in per_request)
    total_out = sum(o for _, o in per_request)
    elapsed = raw["elapsed_time"]
    rate = (lambda amount: amount / elapsed) if elapsed > 0 else (lambda amount: None)
    return {
        "elapsed_time": elapsed,
        "num_requests": raw["num_requests"],
        "total_num_tokens": total_in + total_out,
        "requests_per_second": rate(raw["num_requests"]),
        "tokens_per_second": rate(total_in + total_out),
        "output_tokens_per_second": rate(total_out),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "input_lens": [p for p, _ in per_request],
        "output_lens": [o for _, o in per_request],
        "finish_reasons": raw.get("finish_reasons", {}),
        "load_s": raw.get("load_s"),
        "warmup_s": raw.get("warmup_s"),
        "warmup_requests": raw.get("warmup_requests"),
        "vllm_version": raw.get("vllm_version"),
    }


def format_report(result: dict[str, Any]) -> str:
    """vLLM's (and the seed's) throughput line, with the counts it comes from."""

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return "\n".join(
        [
            f"Throughput: {show(result['requests_per_second'])} requests/s, "
            f"{show(result['tokens_per_second'])} total tokens/s, "
            f"{show(result['output_tokens_per_second'])} output tokens/s",
            f"{result['num_requests']} prompts in {result['elapsed_time']:.2f} s: "
            f"{result['total_input_tokens']} prompt tokens, {result['total_output_tokens']} output tokens "
            f"(counted from the engine's outputs).",
            f"Model load {result['load_s']:.1f} s; warm-up ({result['warmup_requests']} prompts, untimed) "
            f"{result['warmup_s']:.1f} s.",
        ]
    )


class OfflineThroughputPhase:
    def __init__(self, ctx: PhaseContext) -> None:
        bench = ctx.run.benchmark
        assert isinstance(bench, OfflineThroughputConfig)
        self.ctx = ctx
        self.bench = bench
        from llmstack.engines.vllm.config import VllmEngineConfig

        engine = ctx.run.engine
        # The phase's rules admit engine=vllm only; its flavour picks the in-process class.
        flavour = engine.flavour if isinstance(engine, VllmEngineConfig) else None
        if flavour not in LLM_CLASSES:
            raise BenchmarkError(f"no in-process engine known for vLLM flavour {flavour!r}")
        self.llm_class = LLM_CLASSES[flavour]
        tokenizer = load_tokenizer(ctx)
        samples = load_samples(
            bench, tokenizer, bench.warmup_requests + bench.num_prompts, ctx.run.engine.max_model_len
        )
        self.warmup = samples[: bench.warmup_requests]
        self.measured = samples[bench.warmup_requests :]
        ctx.summary.update({"dataset": bench.dataset})

    def spec(self, result_path: Path) -> dict[str, Any]:
        b = self.bench
        return {
            "llm_class": self.llm_class,
            "engine_args": engine_args(self.ctx.plan, b.seed),
            "sampling": {"temperature": b.temperature, "top_p": b.top_p, "ignore_eos": b.ignore_eos},
            "warmup": {
                "prompts": [s.prompt for s in self.warmup],
                "output_lens": [s.output_len for s in self.warmup],
            },
            "prompts": [s.prompt for s in self.measured],
            "output_lens": [s.output_len for s in self.measured],
            "result_path": str(result_path),
        }

    def run(self, server: Any | None) -> None:
        from llmstack.serving.supervisor import run_to_completion

        ctx, bench = self.ctx, self.bench
        raw_path = ctx.rundir.file("offline-raw.json")
        spec_path = ctx.rundir.write_json("offline-spec.json", self.spec(raw_path))
        plan = offline_plan(ctx.plan, spec_path)
        logger.info(
            "offline throughput: %d prompts (+%d warm-up) in vLLM's in-process engine, no server",
            len(self.measured),
            len(self.warmup),
        )
        code, tail = run_to_completion(
            plan, ctx.rundir.file(plan.log_name), echo=_echo, timeout_s=bench.timeout_s
        )
        if code != 0:
            raise EngineError(
                f"the offline benchmark process exited with status {code}; its log is "
                f"{ctx.rundir.file(plan.log_name)}",
                tail,
            )
        try:
            raw = json.loads(raw_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"the offline benchmark process wrote no result ({exc})") from exc
        result = throughput_result(raw)
        # What the dataset asked for, beside what the engine counted (equal for exact prompts + ignore_eos).
        result["expected_input_lens"] = [s.input_tokens for s in self.measured]
        result["expected_output_lens"] = [s.output_len for s in self.measured]
        result.update(provenance(ctx, {"llm_class": self.llm_class}))
        ctx.rundir.write_json("result.json", result)
        report = format_report(result)
        ctx.rundir.write_text("report.txt", report + "\n")
        print(report, flush=True)
        ctx.summary["result"] = {k: result.get(k) for k in HEADLINE_KEYS}


def _echo(line: str) -> None:
    from llmstack.phases.offline_process import PROGRESS_PREFIX

    if line.startswith(PROGRESS_PREFIX):
        print(f"  [offline] {line[len(PROGRESS_PREFIX) :].strip()}", file=sys.stderr, flush=True)
    elif any(marker in line for marker in ("ERROR", "CRITICAL", "Traceback", "Error:")):
        print(f"  [offline] {line}", file=sys.stderr, flush=True)
