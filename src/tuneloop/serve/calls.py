"""The model calls, ``POST /v1/chat/completions`` and ``POST /v1/completions``, as plain ASGI: the gateway's hot path.

:func:`serve_call` reads and checks the body, routes it (:class:`~tuneloop.serve.router.Router`), calls the
backend, and writes the answer itself, JSON or server-sent events, with ``send``. FastAPI's routing, dependency
and response layers cost about as much CPU per request as the rest of the gateway together
(``docs/benchmarks.md``, added latency), so ``GatewayMiddleware`` hands these two paths straight to
:func:`serve_call`; the same function is also their route in the app, which keeps 405 for other methods.

A client that disconnects cancels its call (and so its generation): a watcher task waits on ``receive`` for
``http.disconnect`` and cancels the task serving the request; the request is logged with status 499.

Shutdown past ``serve.shutdown_grace_s`` (``serve/server.py``): the gateway sets ``gw.shutting_down`` and the
backend ends its queued and running generations; those calls answer 503 ``shutting_down`` with ``Retry-After``
(a stream that had started ends with that error as its last event, then ``data: [DONE]``, as vLLM ends a
stream that fails) and are logged with status 503. A call uvicorn cancels after that (an upstream call still
open) is answered and logged the same way; only a cancel by :class:`DisconnectWatch` is a client disconnect (499).

A canary request that fails before its first byte (an exception in the backend, a 5xx) is logged as a failed
canary attempt (request id ``<id>.canary``) and answered by the baseline, so clients never see the canary's
failures while the analysis still counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel

from tuneloop.serve.backends import CallContext, Route
from tuneloop.serve.errors import APIError, ClientGone, error_body, is_shutting_down, scrub_paths, shutting_down
from tuneloop.serve.observe import Observation, Recorder, prompt_text
from tuneloop.serve.schemas import ChatRequest, CompletionRequest, parse_body, read_body

log = logging.getLogger(__name__)

CALL_PATHS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}
SCHEMAS: dict[str, type[BaseModel]] = {"chat.completions": ChatRequest, "completions": CompletionRequest}
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


@dataclass
class RequestState:
    """What the gateway keeps per request in ``scope["tuneloop"]``: its id and the identity headers to send."""

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)


def request_state(request_or_scope) -> RequestState:
    scope = request_or_scope if isinstance(request_or_scope, dict) else request_or_scope.scope
    return scope["tuneloop"]


def set_route_headers(state: RequestState, route: Route) -> None:
    state.headers.update(
        {
            "x-tuneloop-version": route.version_ref,
            "x-tuneloop-artifact": route.artifact_digest,
            "x-tuneloop-arm": route.arm,
        }
    )


def route_path(scope) -> str:
    """The path the app routes on: ``scope["path"]`` without the ``root_path`` prefix (``uvicorn --root-path``,
    a mount), as Starlette's router sees it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def serve_call(gw, scope, receive, send) -> None:
    """One chat or completions call (``scope["path"]`` picks which), answered on ``send``; never raises an
    :class:`APIError` (it becomes the error response) and logs every request, failed ones included."""
    endpoint = CALL_PATHS[route_path(scope)]
    state = request_state(scope)
    obs = Observation(state.request_id, endpoint)
    rec = gw.rec
    watch = DisconnectWatch()
    streaming = False  # once the stream's headers went out, nothing else may start a response
    answered = False  # the 200 of a plain call has started
    try:
        body = parse_body(
            await read_body(receive, gw.settings.max_body_bytes),
            SCHEMAS[endpoint],
            max_bytes=gw.settings.max_body_bytes,
        )
        obs.ref, obs.prompt = body.model, prompt_text(endpoint, body)
        obs.user_key = body.user or header(scope, b"x-tuneloop-user") or None
        obs.route = gw.router.choose_arm(body.model, obs.user_key, obs.request_id)
        set_route_headers(state, obs.route)
        watch.start(receive)
        first, stream = await first_answer(gw, state, obs, endpoint, body, watch)
        if stream is None:
            watch.stop()  # from here a disconnect costs nothing: the server drops what is sent to a gone client
            obs.take_body(first)
            obs.first_token()
            answered = True
            await send_json(send, 200, first)
            rec.finish(obs)
            return
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        streaming = True
        await send_events(
            send,
            first,
            stream,
            obs,
            rec,
            include_usage,
            watch,
            server_ended=lambda: bool(getattr(gw, "shutting_down", False)),
        )
    except APIError as exc:
        watch.stop()
        obs.status, obs.error = exc.status, f"{exc.code}: {exc.message}"
        rec.finish(obs)
        await send_json(send, exc.status, exc.body(), exc.headers)
    except ClientGone:
        obs.status, obs.error = 499, "client disconnected"
        rec.finish(obs)
    except asyncio.CancelledError:
        if not watch.fired:
            if not getattr(gw, "shutting_down", False) or streaming or answered:
                raise
            # uvicorn cancels what is still open after the grace and its end (serve/server.py): a 503, not a 500
            uncancel_current()
            gone = shutting_down()
            obs.status, obs.error = gone.status, f"{gone.code}: {gone.message}"
            rec.finish(obs)
            await send_json(send, gone.status, gone.body(), gone.headers)
            return
        watch.uncancel()  # our own cancel (the client left): the request ends here, logged by send_events or now
        if obs.status != 499:
            obs.status, obs.error = 499, "client disconnected"
            rec.finish(obs)
    except Exception as exc:
        watch.stop()
        log.exception("unexpected error in the gateway")
        if obs.status == 499:  # the client had gone and the request is logged; nobody is listening
            return
        obs.status, obs.error = 500, f"internal_error: {type(exc).__name__}"
        rec.finish(obs)
        if streaming:  # an answer had started: the client sees the stream end without [DONE]
            return
        await send_json(
            send,
            500,
            error_body(
                500, f"internal error ({type(exc).__name__}); the gateway log has the details", code="internal_error"
            ),
        )
    finally:
        watch.stop()


