"""FastChat's OpenAI API server, with its API key taken from the environment, streaming under pydantic 2.

    python -m llmstack.workers.fastchat.api_server [fastchat.serve.openai_api_server's options]

FastChat takes API keys only as `--api-keys`, which anyone on the machine can read in `ps`. engine=fastchat
passes the key in $LLMSTACK_API_KEY instead; this adds it to the server's own arguments inside the process
(its command line stays clean).

fschat 0.2.36 streams with pydantic 1's spelling, `chunk.json(exclude_unset=True, ensure_ascii=False)`, which
pydantic 2 refuses ("`dumps_kwargs` keyword arguments are no longer supported": every streamed request dies
mid-response; lm-sys/FastChat#3140, mended after 0.2.36 by #3356). The FastAPI that ipex-llm's stack and
llmstack's worker use needs pydantic 2, so FastChat's own response models get that spelling back here.
Then the server runs as `python -m fastchat.serve.openai_api_server` would.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import Any

API_KEY_ENV = "LLMSTACK_API_KEY"
SERVER_MODULE = "fastchat.serve.openai_api_server"


def _v1_json(self: Any, *, ensure_ascii: bool = True, **dump: Any) -> str:
    return json.dumps(self.model_dump(mode="json", **dump), ensure_ascii=ensure_ascii)


def _mend_streaming() -> None:
    import pydantic
    from fastchat.protocol import openai_api_protocol

    if pydantic.VERSION.startswith("1."):
        return
    base = pydantic.BaseModel  # imported there too: not it, only FastChat's own models
    for model in vars(openai_api_protocol).values():
        if isinstance(model, type) and issubclass(model, base) and model is not base:
            model.json = _v1_json  # type: ignore[method-assign]


def main() -> None:
    key = os.environ.pop(API_KEY_ENV, None)
    if key:
        sys.argv += ["--api-keys", key]
    _mend_streaming()
    sys.argv[0] = SERVER_MODULE
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
