"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, and the handlers that make them.

Raise :class:`APIError` (or one of the helpers) anywhere in the gateway; :func:`install_handlers` turns it,
FastAPI's own 404/405, validation errors (400, never 422) and unexpected exceptions (500, no traceback or
path in the body) into that shape.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}

_ABS_PATH = re.compile(r"(?<![\w.])/(?!(?:v1|admin)/)(?:[\w.+-]+/)+[\w.+-]*")


def scrub_paths(text: str) -> str:
    """Replace absolute filesystem paths in a message (no path may leak into a response); the gateway's own URL
    paths (``/v1/...``, ``/admin/...``) stay, so "GET /v1/models lists every version" still says where to look."""
    return _ABS_PATH.sub("<path>", text)


@dataclass
class APIError(Exception):
    status: int
    message: str
    code: str | None = None
    param: str | None = None
    type: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        return error_body(self.status, self.message, code=self.code, param=self.param, type_=self.type)


class ClientGone(Exception):
    """The client disconnected before its answer was sent (logged as status 499; nothing is sent)."""


SHUTTING_DOWN = "shutting_down"
SHUTDOWN_RETRY_AFTER_S = 5


def shutting_down() -> APIError:
    """503 ``shutting_down`` (with ``Retry-After``) for a call the gateway ends unanswered because it is shutting
    down and ``serve.shutdown_grace_s`` ran out: still queued, generating, or streaming (then as the stream's
    last event). The request log records it with status 503 and this message, never as a client disconnect."""
    return APIError(
        503,
        "server shutting down: the gateway stopped before this request finished "
        "(serve.shutdown_grace_s ran out); retry it, on another replica or once the gateway is back",
        code=SHUTTING_DOWN,
        headers={"retry-after": str(SHUTDOWN_RETRY_AFTER_S)},
    )


def is_shutting_down(exc: BaseException) -> bool:
    return isinstance(exc, APIError) and exc.code == SHUTTING_DOWN


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None, type_: str | None = None
) -> dict:
    return {
        "error": {
            "message": scrub_paths(message),
            "type": type_ or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def not_found(message: str, *, param: str | None = "model", code: str = "model_not_found") -> APIError:
    return APIError(404, message, code=code, param=param)


def install_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def respond(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return respond(validation_to_api_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return respond(
                APIError(
                    404,
                    f"no route {request.method} {request.url.path}; see GET /v1/models and the OpenAI API paths",
                    code="unknown_url",
                )
            )
        if exc.status_code == 405:
            return respond(
                APIError(
                    405,
                    f"method {request.method} is not allowed on {request.url.path}",
                    code="method_not_allowed",
                    type="invalid_request_error",
                )
            )
        return respond(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(ClientGone)
    async def client_gone(_request, _exc: ClientGone):
        from fastapi.responses import Response

        return Response(status_code=499)  # nobody reads it; the server drops it

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("unexpected error in the gateway")
        return respond(
            APIError(
                500, f"internal error ({type(exc).__name__}); the gateway log has the details", code="internal_error"
            )
        )


def validation_to_api_error(errors) -> APIError:
    """The first pydantic error as a 400 naming the parameter (``messages.0.role``) and what is allowed."""
    first = list(errors)[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # drop pydantic's union member tags (e.g. "str", "list[int]") from the path
    loc = [p for p in loc if not re.fullmatch(r"(str|int|float|list\[.*\]|function-.*|tagged-union.*|[A-Z]\w*)", p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", code="invalid_value", param=param)
