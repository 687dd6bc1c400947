"""The gateway's OpenAI API on the local backend: the official client, streaming, stop, logprobs, n, errors,
headers, feedback and metrics. Real models (tiny, made locally), real HTTP on loopback."""

from __future__ import annotations

import json

import httpx
import pytest

from serve_helpers import install_monitor_standin, register_versions, sse_events

install_monitor_standin()


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    from tuneloop.monitor.metrics import GatewayMetrics
    from tuneloop.monitor.requestlog import AsyncRecorder, open_request_log
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    ws = tmp_path_factory.mktemp("ws")
    reg = register_versions(ws, tiny_model, tmp_path_factory.mktemp("arts"))
    reg.set_alias("tiny-bot", "champion", 1)
    log = open_request_log(str(ws / "requests.db"))
    recorder = AsyncRecorder(log, flush_interval_s=0.05)
    metrics = GatewayMetrics()
    backend = LocalBackend(reg, ws, max_batch_size=8, max_queue=64, default_max_tokens=16)
    app = create_app(
        backend,
        Router(reg),
        GatewaySettings(max_body_bytes=200_000, preload=["tiny-bot"]),
        recorder=recorder,
        metrics=metrics,
        request_log=log,
    )
    with BackgroundServer(app) as server:
        yield server, log, recorder, backend


def client(server, **kw):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, **kw)


def test_openai_client_chat_and_identity_headers(gateway):
    server, *_ = gateway
    raw = client(server).chat.completions.with_raw_response.create(
        model="tiny-bot",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        ],
        max_tokens=5,
        temperature=0,
    )
    resp = raw.parse()
    assert resp.model == "tiny-bot:1"
    assert resp.usage.completion_tokens <= 5 and resp.usage.prompt_tokens > 0
    assert raw.headers["x-tuneloop-version"] == "tiny-bot:1"
    assert raw.headers["x-tuneloop-arm"] == "direct"
    assert len(raw.headers["x-tuneloop-artifact"]) == 64
    assert raw.headers["x-request-id"]