def uncancel_current() -> None:
    """Take back the cancel the current task got (Python 3.11+): it handled it and ends with its last sends."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


class DisconnectWatch:
    """Cancels the task serving a request when its client disconnects (``http.disconnect`` on ``receive``)."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.served: asyncio.Task | None = None
        self.fired = False

    def start(self, receive) -> None:
        self.served = asyncio.current_task()
        self.task = asyncio.get_running_loop().create_task(self.watch(receive))

    async def watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.fired = True
                if self.served is not None:
                    self.served.cancel()
                return

    async def disconnected(self) -> bool:
        return self.fired

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def uncancel(self) -> None:
        if self.served is not None and hasattr(self.served, "uncancel"):  # Python 3.11+
            self.served.uncancel()


async def call_backend(gw, state: RequestState, route: Route, endpoint: str, body, watch: DisconnectWatch):
    """(response body, None) for a plain call; (first chunk, the rest) for a stream. Raises before the first byte."""
    ctx = CallContext(state.request_id, watch.disconnected)
    call = gw.backend.chat if endpoint == "chat.completions" else gw.backend.completion
    if not body.stream:
        return await call(route, body, ctx), None
    stream = await call(route, body, ctx)
    try:
        return await anext(stream), stream  # errors before any output become a plain error response
    except StopAsyncIteration:
        raise APIError(502, f"{route.version_ref} ended its stream without any output", code="empty_stream") from None


async def first_answer(gw, state: RequestState, obs: Observation, endpoint: str, body, watch: DisconnectWatch):
    """:func:`call_backend` on the chosen route; a canary failing before its first byte is logged as a failed
    canary attempt and the request is answered by the baseline (its latency counted from the retry)."""
    assert obs.route is not None, "the route is chosen before the backend is called"
    try:
        return await call_backend(gw, state, obs.route, endpoint, body, watch)
    except Exception as exc:
        if (
            obs.route is None
            or obs.route.arm != "canary"
            or (isinstance(exc, APIError) and exc.status < 500)
            or is_shutting_down(exc)
        ):  # the gateway's shutdown is not the canary's failure
            raise
        gw.rec.finish(failed_canary_attempt(obs, exc))
        log.warning(
            "canary %s failed for %s (%s); retried on the baseline",
            obs.route.version_ref,
            obs.request_id,
            type(exc).__name__,
        )
        canary, obs.route = obs.route, replace(obs.route, arm="direct", rollout_id=None)  # counted once, above
        obs.route = gw.router.baseline_of(canary)
        obs.started = time.perf_counter()
        set_route_headers(state, obs.route)
        return await call_backend(gw, state, obs.route, endpoint, body, watch)


def failed_canary_attempt(obs: Observation, exc: Exception) -> Observation:
    """The canary's failed attempt as its own log record (``<request id>.canary``), counted as a canary error."""
    if isinstance(exc, APIError):
        status, what = exc.status, f"{exc.code}: {exc.message}"
    else:
        status, what = 500, f"internal_error: {type(exc).__name__}: {exc}"
    return replace(
        obs,
        request_id=f"{obs.request_id}.canary",
        status=status,
        response="",
        error=scrub_paths(f"canary failed before its first byte (retried on the baseline): {what}")[:2000],
    )


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def send_json(send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    payload = dumps(obj)
    head = [*JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


async def send_events(
    send,
    first: dict[str, Any],
    stream,
    obs: Observation,
    rec: Recorder,
    include_usage: bool,
    watch: DisconnectWatch,
    server_ended=lambda: False,
) -> None:
    """The stream as server-sent events ending in ``data: [DONE]``; an error after the first byte becomes an error
    event (never an unterminated stream). The usage-only chunk is sent when the client asked for it. ``watch``
    cancels this while the stream runs, if the client leaves; it is stopped before the last event. A cancel that
    is not the watch's while ``server_ended()`` (the gateway shutting down past its grace) ends the stream with
    the 503 ``shutting_down`` error event and ``[DONE]``."""
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    try:
        chunk: dict[str, Any] | None = first
        while chunk is not None:
            obs.take_chunk(chunk)
            if include_usage or not (chunk.get("usage") and not chunk.get("choices")):
                await send(
                    {"type": "http.response.body", "body": b"data: " + dumps(chunk) + b"\n\n", "more_body": True}
                )
            chunk = await anext(stream, None)
    except APIError as exc:
        obs.status, obs.error = exc.status, f"{exc.code}: {exc.message}"
        await send({"type": "http.response.body", "body": b"data: " + dumps(exc.body()) + b"\n\n", "more_body": True})
    except asyncio.CancelledError:
        if watch.fired or not server_ended():
            obs.status, obs.error = 499, "client disconnected mid-stream"
            rec.finish(obs)
            with contextlib.suppress(Exception):
                await stream.aclose()  # ends the generation or the upstream read
            raise
        uncancel_current()  # uvicorn ended the stream past the grace: say so to the client, then [DONE]
        gone = shutting_down()
        obs.status, obs.error = gone.status, f"{gone.code}: {gone.message}"
        with contextlib.suppress(Exception):
            await stream.aclose()
        await send({"type": "http.response.body", "body": b"data: " + dumps(gone.body()) + b"\n\n", "more_body": True})
    except Exception as exc:
        log.exception("stream failed")
        obs.status, obs.error = 500, f"internal error ({type(exc).__name__})"
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + dumps(error_body(500, obs.error, code="internal_error")) + b"\n\n",
                "more_body": True,
            }
        )
    watch.stop()
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    rec.finish(obs)
