"""Request bodies of the HTTP routes (OpenAI's and ipex-llm's), and how each becomes `SamplingParams`.

Bodies are validated strictly (a string where a number belongs is a 400). Unknown fields are ignored, as
OpenAI clients send more than any server implements; fields we know but do not implement (n > 1,
best_of, echo, logprobs, suffix, images) are refused with a clear message rather than silently ignored.
Every refusal is an `ApiError`: the status and OpenAI error body the client gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from llmstack.workers.sampling import SamplingParams

# OpenAI's max_tokens when a completions request gives none.
COMPLETIONS_MAX_TOKENS = 16
# Seeds as vLLM takes them (a torch.long).
SEED_RANGE = (-(2**63), 2**63 - 1)


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


@dataclass(frozen=True)
class Bounds:
    """What a request is checked against: the served model's context and vocabulary, the server's limits."""

    max_model_len: int
    vocab_size: int
    limits: RequestLimits = RequestLimits()

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

    def check_stops(self, stop: tuple[str, ...]) -> None:
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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    # Bytes of the body this was parsed from (set by the route's body dependency).
    _body_bytes: int = PrivateAttr(default=0)

    @property
    def body_bytes(self) -> int:
        return self._body_bytes


class StreamOptions(_Body):
    include_usage: bool = False
    # vLLM's extension: usage in every chunk.
    continuous_usage_stats: bool = False


class SamplingFields(_Body):
    """The sampling fields both OpenAI routes share (with vLLM's extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    logprobs: Any = None
    skip_special_tokens: bool = True
    # vLLM's extension: the generated token ids (and the prompt's) in the response.
    return_token_ids: bool = False
    user: str | None = None

    def sampling_params_for(
        self,
        prompt_len: int,
        bounds: Bounds,
        max_tokens: int | None,
        default_max_tokens: int | None = None,
    ) -> SamplingParams:
        """`max_tokens` None: the request did not say; then `default_max_tokens`, clamped to the room the
        context leaves (as vLLM does), or all of that room."""
        if self.n != 1:
            raise ApiError(400, "n > 1 is not supported: send n requests.", param="n")
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported.", param="logprobs")
        if prompt_len == 0:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        max_model_len = bounds.max_model_len
        room = max_model_len - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_model_len} tokens, and the "
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
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                "completion). "
                "Please reduce the length of the prompt or completion.",
                param="max_tokens",
            )
        if self.min_tokens > max_tokens:
            raise ApiError(
                400,
                f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens}).",
                param="min_tokens",
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bounds.check_stops(stop)
        bounds.check_token_ids(list(self.stop_token_ids or ()), "stop_token_ids")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ApiError(400, f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}.", param="seed")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop=tuple(s for s in stop if s),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        for field, bad in (
            ("echo", self.echo),
            ("suffix", self.suffix),
            ("best_of", (self.best_of or 1) > 1),
        ):
            if bad:
                raise ApiError(400, f"{field} is not supported.", param=field)

    def to_sampling_params(self, prompt_len: int, bounds: Bounds) -> SamplingParams:
        # OpenAI's default of 16 applies where the request says nothing, clamped to the context.
        given = self.max_tokens if "max_tokens" in self.model_fields_set else None
        return self.sampling_params_for(prompt_len, bounds, given, COMPLETIONS_MAX_TOKENS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    # A template of the request's own (vLLM's extension): run only where the server trusts them.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        if self.top_logprobs:
            raise ApiError(400, "logprobs are not supported.", param="top_logprobs")

    def to_sampling_params(self, prompt_len: int, bounds: Bounds) -> SamplingParams:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params_for(prompt_len, bounds, limit)


class TgiParameters(_Body):
    """ipex-llm's `/generate` parameters (text-generation-inference style)."""

    max_new_tokens: int = Field(default=32, ge=0)
    do_sample: bool | None = None
    min_new_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    temperature: float | None = Field(default=None, ge=0.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    typical_p: float | None = None
    # Beyond ipex-llm's set, harmless for its clients.
    stop: list[str] | None = None
    ignore_eos: bool = False
    seed: int | None = None


class GenerateRequest(_Body):
    """ipex-llm's `/generate` and `/generate_stream` body."""

    inputs: str
    parameters: TgiParameters | None = None
    stream: bool = False
    req_type: Literal["completion", "chat"] = "completion"

    @property
    def params(self) -> TgiParameters:
        return self.parameters if self.parameters is not None else TgiParameters()

    def check_supported(self) -> None:
        if self.params.typical_p not in (None, 1.0):
            raise ApiError(400, "typical_p is not supported.", param="parameters.typical_p")

    def to_sampling_params(self, prompt_len: int, bounds: Bounds) -> SamplingParams:
        p = self.params
        # ipex-llm's semantics: greedy unless do_sample; its OpenAI routes set do_sample = temperature > 1e-4.
        sampled = p.do_sample if p.do_sample is not None else (p.temperature or 0.0) > 1e-4
        fields = validated(
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
        return fields.sampling_params_for(prompt_len, bounds, p.max_new_tokens)


def parse(model: type[_Body], body: bytes) -> Any:
    """`model` from a request's body; what it refuses is a 400."""
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc.errors())) from exc
    parsed._body_bytes = len(body)
    return parsed


def validated(model: Any, where: str, **values: Any) -> Any:
    """`model(**values)` from what a request sent under `where`: values that its bounds refuse are the
    client's mistake (400), as if they had been parsed from the body."""
    try:
        return model(**values)
    except ValidationError as exc:
        errors = [{**error, "loc": (where, *error.get("loc", ()))} for error in exc.errors()]
        raise ApiError(400, validation_message(errors)) from exc


def validation_message(errors: Any) -> str:
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
