"""Shutdown past ``serve.shutdown_grace_s``: what is still queued or running gets an OpenAI-shaped 503
``shutting_down`` (``Retry-After``, ``x-request-id``), a stream the server ends gets that error as its last event
and then ``[DONE]``, the request log holds every answered request with its real status (503, never 499), and the
server's log has no traceback.

The first test runs a real gateway process (the tiny model, batches of 2, grace 1 s) under ~80 concurrent
requests and SIGTERMs it; the second runs an in-process gateway over a backend that never answers (as an
upstream server that hangs), where uvicorn's cancel after the grace is what ends the calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import free_port, install_monitor_standin, register_versions, sse_events

install_monitor_standin()

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"

GATEWAY = """
import sys
sys.path.insert(0, {tests!r})
from serve_helpers import install_monitor_standin
install_monitor_standin()
from tuneloop.config import build_config
from tuneloop.serve.server import serve
cfg = build_config({{"name": "tiny-bot", "base_model": {base!r}, "workspace": {ws!r}, "data": {{"train_data": "t.jsonl"}},
                    "serve": {{"max_batch_size": 2, "shutdown_grace_s": 1.0, "probes": False, "torch_threads": 1}}}})
sys.exit(serve(cfg, port={port}))
"""


def start_gateway(ws: Path, base: Path, port: int):
    code = GATEWAY.format(tests=str(TESTS), base=str(base), ws=str(ws), port=port)
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TUNELOOP_API_KEYS", None)
    log = tempfile.NamedTemporaryFile("w+", prefix="gateway-shutdown-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start within 120 s")


def request_body(i: int) -> tuple[str, dict]:
    """Mostly chat (every other one streamed), every fourth a completion (every eighth streamed)."""
    if i % 4 == 3:
        return "/v1/completions", {
            "model": "tiny-bot",
            "prompt": f"ticket {i}: my parcel",
            "max_tokens": 200,
            "temperature": 0,
            "stream": i % 8 == 7,
        }
    return "/v1/chat/completions", {
        "model": "tiny-bot",
        "messages": [{"role": "user", "content": f"where is order {i}?"}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": i % 2 == 0,
    }


async def fire(url: str, n: int) -> list[dict]:
    """``n`` concurrent requests; each answer as {status, headers, stream, json | events} or {transport_error}."""
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> dict:
            path, body = request_body(i)
            try:
                async with client.stream("POST", path, json=body) as r:
                    raw = (await r.aread()).decode()
                    out = {
                        "i": i,
                        "status": r.status_code,
                        "headers": dict(r.headers),
                        "stream": body["stream"],
                        "content_type": r.headers.get("content-type", ""),
                    }
                    if out["content_type"].startswith("text/event-stream"):
                        out["events"] = sse_events(raw)
                    else:
                        out["raw"] = raw
                    return out
            except httpx.HTTPError as exc:
                return {"i": i, "transport_error": repr(exc)}

        return await asyncio.gather(*(one(i) for i in range(n)))


def queued(url: str) -> int:
    try:
        return sum(v.get("queue_depth", 0) for v in httpx.get(f"{url}/health", timeout=2).json().get("loaded", []))
    except (httpx.HTTPError, ValueError):
        return 0


@pytest.fixture(scope="module")
def workspace(tiny_model, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws-shutdown")
    register_versions(ws, tiny_model, tmp_path_factory.mktemp("arts-shutdown"), n_adapters=1, full=False)
    return ws


@pytest.mark.slow
def test_sigterm_past_the_grace_answers_503_and_logs_every_request(workspace, tiny_model):
    from tuneloop.monitor.requestlog import default_log_url, open_request_log

    n = 80
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_gateway(workspace, tiny_model, port)
    answers: list[dict] = []
    try:
        t = threading.Thread(target=lambda: answers.extend(asyncio.run(fire(url, n))))
        t.start()
        deadline = time.time() + 20
        while queued(url) < n // 2 and time.time() < deadline:  # most requests are waiting in the queue
            time.sleep(0.05)
        assert queued(url) >= n // 2, "the requests did not queue up; the test would not exercise the grace's end"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
        t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    server_log = Path(proc.log_path).read_text()
    assert rc == 0, server_log[-3000:]
    assert took < 1.0 + 2.0 + 10, f"shutdown took {took:.1f} s"  # grace + END_OF_GRACE_S + unloading
    assert "Traceback" not in server_log, server_log[-5000:]
    assert "shutdown grace period over" in server_log

    assert len(answers) == n
    assert not [a for a in answers if "transport_error" in a], [a for a in answers if "transport_error" in a][:3]
    refused, cut_streams, finished = [], [], []
    for a in answers:
        rid = a["headers"].get("x-request-id", "")
        assert rid.startswith("req-"), a
        if a["status"] != 200:
            assert a["status"] == 503, a
            assert a["content_type"].startswith("application/json"), a
            err = json.loads(a["raw"])["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert err["code"] == "shutting_down" and err["type"] == "service_unavailable"
            assert "shutting down" in err["message"] and "retry" in err["message"]
            assert int(a["headers"]["retry-after"]) > 0
            refused.append(rid)
        elif a["stream"]:
            events = a["events"]
            assert events and events[-1] == "[DONE]", a  # never cut without [DONE]
            last = events[-2] if len(events) >= 2 else None
            if isinstance(last, dict) and "error" in last:
                assert set(last["error"]) == {"message", "type", "param", "code"}
                assert last["error"]["code"] == "shutting_down", last
                cut_streams.append(rid)
            else:
                finished.append(rid)
        else:
            body = json.loads(a["raw"])
            assert body["choices"], body
            finished.append(rid)
    assert refused, "no request was still queued when the grace ran out"
    assert cut_streams, "no stream was ended by the server"

    log = open_request_log(default_log_url(workspace))
    try:
        for rid in refused + cut_streams:
            rec = log.get(rid)
            assert rec is not None, f"{rid} (answered 503) is not in the request log"
            assert rec.status == 503 and "server shutting down" in (rec.error or ""), rec
        for rid in finished:
            rec = log.get(rid)
            assert rec is not None and rec.status == 200, (rid, rec)
        assert not [r for r in log.requests() if r.status == 499]  # the server ended them, no client left
    finally:
        log.close()


class HangingBackend:
    """A backend whose calls never finish (as an upstream server that hangs): a plain call waits for ever, a
    stream sends one chunk and then waits. It has no ``abort``, so only uvicorn's cancel ends the calls."""

    kind = "hanging"

    def __init__(self):
        self.started = 0

    async def prepare(self, version):
        return {"status": "passed"}

    async def chat(self, route, req, ctx):
        self.started += 1
        if not req.stream:
            await asyncio.Event().wait()

        async def chunks():
            yield {
                "object": "chat.completion.chunk",
                "model": route.version_ref,
                "choices": [{"index": 0, "delta": {"content": "partial "}, "finish_reason": None}],
            }
            await asyncio.Event().wait()
            yield {}

        return chunks()

    async def completion(self, route, req, ctx):
        raise NotImplementedError

    def loaded(self):
        return []

    async def close(self):
        pass


