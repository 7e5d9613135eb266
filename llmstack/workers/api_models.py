"""Request bodies of the worker's routes, validated strictly (a string where a number belongs is a 400).

Unknown fields are ignored, as OpenAI clients send more than any server implements; fields we know but
do not implement (n > 1, best_of, echo, logprobs, suffix, images) are refused with a clear message rather
than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


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


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


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
