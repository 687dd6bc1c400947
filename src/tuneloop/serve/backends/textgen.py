"""OpenAI semantics on top of the batching engine: prompts, token budgets, stop strings, logprobs, responses.

Used by the local backend. :func:`run_choices` submits one job per choice and turns the engine's events into
per-choice text with stop strings applied; the ``chat_*`` / ``completion_*`` functions shape OpenAI bodies
and stream chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tuneloop.serve.batching import (
    BatchEngine,
    DoneEvent,
    EngineStopped,
    ErrorEvent,
    GenJob,
    PromptLogprobs,
    QueueFull,
    SamplingParams,
    StoppedEvent,
    TokenEvent,
)
from tuneloop.serve.errors import APIError, bad_request, shutting_down


@dataclass
class Choice:
    """One choice as it is generated: token ids, the text so far (stop strings applied) and its logprobs."""

    index: int
    stops: list[str]
    tok: Any
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    logprobs: list[TokenEvent] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    stop_token: TokenEvent | None = None  # the end-of-sequence token that ended it (with logprobs asked for)

    incremental: bool = True  # decode after every token (streaming or stop strings); else once at the end

    def add(self, ev: TokenEvent) -> bool:
        """Append a token; True when a stop string was reached (text cut before it)."""
        self.ids.append(ev.token_id)
        if ev.logprob is not None:
            self.logprobs.append(ev)
        if not self.incremental:
            return False
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.text, self.finish_reason = text[: min(hits)], "stop"
            return True
        self.text = text
        return False

    def finish_text(self) -> None:
        """The final text (the choice ended without a stop string): decoded once when not incremental, and
        without the broken character a token limit leaves when it cuts a multi-byte character in two."""
        from tuneloop.modeling import complete_text, decode_text

        self.text = (
            complete_text(self.tok, self.ids, self.text) if self.incremental else decode_text(self.tok, self.ids)
        )

    def pending(self, final: bool) -> str:
        """New text safe to stream: hold back a partial character or a possible stop-string prefix."""
        end = len(self.text)
        if not final:
            # a character still missing bytes decodes to U+FFFD (one per byte with a byte-fallback decoder)
            end = len(self.text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.stops), default=0)
            end = max(self.sent, end - hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out


def make_params(
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    choice: int,
    top_logprobs: int | None,
    prompt_logprobs: bool = False,
) -> SamplingParams:
    # n > 1 with a seed: choice i samples with seed + i, so the choices differ but the request is repeatable
    s = None if seed is None else (seed + choice) % (2**63)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=s,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def token_budget(
    prompt_len: int, requested: int | None, ctx_len: int, default: int, *, param: str, prompt_param: str
) -> int:
    """Tokens to generate; 400 ``context_length_exceeded`` before any generation when it cannot fit."""
    if prompt_len > ctx_len or (prompt_len == ctx_len and requested != 0):
        raise APIError(
            400,
            f"this model's maximum context length is {ctx_len} tokens; the prompt has {prompt_len}. "
            "Shorten the prompt.",
            code="context_length_exceeded",
            param=prompt_param,
        )
    if requested is not None:
        if prompt_len + requested > ctx_len:
            raise APIError(
                400,
                f"this model's maximum context length is {ctx_len} tokens; the prompt has {prompt_len} and "
                f"{param} asks for {requested} more. Lower {param} or shorten the prompt.",
                code="context_length_exceeded",
                param=param,
            )
        return requested
    return max(0, min(default, ctx_len - prompt_len))


def run_choices(
    engine: BatchEngine,
    adapter: str | None,
    prompt_ids: list[int],
    params: list[SamplingParams],
    stop_ids: frozenset[int],
    choices: list[Choice],
    *,
    stream: bool,
) -> AsyncIterator[tuple[Choice, bool]]:
    """Submit one job per choice now (429 when the queue is full), and return the iterator of their progress:
    (choice, finished) after each new token or finish. Leaving the iterator cancels the jobs.

    The engine thread appends events to a deque; it wakes the event loop for every token only when the
    tokens are streamed (or stop strings must be watched), else once per finished choice.
    """
    loop = asyncio.get_running_loop()
    events: deque = deque()
    wake = asyncio.Event()
    per_token = stream or any(c.stops for c in choices)

    def emitter(ch: Choice):
        def emit(ev: Any) -> None:
            events.append((ch, ev))
            if per_token or isinstance(ev, (DoneEvent, ErrorEvent, StoppedEvent)):
                loop.call_soon_threadsafe(wake.set)

        return emit

    jobs = [
        GenJob(prompt_ids, p, stop_ids, adapter=adapter, emit=emitter(ch))
        for ch, p in zip(choices, params, strict=True)
    ]
    try:
        for job in jobs:
            engine.submit(job)
    except QueueFull as exc:
        for job in jobs:
            job.cancel()
        raise APIError(
            429,
            f"the gateway is at capacity ({exc}); retry shortly",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        ) from None
    except EngineStopped:  # the gateway is shutting down past its grace period
        for job in jobs:
            job.cancel()
        raise shutting_down() from None
    return _progress(events, wake, dict(zip([c.index for c in choices], jobs, strict=True)))


async def _progress(
    events: deque, wake: asyncio.Event, open_jobs: dict[int, GenJob]
) -> AsyncIterator[tuple[Choice, bool]]:
    jobs = list(open_jobs.values())
    try:
        # A client that goes away cancels this iterator (Starlette cancels a stream; non-streaming calls are
        # watched by the app), and the finally clause below cancels the jobs: no polling needed here.
        while open_jobs:
            await wake.wait()
            wake.clear()
            while events and open_jobs:
                ch, ev = events.popleft()
                if isinstance(ev, PromptLogprobs):
                    ch.prompt_logprobs = ev
                elif isinstance(ev, ErrorEvent):
                    raise APIError(500, ev.message, code="generation_failed")
                elif ch.index not in open_jobs:
                    continue
                elif isinstance(ev, StoppedEvent):  # BatchEngine.abort: shutdown past serve.shutdown_grace_s
                    raise shutting_down()
                elif isinstance(ev, DoneEvent):
                    ch.finish_reason = ch.finish_reason or ev.finish_reason
                    ch.stop_token = ev.stop_token
                    ch.finish_text()
                    del open_jobs[ch.index]
                    yield ch, True
                elif ch.add(ev):
                    open_jobs.pop(ch.index).cancel()
                    yield ch, True
                else:
                    yield ch, False
    finally:
        for job in jobs:
            job.cancel()


# ------------------------------------------------------------------------------------------------ shapes


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def token_str(tok, tid: int) -> str:
    return tok.decode([tid], skip_special_tokens=False)


def chat_logprobs(ch: Choice) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = token_str(ch.tok, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

    content = []
    for ev in ch.logprobs[: len(ch.ids)]:
        e = entry(ev.token_id, ev.logprob if ev.logprob is not None else 0.0)
        e["top_logprobs"] = [entry(t, v) for t, v in (ev.top or [])]
        content.append(e)
    return {"content": content}


def completion_logprobs(ch: Choice, prompt_ids: list[int] | None) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; with ``echo`` the prompt tokens come first.

    The generated tokens end with the end-of-sequence token when that is what the model produced (as OpenAI and
    vLLM list it; its text, e.g. ``<|im_end|>``, is in ``tokens`` but not in the choice's ``text``): lm-eval's
    ``local-completions`` asks ``max_tokens: 1, echo: true`` and drops the last entry as the generated token."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float | None] | None] = []
    if prompt_ids is not None and ch.prompt_logprobs is not None:
        for tid, lp, top in zip(prompt_ids, ch.prompt_logprobs.logprobs, ch.prompt_logprobs.top, strict=True):
            tokens.append(token_str(ch.tok, tid))
            lps.append(lp)
            tops.append(None if top is None else {token_str(ch.tok, t): v for t, v in top})
    for ev in ch.logprobs + ([ch.stop_token] if ch.stop_token is not None else []):
        tokens.append(token_str(ch.tok, ev.token_id))
        lps.append(ev.logprob)
        tops.append(
            {token_str(ch.tok, t): v for t, v in (ev.top or [])}
            if ev.top is not None
            else {token_str(ch.tok, ev.token_id): ev.logprob}
        )
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def now() -> int:
    return int(time.time())


def chat_messages(messages) -> list[dict[str, Any]]:
    """A chat request's messages as the chat template gets them: the canonical messages training renders
    (``tuneloop.data.formats``), so a conversation is the same token ids at training and at serving time
    (tests/test_template_parity.py). ``developer`` is ``system``, ``function`` is ``tool``; an assistant turn
    that only calls tools is the calls as JSON text, ``{"name", "arguments"}`` (a list when several), with the
    ``tool_call`` flag; a tool turn is its text."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        text = m.text()
        if role == "assistant" and m.tool_calls and not text.strip():
            out.append({"role": "assistant", "content": _tool_calls_text(m.tool_calls, i), "tool_call": True})
        else:
            out.append({"role": role, "content": text})
    return out