def test_calls_still_open_after_the_grace_are_cancelled_into_503(tmp_path, capfd):
    from rollout_gateway_helpers import make_app, make_registry, wait_for
    from tuneloop.serve.server import BackgroundServer

    reg = make_registry(tmp_path, n_versions=1)
    backend = HangingBackend()
    app, log, _recorder = make_app(reg, tmp_path / "requests.db", backend)
    results: dict[str, httpx.Response] = {}
    server = BackgroundServer(app, grace_s=0.5)
    with server:

        def call(name: str, stream: bool) -> None:
            body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            results[name] = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)

        threads = [threading.Thread(target=call, args=(name, name == "stream")) for name in ("plain", "stream")]
        for th in threads:
            th.start()
        wait_for(lambda: backend.started == 2)
        t0 = time.monotonic()
    took = time.monotonic() - t0  # __exit__: the grace, END_OF_GRACE_S, then the cancel
    for th in threads:
        th.join(10)
    assert took < 0.5 + 2.0 + 5
    assert "Traceback" not in capfd.readouterr().err  # uvicorn logs an application's exception with its traceback

    plain, stream = results["plain"], results["stream"]
    assert plain.status_code == 503 and plain.headers["retry-after"] and plain.headers["x-request-id"]
    assert plain.json()["error"]["code"] == "shutting_down"
    events = sse_events(stream.text)
    assert events[0]["choices"][0]["delta"]["content"] == "partial "
    assert events[-2]["error"]["code"] == "shutting_down" and events[-1] == "[DONE]"
    for r in (plain, stream):
        rec = log.get(r.headers["x-request-id"])
        assert rec is not None and rec.status == 503 and "server shutting down" in rec.error, rec
    log.close()


def test_feedback_still_open_after_the_grace_gets_the_503_too(tmp_path, capfd):
    """A non-model route (here /v1/feedback on a store that hangs) still open when uvicorn cancels after the grace
    answers the same OpenAI-shaped 503, not uvicorn's bare 500 with a traceback."""
    from rollout_gateway_helpers import make_app, make_registry
    from tuneloop.serve.server import BackgroundServer

    reg = make_registry(tmp_path, n_versions=1)
    app, log, _recorder = make_app(reg, tmp_path / "requests.db", HangingBackend())
    entered, release = threading.Event(), threading.Event()

    def hanging_store(row):
        entered.set()
        release.wait(30)
        raise RuntimeError("released after the test")

    log.store_feedback_row = hanging_store
    result: dict[str, httpx.Response] = {}
    server = BackgroundServer(app, grace_s=0.3)
    with server:
        th = threading.Thread(
            target=lambda: result.setdefault(
                "r", httpx.post(f"{server.url}/v1/feedback", json={"request_id": "req-x", "rating": 1}, timeout=30)
            )
        )
        th.start()
        assert entered.wait(10)
        # the store is let go only once the client has its answer (so the 503 came while it still hung): the
        # server's exit waits for that worker thread, which otherwise sat out the whole 30 s (CI time)
        threading.Thread(target=lambda: (th.join(30), release.set()), daemon=True).start()
    th.join(10)
    release.set()
    r = result["r"]
    assert r.status_code == 503 and r.headers["x-request-id"] and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "shutting_down"
    assert "Traceback" not in capfd.readouterr().err
    log.close()
