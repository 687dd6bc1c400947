"""OpenAI request bodies as pydantic models with strict validation, and the JSON body reader.

Every number is finite and in range, every string valid Unicode (a lone surrogate is refused), and the
body has a size limit: a bad request is a 400 in OpenAI's shape, never a 500. Unknown fields are ignored, as
OpenAI-compatible servers do, so clients that send newer fields keep working (and an upstream backend gets them).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneloop.serve.errors import APIError, ClientGone, bad_request, validation_to_api_error

SEED_MAX = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, str_max_length=50_000_000)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; this gateway takes text parts only")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(None, ge=0, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-SEED_MAX, le=SEED_MAX)
    user: str | None = Field(None, max_length=512)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if stops is not None and any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: PromptType
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and len(v) > 2048:
            raise ValueError(f"at most 2048 prompts per request, got {len(v)}")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class FeedbackRequest(_Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    request_id: str = Field(min_length=1, max_length=200)
    rating: Literal[1, -1] | None = None
    score: float | None = Field(None, ge=0.0, le=1.0)
    correction: str | None = Field(None, max_length=100_000)
    comment: str | None = Field(None, max_length=10_000)
    source: str = Field("api", min_length=1, max_length=100)

    @model_validator(mode="after")
    def _one_signal(self) -> FeedbackRequest:
        if self.rating is None and self.score is None and self.correction is None and self.comment is None:
            raise ValueError("give at least one of rating (+1 or -1), score (0..1), correction or comment")
        return self


def parse_body(raw: bytes, model: type[BaseModel], *, max_bytes: int) -> Any:
    """Decode, check and validate a JSON request body (413 over the size limit; 400 for anything malformed)."""
    if len(raw) > max_bytes:
        raise APIError(
            413,
            f"request body is {len(raw)} bytes; the limit is {max_bytes} (serve.max_body_bytes)",
            code="request_too_large",
        )
    try:
        text = raw.decode("utf-8")  # strict: UTF-8-encoded surrogates are refused here already
    except UnicodeDecodeError:
        text = None  # json.loads finds the encoding (UTF-16/32) or says what is wrong
    try:
        data = json.loads(raw if text is None else text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if text is None or "\\u" in text:  # in strict UTF-8 only a \u escape can make a lone surrogate
        _check_unicode(data)
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_to_api_error(exc.errors(include_url=False)) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _check_unicode(data: Any) -> None:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(
            f"request body contains invalid Unicode (a lone surrogate at character {exc.start} of a string)",
            code="invalid_unicode",
        ) from None


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


async def read_body(receive, max_bytes: int) -> bytes:
    """The request body from the ASGI ``receive`` (a Starlette ``Request.receive`` or the server's own), refused
    with 413 as soon as it passes ``max_bytes`` (never buffered past the limit); :class:`ClientGone` when the
    client disconnects before sending all of it."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise APIError(
                413, f"request body is larger than {max_bytes} bytes (serve.max_body_bytes)", code="request_too_large"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
