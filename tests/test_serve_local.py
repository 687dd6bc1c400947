"""The local backend: batched greedy decoding equals unbatched, several adapters on one base, cancellation on
disconnect, bounded queues (429), auth, and the server's checks before binding."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_helpers import install_monitor_standin, register_versions

install_monitor_standin()


@pytest.fixture(scope="module")
def registry(tiny_model, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws-local")
    return register_versions(ws, tiny_model, tmp_path_factory.mktemp("arts-local"), n_adapters=2, full=True), ws


def start(registry, **backend_kw):
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    reg, ws = registry
    settings_kw = backend_kw.pop("settings", {})
    backend = LocalBackend(reg, ws, **{"max_batch_size": 8, "max_queue": 64, "default_max_tokens": 16, **backend_kw})
    app = create_app(backend, Router(reg), GatewaySettings(**settings_kw))
    return BackgroundServer(app), backend


PROMPTS = [
    "hello",
    "my invoice shows a double charge for order 4821",
    "the app crashes",
    "where is my parcel",
    "I want a refund",
    "reset my password please",
    "thanks",
    "the delivery was late again and nobody answered",
]


def test_engine_batched_equals_unbatched_across_adapters(registry):
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.batching import generate_sync

    reg, ws = registry
    backend = LocalBackend(reg, ws, max_batch_size=8)
    v1, v2 = (backend.load(reg.get("tiny-bot", n)) for n in (1, 2))
    assert v1.engine is v2.engine and v1.adapter != v2.adapter  # one base, two adapters on it
    tok = v1.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    for lv in (v1, v2):
        batched = generate_sync(lv.engine, ids, max_tokens=8, stop_ids=lv.stop_ids, adapter=lv.adapter)
        single = [generate_sync(lv.engine, [p], max_tokens=8, stop_ids=lv.stop_ids, adapter=lv.adapter)[0] for p in ids]
        assert batched == single
    a1 = generate_sync(v1.engine, ids[:2], max_tokens=12, stop_ids=v1.stop_ids, adapter=v1.adapter)
    a2 = generate_sync(v2.engine, ids[:2], max_tokens=12, stop_ids=v2.stop_ids, adapter=v2.adapter)
    assert a1 != a2  # the adapters really differ
    asyncio.run(backend.close())


def test_concurrent_http_requests_are_batched_and_identical(registry):
    server, backend = start(registry)
    with server:

        def ask(p):
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={
                    "model": "tiny-bot:1",
                    "messages": [{"role": "user", "content": p}],
                    "max_tokens": 12,
                    "temperature": 0,
                },
                timeout=60,
            )
            return r.json()["choices"][0]["message"]["content"]

        serial = [ask(p) for p in PROMPTS]
        engine = backend.versions[next(iter(backend.versions))].engine
        rows_before, batches_before = engine.rows, engine.batches
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            concurrent = list(pool.map(ask, PROMPTS))
        assert concurrent == serial
        assert engine.batches - batches_before < engine.rows - rows_before  # some requests shared a batch


@pytest.mark.slow
def test_disconnect_cancels_generation_and_queue_bound_gives_429(registry, monkeypatch):
    from tuneloop.serve.batching import BatchEngine

    # Every decoding step takes at least 10 ms, so a 200-token generation outlasts the hang-up below: on a loaded
    # machine the tiny model could otherwise finish before the server sees the disconnect (seen once in CI), and
    # nothing would be left to cancel.
    step_rows = BatchEngine._step_rows

    def slow_step_rows(self, rows, logits):
        time.sleep(0.01)
        return step_rows(self, rows, logits)

    monkeypatch.setattr(BatchEngine, "_step_rows", slow_step_rows)
    server, backend = start(registry, max_batch_size=1, max_queue=2, default_max_tokens=200)
    with server:
        body = {
            "model": "tiny-bot:2",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
            next(r.iter_lines())
        lv = backend.versions[next(iter(backend.versions))]
        deadline = time.time() + 10
        while lv.engine.cancelled_rows == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert lv.engine.cancelled_rows >= 1
        # a non-streaming client that hangs up: its generation is cancelled too (not run to max_tokens)
        cancelled, rows = lv.engine.cancelled_rows, lv.engine.rows
        payload = httpx.Request("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": False})
        with socket.create_connection((server.host, server.port)) as raw:
            head = "".join(f"{k}: {v}\r\n" for k, v in payload.headers.items())
            raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode() + payload.read())
            deadline = time.time() + 10
            while lv.engine.rows == rows and time.time() < deadline:  # hang up once it is generating
                time.sleep(0.01)
        deadline = time.time() + 10
        while lv.engine.cancelled_rows == cancelled and time.time() < deadline:
            time.sleep(0.05)
        assert lv.engine.cancelled_rows == cancelled + 1
        # overload: one running, two waiting, the rest refused with 429 in OpenAI's shape
        slow = {**body, "stream": False, "max_tokens": 40}
        with ThreadPoolExecutor(8) as pool:
            rs = list(
                pool.map(lambda _: httpx.post(f"{server.url}/v1/chat/completions", json=slow, timeout=120), range(8))
            )
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and 200 in codes
        err = next(r for r in rs if r.status_code == 429)
        assert err.json()["error"]["code"] == "rate_limit_exceeded" and err.headers["retry-after"] == "1"
        t0 = time.perf_counter()
        ok = httpx.post(f"{server.url}/v1/chat/completions", json={**slow, "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and time.perf_counter() - t0 < 5


def test_api_keys_and_admin_token(registry, monkeypatch):
    server, _ = start(registry, settings={"api_keys": frozenset({"k1"}), "admin_token": "adm"})
    with server:
        msg = {"model": "tiny-bot:1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=msg, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and r.headers["x-request-id"]
        assert (
            httpx.post(
                f"{server.url}/v1/chat/completions", json=msg, headers={"authorization": "Bearer k1"}, timeout=30
            ).status_code
            == 200
        )
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert (
            httpx.get(f"{server.url}/admin/versions", headers={"authorization": "Bearer k1"}, timeout=10).status_code
            == 401
        )
        adm = httpx.get(f"{server.url}/admin/versions", headers={"authorization": "Bearer adm"}, timeout=10)
        assert adm.status_code == 200 and "/" not in str(adm.json()["loaded"]).replace("n/a", "")
        from openai import AuthenticationError, OpenAI

        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    server2, _ = start(registry)
    with server2:
        r = httpx.get(f"{server2.url}/admin/versions", timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_bind_checks_give_one_clear_line():
    from tuneloop.errors import InputError
    from tuneloop.serve.server import check_bind

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_bind("127.0.0.1", port, api_keys=frozenset(), insecure=False, api_keys_env="TUNELOOP_API_KEYS")
    with pytest.raises(InputError, match="not a valid TCP port"):
        check_bind("127.0.0.1", 70000, api_keys=frozenset(), insecure=False, api_keys_env="TUNELOOP_API_KEYS")
    with pytest.raises(InputError, match=r"refusing to listen on 0.0.0.0 without API keys: set \$TUNELOOP_API_KEYS"):
        check_bind("0.0.0.0", 8000, api_keys=frozenset(), insecure=False, api_keys_env="TUNELOOP_API_KEYS")
    assert InputError.exit_code == 2


def test_deploy_host_moved_to_serve():
    from tuneloop.config import build_config
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match="deploy.port moved to serve.port"):
        build_config({"name": "x", "base_model": "b", "data": {"train_data": "t.jsonl"}, "deploy": {"port": 9000}})
    cfg = build_config(
        {
            "name": "x",
            "base_model": "b",
            "data": {"train_data": "t.jsonl"},
            "serve": {"port": 9001, "backend": "openai", "upstream": "http://127.0.0.1:9/v1"},
        }
    )
    assert cfg.serve.port == 9001 and cfg.serve.api_keys_env == "TUNELOOP_API_KEYS" and cfg.serve.docs is False
