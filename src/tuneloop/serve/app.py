"""The gateway's FastAPI app: OpenAI-compatible endpoints over a backend, with identity headers, auth,
body limits, the request log and metrics.

Entry point: :func:`create_app`. Paths: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/feedback``, ``GET /metrics``, ``GET /health``,
``GET /admin/versions``, ``POST /admin/load``, the rollout admin API (``serve/rollouts.py``) and
``GET /dashboard`` (``serve/dashboard.py``). Every response carries ``x-request-id``; once a request is
routed, also ``x-tuneloop-version``, ``x-tuneloop-artifact`` and ``x-tuneloop-arm``.

The two model calls are served by :func:`tuneloop.serve.calls.serve_call` as plain ASGI: ``GatewayMiddleware``
hands them over after its checks, past FastAPI's routing (the hot path; see that module).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import Request

from tuneloop.registry.records import ModelVersion
from tuneloop.serve.backends import Backend, Route
from tuneloop.serve.backends.local import ServedModel, load_served_model  # noqa: F401  (public: load one version in-process)
from tuneloop.serve.calls import (
    CALL_PATHS,
    RequestState,
    request_state,
    route_path,
    send_json,
    serve_call,
    set_route_headers,
    uncancel_current,
)
from tuneloop.serve.errors import APIError, install_handlers, shutting_down
from tuneloop.serve.observe import Recorder
from tuneloop.serve.router import NOT_A_CHAT_MODEL, Router
from tuneloop.serve.schemas import FeedbackRequest, parse_body, read_body

log = logging.getLogger(__name__)


@dataclass
class GatewaySettings:
    api_keys: frozenset[str] = frozenset()
    admin_token: str | None = None
    max_body_bytes: int = 1_000_000
    docs: bool = False
    preload: list[str] = field(default_factory=list)  # refs loaded (and probed) at start-up
    retention_days: float | None = None  # request log: purge older records hourly
    rollout_tick_s: float | None = 5.0  # deploy.canary.tick_interval_s; None: this gateway never decides
    rollout_policy: dict | None = None  # deploy.canary policy for POST /admin/rollouts (None: defaults)


@dataclass
class Gateway:
    """What the routes share: the backend, the router, the settings and the optional monitoring pieces."""

    backend: Backend
    router: Router
    settings: GatewaySettings
    recorder: Any = None  # AsyncRecorder
    metrics: Any = None  # GatewayMetrics
    request_log: Any = None  # RequestLog (feedback, rollout analysis)
    notifier: Any = None  # rollout.notify.Notifier for rollout decisions
    shutting_down: bool = False  # serve.shutdown_grace_s ran out (serve/server.py): open calls end with 503

    @property
    def rec(self) -> Recorder:
        return Recorder(self.recorder, self.metrics)


def create_app(
    backend: Backend,
    router: Router,
    settings: GatewaySettings | None = None,
    *,
    recorder=None,
    metrics=None,
    request_log=None,
    notifier=None,
):
    """The app. ``recorder`` (an ``AsyncRecorder``), ``metrics`` (``GatewayMetrics``) and ``request_log``
    (a ``RequestLog``, for feedback and rollout analysis) are optional: without them nothing is recorded,
    /v1/feedback is 503 and rollouts are split but not decided here. ``notifier`` gets rollout notifications."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from tuneloop.serve.dashboard import add_dashboard_routes
    from tuneloop.serve.rollouts import add_rollout_routes, rollout_loop

    gw = Gateway(backend, router, settings or GatewaySettings(), recorder, metrics, request_log, notifier)

    @asynccontextmanager
    async def lifespan(_app):
        await preload(gw)
        tasks = [asyncio.create_task(rollout_loop(gw))]
        if request_log is not None and gw.settings.retention_days:
            tasks.append(asyncio.create_task(purge_periodically(request_log, gw.settings.retention_days)))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
        router.close()
        if recorder is not None:
            await asyncio.to_thread(recorder.close)
        if notifier is not None:
            await asyncio.to_thread(notifier.close, 10.0)

    class GatewayApp(FastAPI):
        def build_middleware_stack(self):
            # GatewayMiddleware outermost: the hot path skips FastAPI's error, telemetry and body-limit layers too
            return GatewayMiddleware(super().build_middleware_stack(), gateway=gw)

    docs = gw.settings.docs
    app = GatewayApp(
        title="tuneloop gateway",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.gateway = gw  # what the routes share, for embedding and tests
    install_handlers(app)
    add_openai_routes(app, gw)
    add_operations_routes(app, gw)
    add_rollout_routes(app, gw)
    add_dashboard_routes(app, gw)
    return app


async def preload(gw: Gateway) -> None:
    for ref in gw.settings.preload:
        try:
            route = gw.router.choose_arm(ref, None)
            status = await gw.backend.prepare(route.version)
            log.info("%s ready (probes: %s)", route.version_ref, status.get("status"))
        except APIError as exc:  # a refused version answers 503 with the reason; the others are served
            if exc.code == NOT_A_CHAT_MODEL:  # a reward model: nothing to load for chat (calls for it get a 400)
                log.info("%s not loaded: a reward model has no chat endpoint", ref)
                continue
            log.error("%s not served: %s", ref, exc.message)


def add_openai_routes(app, gw: Gateway) -> None:
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(v, v.ref) for v in gw.router.versions()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        v = gw.router.resolve(model_id)
        set_route_headers(request_state(request), Route(model_id, v))
        return model_object(v, model_id)

    for path in CALL_PATHS:  # the routes (405 for other methods); GatewayMiddleware calls serve_call before routing
        app.router.add_route(path, CallEndpoint(gw), methods=["POST"], include_in_schema=False)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        from fastapi.responses import JSONResponse

        s = gw.settings
        body = parse_body(
            await read_body(request.receive, s.max_body_bytes), FeedbackRequest, max_bytes=s.max_body_bytes
        )
        if gw.request_log is None:
            raise APIError(
                503,
                "feedback needs the request log (serve.request_log); this gateway runs without one",
                code="no_request_log",
            )
        record, created = await asyncio.to_thread(store_feedback, gw.request_log, gw.recorder, body)
        if created is None:  # the store is unavailable: spooled, stored when it is back (monitor/spool.py)
            return JSONResponse(
                {
                    "object": "feedback",
                    "id": None,
                    "request_id": record.request_id,
                    "source": record.source,
                    "created": None,
                    "status": "queued",
                },
                status_code=202,
            )
        return JSONResponse(
            {
                "object": "feedback",
                "id": record.feedback_id,
                "request_id": record.request_id,
                "source": record.source,
                "created": created,
                "status": "stored",
            },
            status_code=201 if created else 200,
        )


def add_operations_routes(app, gw: Gateway) -> None:
    from fastapi.responses import Response

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # 200 while the gateway serves; "degraded" (with reasons) while the request log is not whole (its store
        # is unavailable and records wait in the spool, or records were lost lately): answers still flow.
        out: dict[str, Any] = {"status": "ok", "backend": gw.backend.kind, "loaded": gw.backend.loaded()}
        if gw.recorder is not None:
            request_log = gw.recorder.health()
            out["request_log"] = request_log
            if request_log["status"] != "ok":
                out["status"], out["reasons"] = "degraded", request_log["reasons"]
        if gw.settings.api_keys and not has_key(request, gw.settings):
            return public_health(out)  # no key: what a health check needs, not the versions and their digests
        return out

    @app.get("/metrics")
    async def metrics_endpoint():
        if gw.metrics is None:
            raise APIError(503, "metrics are not enabled on this gateway", code="no_metrics")
        content, ctype = gw.metrics.render()
        return Response(content, media_type=ctype)

    @app.get("/admin/versions")
    async def admin_versions() -> dict[str, Any]:
        return {
            "backend": gw.backend.kind,
            "loaded": gw.backend.loaded(),
            "refused": getattr(gw.backend, "refused", {}),
        }

    @app.post("/admin/load")
    async def admin_load(request: Request) -> dict[str, Any]:
        data = json.loads(await read_body(request.receive, gw.settings.max_body_bytes) or b"{}")
        ref = data.get("model") if isinstance(data, dict) else None
        if not isinstance(ref, str) or not ref:
            raise APIError(400, 'give the version to load as {"model": "name:3"}', code="invalid_value", param="model")
        route = gw.router.choose_arm(ref, None)
        set_route_headers(request_state(request), route)
        return {"version": route.version_ref, "probes": await gw.backend.prepare(route.version)}


class CallEndpoint:
    """A model-call route as an ASGI app (an instance, so Starlette passes it ``scope, receive, send``)."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    async def __call__(self, scope, receive, send) -> None:
        await serve_call(self.gw, scope, receive, send)


# ------------------------------------------------------------------------------------------------ helpers


async def purge_periodically(request_log, retention_days: float, every_s: float = 3600.0) -> None:
    """Retention by age: delete logged requests (and their feedback) older than ``retention_days``."""
    while True:
        try:
            removed = await asyncio.to_thread(request_log.purge, time.time() - retention_days * 86400)
            if removed:
                log.info("request log retention: removed %d records older than %s days", removed, retention_days)
        except Exception:
            log.exception("request log purge failed")
        await asyncio.sleep(every_s)


def store_feedback(request_log, recorder, body: FeedbackRequest):
    """``(record, created)``; ``created`` is None when the feedback went to the spool (answered 202)."""
    from tuneloop.monitor.requestlog import RequestLogUnavailable, UnknownRequest, store_unavailable

    kwargs = dict(
        source=body.source, rating=body.rating, score=body.score, correction=body.correction, comment=body.comment
    )
    try:
        if recorder is not None:  # it flushes its queue before a 404, and spools while the store is unavailable
            return recorder.add_feedback(body.request_id, flush_timeout=2.0, **kwargs)
        return request_log.add_feedback(body.request_id, **kwargs)
    except UnknownRequest:
        raise APIError(
            404,
            f"no request with id {body.request_id!r} in the request log",
            code="request_not_found",
            param="request_id",
        ) from None
    except RequestLogUnavailable as exc:
        raise APIError(503, f"{exc}", code="request_log_unavailable") from None
    except Exception as exc:
        if store_unavailable(exc):
            raise APIError(
                503,
                "the request log store is unavailable; send the feedback again later",
                code="request_log_unavailable",
            ) from None
        raise


def model_object(v: ModelVersion, model_id: str) -> dict[str, Any]:
    """The OpenAI model object (``GET /v1/models``) of a registered version; the export's README is
    :func:`tuneloop.registry.card.model_card`."""

    try:
        created = int(datetime.fromisoformat(str(v.created_at)).timestamp())
    except ValueError:
        created = 0
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "tuneloop",
        "version": v.ref,
        "artifact_sha256": v.artifact_digest,
        "kind": v.artifact_kind,
        "aliases": list(v.aliases),
    }


# ------------------------------------------------------------------------------------------------ middleware


# Paths served without an API key: the health check, and the dashboard's page, which holds no data (its script
# fetches /dashboard.json with the key given in the page URL's fragment, which browsers never send).
OPEN_PATHS = frozenset({"/health", "/dashboard"})


class GatewayMiddleware:
    """Pure ASGI (streaming-safe): request id, identity headers, auth, and the body-size limit by Content-Length.
    After the checks, ``POST`` on the two model-call paths goes straight to :func:`serve_call` (the hot path)."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.gw = gateway
        self.s = gateway.settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = RequestState(f"req-{uuid.uuid4().hex}")
        scope["tuneloop"] = state

        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-request-id", state.request_id.encode())]
                extra += [(k.encode(), v.encode()) for k, v in state.headers.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        denied = self.check(scope)
        if denied is not None:
            return await send_json(send_with_headers, denied.status, denied.body(), denied.headers)
        if scope["method"] == "POST" and route_path(scope) in CALL_PATHS:
            return await serve_call(self.gw, scope, receive, send_with_headers)
        try:
            return await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            # uvicorn cancels what is still open after the shutdown grace (serve/server.py): feedback, admin calls
            # get the same OpenAI-shaped 503 as the model calls, not uvicorn's bare 500 and a traceback
            if not self.gw.shutting_down or started:
                raise
            uncancel_current()
            exc = shutting_down()
            await send_json(send_with_headers, exc.status, exc.body(), exc.headers)

    def check(self, scope) -> APIError | None:
        length, authorization = "", ""
        for key, value in scope.get("headers", ()):
            key = key.lower()
            if key == b"content-length":
                length = value.decode("latin-1")
            elif key == b"authorization":
                authorization = value.decode("latin-1")
        if length.isdigit() and int(length) > self.s.max_body_bytes:
            return APIError(
                413,
                f"request body is {length} bytes; the limit is {self.s.max_body_bytes} (serve.max_body_bytes)",
                code="request_too_large",
            )
        path = route_path(scope)
        token = bearer(authorization)
        if path.startswith("/admin"):
            if not self.s.admin_token:
                return APIError(
                    403,
                    "admin endpoints are off: set the admin token in the environment variable named by "
                    "serve.admin_token_env (default TUNELOOP_ADMIN_TOKEN)",
                    code="admin_disabled",
                )
            if not token or not constant_time_in(token, {self.s.admin_token}):
                return APIError(
                    401, "admin endpoints need 'Authorization: Bearer <admin token>'", code="invalid_admin_token"
                )
            return None
        if self.s.api_keys and path not in OPEN_PATHS and not (token and constant_time_in(token, self.s.api_keys)):
            return APIError(
                401,
                "missing or invalid API key; send 'Authorization: Bearer <key>' with a key from the gateway's "
                "key list (serve.api_keys_env)",
                code="invalid_api_key",
            )
        return None


def has_key(request: Request, s: GatewaySettings) -> bool:
    """Whether the request carries a valid API key (or the admin token)."""
    token = bearer(request.headers.get("authorization", ""))
    if not token:
        return False
    return constant_time_in(token, s.api_keys | ({s.admin_token} if s.admin_token else set()))


def public_health(full: dict[str, Any]) -> dict[str, Any]:
    """``GET /health`` without an API key when keys are set: the status and how many versions are loaded; the
    versions, their artifact digests and the reasons of a ``degraded`` status need a key."""
    return {"status": full["status"], "versions_loaded": len(full.get("loaded") or [])}


def bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def constant_time_in(token: str, allowed) -> bool:
    import hmac

    return any(hmac.compare_digest(token.encode(), a.encode()) for a in allowed)
