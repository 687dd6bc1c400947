"""Reliability of a gateway process: hostile requests get their 4xx in OpenAI's shape within a second and the
next normal request is served at normal speed; a soak of mixed streaming/non-streaming requests at 50
concurrent clients has no gateway failures and bounded RSS growth (``TUNELOOP_SOAK_REQUESTS``, default 5000)."""

from __future__ import annotations

import asyncio
import os
import random
import time

import httpx
import pytest

from serve_helpers import free_port, install_monitor_standin, register_versions, start_gateway_process

install_monitor_standin()

CHAT = {
    "model": "tiny-bot",
    "messages": [{"role": "user", "content": "where is my parcel"}],
    "max_tokens": 4,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws-rel")
    register_versions(ws, tiny_model, tmp_path_factory.mktemp("arts-rel"), n_adapters=2, full=False)
    port = free_port()
    proc = start_gateway_process(ws, port)
    yield proc, f"http://127.0.0.1:{port}"
    print(open(proc.log_path).read()[-3000:])
    proc.terminate()
    proc.wait(30)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def normal_latency(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200
    return time.perf_counter() - t0


@pytest.mark.slow
def test_hostile_requests_get_fast_4xx_and_do_not_slow_the_next(gateway):
    proc, url = gateway
    baseline = min(normal_latency(url) for _ in range(3))
    hostile = [
        ("5 MB prompt", dict(json={**CHAT, "messages": [{"role": "user", "content": "x" * 5_000_000}]}), 413),
        (
            "NaN",
            dict(content=b'{"model":"tiny-bot","messages":[{"role":"user","content":"x"}],"temperature":NaN}'),
            400,
        ),
        ("lone surrogate", dict(content=b'{"model":"tiny-bot","messages":[{"role":"user","content":"\\udc00"}]}'), 400),
        ("huge seed", dict(json={**CHAT, "seed": 10**30}), 400),
        (
            "infinite top_p",
            dict(content=b'{"model":"tiny-bot","messages":[{"role":"user","content":"x"}],"top_p":1e999}'),
            400,
        ),
    ]
    for name, kw, status in hostile:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", headers={"content-type": "application/json"}, timeout=30, **kw)
        took = time.perf_counter() - t0
        assert r.status_code == status, (name, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, name
        assert took < 1.0, (name, took)
        assert normal_latency(url) < max(1.0, 5 * baseline), name
    # a client that disconnects mid-generation: its work stops, the next request is not held up
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True}, timeout=30
    ) as r:
        next(r.iter_lines())
    assert normal_latency(url) < max(1.0, 5 * baseline)


@pytest.mark.slow
def test_soak_mixed_requests(gateway):
    proc, url = gateway
    total = int(os.environ.get("TUNELOOP_SOAK_REQUESTS", "5000"))
    rng = random.Random(0)
    plan = [(rng.random() < 0.5, rng.choice(["tiny-bot:1", "tiny-bot:2"]), rng.randint(1, 6)) for _ in range(total)]

    async def run(items):
        failures, ok = [], 0
        t_start = time.monotonic()
        sem = asyncio.Semaphore(50)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=50)) as client:

            async def one(stream, model, max_tokens):
                nonlocal ok
                body = {**CHAT, "model": model, "max_tokens": max_tokens, "stream": stream}
                async with sem:
                    try:
                        r = await client.post(f"{url}/v1/chat/completions", json=body)
                    except httpx.TransportError as exc:
                        failures.append((type(exc).__name__, round(time.monotonic() - t_start, 2)))
                        return
                if (
                    r.status_code != 200
                    or (stream and not r.text.rstrip().endswith("data: [DONE]"))
                    or (stream and '"error"' in r.text)
                ):
                    failures.append((r.status_code, r.text[:200]))
                else:
                    ok += 1

            await asyncio.gather(*(one(*p) for p in items))
        return failures, ok

    asyncio.run(run(plan[:200]))  # warm-up: allocator and caches settle
    before = rss_mb(proc.pid)
    failures, ok = asyncio.run(run(plan))
    growth = rss_mb(proc.pid) - before
    assert failures == [] and ok == total, (len(failures), failures[:10])
    assert growth < 100, f"RSS grew {growth:.1f} MB over {total} requests"
