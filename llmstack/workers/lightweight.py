"""llmstack's lightweight worker: one model, continuous batching, OpenAI-compatible HTTP.

    python -m llmstack.workers.lightweight --model DIR --served-model-name NAME [--backend ipex_llm ...]

Two processes by default: this one serves HTTP (FastAPI on uvicorn) and tokenizes prompts; a child
(`model_process.py`) loads the model and runs the scheduler. The model is loaded before the port opens,
so a listening port means a loaded model (and the launcher's probe still waits for /health and
/v1/models). SIGTERM or Ctrl-C stops uvicorn, which stops the model process; if the model process dies,
open requests fail and the server exits with status 1, so the launcher sees it. Flags:
`llmstack.workers.protocol.WorkerOptions` (shared with the launcher, which renders them).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from llmstack.workers.protocol import API_KEY_ENV, WorkerOptions

logger = logging.getLogger("llmstack.workers.lightweight")

# Seconds uvicorn waits for open streams on shutdown before closing them (the launcher's grace is longer).
GRACEFUL_SHUTDOWN_S = 5


def main(argv: Sequence[str] | None = None) -> int:
    return serve(WorkerOptions.parse(argv))


def serve(options: WorkerOptions, model_main: Callable[..., None] | None = None) -> int:
    """Serve until stopped; the exit status. `model_main`: the model process's main (`ModelProcess`'s
    target; the pipeline's rank 0 runs its stage and scheduler there), default the lightweight one."""
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    from llmstack.workers.metrics import WorkerMetrics

    metrics = WorkerMetrics(options.served_model_name)
    try:
        client, tokenizer = _start_model(options, metrics, model_main)
    except Exception as exc:  # the model cannot be served as asked: one line, no traceback
        logger.error("cannot serve %s: %s", options.model, exc)
        return 2

    import uvicorn

    from llmstack.workers.openai.api_router import build_app
    from llmstack.workers.openai.protocol import RequestLimits
    from llmstack.workers.openai.serving import Serving

    serving = Serving(
        client,
        tokenizer,
        served_name=options.served_model_name,
        model_path=options.model,
        max_model_len=client.max_model_len,
        info=client.facts.info,
        metrics=metrics,
        api_key=os.environ.get(API_KEY_ENV) or None,
        vocab_size=client.facts.vocab_size,
        limits=RequestLimits.from_options(options, client.max_model_len),
    )
    app = build_app(
        serving,
        on_startup=lambda: logger.info(
            "serving %s at http://%s:%d/v1", options.served_model_name, options.host, options.port
        ),
    )
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level if options.log_level != "info" else "warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    if hasattr(client, "on_death"):
        client.on_death = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if getattr(client, "died", False) else 0


def _start_model(
    options: WorkerOptions, metrics: Any, model_main: Callable[..., None] | None
) -> tuple[Any, Any]:
    """The model loop's client (the model loaded) and this process's tokenizer."""
    from llmstack.workers.backends.loader import load_tokenizer
    from llmstack.workers.detokenizer import decoders_for
    from llmstack.workers.model_client import ProcessModelClient, ThreadModelClient
    from llmstack.workers.model_process import ModelProcess

    if not options.model_process and model_main is None:
        client = ThreadModelClient(options, metrics)
        return client, client.tokenizer
    model = ModelProcess(options, model_main)  # loads in the child while this process loads the tokenizer
    try:
        tokenizer = load_tokenizer(options)
        facts = model.wait_ready()
    except BaseException:
        model.stop()
        raise
    client = ProcessModelClient(
        model,
        facts,
        max_waiting_requests=options.max_waiting_requests,
        metrics=metrics,
        decoders=decoders_for(tokenizer),
    )
    return client, tokenizer


if __name__ == "__main__":
    from llmstack.workers.model_process import fast_exit

    fast_exit(main())
