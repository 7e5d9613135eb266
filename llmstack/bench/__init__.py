"""The benchmark client: load generation over HTTP, per-request records and metrics.

It knows only HTTP and the OpenAI API, so it measures any compatible server, and imports nothing of llmstack
outside this package (the launcher's phases, `llmstack.phases`, glue it to a run). Submodules are imported
on demand to keep `import llmstack.bench` cheap: `http` (transport; `framing`, `stamped` under it), `openai`
(what a response means), `loadgen` (closed loop, open loop, fixed duration; `loops` under it), `records`,
`metrics`, `datasets`, `prompts`, `images`, `wrk`.

Against any OpenAI-compatible server, without the launcher:

    from llmstack.bench.loadgen import run_load_sync
    from llmstack.bench.metrics import summarize_load

    body = {"model": "my-model", "prompt": "Hello", "max_tokens": 64, "stream": True,
            "stream_options": {"include_usage": True}}
    result = run_load_sync("http://localhost:8000", [body] * 100, endpoint="/v1/completions",
                           concurrency=8, timeout_s=60)
    summary = summarize_load(result)
    print(summary["output_throughput"], summary["p99_ttft_ms"])
"""

from __future__ import annotations
