"""The HTTP API of our workers: OpenAI-compatible routes, ipex-llm's /generate routes, health and metrics.

    GET  /health                 200 while the model loop runs
    GET  /v1/models              the served name
    GET  /metrics                Prometheus text
    GET  /info                   backend, device, dtype, low-bit format, module types of the loaded model
    POST /v1/completions         OpenAI completions (stream or not)
    POST /v1/chat/completions    OpenAI chat completions, prompt built by the model's own chat template
    POST /generate               ipex-llm: [request_id, text] (stream=true: as /generate_stream)
    POST /generate_stream        ipex-llm: SSE in ipex-llm's chunk shape, with a true finish_reason

Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}}, with a 4xx status for
anything the client got wrong; the server keeps serving. Requests are bounded before they cost anything
(`RequestLimits`: body bytes, 413; prompt characters, stop strings, token ids and seeds, 400), chat
templates that requests bring run only where the server trusts them, and large prompts are templated and
tokenized off the event loop, so that one request cannot hold /health or the other streams. Streams end
with `data: [DONE]` (OpenAI routes) and carry `usage` when `stream_options.include_usage` asks for it.

Chunks are rendered from pre-built JSON fragments: per token only the text is JSON-escaped.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from json.encoder import encode_basestring_ascii as json_string  # type: ignore[attr-defined]
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.workers.api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
    TgiParameters,
)
from llmstack.workers.backends.base import BackendInfo
from llmstack.workers.engine_client import EngineClient, EngineDied, Overloaded
from llmstack.workers.metrics import CONTENT_TYPE, WorkerMetrics
from llmstack.workers.sampling import SamplingParams
from llmstack.workers.scheduler import Update
from llmstack.workers.streams import EventStreamResponse, RequestStream

logger = logging.getLogger(__name__)

# OpenAI's max_tokens when a completions request gives none.
COMPLETIONS_MAX_TOKENS = 16
# Prompts shorter than this (characters) and chat requests shorter than this (body bytes) are templated and
# tokenized inline: well under a millisecond, less than handing them to a thread. Longer ones go to the
# CPU pool.
INLINE_CHARS = 4096
# Seeds as vLLM takes them (a torch.long).
SEED_RANGE = (-(2**63), 2**63 - 1)
# Keys of chat_template_kwargs that would replace the template, or change what the call returns.
TEMPLATE_KEYS = frozenset({"chat_template", "tokenize", "return_dict", "tools_in_user_message"})


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (`WorkerOptions` says why each limit is there)."""

    max_stop_strings: int = 4
    max_stop_string_chars: int = 1024
    max_request_bytes: int = 16 * 1024 * 1024
    max_prompt_chars: int = 64 * 4096
    trust_request_chat_template: bool = False
    stall_timeout_s: float = 60.0

    @classmethod
    def from_options(cls, options: Any, max_model_len: int) -> RequestLimits:
        return cls(
            max_stop_strings=options.max_stop_strings,
            max_stop_string_chars=options.max_stop_string_chars,
            max_request_bytes=options.max_request_bytes,
            max_prompt_chars=options.max_prompt_chars or 64 * max_model_len,
            trust_request_chat_template=options.trust_request_chat_template,
            stall_timeout_s=options.stall_timeout_s,
        )


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code if code is not None else status


def error_response(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code if code else status}}
    return JSONResponse(body, status_code=status)


