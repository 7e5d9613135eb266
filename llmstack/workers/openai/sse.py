"""Server-sent events: the OpenAI and ipex-llm chunk shapes, and the response that streams them.

Chunks are rendered from pre-built JSON fragments: per token only the text is JSON-escaped. Each stream
reads its request's updates a batch at a time (`RequestStream.next_batch`), so a response that fell behind
catches up with one socket write for several tokens (each still its own event). A stream left before its
request finished aborts that request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring_ascii as json_string  # type: ignore[attr-defined]
from typing import Any

from starlette.responses import Response

from llmstack.workers.scheduler import Update
from llmstack.workers.streams import RequestStream

logger = logging.getLogger(__name__)


def usage_json(prompt_tokens: int, completion_tokens: int) -> str:
    return (
        f'{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion_tokens},'
        f'"total_tokens":{prompt_tokens + completion_tokens}}}'
    )


def _reason_json(update: Update) -> tuple[str, str]:
    finish = "null" if update.finish_reason is None else f'"{update.finish_reason}"'
    stop = update.stop_reason
    stop_json = "null" if stop is None else (json_string(stop) if isinstance(stop, str) else str(stop))
    return finish, stop_json


async def _events(
    request_id: str,
    stream: RequestStream,
    abort: Callable[[str], None],
    render: Callable[[list[str], Update], bool],
    first: str = "",
) -> AsyncIterator[str]:
    """One request's events: `first`, then what `render(parts, update)` appends to `parts` for each update
    (True: that was the last). A stream left before its request finished aborts the request."""
    try:
        if first:
            yield first
        while True:
            updates = await stream.next_batch()
            if not updates:  # the client went away
                return
            parts: list[str] = []
            for update in updates:
                if render(parts, update):
                    yield "".join(parts)
                    return
            if parts:
                yield "".join(parts)
    finally:
        if not stream.finished:
            abort(request_id)


def openai_chunks(
    request_id: str,
    stream: RequestStream,
    *,
    model_json: str,
    abort: Callable[[str], None],
    chat: bool,
    prompt_tokens: int,
    include_usage: bool,
    continuous_usage: bool,
    token_ids: bool = False,
) -> AsyncIterator[str]:
    """OpenAI's completion or chat chunks, then `data: [DONE]`. `model_json`: the served name, JSON."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    head = (
        f'data: {{"id":"{request_id}","object":"{obj}","created":{created},'
        f'"model":{model_json},"choices":[{{"index":0,'
    )
    text_key = '"delta":{"content":' if chat else '"text":'
    text_end = "}" if chat else ""
    pending_ids: list[int] = []  # tokens not yet reported in a chunk (return_token_ids)
    completion_tokens = 0

    def chunk(text: str, finish: str, stop: str | None) -> str:
        extra = ""
        if token_ids:
            extra = f',"token_ids":[{",".join(map(str, pending_ids))}]'
            pending_ids.clear()
        if stop is not None:
            extra += f',"stop_reason":{stop}'
        usage = f',"usage":{usage_json(prompt_tokens, completion_tokens)}' if continuous_usage else ""
        return (
            f'{head}{text_key}{json_string(text)}{text_end},"logprobs":null,"finish_reason":{finish}{extra}}}]'
            f"{usage}}}\n\n"
        )

    def render(parts: list[str], update: Update) -> bool:
        nonlocal completion_tokens
        completion_tokens = update.completion_tokens
        if token_ids and update.token_id >= 0:
            pending_ids.append(update.token_id)
        if update.finish_reason is None:
            if update.text:
                parts.append(chunk(update.text, "null", None))
            return False
        if update.error:
            error = {"message": update.error, "type": "server_error", "param": None, "code": 500}
            parts.append(f"data: {json.dumps({'error': error})}\n\n")
        else:
            finish, stop = _reason_json(update)
            parts.append(chunk(update.text, finish, stop))
            if include_usage:
                parts.append(
                    f'data: {{"id":"{request_id}","object":"{obj}","created":{created},'
                    f'"model":{model_json},"choices":[],'
                    f'"usage":{usage_json(prompt_tokens, completion_tokens)}}}\n\n'
                )
        parts.append("data: [DONE]\n\n")
        return True

    # OpenAI's first chat chunk names the role; it carries no generated text.
    role = head + '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
    return _events(request_id, stream, abort, render, role if chat else "")


def ipex_chunks(
    request_id: str, stream: RequestStream, *, model_json: str, abort: Callable[[str], None], chat: bool
) -> AsyncIterator[str]:
    """ipex-llm's /generate_stream shape: no object/created, `index` counts chunks, no [DONE]."""
    head = f'data: {{"id":"{request_id}","model":{model_json},"choices":[{{"index":'
    index = 0

    def render(parts: list[str], update: Update) -> bool:
        nonlocal index
        if update.text:
            text = json_string(update.text)
            body = f'"delta":{{"role":"assistant","content":{text}}}' if chat else f'"text":{text}'
            parts.append(f'{head}{index},{body},"logprobs":null,"finish_reason":null}}]}}\n\n')
            index += 1
        if update.finish_reason is None:
            return False
        end = '"delta":{"role":"assistant","content":null}' if chat else '"text":""'
        reason = "error" if update.error else update.finish_reason
        parts.append(f'{head}{index},{end},"logprobs":null,"finish_reason":"{reason}"}}]}}\n\n')
        return True

    return _events(request_id, stream, abort, render)


class EventStreamResponse(Response):
    """text/event-stream from an async iterator of str; calls `on_disconnect` if the client leaves early."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[str], on_disconnect: Callable[[], None]) -> None:
        super().__init__(content=None, status_code=200, media_type=self.media_type)
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self._chunks = chunks
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        done = False

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not done:
                        self._on_disconnect()
                    return

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            async for text in self._chunks:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            logger.debug("client went away while streaming")
        finally:
            done = True
            watcher.cancel()
