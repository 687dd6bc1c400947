"""Two operator-facing details of the gateway: ``GET /health`` without an API key (when keys are set) says what a
health check needs and nothing more, and every rollout decision is an INFO line in the gateway's log at its
default level (``serve()`` configures the ``tuneloop`` logger)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from rollout_gateway_helpers import ADMIN, ScriptedBackend, make_app, make_registry

SHA = "ab" * 32


class LoadedBackend(ScriptedBackend):
    """Reports one loaded version with its artifact digest, as the local backend does."""

    def loaded(self):
        return [{"version": "support-bot:1", "artifact_sha256": SHA, "adapter": None}]


def test_health_without_a_key_gives_the_status_only(tmp_path):
    from tuneloop.serve.server import BackgroundServer

    reg = make_registry(tmp_path, n_versions=1)
    app, log, _ = make_app(reg, tmp_path / "requests.db", LoadedBackend(), api_keys=frozenset({"key-1"}))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.get("/health", headers=headers)
            assert r.status_code == 200 and r.headers["x-request-id"]
            assert r.json() == {"status": "ok", "versions_loaded": 1}
            assert SHA not in r.text and "support-bot" not in r.text
        for token in ("key-1", ADMIN):  # an API key or the admin token: the full detail
            full = c.get("/health", headers={"Authorization": f"Bearer {token}"}).json()
            assert full["status"] == "ok" and full["loaded"][0]["artifact_sha256"] == SHA
    log.close()

    app, log, _ = make_app(reg, tmp_path / "requests2.db", LoadedBackend())  # no keys configured: full detail
    with BackgroundServer(app) as server:
        assert httpx.get(f"{server.url}/health", timeout=10).json()["loaded"][0]["version"] == "support-bot:1"
    log.close()


DECISIONS = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from rollout_gateway_helpers import make_registry
from tuneloop.rollout import controller
from tuneloop.serve.server import configure_logging

configure_logging()  # what `tuneloop serve` does before it builds the gateway

POLICY = {{"weights": [0.2, 0.5, 1.0], "min_requests_per_step": 150,
          "metrics": [{{"name": "errors", "max_ratio": 3.0}}],
          "guards": [{{"metric": "errors", "max_rate": 0.5, "min_requests": 20}}]}}

class ArmLog:
    totals = {{}}
    def arm_counts(self, *, model, since=None, rollout_id=None):
        return self.totals
    def latencies(self, *, model, arm, since=None, rollout_id=None):
        return []

def arm(requests, errors):
    return {{"requests": requests, "errors": errors, "latency_sum": 0.0, "feedback": 0, "negative_feedback": 0}}

reg = make_registry(Path({root!r}), n_versions=2)
controller.start(reg, "support-bot:2", policy=POLICY, actor="test", reason="test", now=1000.0)
log = ArmLog()
controller.tick(reg, log, "support-bot", now=1010.0)   # no traffic yet: hold (logged)
controller.tick(reg, log, "support-bot", now=1015.0)   # the same hold 5 s later: not logged again
log.totals = {{"baseline": arm(800, 0), "canary": arm(200, 150)}}
controller.tick(reg, log, "support-bot", now=1020.0)   # the canary fails: rollback (logged)
"""


def test_each_rollout_decision_is_an_info_line_at_the_gateways_default_level(tmp_path):
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(tests.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = DECISIONS.format(tests=str(tests), root=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "rollout " in line]
    holds = [line for line in lines if "holds at 20%" in line]
    rollbacks = [line for line in lines if "rolled back" in line]
    assert len(holds) == 1 and "hold: no traffic since the last check" in holds[0], r.stderr
    assert len(rollbacks) == 1 and "guard errors" in rollbacks[0] and "support-bot:2" in rollbacks[0], r.stderr
    assert all(line.startswith("INFO:") for line in holds + rollbacks), lines