class Worker:
    """Everything the routes need: the model loop's client, the tokenizer and the served model's facts."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Any,
        *,
        served_name: str,
        model_path: str,
        max_model_len: int,
        info: BackendInfo,
        metrics: WorkerMetrics,
        api_key: str | None,
        vocab_size: int,
        limits: RequestLimits | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.info = info
        self.metrics = metrics
        self.api_key = api_key
        self.vocab_size = vocab_size
        self.limits = limits or RequestLimits()
        self.created = int(time.time())
        self._model_json = json_string(served_name)
        # Templating and tokenizing of large prompts, off the event loop; two at a time at most.
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmstack-tokenize")

    # -- request handling --------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401, "Invalid or missing API key (Authorization: Bearer <key>).", code="invalid_api_key"
            )

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is larger than the limit."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(int(declared))
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise self._too_large(size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(
            413,
            f"The request body has {size} bytes or more; this server takes at most "
            f"{self.limits.max_request_bytes} bytes (max_request_bytes).",
            code="request_too_large",
        )

    async def off_loop(self, inline: bool, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)`: inline where it is known to be cheap, else in the CPU pool."""
        if inline:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._cpu, work, *args)

    def check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.limits.max_prompt_chars:
            raise ApiError(
                400,
                f"The prompt has {chars} characters; this server takes at most "
                f"{self.limits.max_prompt_chars} (max_prompt_chars) before tokenizing.",
                param=param,
            )

    def check_token_ids(self, ids: list[int], param: str) -> None:
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ApiError(400, f"Token id {token_id} is out of vocabulary.", param=param)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.served_name}`.",
                kind="not_found_error",
                param="model",
                code="model_not_found",
            )

    async def encode_prompt(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "The prompt is empty.", param="prompt")
            self.check_prompt_chars(len(prompt), "prompt")
            return await self.off_loop(len(prompt) < INLINE_CHARS, self._tokenize, prompt, True)
        if not prompt:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        if isinstance(prompt[0], int):  # the body's validation made the list all of one type
            ids = list(prompt)  # type: ignore[arg-type]
            # One too long for the context is refused for its length (sampling_params): no need to look
            # at each of its (up to millions of) ids on the event loop.
            if len(ids) < self.max_model_len:
                self.check_token_ids(ids, "prompt")
            return ids
        if len(prompt) == 1:
            return await self.encode_prompt(prompt[0])
        raise ApiError(
            400,
            "Exactly one prompt per request is supported (a string or a list of token ids).",
            param="prompt",
        )

    def _tokenize(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    async def encode_chat(self, req: ChatCompletionRequest, body_bytes: int) -> list[int]:
        template = self._request_template(req)
        if template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError(400, "The model has no chat template; use /v1/completions.", param="messages")
        messages = []
        chars = 0
        for message in req.messages:
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(
                            400,
                            f"Only text content parts are supported, not {part.get('type')!r}.",
                            param="messages",
                        )
                    texts.append(part["text"])
                content = "".join(texts)
            entry = message.model_dump(exclude_none=True)
            entry["content"] = content or ""
            chars += len(entry["content"])
            messages.append(entry)
        self.check_prompt_chars(chars, "messages")
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in TEMPLATE_KEYS}
        if template is not None:
            kwargs["chat_template"] = template
        # The model's template costs in proportion to what the request sent (messages, their other fields,
        # chat_template_kwargs); one a request brings, anything.
        inline = template is None and body_bytes < INLINE_CHARS
        return await self.off_loop(inline, self._apply_template, messages, req.add_generation_prompt, kwargs)

    def _request_template(self, req: ChatCompletionRequest) -> str | None:
        """A chat template the request brings: arbitrary code, run only where the server trusts it."""
        template = req.chat_template or (req.chat_template_kwargs or {}).get("chat_template")
        if template is not None and not self.limits.trust_request_chat_template:
            raise ApiError(
                400,
                "Chat templates sent with a request are refused: this server was not started to trust "
                "them (trust_request_chat_template).",
                param="chat_template",
            )
        return template

    def _apply_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                        kwargs: dict[str, Any]) -> list[int]:  # fmt: skip
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
            raise ApiError(
                400, f"The chat template failed on these messages: {exc}", param="messages"
            ) from exc
        # The template writes the special tokens (BOS) itself.
        return self._tokenize(text, False)

    def sampling_params(
        self,
        fields: SamplingFields,
        prompt_len: int,
        max_tokens: int | None,
        default_max_tokens: int | None = None,
    ) -> SamplingParams:
        """`max_tokens` None: the request did not say; then `default_max_tokens`, clamped to the room the
        context leaves (as vLLM does), or all of that room."""
        if fields.n != 1:
            raise ApiError(400, "n > 1 is not supported: send n requests.", param="n")
        if fields.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported.", param="logprobs")
        if prompt_len == 0:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens, and the "
                f"prompt alone has {prompt_len}.",
                param="prompt",
            )
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        if max_tokens < 1:
            raise ApiError(400, "max_tokens must be at least 1.", param="max_tokens")
        if max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                "completion). "
                "Please reduce the length of the prompt or completion.",
                param="max_tokens",
            )
        if fields.min_tokens > max_tokens:
            raise ApiError(
                400,
                f"min_tokens ({fields.min_tokens}) exceeds max_tokens ({max_tokens}).",
                param="min_tokens",
            )
        stop = (fields.stop,) if isinstance(fields.stop, str) else tuple(fields.stop or ())
        self._check_stops(stop)
        self.check_token_ids(list(fields.stop_token_ids or ()), "stop_token_ids")
        if fields.seed is not None and not SEED_RANGE[0] <= fields.seed <= SEED_RANGE[1]:
            raise ApiError(400, f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}.", param="seed")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if fields.temperature is None else fields.temperature,
            top_p=1.0 if fields.top_p is None else fields.top_p,
            top_k=fields.top_k or 0,
            seed=fields.seed,
            min_tokens=fields.min_tokens,
            ignore_eos=fields.ignore_eos,
            stop=tuple(s for s in stop if s),
            stop_token_ids=tuple(fields.stop_token_ids or ()),
            repetition_penalty=fields.repetition_penalty,
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            skip_special_tokens=fields.skip_special_tokens,
        )

    def _check_stops(self, stop: tuple[str, ...]) -> None:
        limits = self.limits
        if len(stop) > limits.max_stop_strings:
            raise ApiError(
                400,
                f"{len(stop)} stop strings; this server takes at most {limits.max_stop_strings} "
                "(max_stop_strings).",
                param="stop",
            )
        longest = max((len(s) for s in stop), default=0)
        if longest > limits.max_stop_string_chars:
            raise ApiError(
                400,
                f"A stop string has {longest} characters; this server takes at most "
                f"{limits.max_stop_string_chars} characters (max_stop_string_chars).",
                param="stop",
            )

    def submit(self, prompt_ids: list[int], params: SamplingParams, prefix: str) -> tuple[str, RequestStream]:
        try:
            return self.engine.submit(prompt_ids, params, prefix)
        except Overloaded as exc:
            raise ApiError(
                503, f"The server is overloaded: {exc}.", kind="server_error", code="overloaded"
            ) from exc
        except EngineDied as exc:
            raise ApiError(503, f"The model is not being served: {exc}.", kind="server_error") from exc

    async def collect(self, request_id: str, stream: RequestStream) -> tuple[str, Update, list[int]]:
        """Wait for the whole output: (text, final update, generated token ids)."""
        parts: list[str] = []
        ids: list[int] = []
        try:
            while True:
                for update in await stream.next_batch():
                    parts.append(update.text)
                    if update.token_id >= 0:
                        ids.append(update.token_id)
                    if update.finish_reason is not None:
                        if update.error:
                            raise ApiError(500, update.error, kind="server_error")
                        return "".join(parts), update, ids
        finally:
            if not stream.finished:
                self.engine.abort(request_id)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


# -- streaming renderers -----------------------------------------------------------------------------------
def _usage_json(prompt_tokens: int, completion_tokens: int) -> str:
    return (
        f'{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion_tokens},'
        f'"total_tokens":{prompt_tokens + completion_tokens}}}'
    )


def _reason_json(update: Update) -> tuple[str, str]:
    finish = "null" if update.finish_reason is None else f'"{update.finish_reason}"'
    stop = update.stop_reason
    stop_json = "null" if stop is None else (json_string(stop) if isinstance(stop, str) else str(stop))
    return finish, stop_json


async def openai_chunks(
    worker: Worker,
    request_id: str,
    stream: RequestStream,
    *,
    chat: bool,
    prompt_tokens: int,
    include_usage: bool,
    continuous_usage: bool,
    token_ids: bool = False,
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    head = (
        f'data: {{"id":"{request_id}","object":"{obj}","created":{created},'
        f'"model":{worker._model_json},"choices":[{{"index":0,'
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
        usage = f',"usage":{_usage_json(prompt_tokens, completion_tokens)}' if continuous_usage else ""
        return (
            f'{head}{text_key}{json_string(text)}{text_end},"logprobs":null,"finish_reason":{finish}{extra}}}]'
            f"{usage}}}\n\n"
        )

    try:
        if chat:
            # OpenAI's first chunk names the role; it carries no generated text.
            yield (
                head + '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
            )
        while True:
            updates = await stream.next_batch()
            if not updates:  # the client went away
                return
            parts = []
            for update in updates:
                completion_tokens = update.completion_tokens
                if token_ids and update.token_id >= 0:
                    pending_ids.append(update.token_id)
                if update.finish_reason is None:
                    if update.text:
                        parts.append(chunk(update.text, "null", None))
                    continue
                if update.error:
                    error = {"message": update.error, "type": "server_error", "param": None, "code": 500}
                    parts.append(f"data: {json.dumps({'error': error})}\n\n")
                else:
                    finish, stop = _reason_json(update)
                    parts.append(chunk(update.text, finish, stop))
                    if include_usage:
                        parts.append(
                            f'data: {{"id":"{request_id}","object":"{obj}","created":{created},'
                            f'"model":{worker._model_json},"choices":[],'
                            f'"usage":{_usage_json(prompt_tokens, completion_tokens)}}}\n\n'
                        )
                parts.append("data: [DONE]\n\n")
                yield "".join(parts)
                return
            if parts:
                yield "".join(parts)
    finally:
        if not stream.finished:
            worker.engine.abort(request_id)


async def ipex_chunks(
    worker: Worker, request_id: str, stream: RequestStream, *, chat: bool
) -> AsyncIterator[str]:
    """ipex-llm's /generate_stream shape: no object/created, `index` counts chunks, no [DONE]."""
    head = f'data: {{"id":"{request_id}","model":{worker._model_json},"choices":[{{"index":'
    index = 0
    try:
        while True:
            updates = await stream.next_batch()
            if not updates:
                return
            parts = []
            for update in updates:
                if update.text:
                    text = json_string(update.text)
                    body = f'"delta":{{"role":"assistant","content":{text}}}' if chat else f'"text":{text}'
                    parts.append(f'{head}{index},{body},"logprobs":null,"finish_reason":null}}]}}\n\n')
                    index += 1
                if update.finish_reason is not None:
                    end = '"delta":{"role":"assistant","content":null}' if chat else '"text":""'
                    reason = "error" if update.error else update.finish_reason
                    parts.append(f'{head}{index},{end},"logprobs":null,"finish_reason":"{reason}"}}]}}\n\n')
                    yield "".join(parts)
                    return
            if parts:
                yield "".join(parts)
    finally:
        if not stream.finished:
            worker.engine.abort(request_id)


# -- the app -----------------------------------------------------------------------------------------------
def build_app(
    worker: Worker,
    on_startup: Callable[[], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.engine.start(asyncio.get_running_loop())
        if on_startup:
            on_startup()
        try:
            yield
        finally:
            worker.engine.stop()
            if on_shutdown:
                on_shutdown()

    app = FastAPI(title="llmstack lightweight worker", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, kind=exc.kind, param=exc.param, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind=kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc.errors()))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"Internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health() -> Response:
        if not worker.engine.alive():
            return error_response(503, "The model loop is not running.", kind="server_error")
        stalled = worker.engine.stalled_for()
        if stalled > worker.limits.stall_timeout_s:
            return error_response(
                503,
                f"The model loop has made no progress for {stalled:.0f} s with "
                f"{worker.engine.snapshot()['open_requests']} requests open.",
                kind="server_error",
            )
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        worker.check_auth(request)
        card = {
            "id": worker.served_name,
            "object": "model",
            "created": worker.created,
            "owned_by": "llmstack",
            "root": worker.model_path,
            "parent": None,
            "max_model_len": worker.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(worker.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        worker.check_auth(request)
        data = asdict(worker.info)
        data.update(
            served_model_name=worker.served_name,
            max_model_len=worker.max_model_len,
            max_batch_size=worker.engine.max_batch_size,
            scheduler=worker.engine.snapshot(),
        )
        return JSONResponse(data)

    async def respond(
        fields: SamplingFields,
        prompt_ids: list[int],
        max_tokens: int | None,
        chat: bool,
        default_max_tokens: int | None = None,
    ) -> Response:
        params = worker.sampling_params(fields, len(prompt_ids), max_tokens, default_max_tokens)
        request_id, stream = worker.submit(prompt_ids, params, "chatcmpl" if chat else "cmpl")
        if fields.stream:
            options = fields.stream_options
            chunks = openai_chunks(
                worker,
                request_id,
                stream,
                chat=chat,
                prompt_tokens=len(prompt_ids),
                include_usage=bool(options and options.include_usage),
                continuous_usage=bool(options and options.continuous_usage_stats),
                token_ids=fields.return_token_ids,
            )
            return EventStreamResponse(chunks, stream.close)
        text, final, output_ids = await worker.collect(request_id, stream)
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=final.finish_reason, stop_reason=final.stop_reason)
        body: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": worker.served_name,
            "choices": [choice],
            "usage": worker.usage(len(prompt_ids), final.completion_tokens),
        }
        if fields.return_token_ids:  # vLLM's extension
            choice["token_ids"] = output_ids
            (body if chat else choice)["prompt_token_ids"] = prompt_ids
        return JSONResponse(body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        worker.check_auth(request)
        req = _parse(CompletionRequest, await worker.read_body(request))
        worker.check_model(req.model)
        for field, bad in (("echo", req.echo), ("suffix", req.suffix), ("best_of", (req.best_of or 1) > 1)):
            if bad:
                raise ApiError(400, f"{field} is not supported.", param=field)
        # OpenAI's default of 16 applies where the request says nothing, clamped to the context.
        given = req.max_tokens if "max_tokens" in req.model_fields_set else None
        prompt_ids = await worker.encode_prompt(req.prompt)
        return await respond(req, prompt_ids, given, chat=False, default_max_tokens=COMPLETIONS_MAX_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        worker.check_auth(request)
        body = await worker.read_body(request)
        req = _parse(ChatCompletionRequest, body)
        worker.check_model(req.model)
        if req.top_logprobs:
            raise ApiError(400, "logprobs are not supported.", param="top_logprobs")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await respond(req, await worker.encode_chat(req, len(body)), limit, chat=True)

    async def generate_common(request: Request, force_stream: bool) -> Response:
        worker.check_auth(request)
        req = _parse(GenerateRequest, await worker.read_body(request))
        p = req.parameters
        if p is None:
            p = TgiParameters()
        if p.typical_p not in (None, 1.0):
            raise ApiError(400, "typical_p is not supported.", param="parameters.typical_p")
        prompt_ids = await worker.encode_prompt(req.inputs)
        # ipex-llm's semantics: greedy unless do_sample; its OpenAI routes set do_sample = temperature > 1e-4.
        sampled = p.do_sample if p.do_sample is not None else (p.temperature or 0.0) > 1e-4
        fields = _validated(
            SamplingFields,
            "parameters",
            temperature=(p.temperature if p.temperature is not None else 1.0) if sampled else 0.0,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            stop=p.stop,
            ignore_eos=p.ignore_eos,
            min_tokens=p.min_new_tokens or 0,
            repetition_penalty=p.repetition_penalty or 1.0,
        )
        params = worker.sampling_params(fields, len(prompt_ids), p.max_new_tokens)
        prefix = "stream" if (force_stream or req.stream) else "gen"
        request_id, stream = worker.submit(prompt_ids, params, prefix)
        if force_stream or req.stream:
            return EventStreamResponse(
                ipex_chunks(worker, request_id, stream, chat=req.req_type == "chat"), stream.close
            )
        text, _, _ = await worker.collect(request_id, stream)
        return JSONResponse([request_id, text])

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await generate_common(request, force_stream=False)

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        return await generate_common(request, force_stream=True)

    return app


def _parse(model: Any, body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(400, _validation_message(exc.errors())) from exc


def _validated(model: Any, where: str, **values: Any) -> Any:
    """`model(**values)` from what a request sent under `where`: values that its bounds refuse are the
    client's mistake (400), as if they had been parsed from the body."""
    try:
        return model(**values)
    except ValidationError as exc:
        errors = [{**error, "loc": (where, *error.get("loc", ()))} for error in exc.errors()]
        raise ApiError(400, _validation_message(errors)) from exc


def _validation_message(errors: Any) -> str:
    parts = []
    for error in list(errors)[:3]:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        if error.get("type") == "json_invalid":
            parts.append(f"The body is not valid JSON: {error.get('msg', '')}")
        elif location:
            parts.append(f"{location}: {error.get('msg', 'invalid')}")
        else:
            parts.append(str(error.get("msg", "invalid request")))
    return "; ".join(parts) or "Invalid request."
