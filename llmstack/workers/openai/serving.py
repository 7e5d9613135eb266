"""The request logic behind the routes: prompts to token ids, submission to the model loop, responses.

Requests are bounded before they cost anything (`protocol.Bounds`: prompt characters, stop strings,
token ids and seeds), chat templates that requests bring run only where the server trusts them, and
large prompts are templated and tokenized off the event loop, so that one request cannot hold /health
or the other streams. Streamed responses are rendered by `sse`; whole ones here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from fastapi.responses import JSONResponse, Response

from llmstack.workers.backends.base import BackendInfo
from llmstack.workers.metrics import WorkerMetrics
from llmstack.workers.model_client import ModelClient, ModelDied, Overloaded
from llmstack.workers.openai.protocol import (
    ApiError,
    Bounds,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    RequestLimits,
    SamplingFields,
)
from llmstack.workers.openai.sse import EventStreamResponse, ipex_chunks, json_string, openai_chunks
from llmstack.workers.sampling import SamplingParams
from llmstack.workers.scheduler import Update
from llmstack.workers.streams import RequestStream

# Prompts shorter than this (characters) and chat requests shorter than this (body bytes) are templated and
# tokenized inline: well under a millisecond, less than handing them to a thread. Longer ones go to the
# CPU pool.
INLINE_CHARS = 4096
# Keys of chat_template_kwargs that would replace the template, or change what the call returns.
TEMPLATE_KEYS = frozenset({"chat_template", "tokenize", "return_dict", "tools_in_user_message"})


class Serving:
    """Everything the routes need: the model loop's client, the tokenizer and the served model's facts."""

    def __init__(
        self,
        client: ModelClient,
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
        self.client = client
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.info = info
        self.metrics = metrics
        self.api_key = api_key
        self.limits = limits or RequestLimits()
        self.bounds = Bounds(max_model_len, vocab_size, self.limits)
        self.created = int(time.time())
        self._model_json = json_string(served_name)
        # Templating and tokenizing of large prompts, off the event loop; two at a time at most.
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmstack-tokenize")

    # -- the routes ----------------------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """Why /health is 503, or None while the model loop runs and makes progress."""
        if not self.client.alive():
            return "The model loop is not running."
        stalled = self.client.stalled_for()
        if stalled > self.limits.stall_timeout_s:
            return (
                f"The model loop has made no progress for {stalled:.0f} s with "
                f"{self.client.snapshot()['open_requests']} requests open."
            )
        return None

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "llmstack",
            "root": self.model_path,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [card]}

    def describe(self) -> dict[str, Any]:
        data = asdict(self.info)
        data.update(
            served_model_name=self.served_name,
            max_model_len=self.max_model_len,
            max_batch_size=self.client.max_batch_size,
            scheduler=self.client.snapshot(),
        )
        return data

    async def completions(self, req: CompletionRequest) -> Response:
        self.check_model(req.model)
        req.check_supported()
        prompt_ids = await self.encode_prompt(req.prompt)
        params = req.to_sampling_params(len(prompt_ids), self.bounds)
        return await self._respond(req, prompt_ids, params, chat=False)

    async def chat(self, req: ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        req.check_supported()
        prompt_ids = await self.encode_chat(req)
        params = req.to_sampling_params(len(prompt_ids), self.bounds)
        return await self._respond(req, prompt_ids, params, chat=True)

    async def generate(self, req: GenerateRequest, force_stream: bool) -> Response:
        """ipex-llm's /generate ([request_id, text], or a stream) and /generate_stream."""
        req.check_supported()
        prompt_ids = await self.encode_prompt(req.inputs)
        params = req.to_sampling_params(len(prompt_ids), self.bounds)
        streamed = force_stream or req.stream
        request_id, stream = self.submit(prompt_ids, params, "stream" if streamed else "gen")
        if streamed:
            chunks = ipex_chunks(request_id, stream, model_json=self._model_json, abort=self.client.abort,
                                 chat=req.req_type == "chat")  # fmt: skip
            return EventStreamResponse(chunks, stream.close)
        text, _, _ = await self.collect(request_id, stream)
        return JSONResponse([request_id, text])

    async def _respond(
        self, fields: SamplingFields, prompt_ids: list[int], params: SamplingParams, chat: bool
    ) -> Response:
        request_id, stream = self.submit(prompt_ids, params, "chatcmpl" if chat else "cmpl")
        if fields.stream:
            options = fields.stream_options
            chunks = openai_chunks(
                request_id,
                stream,
                model_json=self._model_json,
                abort=self.client.abort,
                chat=chat,
                prompt_tokens=len(prompt_ids),
                include_usage=bool(options and options.include_usage),
                continuous_usage=bool(options and options.continuous_usage_stats),
                token_ids=fields.return_token_ids,
            )
            return EventStreamResponse(chunks, stream.close)
        text, final, output_ids = await self.collect(request_id, stream)
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
            "model": self.served_name,
            "choices": [choice],
            "usage": usage(len(prompt_ids), final.completion_tokens),
        }
        if fields.return_token_ids:  # vLLM's extension
            choice["token_ids"] = output_ids
            (body if chat else choice)["prompt_token_ids"] = prompt_ids
        return JSONResponse(body)

    # -- prompts -------------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.served_name}`.",
                kind="not_found_error",
                param="model",
                code="model_not_found",
            )

    async def off_loop(self, inline: bool, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)`: inline where it is known to be cheap, else in the CPU pool."""
        if inline:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._cpu, work, *args)

    async def encode_prompt(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "The prompt is empty.", param="prompt")
            self.bounds.check_prompt_chars(len(prompt), "prompt")
            return await self.off_loop(len(prompt) < INLINE_CHARS, self._tokenize, prompt, True)
        if not prompt:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        if isinstance(prompt[0], int):  # the body's validation made the list all of one type
            ids = list(prompt)  # type: ignore[arg-type]
            # One too long for the context is refused for its length (sampling parameters): no need to look
            # at each of its (up to millions of) ids on the event loop.
            if len(ids) < self.max_model_len:
                self.bounds.check_token_ids(ids, "prompt")
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

    async def encode_chat(self, req: ChatCompletionRequest) -> list[int]:
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
        self.bounds.check_prompt_chars(chars, "messages")
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in TEMPLATE_KEYS}
        if template is not None:
            kwargs["chat_template"] = template
        # The model's template costs in proportion to what the request sent (messages, their other fields,
        # chat_template_kwargs); one a request brings, anything.
        inline = template is None and req.body_bytes < INLINE_CHARS
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

    # -- the model loop ------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, prefix: str) -> tuple[str, RequestStream]:
        try:
            return self.client.submit(prompt_ids, params, prefix)
        except Overloaded as exc:
            raise ApiError(
                503, f"The server is overloaded: {exc}.", kind="server_error", code="overloaded"
            ) from exc
        except ModelDied as exc:
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
                self.client.abort(request_id)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
