"""The gateway runs rollouts: the sticky split and its headers and log records, canary failover to the
baseline, the controller loop (automatic rollback, promotion, two replicas over one registry and one log),
candidate preparation, the TTL of the rollout cache, and the admin API. Real app, real SQLite registry and
request log, real HTTP on loopback; the backend is scripted so that a test takes seconds."""

from __future__ import annotations

import collections

import httpx
import pytest

from rollout_gateway_helpers import ADMIN, MODEL, ListNotifier, ScriptedBackend, chat, make_app, make_registry, wait_for
from tuneloop.rollout import controller
from tuneloop.serve.server import BackgroundServer

HALF = {
    "weights": [0.5, 1.0],
    "min_requests_per_step": 10**6,
    "max_active_s": None,
    "metrics": [{"name": "errors", "max_ratio": 3.0}],
    "guards": [{"metric": "errors", "max_rate": 0.5, "min_requests": 5}],
}
FAST = {
    "weights": [0.05, 0.5, 1.0],
    "min_requests_per_step": 10,
    "max_active_s": None,
    "metrics": [{"name": "errors", "max_ratio": 3.0}],
    "guards": [{"metric": "errors", "max_rate": 0.5, "min_requests": 5}],
}


def canary_live(client, url):
    """Wait until the candidate is prepared and takes traffic (the first canary answer)."""
    return wait_for(
        lambda: any(chat(client, url, f"probe-{i}").headers["x-tuneloop-arm"] == "canary" for i in range(20))
    )


def records(log, recorder):
    recorder.flush(timeout=5)
    return log.requests(model=MODEL)


