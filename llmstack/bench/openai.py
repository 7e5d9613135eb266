"""What an OpenAI-compatible response means: the SSE events or JSON body of a completion (text, reasoning,
usage, finish reason, tokens per chunk) and the error an HTTP status and body tell, written into a record.

`llmstack.bench.http` only moves bytes; it hands each finished response here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from llmstack.bench.records import RequestRecord

if TYPE_CHECKING:
    from llmstack.bench.framing import ResponseParser

__all__ = ["apply_json_body", "apply_sse_events", "error_text", "fill_record"]

_ERROR_TEXT_LIMIT = 500


def fill_record(
    record: RequestRecord, parser: ResponseParser, stream: bool, finished_at: float | None, error: str | None
) -> None:
    """One finished response (`parser` has replayed all of its reads) into `record`; `error` is the
    transport's (a timeout, a closed connection, bad framing), which wins over what the body says."""
    status = parser.status
    record.http_status = status
    record.done_at = finished_at
    is_2xx = status is not None and 200 <= status < 300
    if parser.sse_mode:
        # Partial streams are interpreted too: a request that died mid-stream keeps its timings.
        apply_sse_events(record, parser.event_times, parser.event_data)
    elif is_2xx and error is None:
        if stream:
            record.error = f"asked for a stream but the server answered {parser.content_type or 'no type'}"
        else:
            apply_json_body(record, bytes(parser.body))
    if error is not None:
        record.error = error
    elif not is_2xx:
        record.error = error_text(status, parser.reason, bytes(parser.body))
    elif record.error is None and stream and not record.chunk_times:
        record.error = "stream ended without any generated text"
    record.success = record.error is None


def error_text(status: int | None, reason: str, body: bytes) -> str:
    """`HTTP 400 Bad Request: <message>`, the message taken from an OpenAI-style error body if any."""
    message = ""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        message = _error_message(
            parsed.get("error") or parsed.get("detail") or parsed.get("message") or parsed
        )
    elif body:
        message = body.decode("utf-8", errors="replace").strip()
    text = f"HTTP {status} {reason}".rstrip()
    if message:
        text += f": {message[:_ERROR_TEXT_LIMIT]}"
    return text


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if message:
            return str(message)
    return str(error)


def _choice_text(choice: Mapping[str, Any]) -> tuple[str, str]:
    """(content, reasoning) of one choice: `text` for completions, `delta`/`message` for chat."""
    text = choice.get("text")
    if isinstance(text, str):
        return text, ""
    delta = choice.get("delta") or choice.get("message")
    if not isinstance(delta, dict):
        return "", ""
    content = delta.get("content")
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    return (
        content if isinstance(content, str) else "",
        reasoning if isinstance(reasoning, str) else "",
    )


def _logprob_token_count(choice: Mapping[str, Any]) -> int | None:
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        tokens = logprobs.get("tokens")  # completions
        if tokens is None:
            tokens = logprobs.get("content")  # chat
        if isinstance(tokens, list):
            return len(tokens)
    return None


def _apply_usage(record: RequestRecord, usage: object) -> int | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(prompt, int):
        record.prompt_tokens = prompt
    if isinstance(completion, int):
        record.completion_tokens = completion
        return completion
    return None


def _parse_events(payloads: list[bytes]) -> tuple[list[object], bytes | None]:
    """Decode every payload; on a bad one, the events before it and the bad payload."""
    if not payloads:
        return [], None
    try:
        # One decoder call per response instead of one per event: several times cheaper.
        events = json.loads(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        events = None
    if isinstance(events, list) and len(events) == len(payloads):
        return events, None
    # Either a payload is not JSON, or one held several values ("1,2") and the count is off.
    good: list[object] = []
    for raw in payloads:
        try:
            good.append(json.loads(raw))
        except ValueError:
            return good, raw
    return good, None


def apply_sse_events(record: RequestRecord, times: list[float], payloads: list[bytes]) -> None:
    """Interpret the `data:` payloads of a stream (without `[DONE]`) and fill `record`.

    A chunk counts as generated text when `choices[0].text` (completions) or `choices[0].delta.content`
    (or a reasoning delta, chat) is a non-empty string. Role-only chunks, empty texts, finish-only chunks and
    usage-only chunks (empty `choices`) give no entry in `chunk_times` but still supply usage and
    finish_reason. Tokens per chunk are known when every text chunk carries a cumulative
    `usage.completion_tokens` (vLLM's `continuous_usage_stats`) or `logprobs`.
    """
    chunk_times: list[float] = []
    texts: list[str] = []
    thoughts: list[str] = []
    counts: list[int] | None = []
    completion_at_last_chunk = 0
    events, bad_event = _parse_events(payloads)
    if bad_event is not None:
        record.error = f"invalid JSON in SSE event: {bad_event[:200]!r}"
    for arrived_at, event in zip(times, events, strict=False):
        if not isinstance(event, dict):
            continue
        if event.get("error") is not None and not event.get("choices"):
            record.error = f"error event in stream: {_error_message(event['error'])[:_ERROR_TEXT_LIMIT]}"
            break
        cumulative = _apply_usage(record, event.get("usage"))
        choices = event.get("choices")
        if not choices or not isinstance(choices[0], dict):
            continue
        choice = choices[0]
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
        text, thought = _choice_text(choice)
        if not text and not thought:
            continue
        chunk_times.append(arrived_at)
        if text:
            texts.append(text)
        if thought:
            thoughts.append(thought)
        if counts is not None:
            if cumulative is not None:
                # Tokens of text-less chunks in between (special tokens) are credited to this chunk.
                counts.append(cumulative - completion_at_last_chunk)
                completion_at_last_chunk = cumulative
            else:
                n = _logprob_token_count(choice)
                if n is None:
                    counts = None
                else:
                    counts.append(n)
    record.output_text = "".join(texts)
    record.reasoning_text = "".join(thoughts)
    record.chunk_times = chunk_times
    record.first_content_at = chunk_times[0] if chunk_times else None
    record.chunk_token_counts = counts if counts else None


def apply_json_body(record: RequestRecord, body: bytes) -> None:
    """Interpret a complete non-streaming response body."""
    try:
        obj = json.loads(body)
    except ValueError:
        record.error = f"invalid JSON response: {body[:200]!r}"
        return
    if not isinstance(obj, dict):
        record.error = f"unexpected JSON response: {body[:200]!r}"
        return
    if obj.get("error") is not None and not obj.get("choices"):
        record.error = _error_message(obj["error"])[:_ERROR_TEXT_LIMIT]
        return
    _apply_usage(record, obj.get("usage"))
    choices = obj.get("choices")
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        record.output_text, record.reasoning_text = _choice_text(choice)
        record.finish_reason = choice.get("finish_reason")
