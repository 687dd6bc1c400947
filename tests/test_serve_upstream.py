"""The ``openai`` backend against a second tuneloop gateway process as the upstream: forwarding, streaming,
identity headers, an upstream killed mid-stream (clean error event), 503 while it is down, recovery after."""

from __future__ import annotations

import signal

import httpx
import pytest

from serve_helpers import free_port, install_monitor_standin, register_versions, sse_events, start_gateway_process

install_monitor_standin()


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.upstream import UpstreamBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    ws = tmp_path_factory.mktemp("ws-up")
    reg = register_versions(ws, tiny_model, tmp_path_factory.mktemp("arts-up"), n_adapters=2, full=False)
    port = free_port()
    state = {"proc": start_gateway_process(ws, port), "ws": ws, "port": port}
    backend = UpstreamBackend(f"http://127.0.0.1:{port}/v1", reg, timeout_s=60, retries=2, backoff_s=0.1)
    with BackgroundServer(create_app(backend, Router(reg), GatewaySettings())) as gw:
        state["gw"] = gw
        yield state
    if state["proc"].poll() is None:
        state["proc"].kill()
        state["proc"].wait(10)


def test_forwarding_matches_the_upstream(setup):
    from openai import OpenAI

    gw, up = setup["gw"].url, f"http://127.0.0.1:{setup['port']}"
    msgs = [{"role": "user", "content": "my parcel is late"}]
    via = OpenAI(base_url=f"{gw}/v1", api_key="x", max_retries=0).chat.completions.with_raw_response.create(
        model="tiny-bot:1", messages=msgs, max_tokens=8, temperature=0
    )
    direct = OpenAI(base_url=f"{up}/v1", api_key="x", max_retries=0).chat.completions.create(
        model="tiny-bot:1", messages=msgs, max_tokens=8, temperature=0
    )
    body = via.parse()
    assert body.choices[0].message.content == direct.choices[0].message.content
    assert (
        body.model == "tiny-bot:1"
        and via.headers["x-tuneloop-version"] == "tiny-bot:1"
        and via.headers["x-tuneloop-arm"] == "direct"
    )
    chunks = list(
        OpenAI(base_url=f"{gw}/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny-bot:2",
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and all(c.model == "tiny-bot:2" for c in chunks)
    r = httpx.post(
        f"{gw}/v1/completions",
        json={"model": "tiny-bot:1", "prompt": "hello there", "max_tokens": 1, "echo": True, "logprobs": 1},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
    bad = httpx.post(
        f"{gw}/v1/chat/completions", json={"model": "tiny-bot:1", "messages": msgs, "max_tokens": 100000}, timeout=60
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_upstream_killed_mid_stream_then_down_then_back(setup):
    gw, port = setup["gw"].url, setup["port"]
    body = {
        "model": "tiny-bot:1",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    lines = []
    with httpx.stream("POST", f"{gw}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                setup["proc"].send_signal(signal.SIGKILL)
    events = sse_events("\n".join(lines))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "upstream_error"
    setup["proc"].wait(10)
    down = httpx.post(f"{gw}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30)
    assert down.status_code == 503 and down.json()["error"]["code"] == "upstream_unavailable"
    assert "127.0.0.1" in down.json()["error"]["message"] and down.elapsed.total_seconds() < 5
    setup["proc"] = start_gateway_process(setup["ws"], port)
    back = httpx.post(f"{gw}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
    assert back.status_code == 200 and back.headers["x-tuneloop-version"] == "tiny-bot:1"
