"""The capacity stub (tests/capacity_stub.py) started where engine=vllm starts vLLM: a measuring instrument
for server-settings searches, whose capacity is known from the settings.

`fake_vllm_python(directory)` writes an interpreter for engine.python: it runs
`-m vllm.entrypoints.openai.api_server <vLLM's flags>` as this module and passes every other command (the
launcher's checks that vllm imports, its version) to the real interpreter. Everything else is real: the
grid, vLLM's validation and memory fit, its launch plan, the supervisor, the capacity phase and its client.
The stub serves the plan's --served-model-name on its --host/--port with --max-num-seqs service slots, so
a closed-loop search finds exactly max_num_seqs requests in flight (tests/test_capacity_phase.py shows it
for slots=6 with these timings).

    python -m tests.vllm_stub --port 8123 --max-num-seqs 4 --served-model-name tiny [any vLLM flags]
"""

from __future__ import annotations

import argparse
import stat
import sys
import threading
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFILL_S = 0.05
TOKEN_S = 0.01


def fake_vllm_python(directory: Path) -> Path:
    path = directory / "python"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "vllm.entrypoints.openai.api_server" ]; then\n'
        "  shift 2\n"
        f'  PYTHONPATH="{ROOT}" exec "{sys.executable}" -m tests.vllm_stub "$@"\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def main() -> None:
    from tests import capacity_stub

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-num-seqs", type=int, default=256)  # vLLM's default
    parser.add_argument("--served-model-name", default=capacity_stub.MODEL_ID)
    args, _ = parser.parse_known_args()
    capacity_stub.MODEL_ID = args.served_model_name  # what /v1/models lists: the launcher waits for it
    model = capacity_stub.StubModel(slots=args.max_num_seqs, prefill_s=PREFILL_S, token_s=TOKEN_S)
    with capacity_stub.stub_server(model, port=args.port) as state:
        print(f"vllm stub at {state.url}: {args.max_num_seqs} slots", flush=True)
        with suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