def _tool_calls_text(calls: list[dict[str, Any]], i: int) -> str:
    """OpenAI ``tool_calls`` -> JSON text, as ``tuneloop.data.formats`` writes them into training records."""
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise bad_request(f"messages.{i}.tool_calls.{j} has no function name", param=f"messages.{i}.tool_calls")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass  # kept as the string it is, as training keeps it
        out.append({"name": fn["name"], "arguments": args})
    try:
        return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)
    except (TypeError, ValueError):
        raise bad_request(
            f"messages.{i}.tool_calls: the arguments cannot be written as JSON", param=f"messages.{i}.tool_calls"
        ) from None


def reject_unsupported_chat(req) -> None:
    """Fields the local backend cannot honour get a clear 400 instead of being ignored. Tool turns in the
    conversation are rendered (:func:`chat_messages`); offering tools to call is not supported."""
    if req.tools or req.tool_choice not in (None, "none"):
        raise bad_request(
            "tools and tool_choice are not supported by the local backend (the served model has no "
            "tool-calling template); drop them, or serve through an upstream that supports tools "
            "(serve.backend: openai)",
            param="tools",
            code="unsupported_parameter",
        )
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise bad_request(
            "response_format other than text is not supported by the local backend",
            param="response_format",
            code="unsupported_parameter",
        )
    if req.presence_penalty or req.frequency_penalty:
        raise bad_request(
            "presence_penalty and frequency_penalty are not supported by the local backend; leave them at 0",
            param="presence_penalty" if req.presence_penalty else "frequency_penalty",
            code="unsupported_parameter",
        )
