"""A PostgreSQL outage under traffic loses nothing (issue 21): a real gateway process with its request log on a
real PostgreSQL server (started on loopback by the test), the server stopped while requests and feedback flow,
then started again. Every answered request and every accepted feedback is in the store afterwards; so too when
the gateway is killed (SIGKILL) during the outage and restarted after it. ``/health`` says ``degraded`` while
records wait in the spool, ``/v1/feedback`` answers 202 then, ``/metrics`` counts spooled and replayed records."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from pg_server import create_database, own_postgres_server, start_cluster, stop_cluster  # noqa: F401
from serve_helpers import free_port, register_versions, start_gateway_process

CHAT = {
    "model": "tiny-bot",
    "messages": [{"role": "user", "content": "where is my parcel"}],
    "max_tokens": 3,
    "temperature": 0,
}


class Traffic:
    """``clients`` threads sending chat requests (every fourth streamed) until stopped; keeps the answered ids."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.answered, self.errors = url, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = {**CHAT, "stream": n % 4 == 0, "user": f"u{i}-{n % 7}"}
                try:
                    if body["stream"]:
                        with client.stream("POST", "/v1/chat/completions", json=body) as r:
                            text = "".join(r.iter_text())
                            ok = r.status_code == 200 and "[DONE]" in text
                    else:
                        r = client.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                (self.answered if ok else self.errors).append(r.headers.get("x-request-id") if ok else r.status_code)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)


def wait_health(url: str, status: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/health", timeout=5).json()
            if last["status"] == status:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health did not become {status!r} in {timeout} s; last: {last}")


def send_feedback(url: str, ids: list[str], rating: int) -> list[int]:
    return [
        httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "rating": rating}, timeout=30).status_code
        for rid in ids
    ]


def stored(pg_url: str):
    from tuneloop.monitor.requestlog import open_request_log

    log = open_request_log(pg_url)
    try:
        return {r.request_id: r for r in log.requests()}, {(f.request_id, f.source): f for f in log.feedback()}
    finally:
        log.close()


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def outage_gateway(own_postgres_server, make_config, tiny_model, tmp_path):
    from tuneloop.config import load_config
    from tuneloop.workspace import Workspace

    pg_url = create_database(own_postgres_server)
    config = make_config(serve__request_log=pg_url, serve__retention_days=None)
    ws = Workspace.for_config(load_config(config)).root
    register_versions(ws, tiny_model, tmp_path / "arts", n_adapters=1, full=False)
    port = free_port()
    state = {"proc": start_gateway_process(config, port)}
    yield state, config, port, pg_url, ws
    proc = state["proc"]
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)
    print(Path(proc.log_path).read_text()[-3000:])


@pytest.mark.slow
def test_database_outage_loses_no_request_and_no_feedback(outage_gateway, own_postgres_server):
    state, _config, port, pg_url, _ws = outage_gateway
    url = f"http://127.0.0.1:{port}"
    with Traffic(url) as traffic:
        time.sleep(1.5)
        before = list(traffic.answered)
        stop_cluster(own_postgres_server)
        time.sleep(1.0)
        degraded = wait_health(url, "degraded", timeout=20)
        during = list(traffic.answered[len(before) :])
        fb_during = send_feedback(url, during[:10], rating=-1)
        time.sleep(2.0)
        answered_in_outage = len(traffic.answered) - len(before)
        start_cluster(own_postgres_server)
        time.sleep(1.5)
    assert traffic.errors == [] and answered_in_outage > 20
    assert any("unavailable" in r for r in degraded["reasons"]) and degraded["request_log"]["spooled"] > 0
    assert set(fb_during) == {202}  # accepted into the spool, not a 500
    wait_health(url, "ok", timeout=60)
    requests, feedback = stored(pg_url)
    missing = [rid for rid in traffic.answered if rid not in requests]
    assert missing == [], f"{len(missing)} of {len(traffic.answered)} answered requests are not in the store"
    assert {rid for rid, _ in feedback} == set(during[:10]) and all(f.rating == -1 for f in feedback.values())
    assert metric(url, 'tuneloop_request_log_records_total{kind="request",outcome="spooled"}') >= answered_in_outage
    assert metric(url, 'tuneloop_request_log_records_total{kind="request",outcome="replayed"}') == metric(
        url, 'tuneloop_request_log_records_total{kind="request",outcome="spooled"}'
    )
    assert metric(url, 'tuneloop_request_log_records_total{kind="request",outcome="dropped"}') == 0
    fb_after = send_feedback(url, during[10:12], rating=1)
    assert set(fb_after) == {201}


@pytest.mark.slow
def test_gateway_killed_during_the_outage_loses_nothing_after_restart(outage_gateway, own_postgres_server):
    state, config, port, pg_url, ws = outage_gateway
    url = f"http://127.0.0.1:{port}"
    with Traffic(url) as traffic:
        time.sleep(1.0)
        stop_cluster(own_postgres_server)
        time.sleep(2.0)
    wait_health(url, "degraded", timeout=20)
    during_feedback = traffic.answered[-5:]
    assert set(send_feedback(url, during_feedback, rating=-1)) == {202}
    time.sleep(0.5)  # past the queue's flush interval: everything answered is spooled (fsync'd) by now
    os.kill(state["proc"].pid, signal.SIGKILL)
    state["proc"].wait(30)
    spooled = sum(1 for p in (ws / "spool" / "request-log" / "0").glob("*.jsonl") for _ in open(p))
    assert spooled > 0
    start_cluster(own_postgres_server)
    state["proc"] = start_gateway_process(config, port)  # finds the spool and replays it
    wait_health(url, "ok", timeout=60)
    requests, feedback = stored(pg_url)
    missing = [rid for rid in traffic.answered if rid not in requests]
    assert traffic.errors == [] and missing == [], f"{len(missing)} of {len(traffic.answered)} answered requests lost"
    assert {rid for rid, _ in feedback} == set(during_feedback)
