"""The gateway runs on httptools and uvloop (core dependencies) where they are installed, and says so."""

from __future__ import annotations

import sys

import httpx
import pytest


def test_http_stack_picks_the_c_parser_and_loop():
    from tuneloop.serve.server import http_stack

    expected_loop = "asyncio" if sys.platform == "win32" else "uvloop"
    assert http_stack() == {"http": "httptools", "loop": expected_loop}


def test_http_stack_falls_back_when_they_are_missing(monkeypatch):
    from tuneloop.serve.server import http_stack

    monkeypatch.setitem(sys.modules, "httptools", None)  # an entry of None makes the import fail
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert http_stack() == {"http": "h11", "loop": "asyncio"}


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not built for Windows")
def test_background_server_answers_through_httptools_on_uvloop():
    import asyncio

    from fastapi import FastAPI

    from tuneloop.serve.server import BackgroundServer

    app = FastAPI()

    @app.get("/loop")
    async def loop_kind() -> dict[str, str]:
        return {"loop": type(asyncio.get_running_loop()).__module__}

    server = BackgroundServer(app)
    with server:
        assert httpx.get(f"{server.url}/loop", timeout=10).json()["loop"].startswith("uvloop")
        assert server.server.config.http_protocol_class.__name__ == "HttpToolsProtocol"
