"""The benchmark phase chained after readiness: warm-up, then one measured run per load level.

Each level writes bench-<label>/result.json (vLLM `bench serve --save-result` keys plus our provenance),
requests.jsonl (every request's timestamps and counts) and report.txt (the seed's report).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from llmstack.config.schema import BenchmarkConfig, RunConfig
from llmstack.engines.plan import LaunchPlan
from llmstack.errors import BenchmarkError, EngineError
from llmstack.results.rundir import RunDir

logger = logging.getLogger(__name__)

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Keys of each level's summary that summary.json repeats (the full set is in result.json).
HEADLINE_KEYS = (
    "completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
    "mean_e2el_ms",
)  # fmt: skip


def build_payload(bench: BenchmarkConfig, model: str, prompt: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": bench.output_len,
        "temperature": bench.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if bench.ignore_eos:
        # vLLM's sampling extensions: output lengths exactly as asked.
        payload["ignore_eos"] = True
        payload["min_tokens"] = bench.output_len
    if bench.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    return payload


def run_benchmark_phase(run: RunConfig, plan: LaunchPlan, rundir: RunDir, server: Any) -> dict[str, Any]:
    from llmstack.bench.loadgen import run_load_sync
    from llmstack.bench.metrics import summarize_load
    from llmstack.bench.prompts import load_tokenizer, random_prompts, token_counter
    from llmstack.bench.records import dump_records
    from llmstack.bench.report import format_load_level, format_seed_report

    bench = run.benchmark
    tokenizer = load_tokenizer(run.model.tokenizer or str(run.model.path))
    count_tokens = token_counter(tokenizer)
    total = bench.warmup_requests + bench.num_prompts
    prompts = random_prompts(tokenizer, total, bench.input_len, bench.seed)
    payloads = [build_payload(bench, plan.probe.served_name, p.text) for p in prompts]
    input_lens = [p.tokens for p in prompts]
    common = {
        "endpoint": ENDPOINTS[bench.endpoint],
        "api_key": plan.probe.api_key,
        "timeout_s": bench.timeout_s,
    }

    if bench.warmup_requests:
        w = bench.warmup_requests
        logger.info("warm-up: %d requests", w)
        concurrency = min(w, max(bench.concurrency))
        warm = run_load_sync(plan.probe.base_url, payloads[:w], concurrency=concurrency, **common)
        if not any(r.success for r in warm.records):
            _raise_if_server_died(server)
            raise BenchmarkError(f"every warm-up request failed; the first error: {warm.records[0].error}")

    levels: list[dict[str, Any]] = []
    for concurrency in bench.concurrency:
        label = f"c{concurrency}"
        logger.info("benchmark %s: %d requests at concurrency %d", label, bench.num_prompts, concurrency)
        result = run_load_sync(
            plan.probe.base_url,
            payloads[bench.warmup_requests :],
            concurrency=concurrency,
            progress=_progress_bar(label),
            input_lens=input_lens[bench.warmup_requests :],
            **common,
        )
        summary = summarize_load(result, count_tokens=count_tokens)
        summary.update(_provenance(run, plan, bench))
        level_dir = rundir.path / f"bench-{label}"
        level_dir.mkdir(exist_ok=True)
        level = RunDir(level_dir)
        level.write_json("result.json", summary)
        dump_records(level_dir / "requests.jsonl", result.records)
        report = format_seed_report(
            result.records, result.start, result.end, concurrency=concurrency, count_tokens=count_tokens
        )
        level.write_text("report.txt", report + "\n")
        print(format_load_level(summary, label), flush=True)
        print(report, flush=True)
        headline = {k: summary.get(k) for k in HEADLINE_KEYS}
        levels.append({"label": label, "concurrency": concurrency, **headline})
        _raise_if_server_died(server)
    failed = sum(level["failed"] or 0 for level in levels)
    if failed:
        logger.warning("%d requests failed; see bench-*/result.json 'error_counts'", failed)
    return {"name": bench.name, "endpoint": bench.endpoint, "levels": levels}


def _provenance(run: RunConfig, plan: LaunchPlan, bench: BenchmarkConfig) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if bench.endpoint == "chat" else "vllm",
        "endpoint_type": "openai-chat" if bench.endpoint == "chat" else "openai",
        "model_id": plan.probe.served_name,
        "tokenizer_id": run.model.tokenizer or run.model.path,
        "llmstack": {
            "engine": plan.engine,
            "model": run.model.name,
            "low_bit": run.low_bit.name,
            "device": run.device.name,
            "input_len": bench.input_len,
            "output_len": bench.output_len,
            "ignore_eos": bench.ignore_eos,
            "seed": bench.seed,
        },
    }


def _raise_if_server_died(server: Any) -> None:
    if not server.alive():
        raise EngineError(
            "the engine died during the benchmark; partial results were written", server.log_tail()
        )


def _progress_bar(label: str) -> Any:
    if not sys.stderr.isatty():
        return None
    width = 30

    def show(done: int, total: int) -> None:
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
