"""The worker's HTTP routes: OpenAI-compatible ones, ipex-llm's /generate ones, health and metrics.

    GET  /health                 200 while the model loop runs and makes progress, else 503
    GET  /v1/models              the served name
    GET  /metrics                Prometheus text
    GET  /info                   backend, device, dtype, low-bit format, module types of the loaded model
    POST /v1/completions         OpenAI completions (stream or not)
    POST /v1/chat/completions    OpenAI chat completions, prompt built by the model's own chat template
    POST /generate               ipex-llm: [request_id, text] (stream=true: as /generate_stream)
    POST /generate_stream        ipex-llm: SSE in ipex-llm's chunk shape, with a true finish_reason

Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}}, with a 4xx status for
anything the client got wrong; the server keeps serving. The API key and the typed bodies are FastAPI
dependencies. A body is read by its dependency rather than by FastAPI, so that it is refused (413) as soon
as it passes `max_request_bytes`, and validated as JSON in pydantic's strict mode, whatever its
content type.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.workers.metrics import CONTENT_TYPE
from llmstack.workers.openai.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    parse,
    validation_message,
)
from llmstack.workers.openai.serving import Serving

logger = logging.getLogger(__name__)

RequestBody = TypeVar("RequestBody", CompletionRequest, ChatCompletionRequest, GenerateRequest)


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status)


def api_key_checker(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """The dependency that refuses (401) a request without `Authorization: Bearer <api_key>`."""
    expected = None if api_key is None else api_key.encode()

    async def check_api_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(
                401, "Invalid or missing API key (Authorization: Bearer <key>).", code="invalid_api_key"
            )

    return check_api_key


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is larger than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body has {size} bytes or more; this server takes at most {limit} bytes "
        "(max_request_bytes).",
        code="request_too_large",
    )


def body_parser(model: type[RequestBody]) -> Callable[[Request], Awaitable[RequestBody]]:
    """The dependency that gives a route its body as `model` (the limit is the app's `max_request_bytes`)."""

    async def parse_body(request: Request) -> RequestBody:
        body = await read_body(request, request.app.state.max_request_bytes)
        return parse(model, body)  # type: ignore[no-any-return]

    return parse_body


# The routes' typed bodies (module level: FastAPI resolves the string annotations in this module).
Completion = Annotated[CompletionRequest, Depends(body_parser(CompletionRequest))]
Chat = Annotated[ChatCompletionRequest, Depends(body_parser(ChatCompletionRequest))]
Generate = Annotated[GenerateRequest, Depends(body_parser(GenerateRequest))]


def build_app(
    serving: Serving,
    on_startup: Callable[[], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    client = serving.client

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.start(asyncio.get_running_loop())
        if on_startup:
            on_startup()
        try:
            yield
        finally:
            client.stop()
            if on_shutdown:
                on_shutdown()

    app = FastAPI(title="llmstack lightweight worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.max_request_bytes = serving.limits.max_request_bytes
    _add_error_handlers(app)
    authorized = [Depends(api_key_checker(serving.api_key))]

    @app.get("/health")
    async def health() -> Response:
        problem = serving.health_problem()
        if problem is not None:
            return error_response(ApiError(503, problem, kind="server_error"))
        return Response(status_code=200)

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> JSONResponse:
        return JSONResponse(serving.models())

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/info", dependencies=authorized)
    async def info() -> JSONResponse:
        return JSONResponse(serving.describe())

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(req: Completion) -> Response:
        return await serving.completions(req)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(req: Chat) -> Response:
        return await serving.chat(req)

    @app.post("/generate", dependencies=authorized)
    async def generate(req: Generate) -> Response:
        return await serving.generate(req, force_stream=False)

    @app.post("/generate_stream", dependencies=authorized)
    async def generate_stream(req: Generate) -> Response:
        return await serving.generate(req, force_stream=True)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), kind=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, validation_message(exc.errors())))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        message = f"Internal error: {type(exc).__name__}: {exc}"
        return error_response(ApiError(500, message, kind="server_error"))
