"""The lean HTTP/1.1 client of the ``openai`` backend against a scripted asyncio server: framing (length,
chunked, to-close, 204), keep-alive reuse, a stale idle connection, connect failures, timeouts, a body cut off."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tuneloop.serve.backends.upstream_http import ConnectFailed, Pool, ProtocolFailure, ReadTimeout, fast_path_usable


async def serve(answers: list[bytes], *, close_after: bool = False, hold_s: float = 0.0):
    """A server answering each request on a connection with the next of ``answers`` (then closing if told)."""
    state = {"connections": 0, "requests": []}

    async def handle(reader, writer):
        state["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                state["requests"].append((head.split(b"\r\n")[0], body))
                if hold_s:
                    await asyncio.sleep(hold_s)
                writer.write(answers[min(len(state["requests"]), len(answers)) - 1])
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, state


JSON_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    + chunk(b'data: {"a":1}\n')
    + chunk(b"\ndata: [DONE]")
    + chunk(b"\n\n")
    + b"0\r\n\r\n"
)  # lines split across chunks


def run(coro):
    return asyncio.run(coro)


def test_keep_alive_reuses_one_connection_and_frames_bodies():
    async def go():
        server, port, state = await serve([JSON_OK, CHUNKED, JSON_OK])
        pool = Pool(f"http://127.0.0.1:{port}/v1", connect_timeout_s=2, read_timeout_s=5)
        r = await pool.request("POST", "/chat/completions", b'{"x": 1}')
        assert r.status_code == 200 and await r.json() == {"ok": True}
        r = await pool.request("POST", "/chat/completions", b"{}")
        lines = [line async for line in r.aiter_lines()]
        assert lines == ['data: {"a":1}', "", "data: [DONE]", ""]
        r = await pool.request("POST", "/completions", b"{}")
        assert await r.aread() == b'{"ok": true}'
        pool.close()
        server.close()
        return state

    state = run(go())
    assert state["connections"] == 1
    assert [h for h, _ in state["requests"]] == [
        b"POST /v1/chat/completions HTTP/1.1",
        b"POST /v1/chat/completions HTTP/1.1",
        b"POST /v1/completions HTTP/1.1",
    ]
    assert state["requests"][0][1] == b'{"x": 1}'


def test_stream_closed_after_done_still_releases_its_connection():
    async def go():
        server, port, state = await serve([CHUNKED, JSON_OK])
        pool = Pool(f"http://127.0.0.1:{port}/v1", connect_timeout_s=2, read_timeout_s=5)
        r = await pool.request("POST", "/chat/completions", b"{}")
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                break
        await r.aclose()  # drains the terminating chunk, so the connection can be reused
        r = await pool.request("POST", "/chat/completions", b"{}")
        assert await r.json() == {"ok": True}
        pool.close()
        server.close()
        return state["connections"]

    assert run(go()) == 1


def test_server_that_closes_idle_connections_is_retried_on_a_fresh_one():
    async def go():
        server, port, state = await serve([JSON_OK], close_after=True)
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=5)
        for _ in range(3):
            r = await pool.request("POST", "/x", b"{}")
            assert await r.json() == {"ok": True}
            await asyncio.sleep(0.05)
        pool.close()
        server.close()
        return state["connections"]

    assert run(go()) == 3


def test_read_to_close_body_http10_and_204():
    async def go():
        server, port, _ = await serve([b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it"], close_after=True)
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=5)
        assert await (await pool.request("GET", "/a")).aread() == b"all of it"
        server.close()
        server, port, state = await serve([b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"])
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=5)
        for _ in range(2):  # HTTP/1.0 without keep-alive: not reused
            assert await (await pool.request("GET", "/c")).aread() == b"ok"
        assert state["connections"] == 2
        server.close()
        server, port, _ = await serve([b"HTTP/1.1 204 No Content\r\n\r\n"])
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=1)
        r = await pool.request("POST", "/b", b"{}")
        assert r.status_code == 204 and await r.aread() == b""
        server.close()

    run(go())


def test_failures_connect_timeout_and_cut_body():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    async def go():
        with pytest.raises(ConnectFailed):
            await Pool(f"http://127.0.0.1:{dead}", connect_timeout_s=2, read_timeout_s=5).request("POST", "/x", b"{}")
        server, port, _ = await serve([JSON_OK], hold_s=2.0)
        with pytest.raises(ReadTimeout):
            await Pool(f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=0.2).request("POST", "/x", b"{}")
        server.close()
        cut = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"
        server, port, _ = await serve([cut], close_after=True)
        r = await Pool(f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=5).request("POST", "/x", b"{}")
        with pytest.raises(ProtocolFailure):
            await r.aread()
        server, port, _ = await serve([b"SMTP ready\r\n\r\n"])
        with pytest.raises(ProtocolFailure):
            await Pool(f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=5).request("GET", "/x")
        server.close()

    run(go())


def test_fast_path_steps_aside_for_an_environment_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert fast_path_usable("http://127.0.0.1:8001/v1")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    assert not fast_path_usable("http://vllm.internal:8001/v1")
    monkeypatch.setenv("NO_PROXY", "vllm.internal")
    assert fast_path_usable("http://vllm.internal:8001/v1")
    assert not fast_path_usable("unix:///tmp/sock")