def test_refs_pick_versions(gateway):
    server, *_ = gateway
    c = client(server)
    for ref, want in [("tiny-bot:2", "tiny-bot:2"), ("tiny-bot@champion", "tiny-bot:1"), ("tiny-bot:3", "tiny-bot:3")]:
        r = c.chat.completions.create(
            model=ref, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert r.model == want
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny-bot:1", "tiny-bot:2", "tiny-bot:3"]
    assert c.models.retrieve("tiny-bot@champion").version == "tiny-bot:1"


def test_streaming_matches_non_streaming_and_usage_chunk(gateway):
    server, *_ = gateway
    c = client(server)
    msgs = [{"role": "user", "content": "my invoice is wrong"}]
    full = c.chat.completions.create(model="tiny-bot:2", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="tiny-bot:2",
            messages=msgs,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "tiny-bot:2", "messages": msgs, "max_tokens": 4, "stream": True},
        timeout=30,
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


def test_stop_strings_and_n_and_logprobs(gateway):
    server, *_ = gateway
    c = client(server)
    msgs = [{"role": "user", "content": "hello there"}]
    base = (
        c.chat.completions.create(model="tiny-bot:1", messages=msgs, max_tokens=16, temperature=0)
        .choices[0]
        .message.content
    )
    assert len(base) > 3
    stop = base[2:4]
    cut = c.chat.completions.create(model="tiny-bot:1", messages=msgs, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == base[: base.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = c.chat.completions.create(
        model="tiny-bot:1", messages=msgs, max_tokens=6, temperature=1.0, seed=7, n=3, logprobs=True, top_logprobs=2
    )
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    again = c.chat.completions.create(model="tiny-bot:1", messages=msgs, max_tokens=6, temperature=1.0, seed=7, n=3)
    assert [ch.message.content for ch in many.choices] == [ch.message.content for ch in again.choices]
    lp = many.choices[0].logprobs.content
    assert lp and all(x.logprob <= 0 and len(x.top_logprobs) == 2 for x in lp)
    short = c.chat.completions.create(
        model="tiny-bot:1", messages=msgs, max_completion_tokens=2, max_tokens=16, temperature=0
    )
    assert short.usage.completion_tokens <= 2 and base.startswith(
        short.choices[0].message.content
    )  # it wins over max_tokens


def test_completions_echo_logprobs_score_prompt(gateway):
    server, *_ = gateway
    c = client(server)
    r = c.completions.create(
        model="tiny-bot:1", prompt=["the order was late", "hello"], max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    assert len(r.choices) == 2
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert r.choices[0].text.startswith("the order was late")
    # token-id prompts (lm-eval local-completions sends these) give the same scores as the text
    from tuneloop.modeling import load_tokenizer

    _, _, _, backend = gateway
    tok = load_tokenizer(str(backend.registry.open_artifact("tiny-bot", 1)))
    ids = tok("the order was late", add_special_tokens=False)["input_ids"]
    by_ids = c.completions.create(model="tiny-bot:1", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert by_ids.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[: len(ids)], abs=1e-5)
    assert by_ids.usage.completion_tokens == 0 and by_ids.usage.prompt_tokens == len(ids)
    greedy = c.completions.create(model="tiny-bot:1", prompt="the order", max_tokens=4, temperature=0)
    assert greedy.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    "body,code,param",
    [
        (
            {"model": "tiny-bot", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")},
            "invalid_json",
            None,
        ),
        (
            {"model": "tiny-bot", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "invalid_value",
            "temperature",
        ),
        ({"model": "tiny-bot", "messages": [{"role": "user", "content": "x"}], "seed": 2**80}, "invalid_value", "seed"),
        (
            {"model": "tiny-bot", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]},
            "invalid_value",
            "stop",
        ),
        ({"model": "tiny-bot", "messages": []}, "invalid_value", "messages"),
        ({"model": "tiny-bot", "messages": [{"role": "robot", "content": "x"}]}, "invalid_value", "messages.0.role"),
        (
            {
                "model": "tiny-bot",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "unsupported_parameter",
            "tools",
        ),
        (
            {"model": "tiny-bot", "messages": [{"role": "user", "content": "x" * 5000}]},
            "context_length_exceeded",
            "messages",
        ),
        (
            {"model": "tiny-bot", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000},
            "context_length_exceeded",
            "max_tokens",
        ),
    ],
)
def test_bad_requests_get_openai_400(gateway, body, code, param):
    server, *_ = gateway
    raw = json.dumps(body, allow_nan=True)
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_lone_surrogate_huge_body_unknown_model_and_no_paths(gateway, tmp_path):
    server, *_ = gateway
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model":"tiny-bot","messages":[{"role":"user","content":"\\ud800"}]}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode"
    big = {"model": "tiny-bot", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as exc:
        client(server).chat.completions.create(model="nope:1", messages=[{"role": "user", "content": "x"}])
    assert "nope" in str(exc.value)
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "tiny-bot:99", "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert r.status_code == 404 and "/" not in r.json()["error"]["message"].replace("GET /v1/models/tiny-bot", "")
    assert httpx.get(f"{server.url}/v1/nothing", timeout=10).json()["error"]["code"] == "unknown_url"
    assert httpx.get(f"{server.url}/docs", timeout=10).status_code == 404


def test_request_log_feedback_and_metrics(gateway):
    server, log, recorder, _ = gateway
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"x-tuneloop-user": "alice"},
        json={"model": "tiny-bot:2", "messages": [{"role": "user", "content": "refund please"}], "max_tokens": 3},
        timeout=30,
    )
    rid = r.headers["x-request-id"]
    fb = {"request_id": rid, "rating": -1, "correction": "billing"}
    first = httpx.post(f"{server.url}/v1/feedback", json=fb, timeout=10)
    assert first.status_code == 201, first.text
    again = httpx.post(f"{server.url}/v1/feedback", json=fb, timeout=10)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    rec = log.get(rid)
    assert rec.version == 2 and rec.arm == "direct" and rec.status == 200 and rec.user_hash and rec.user_hash != "alice"
    assert json.loads(rec.prompt)[0]["content"] == "refund please" and rec.completion_tokens > 0
    assert (
        httpx.post(f"{server.url}/v1/feedback", json={"request_id": "req-unknown", "rating": 1}, timeout=10).status_code
        == 404
    )
    assert httpx.post(f"{server.url}/v1/feedback", json={"request_id": rid, "rating": 5}, timeout=10).status_code == 400
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "tuneloop_requests_total" in text


def test_scrub_paths_hides_filesystem_paths_but_keeps_the_api_paths():
    from tuneloop.serve.errors import scrub_paths

    assert scrub_paths("cannot read /home/ann/ws/registry/artifacts/x.safetensors") == "cannot read <path>"
    assert (
        scrub_paths("see GET /v1/models/support-bot and POST /admin/rollouts")
        == "see GET /v1/models/support-bot and POST /admin/rollouts"
    )
    assert scrub_paths("no such file /srv/v1/model.bin") == "no such file <path>"


def test_model_calls_and_admin_auth_under_a_root_path(gateway):
    """Behind ``uvicorn --root-path /gw`` (or a mount) ``scope["path"]`` carries the prefix: the model calls are
    still served by the hot path, and /gw/admin still needs the admin token."""
    import asyncio

    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router

    *_, served = gateway
    backend = LocalBackend(served.registry, served.workspace_root, default_max_tokens=4)
    app = create_app(backend, Router(served.registry), GatewaySettings(admin_token="adm"))

    async def run():
        transport = httpx.ASGITransport(app=app, root_path="/gw")
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=60) as c:
            r = await c.post(
                "/gw/v1/chat/completions",
                json={"model": "tiny-bot:1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert r.status_code == 200 and r.headers["x-tuneloop-version"] == "tiny-bot:1", r.text
            assert (await c.get("/gw/admin/versions")).status_code == 401
            assert (await c.get("/gw/v1/chat/completions")).status_code == 405
        await backend.close()

    asyncio.run(run())
