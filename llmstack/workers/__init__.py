"""The servers llmstack owns. Each worker is a separate program (`python -m llmstack.workers.<name>`),
started through the same supervisor as vLLM. Workers import nothing of llmstack outside this package; the
launcher imports only `llmstack.workers.protocol`, the command line and environment both sides agree on.

    lightweight.py      the entry point: options, the model loop's client, uvicorn
    openai/             the HTTP front end (routes, request bodies, request logic, SSE)
    model_client.py     the server process's client of the model loop (admission, streams, metrics)
    model_process.py    the child process that loads the model and runs the scheduler
    scheduler.py        continuous batching over a backend; sampling.py, detokenizer.py beside it
    backends/           the model backends and their loader
"""