def test_split_is_sticky_logged_with_the_rollout_and_explicit_refs_are_direct(tmp_path):
    reg = make_registry(tmp_path)
    backend = ScriptedBackend()
    app, log, recorder = make_app(reg, tmp_path / "requests.db", backend)
    rid = controller.start(reg, f"{MODEL}:2", policy=HALF).rollout_id
    with BackgroundServer(app) as server, httpx.Client() as c:
        canary_live(c, server.url)
        assert backend.prepared == [f"{MODEL}:2"]  # loaded (and probed) before its first canary request
        arms = {}
        for i in range(60):
            user = f"user-{i}"
            r = chat(c, server.url, user, model=MODEL if i % 2 else f"{MODEL}@champion")
            assert r.status_code == 200
            arm, version = r.headers["x-tuneloop-arm"], r.headers["x-tuneloop-version"]
            assert version == {"canary": f"{MODEL}:2", "baseline": f"{MODEL}:1"}[arm]
            assert r.json()["choices"][0]["message"]["content"] == f"answer from {version}"
            arms[user] = arm
        assert 10 < sum(a == "canary" for a in arms.values()) < 50
        for user, arm in list(arms.items())[:15]:  # sticky: the same user gets the same arm
            assert chat(c, server.url, user).headers["x-tuneloop-arm"] == arm
        r = c.post(
            f"{server.url}/v1/chat/completions",
            headers={"x-tuneloop-user": "user-3"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.headers["x-tuneloop-arm"] == arms["user-3"]
        for ref, version in [
            (f"{MODEL}:2", f"{MODEL}:2"),
            (f"{MODEL}:3", f"{MODEL}:3"),
            (f"{MODEL}@canary", f"{MODEL}:2"),
        ]:
            r = chat(c, server.url, "user-1", model=ref)
            assert (r.headers["x-tuneloop-arm"], r.headers["x-tuneloop-version"]) == ("direct", version)
        logged = records(log, recorder)
    split = [r for r in logged if r.arm in ("canary", "baseline")]
    assert len(split) >= 76 and all(r.rollout_id == rid for r in split)
    assert all(r.version == (2 if r.arm == "canary" else 1) for r in split)
    direct = [r for r in logged if r.arm == "direct"]
    assert all(r.rollout_id is None for r in direct) and any(r.ref == f"{MODEL}:3" for r in direct)
    counts = log.arm_counts(model=MODEL, rollout_id=rid)
    assert counts["canary"]["requests"] + counts["baseline"]["requests"] == len(split)


@pytest.mark.parametrize("failure", ["crash", "fail_5xx"])
def test_a_failing_canary_is_retried_on_the_baseline_and_still_counted(tmp_path, failure):
    reg = make_registry(tmp_path)
    backend = ScriptedBackend(**{failure: {2}})
    app, log, recorder = make_app(reg, tmp_path / "requests.db", backend)
    rid = controller.start(reg, f"{MODEL}:2", policy=HALF).rollout_id
    with BackgroundServer(app) as server, httpx.Client() as c:
        wait_for(lambda: backend.prepared)
        statuses = collections.Counter()
        for i in range(60):
            r = chat(c, server.url, f"user-{i}", stream=(i % 3 == 0))
            statuses[r.status_code] += 1
            assert r.headers["x-tuneloop-arm"] == "baseline" and r.headers["x-tuneloop-version"] == f"{MODEL}:1"
            if i % 3:
                assert r.json()["choices"][0]["message"]["content"] == f"answer from {MODEL}:1"
            else:
                assert f"{MODEL}:1" in r.text and "[DONE]" in r.text and '"error"' not in r.text
        logged = records(log, recorder)
    assert statuses == {200: 60}  # clients see no failure
    failed = [r for r in logged if r.arm == "canary"]
    assert failed and all(r.status == 500 and r.request_id.endswith(".canary") and r.rollout_id == rid for r in failed)
    assert all("retried on the baseline" in r.error for r in failed)
    served = {r.request_id for r in logged if r.arm == "baseline"}
    assert all(r.request_id.removesuffix(".canary") in served for r in failed)  # each failed attempt was then served
    counts = log.arm_counts(model=MODEL, rollout_id=rid)
    assert counts["canary"]["errors"] == counts["canary"]["requests"] == len(failed)
    assert counts["baseline"]["errors"] == 0


def test_the_gateway_rolls_back_a_crashing_canary_and_routes_the_change(tmp_path):
    reg = make_registry(tmp_path)
    notifier = ListNotifier()
    backend = ScriptedBackend(crash={2})
    app, log, recorder = make_app(reg, tmp_path / "requests.db", backend, tick_s=0.2, notifier=notifier)
    rid = controller.start(reg, f"{MODEL}:2", policy=HALF).rollout_id
    with BackgroundServer(app) as server, httpx.Client() as c:
        i = 0
        while reg.get_rollout(MODEL).status == "running":
            assert chat(c, server.url, f"user-{i}").status_code == 200
            i += 1
            assert i < 2000, "never rolled back"
        record = reg.get_rollout(MODEL)
        assert record.status == "rolled_back" and record.rollout_id == rid
        assert "guard errors" in record.last_decision["reason"]
        wait_for(lambda: chat(c, server.url, "user-1").headers["x-tuneloop-arm"] == "direct", timeout=5)
        assert all(chat(c, server.url, f"user-{k}").headers["x-tuneloop-version"] == f"{MODEL}:1" for k in range(20))
    assert reg.get(MODEL, "champion").version == 1
    assert "canary" not in reg.aliases(MODEL)
    assert [e for e, *_ in notifier.sent] == ["rollback"]
    ended = [e for e in reg.events(MODEL) if e.kind == "rollout_ended"]
    assert len(ended) == 1 and ended[0].details["decision"]["metrics"]["errors"]["canary"]["events"] >= 5


def test_a_candidate_the_backend_refuses_is_aborted_without_taking_traffic(tmp_path):
    reg = make_registry(tmp_path)
    backend = ScriptedBackend(refuse={2})
    app, log, recorder = make_app(reg, tmp_path / "requests.db", backend)
    controller.start(reg, f"{MODEL}:2", policy=HALF)
    with BackgroundServer(app) as server, httpx.Client() as c:
        arms = {chat(c, server.url, f"user-{i}").headers["x-tuneloop-arm"] for i in range(10)}
        wait_for(lambda: reg.get_rollout(MODEL).status == "aborted")
        assert arms == {"direct"}
    record = reg.get_rollout(MODEL)
    reason = record.last_decision["reason"]
    assert "could not serve the candidate" in reason and "failed its probes" in reason
    assert backend.calls.get(f"{MODEL}:2", 0) == 0


def test_a_started_and_an_ended_rollout_take_effect_within_the_ttl(tmp_path):
    import time

    reg = make_registry(tmp_path)
    app, log, recorder = make_app(reg, tmp_path / "requests.db", ScriptedBackend(), ttl_s=0.5)
    with BackgroundServer(app) as server, httpx.Client() as c:
        assert chat(c, server.url, "user-1").headers["x-tuneloop-arm"] == "direct"
        t0 = time.time()
        controller.start(reg, f"{MODEL}:2", policy=HALF)
        canary_live(c, server.url)
        assert time.time() - t0 < 4.0  # the TTL (0.5 s), the loop's look (0.5 s) and preparing the candidate
        t0 = time.time()
        controller.abort(reg, MODEL, reason="test")
        wait_for(lambda: chat(c, server.url, "user-1").headers["x-tuneloop-arm"] == "direct", timeout=5)
        assert time.time() - t0 < 2.5  # the TTL (0.5 s) plus the request that sees it


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_two_gateways_over_one_registry_and_one_log_reach_one_decision(tmp_path, store, request):
    """Two replicas (each with its own registry handle and request-log connection pool) over one registry and
    one request log (SQLite here, PostgreSQL as deployed; that case skips where the server is absent)."""
    from tuneloop.registry.sqlite import SqliteRegistry

    log_url = request.getfixturevalue("postgres_url") if store == "postgresql" else str(tmp_path / "requests.db")
    reg = make_registry(tmp_path)
    rid = controller.start(reg, f"{MODEL}:2", policy=FAST).rollout_id
    notes = [ListNotifier(), ListNotifier()]
    apps = [
        make_app(SqliteRegistry(tmp_path / "ws"), log_url, ScriptedBackend(), tick_s=0.15, notifier=notes[k])[0]
        for k in (0, 1)
    ]
    with BackgroundServer(apps[0]) as a, BackgroundServer(apps[1]) as b, httpx.Client() as c:
        i = 0
        while reg.get_rollout(MODEL).status == "running":
            assert chat(c, (a, b)[i % 2].url, f"user-{i}").status_code == 200
            i += 1
            assert i < 5000, "never promoted"
    record = reg.get_rollout(MODEL)
    assert record.status == "promoted" and reg.get(MODEL, "champion").version == 2
    events = controller.decisions(reg, MODEL, rid)
    revisions = [e.details["revision"] for e in events]
    assert len(revisions) == len(set(revisions))  # no decision stored twice
    actions = [e.details["decision"]["action"] for e in events if e.details.get("decision")]
    assert actions.count("step_up") == 1 and actions.count("promote") == 1
    sent = [e for n in notes for e, *_ in n.sent]
    assert sorted(sent) == ["promote", "step"]  # each decision announced once, by the replica that stored it


def admin(c, url, method, path, token=ADMIN, **kw):
    return c.request(method, f"{url}{path}", headers={"authorization": f"Bearer {token}"} if token else {}, **kw)


def test_admin_rollout_api(tmp_path):
    reg = make_registry(tmp_path)
    notifier = ListNotifier()
    app, *_ = make_app(reg, tmp_path / "requests.db", ScriptedBackend(), notifier=notifier, policy=HALF)
    with BackgroundServer(app) as server, httpx.Client() as c:
        url = server.url
        assert admin(c, url, "POST", "/admin/rollouts", token=None, json={"ref": f"{MODEL}:2"}).status_code == 401
        assert admin(c, url, "POST", "/admin/rollouts", token="wrong", json={"ref": f"{MODEL}:2"}).status_code == 401
        assert admin(c, url, "GET", f"/admin/rollouts/{MODEL}").status_code == 404
        assert admin(c, url, "POST", "/admin/rollouts", json={}).status_code == 400
        r = admin(c, url, "POST", "/admin/rollouts", json={"ref": f"{MODEL}:2", "reason": "new data"})
        assert r.status_code == 201, r.text
        started = r.json()
        assert started["weight"] == 0.5 and started["candidate"] == f"{MODEL}:2" and "state_json" not in started
        again = admin(c, url, "POST", "/admin/rollouts", json={"ref": f"{MODEL}:3"})
        assert again.status_code == 409 and started["rollout_id"] in again.json()["error"]["message"]
        st = admin(c, url, "GET", f"/admin/rollouts/{MODEL}").json()
        assert st["status"] == "running" and st["analysis"]["weights"] == [0.5, 1.0]
        assert [d["kind"] for d in st["decisions"]] == ["rollout_started"]
        canary_live(c, url)
        assert (
            admin(c, url, "POST", f"/admin/rollouts/{MODEL}/abort", json={}).status_code == 400
        )  # a reason is required
        r = admin(c, url, "POST", f"/admin/rollouts/{MODEL}/abort", json={"reason": "wrong data"})
        assert r.status_code == 200 and r.json()["status"] == "aborted"
        assert chat(c, url, "probe-1").headers["x-tuneloop-arm"] == "direct"  # the admin call dropped the cache
        assert admin(c, url, "POST", f"/admin/rollouts/{MODEL}/promote", json={}).status_code == 409
        admin(c, url, "POST", "/admin/rollouts", json={"ref": f"{MODEL}:3"})
        r = admin(c, url, "POST", f"/admin/rollouts/{MODEL}/promote", json={"reason": "looks fine"})
        assert r.status_code == 200 and r.json()["status"] == "promoted"
    assert reg.get(MODEL, "champion").version == 3
    assert [e for e, *_ in notifier.sent] == ["start", "abort", "start", "promote"]


def test_a_restarted_gateway_resumes_the_rollout_from_the_stored_state(tmp_path):
    reg = make_registry(tmp_path)
    rid = controller.start(reg, f"{MODEL}:2", policy=FAST).rollout_id
    app, log, _ = make_app(reg, tmp_path / "requests.db", ScriptedBackend(), tick_s=0.15)
    with BackgroundServer(app) as server, httpx.Client() as c:
        i = 0
        while reg.get_rollout(MODEL).weight < 0.5:  # first gateway: until the step up
            assert chat(c, server.url, f"user-{i}").status_code == 200
            i += 1
            assert i < 3000
    before = reg.get_rollout(MODEL)
    counted = controller.status(reg, MODEL)["analysis"]["canary_requests"]
    app2, *_ = make_app(reg, tmp_path / "requests.db", ScriptedBackend(), tick_s=0.15)
    with BackgroundServer(app2) as server, httpx.Client() as c:  # second gateway: the same rollout goes on
        while reg.get_rollout(MODEL).status == "running":
            assert chat(c, server.url, f"user-{i}").status_code == 200
            i += 1
            assert i < 6000
    after = reg.get_rollout(MODEL)
    assert before.status == "running" and before.weight == 0.5
    assert after.rollout_id == rid and after.status == "promoted"
    assert after.last_decision["canary_requests"] >= counted + FAST["min_requests_per_step"]
    actions = [(e.details.get("decision") or {}).get("action") for e in controller.decisions(reg, MODEL, rid)]
    assert actions.count("step_up") == 1 and actions.count("promote") == 1  # resumed at 50 %, not restarted at 5 %


def test_the_gateway_from_a_config_ticks_at_the_configured_interval_with_its_policy(make_config):
    from tuneloop.config import load_config
    from tuneloop.serve.server import build_gateway
    from tuneloop.workspace import Workspace

    cfg = load_config(
        make_config(
            deploy={
                "strategy": "canary",
                "canary": {"tick_interval_s": 0.3, "weights": [0.1, 1.0], "min_requests_per_step": 50},
            },
            notify={"webhooks": [{"url": "http://127.0.0.1:9/hook", "format": "json", "events": ["rollback"]}]},
        )
    )
    gw = build_gateway(cfg, Workspace.for_config(cfg).root).state.gateway
    assert gw.settings.rollout_tick_s == 0.3
    assert (
        gw.settings.rollout_policy["weights"] == [0.1, 1.0]
        and gw.settings.rollout_policy["min_requests_per_step"] == 50
    )
    assert "tick_interval_s" not in gw.settings.rollout_policy
    assert [h.url for h in gw.notifier.webhooks] == ["http://127.0.0.1:9/hook"]


class CountingRegistry:
    """The registry, counting ``get_rollout`` reads."""

    def __init__(self, reg):
        self.reg, self.rollout_reads = reg, 0

    def get_rollout(self, *a, **kw):
        self.rollout_reads += 1
        return self.reg.get_rollout(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.reg, name)


def test_router_splits_by_weight_reads_the_registry_once_per_ttl_and_waits_for_the_candidate(tmp_path):
    from tuneloop.serve.router import Router

    reg = CountingRegistry(make_registry(tmp_path))
    rid = controller.start(reg.reg, f"{MODEL}:2", policy=FAST).rollout_id
    router = Router(reg, ttl_s=60.0)
    first = router.choose_arm(MODEL, "user-1", "req-0")
    assert (first.arm, first.version_ref, first.rollout_id) == ("direct", f"{MODEL}:1", None)  # candidate not ready yet
    assert router.pending() == [f"{MODEL}:2"]
    router.mark_ready(f"{MODEL}:2")
    assert router.pending() == []
    routes = [router.choose_arm(MODEL if i % 2 else f"{MODEL}@champion", None, f"req-{i}") for i in range(4000)]
    canary = [r for r in routes if r.arm == "canary"]
    assert 0.035 < len(canary) / len(routes) < 0.065  # the 5 % weight, drawn per request without a user key
    assert all(r.version_ref == f"{MODEL}:2" and r.rollout_id == rid for r in canary)
    assert all(r.version_ref == f"{MODEL}:1" and r.rollout_id == rid for r in routes if r.arm == "baseline")
    assert reg.rollout_reads == 1  # cached: not one registry read per request
    assert router.choose_arm(f"{MODEL}:2", "user-1").arm == "direct"
    assert router.choose_arm(f"{MODEL}@canary", "user-1").arm == "direct"
    back = router.baseline_of(canary[0])
    assert (back.arm, back.version_ref, back.rollout_id) == ("baseline", f"{MODEL}:1", rid)
    controller.abort(reg.reg, MODEL, reason="test")
    assert router.choose_arm(MODEL, "user-1").arm != "direct"  # still cached (TTL 60 s) ...
    router.invalidate(MODEL)
    assert router.choose_arm(MODEL, "user-1").arm == "direct"  # ... until the cache is dropped
    assert router.baseline_of(canary[0]).arm == "direct"  # a retry after the rollout ended goes to the champion


def test_router_cache_is_read_again_off_the_request_path(tmp_path, monkeypatch):
    """Requests are answered from the cache (up to 2 * ttl_s old) and the refresher reads the entries in use
    again; an entry older than that is read first; a refresh that read before invalidate() is not stored."""
    import threading

    import tuneloop.serve.router as router_mod
    from tuneloop.serve.router import Router

    clock = [1000.0]
    monkeypatch.setattr(router_mod.time, "monotonic", lambda: clock[0])
    reg = CountingRegistry(make_registry(tmp_path))
    gate = threading.Event()
    gate.set()

    class Held(CountingRegistry):
        def get_rollout(self, *a, **kw):
            record = super().get_rollout(*a, **kw)
            if threading.current_thread() is not threading.main_thread():
                gate.wait(10)  # the refresher: read, then held, so what it read is out of date when it returns
            return record

    held = Held(reg.reg)
    router = Router(held, ttl_s=10.0, refresh_every_s=3600)  # the test drives the refresher: refresh_due()
    assert router.rollout(MODEL) is None and held.rollout_reads == 1  # first use: read now
    rid = controller.start(reg.reg, f"{MODEL}:2", policy=FAST).rollout_id
    clock[0] += 15  # stale (< 2 * ttl_s): served as is
    assert router.rollout(MODEL) is None and held.rollout_reads == 1
    router.cache.refresh_every_s = 5
    router.cache.refresh_due()  # the refresher's pass
    assert held.rollout_reads == 2 and router.rollout(MODEL).rollout_id == rid
    clock[0] += 25  # too old: read before use
    assert router.rollout(MODEL).rollout_id == rid and held.rollout_reads == 3
    clock[0] += 6
    gate.clear()  # a slow refresh reads "running" ...
    refresher = threading.Thread(target=router.cache.refresh_due)
    refresher.start()
    for _ in range(500):
        if held.rollout_reads == 4:
            break
        threading.Event().wait(0.01)
    controller.abort(reg.reg, MODEL, reason="test")
    router.invalidate(MODEL)  # ... overtaken by invalidate()
    assert router.rollout(MODEL) is None  # read again at once: abort seen
    gate.set()
    refresher.join(10)
    assert router.rollout(MODEL) is None  # the slow read was not stored
    clock[0] += 100
    router.cache.refresh_due()  # unused for idle_s: dropped
    assert len(router.cache) == 0
    router.close()


def test_router_caches_an_unknown_model_and_keeps_serving_when_the_registry_fails(tmp_path):
    from tuneloop.serve.errors import APIError
    from tuneloop.serve.router import Router

    class Flaky(CountingRegistry):
        down = False
        model_reads = 0

        def models(self):
            self.model_reads += 1
            if self.down:
                raise OSError("database is locked")
            return self.reg.models()

    reg = Flaky(make_registry(tmp_path))
    router = Router(reg, ttl_s=60.0, refresh_every_s=3600)
    for _ in range(3):
        with pytest.raises(APIError) as err:
            router.resolve("no-such-model")
        assert err.value.status == 404
    assert reg.model_reads <= 2  # read once (twice for the message), then the 404 is cached
    version = router.resolve(MODEL).version
    reg.down = True
    router.cache.refresh_every_s = 0
    router.cache.refresh_due()  # every read fails: the cached values stay
    assert router.resolve(MODEL).version == version
    router.close()
