"""llmstack's lightweight worker: one model, continuous batching, OpenAI-compatible HTTP.

    python -m llmstack.workers.lightweight --model DIR --served-model-name NAME [--backend ipex_llm ...]

The model is loaded before the port opens, so a listening port means a loaded model (and the launcher's
probe still waits for /health and /v1/models). SIGTERM or Ctrl-C stops uvicorn, then the scheduler
thread. Flags: `llmstack.workers.protocol.WorkerOptions` (shared with the launcher, which renders them).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from llmstack.workers.protocol import API_KEY_ENV, WorkerOptions

logger = logging.getLogger("llmstack.workers.lightweight")

# Seconds uvicorn waits for open streams on shutdown before closing them (the launcher's grace is longer).
GRACEFUL_SHUTDOWN_S = 5


def main(argv: Sequence[str] | None = None) -> int:
    options = WorkerOptions.parse(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    from llmstack.workers.backends import BackendError, load

    try:
        loaded = load(options)
    except BackendError as exc:
        logger.error("cannot serve %s: %s", options.model, exc)
        return 2

    import uvicorn

    from llmstack.workers.api import Worker, build_app
    from llmstack.workers.detokenizer import decoder_for
    from llmstack.workers.metrics import WorkerMetrics
    from llmstack.workers.scheduler import Scheduler

    metrics = WorkerMetrics(options.served_model_name)
    scheduler = Scheduler(
        loaded.backend,
        {skip: decoder_for(loaded.tokenizer, skip) for skip in (True, False)},
        loaded.eos_token_ids,
        max_waiting_requests=options.max_waiting_requests,
        metrics=metrics,
    )
    worker = Worker(
        scheduler,
        loaded.tokenizer,
        served_name=options.served_model_name,
        model_path=options.model,
        max_model_len=loaded.max_model_len,
        info=loaded.backend.info(),
        metrics=metrics,
        api_key=os.environ.get(API_KEY_ENV) or None,
    )
    app = build_app(
        worker,
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
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
