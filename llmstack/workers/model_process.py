"""The model process (loads the model, runs the scheduler) and its handle in the server process.

Messages (pickled tuples on two one-way multiprocessing Pipes, one per direction: the server's event loop
makes the end it reads non-blocking, and a send on a non-blocking end fails for any message larger than
the socket's buffer, so the server never sends on that end):
  server -> model   ("add", GenerationRequest)  ("abort", request_id)  ("stop", None)
  model -> server   ("ready", ModelFacts) or ("error", message), once, after loading;
                    ("updates", [(request_id, *Update fields), ...], running, waiting), once per
                    iteration; the text field is "" for requests without stop strings (the server
                    process detokenizes those from the token ids);
                    ("stats", dict) from a scheduler with figures of its own (the pipeline's stages).

A reader thread takes the server's messages (blocked in recv, it holds no GIL); the main thread runs the
scheduler. The process leaves when told to stop, when the pipe closes (the server process is gone), or, as
a last resort, by SIGKILL from the kernel when its parent dies. It ignores SIGINT and SIGTERM: the server
process decides when the model loop ends, so that it can finish its streams first. `ModelProcess` starts it
and waits for its `ModelFacts`; `model_client.ProcessModelClient` then speaks to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmstack.pdeathsig import die_with_parent
from llmstack.workers.backends.base import BackendInfo
from llmstack.workers.protocol import WorkerOptions

logger = logging.getLogger("llmstack.workers.model_process")

# Seconds to wait for the model process to load the model and say it is ready.
LOAD_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class ModelFacts:
    """What the model loop tells the front end once the model is loaded."""

    max_batch_size: int
    max_model_len: int
    eos_token_ids: list[int]
    info: BackendInfo
    # Rows of the embedding: token ids at or above it are out of vocabulary.
    vocab_size: int


class ModelProcess:
    """The child process that loads the model and runs the scheduler (multiprocessing, spawn), and the two
    one-way pipes to it: `requests` (this process sends) and `updates` (this process reads)."""

    def __init__(self, options: WorkerOptions, target: Callable[..., None] | None = None) -> None:
        """`target(inbox, outbox, options)`: the child's main (default: `main`, the lightweight worker's;
        the pipeline's rank 0 brings its own, built on `serve_model`)."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        inbox, self.requests = context.Pipe(duplex=False)
        self.updates, outbox = context.Pipe(duplex=False)
        self.process = context.Process(
            target=target or main, args=(inbox, outbox, options), name="llmstack-model", daemon=True
        )
        self.process.start()
        inbox.close()
        outbox.close()

    def wait_ready(self, timeout_s: float = LOAD_TIMEOUT_S) -> ModelFacts:
        """Block until the model is loaded; RuntimeError with the reason if it could not be."""
        deadline = time.monotonic() + timeout_s
        while not self.updates.poll(0.5):
            if not self.process.is_alive():
                raise RuntimeError(
                    f"the model process exited with status {self.process.exitcode} while loading"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model was not loaded after {timeout_s:.0f} s")
        kind, payload = self.updates.recv()
        if kind == "error":
            self.process.join(10)
            raise RuntimeError(payload)
        assert kind == "ready", kind
        return payload

    def stop(self, tell: bool = True) -> None:
        """`tell`: send the stop message here (False: the caller's writer has sent it)."""
        if tell:
            with contextlib.suppress(OSError, ValueError):
                self.requests.send(("stop", None))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# start(options, publish) -> the scheduler to run and the facts to announce; BackendError: a one-line refusal.
StartModel = Callable[[Any, Callable[..., None]], tuple[Any, ModelFacts]]


def main(inbox: Any, outbox: Any, options: WorkerOptions) -> None:
    serve_model(inbox, outbox, options, _start_lightweight)


def _start_lightweight(options: WorkerOptions, publish: Callable[..., None]) -> tuple[Any, ModelFacts]:
    from llmstack.workers.backends.loader import load
    from llmstack.workers.detokenizer import decoders_for
    from llmstack.workers.scheduler import Scheduler

    loaded = load(options)
    scheduler = Scheduler(
        loaded.backend,
        decoders_for(loaded.tokenizer),
        loaded.eos_token_ids,
        publish=publish,
        # The server process detokenizes the rest (ProcessModelClient), on the other core.
        text_for_stops_only=True,
    )
    facts = ModelFacts(
        options.max_batch_size,
        loaded.max_model_len,
        loaded.eos_token_ids,
        loaded.backend.info(),
        loaded.backend.vocab_size,
    )
    return scheduler, facts


def serve_model(inbox: Any, outbox: Any, options: Any, start: StartModel) -> None:
    """The model process's life: load (through `start`), say ready, run the scheduler until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    from llmstack.workers.backends.loader import BackendError

    def publish(updates: list, running: int, waiting: int) -> None:
        # Plain tuples: pickling them is several times cheaper than pickling dataclass instances.
        rows = [(rid, u.text, u.completion_tokens, u.token_id, u.finish_reason, u.stop_reason, u.error)
                for rid, u in updates]  # fmt: skip
        outbox.send(("updates", rows, running, waiting))

    try:
        scheduler, facts = start(options, publish)
    except BackendError as exc:
        outbox.send(("error", str(exc)))
        return
    except Exception as exc:
        logger.exception("loading the model failed")
        outbox.send(("error", f"loading the model failed: {type(exc).__name__}: {exc}"))
        return
    # A scheduler with figures of its own (the pipeline's stages) sends them as ("stats", dict) messages.
    if hasattr(scheduler, "publish_stats"):
        scheduler.publish_stats = lambda stats: outbox.send(("stats", stats))
    outbox.send(("ready", facts))
    reader = threading.Thread(target=_read, args=(inbox, scheduler), name="llmstack-model-inbox", daemon=True)
    reader.start()
    try:
        scheduler.run()
    except (BrokenPipeError, EOFError, OSError):
        logger.info("the server process is gone; the model process stops")
    except Exception as exc:  # the model loop itself broke (a pipeline rank died): the server must know
        logger.error("the model loop stopped: %s", exc)
        fast_exit(1)
    fast_exit(0)


def fast_exit(code: int) -> None:
    """Exit without tearing down every imported module (seconds with torch and transformers loaded).

    Only multiprocessing's own exit hook runs first, so that its semaphores (tqdm makes one) are released
    rather than reported as leaked; nothing else of ours needs cleaning up.
    """
    from multiprocessing import util

    with contextlib.suppress(Exception):
        util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _read(conn: Any, scheduler: Any) -> None:
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            scheduler.stop()
            return
        if kind == "add":
            scheduler.submit(payload)
        elif kind == "abort":
            scheduler.abort(payload)
        elif kind == "stop":
            scheduler.stop()
            return
