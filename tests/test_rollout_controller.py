"""The rollout controller on a real SQLite registry and a real SQLite request log filled with simulated traffic.

Requests are split by ``choose_arm`` at the weight stored in the registry, logged with their arm and rollout
id (errors as HTTP 500, feedback through ``add_feedback``), and ``tick`` decides from ``arm_counts`` between
batches, as the gateway does. Notifications go to a real HTTP receiver on 127.0.0.1.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from test_notify import Receiver
from tuneloop.cli import app
from tuneloop.errors import InputError
from tuneloop.monitor.requestlog import RequestRecord, open_request_log
from tuneloop.registry.rollouts import Rollout, new_record
from tuneloop.registry.sqlite import SqliteRegistry
from tuneloop.rollout import controller
from tuneloop.rollout.notify import Notifier, Webhook
from tuneloop.rollout.split import choose_arm, unit_hash

# Small steps so a test needs thousands of requests, not tens of thousands.
POLICY = {
    "alpha": 0.05,
    "weights": [0.2, 0.5, 1.0],
    "min_requests_per_step": 150,
    "metrics": [{"name": "errors", "max_ratio": 3.0}, {"name": "negative_feedback", "max_ratio": 3.0}],
    "guards": [{"metric": "errors", "max_rate": 0.5, "min_requests": 20}],
}


def make_model_dir(path: Path, value: float) -> Path:
    path.mkdir(parents=True)
    save_file({"w": np.full((2, 2), value, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


@pytest.fixture
def ws(tmp_path):
    """A registry with support-bot:1 (champion) and :2 (the candidate), and an empty request log."""
    reg = SqliteRegistry(tmp_path / "ws")
    for i in (1, 2):
        reg.register(
            "support-bot",
            make_model_dir(tmp_path / f"m{i}", i),
            artifact_kind="model",
            base_model="tiny",
            lineage={},
            metrics={},
            gates={},
        )
    reg.promote("support-bot", 1, actor="test")
    log = open_request_log(tmp_path / "ws" / "requests.db")
    yield reg, log
    log.close()


def traffic(
    log, rollout: Rollout, n: int, *, t0: float, err: dict, neg: dict, rng: random.Random, users: int = 400
) -> None:
    """``n`` requests split by the stored weight; each arm fails with ``err[arm]`` and gets a negative rating
    with ``neg[arm]`` on the half of requests that receive feedback."""
    recs, feedback = [], []
    for i in range(n):
        rid = f"{rollout.rollout_id}-{t0:.0f}-{i}"
        user = f"user-{rng.randrange(users)}"
        arm = choose_arm(rollout, user, rid)
        failed = rng.random() < err[arm]
        recs.append(
            RequestRecord(
                request_id=rid,
                created_at=t0 + i * 1e-3,
                endpoint="chat.completions",
                model=rollout.model,
                ref=rollout.model,
                version=rollout.candidate_version if arm == "canary" else rollout.baseline_version,
                artifact_sha256=None,
                arm=arm,
                user_hash=user,
                prompt="[]",
                response="" if failed else "ok",
                status=500 if failed else 200,
                latency_s=0.1,
                rollout_id=rollout.rollout_id,
            )
        )
        if not failed and rng.random() < 0.5:
            feedback.append((rid, -1 if rng.random() < neg[arm] else 1))
    log.record_many(recs)
    for rid, rating in feedback:
        log.add_feedback(rid, rating=rating)


def run_rollout(reg, log, *, err, neg, batch=400, max_ticks=60, seed=0, notifier=None, model="support-bot"):
    """Ticks until the rollout ends; returns the decisions (None entries are skipped)."""
    rng, decisions, t = random.Random(seed), [], 1000.0
    for _ in range(max_ticks):
        rollout = reg.get_rollout(model)
        if rollout.status != "running":
            break
        traffic(log, rollout, batch, t0=t, err=err, neg=neg, rng=rng)
        t += 10.0
        d = controller.tick(reg, log, model, now=t, notifier=notifier)
        decisions.append(d)
    return [d for d in decisions if d is not None]


def test_a_bad_canary_is_rolled_back_with_its_statistics_and_the_champion_unchanged(ws):
    reg, log = ws
    with Receiver() as receiver:
        notifier = Notifier(
            [Webhook(receiver.url), Webhook(receiver.url, format="slack", events=("rollback",))], backoff_s=0.01
        )
        started = controller.start(
            reg, "support-bot:2", policy=POLICY, notifier=notifier, actor="ci", reason="test", now=1000.0
        )
        assert reg.aliases("support-bot") == {"canary": 2, "champion": 1}
        decisions = run_rollout(
            reg, log, err={"baseline": 0.01, "canary": 0.10}, neg={"baseline": 0.1, "canary": 0.1}, notifier=notifier
        )
        assert notifier.flush(20)
        notifier.close()
    final = decisions[-1]
    assert final.action == "rollback", [(d.action, d.reason) for d in decisions]
    assert "errors: canary worse" in final.reason
    assert final.canary_requests < 1500  # about a few hundred canary requests at a 10x error rate
    record = reg.get_rollout("support-bot")
    assert record.status == "rolled_back" and record.weight == 0.0
    assert reg.aliases("support-bot") == {"champion": 1}  # champion unchanged, canary alias gone
    ended = [e for e in reg.events("support-bot") if e.kind == "rollout_ended"]
    assert len(ended) == 1 and ended[0].details["rollout_id"] == started.rollout_id
    stats = ended[0].details["decision"]["metrics"]["errors"]
    assert stats["canary"]["events"] > stats["baseline"]["events"] * 0.2 * 3
    assert stats["log_evalue"] >= stats["threshold"] and stats["interval"][0] >= 1.0
    assert stats["estimate"] > 2 and stats["requests_seen"] == final.canary_requests
    events = sorted({b["event"] for b in receiver.bodies if "event" in b})
    assert events == ["rollback", "start"]
    slack = [b for b in receiver.bodies if "text" in b]
    assert len(slack) == 1 and "rolled back" in slack[0]["text"] and "errors" in slack[0]["text"]


def test_a_good_canary_steps_up_through_every_weight_and_is_promoted(ws):
    reg, log = ws
    controller.start(reg, "support-bot:2", policy=POLICY, actor="ci", now=1000.0)
    decisions = run_rollout(reg, log, err={"baseline": 0.02, "canary": 0.02}, neg={"baseline": 0.1, "canary": 0.1})
    actions = [d.action for d in decisions if d.action != "continue"]
    assert actions == ["step_up", "promote"], [(d.action, d.reason) for d in decisions]
    assert [d.weight for d in decisions if d.action != "continue"] == [0.5, 1.0]
    assert reg.aliases("support-bot") == {"champion": 2, "previous": 1}
    record = reg.get_rollout("support-bot")
    assert record.status == "promoted" and record.last_decision["action"] == "promote"
    kinds = [
        e.details["decision"]["action"]
        for e in controller.decisions(reg, "support-bot", record.rollout_id)
        if e.details.get("decision")
    ]
    assert kinds[-2:] == ["step_up", "promote"]


def test_no_traffic_holds_and_is_recorded_once_a_minute(ws):
    reg, log = ws
    controller.start(reg, "support-bot:2", policy=POLICY, actor="ci", now=1000.0)
    decisions = [controller.tick_running(reg, log, now=1000.0 + 10 * i)["support-bot"] for i in range(1, 13)]
    assert all(d.action == "continue" and d.reason.startswith("hold") for d in decisions)
    record = reg.get_rollout("support-bot")
    assert record.status == "running" and record.weight == 0.2 and record.revision == 13
    held = [e for e in controller.decisions(reg, "support-bot", record.rollout_id) if e.kind == "rollout_decision"]
    assert len(held) == 2  # at t=1010 and t=1070: not one event per tick
    assert record.last_decision["at"] == 1120.0  # but the record always has the newest decision
    analysis, _ = controller.load_state(record)
    assert analysis.state.active_s == 0.0  # time without traffic does not count towards max_active_s


def test_a_restart_resumes_from_the_stored_state(ws, tmp_path):
    reg, log = ws
    controller.start(reg, "support-bot:2", policy=POLICY, actor="ci", now=1000.0)
    rng = random.Random(3)
    traffic(
        log,
        reg.get_rollout("support-bot"),
        300,
        t0=1000.0,
        err={"baseline": 0.01, "canary": 0.01},
        neg={"baseline": 0.1, "canary": 0.1},
        rng=rng,
    )
    first = controller.tick(reg, log, "support-bot", now=1010.0)
    reopened = SqliteRegistry(tmp_path / "ws")  # a new process: nothing in memory
    again = controller.tick(reopened, log, "support-bot", now=1020.0)
    assert again.canary_requests == first.canary_requests > 0  # the same totals are not counted twice
    assert again.reason.startswith("hold")


def test_two_replicas_ticking_the_same_state_store_one_decision(ws):
    reg, log = ws
    controller.start(reg, "support-bot:2", policy=POLICY, actor="ci", now=1000.0)
    record = reg.get_rollout("support-bot")
    traffic(
        log,
        record,
        200,
        t0=1000.0,
        err={"baseline": 0.0, "canary": 0.0},
        neg={"baseline": 0.0, "canary": 0.0},
        rng=random.Random(1),
    )

    class StaleRegistry(SqliteRegistry):
        """Replica B read the rollout before replica A stored its tick."""

        def get_rollout(self, model, rollout_id=None):
            return record

    stale = StaleRegistry(reg.root)
    assert controller.tick(reg, log, "support-bot", now=1010.0) is not None
    assert controller.tick(stale, log, "support-bot", now=1010.0) is None
    assert reg.get_rollout("support-bot").revision == 2


def test_manual_promote_and_abort(ws, tmp_path):
    reg, log = ws
    with pytest.raises(InputError, match="no running rollout"):
        controller.promote(reg, "support-bot", actor="ops")
    controller.start(reg, "support-bot:2", policy=POLICY, actor="ci", now=1000.0)
    with pytest.raises(InputError, match="already has a running rollout"):
        controller.start(reg, "support-bot:2", policy=POLICY, actor="ci")
    with pytest.raises(InputError, match="needs a reason"):
        controller.abort(reg, "support-bot", reason=" ", actor="ops")
    ended = controller.abort(reg, "support-bot", reason="pager fired", actor="ops")
    assert ended.status == "aborted" and reg.aliases("support-bot") == {"champion": 1}
    assert ended.last_decision["action"] == "rollback" and "pager fired" in ended.last_decision["reason"]
    second = controller.start(reg, "support-bot:2", policy=POLICY, actor="ci", now=2000.0)
    assert second.rollout_id == "support-bot-r2"
    promoted = controller.promote(reg, "support-bot", actor="ops", reason="looks fine")
    assert promoted.status == "promoted" and reg.aliases("support-bot") == {"champion": 2, "previous": 1}
    assert [r.status for r in reg.list_rollouts("support-bot")] == ["aborted", "promoted"]


def test_split_is_sticky_per_user_monotone_in_the_weight_and_near_the_weight():
    rollout = new_record("bot", 1, 2, 1, policy={}, weight=0.05, state_json=None, actor="t", reason="", now="t")
    users = [f"u{i}" for i in range(20000)]
    at5 = {u for u in users if choose_arm(rollout, u, "any") == "canary"}
    at25 = {u for u in users if choose_arm(replace(rollout, weight=0.25), u, "other") == "canary"}
    assert at5 <= at25  # users on the canary stay there when the weight steps up
    assert abs(len(at5) / len(users) - 0.05) < 0.006 and abs(len(at25) / len(users) - 0.25) < 0.015
    assert all(choose_arm(rollout, "u1", f"r{i}") == choose_arm(rollout, "u1", "r0") for i in range(50))
    per_request = sum(choose_arm(rollout, None, f"req-{i}") == "canary" for i in range(20000)) / 20000
    assert abs(per_request - 0.05) < 0.006
    assert choose_arm(None, "u1", "r") == "baseline"
    assert choose_arm(replace(rollout, status="rolled_back"), "u1", "r") == "baseline"
    assert unit_hash("a") != unit_hash("b") and 0 <= unit_hash("a") < 1


runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_rollout_cli_start_status_wait_promote_abort(ws, tmp_path):
    reg, log = ws
    w = ["--workspace", tmp_path / "ws"]
    r = cli("rollout", "start", "support-bot:2", *w, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["weight"] == 0.05
    r = cli("rollout", "status", "support-bot", *w, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "running"
    r = cli("rollout", "status", "support-bot", *w, "--wait", "--timeout", "0.3", "--interval", "0.1")
    assert r.exit_code == 1 and "still running" in r.stderr  # timed out waiting: not promoted
    assert cli("rollout", "promote", "support-bot", *w).exit_code == 0
    r = cli("rollout", "status", "support-bot", *w, "--wait")
    assert r.exit_code == 0, r.output
    assert cli("rollout", "start", "support-bot:1", *w, "--json").exit_code == 0  # roll the old one back in
    r = cli("rollout", "abort", "support-bot", *w)
    assert r.exit_code == 2 and "--reason" in r.stderr
    assert cli("rollout", "abort", "support-bot", *w, "--reason", "bad answers").exit_code == 0
    r = cli("rollout", "status", "support-bot", *w, "--wait", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["status"] == "aborted"
    assert cli("rollout", "status", "nope", *w).exit_code == 2
    r = cli("rollout", "status", *w, "--json")  # no name: every model's latest rollout
    assert r.exit_code == 0 and [x["status"] for x in json.loads(r.stdout)] == ["aborted"]


def test_deploy_canary_config_maps_to_the_policy_and_reports_every_problem_with_its_key(tmp_path):
    from tuneloop.config import CanaryConfig, load_config
    from tuneloop.errors import ConfigError
    from tuneloop.rollout.analysis import RolloutPolicy

    assert RolloutPolicy.from_dict(CanaryConfig().policy_dict()) == RolloutPolicy()  # the same defaults
    p = tmp_path / "c.yaml"
    p.write_text(
        "name: x\nbase_model: m\ntrain_data: a.jsonl\ndeploy:\n  strategy: canary\n  canary:\n"
        "    weights: [0.1, 1.0]\n    metrics: [errors, {name: latency, max_ratio: 2}]\n"
        "    guards: [{metric: harmful, max_count: 0}]\n    on_limit: hold\n"
    )
    cfg = load_config(p)
    assert cfg.deploy.strategy == "canary"
    policy = RolloutPolicy.from_dict(cfg.deploy.canary.policy_dict())
    assert policy.weights == (0.1, 1.0) and [m.name for m in policy.metrics] == ["errors", "latency"]
    assert policy.metrics[1].max_ratio == 2.0 and policy.guards[0].max_count == 0 and policy.on_limit == "hold"
    p.write_text(
        "name: x\nbase_model: m\ntrain_data: a.jsonl\ndeploy:\n  strategy: blue-green\n  canary:\n"
        "    weights: [0.5, 0.2]\n    alpha: 1.5\n    metrics: [errors, errors, speed]\n"
        "    guards: [{metric: errors}]\n    tick_interval_s: 0\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    text = str(exc.value)
    for key in (
        "deploy.strategy",
        "deploy.canary.weights",
        "deploy.canary.alpha",
        "deploy.canary.metrics.2.name",
        "deploy.canary.guards.0",
        "deploy.canary.tick_interval_s",
    ):
        assert f"{key}" in text, (key, text)
    assert exc.value.exit_code == 2


def test_rollout_start_takes_the_policy_from_the_config(ws, tmp_path):
    cfg = tmp_path / "tuneloop.yaml"
    cfg.write_text(
        f"name: support-bot\nbase_model: m\ntrain_data: a.jsonl\nworkspace: {tmp_path / 'ws'}\n"
        "deploy:\n  strategy: canary\n  canary:\n    weights: [0.1, 0.3, 1.0]\n    metrics: [errors]\n"
    )
    r = cli("rollout", "start", "support-bot:2", "-c", cfg, "--json", "--reason", "from CI")
    assert r.exit_code == 0, r.output
    started = json.loads(r.stdout)
    assert started["weight"] == 0.1 and started["policy"]["weights"] == [0.1, 0.3, 1.0]
    assert [m["name"] for m in started["policy"]["metrics"]] == ["errors"] and "state_json" not in started
    assert started["reason"] == "from CI"


def test_an_incomplete_request_log_holds_the_rollout_and_nothing_is_decided_on_it(ws):
    """While the gateway's spool holds records not yet in the store, a bad canary is not rolled back (nor a good one
    stepped up) on the partial log: the rollout holds with the reason; once the log is whole, the decision comes."""
    reg, log = ws
    controller.start(reg, "support-bot:2", policy=POLICY, actor="ci", now=1000.0)
    rollout = reg.get_rollout("support-bot")
    traffic(
        log,
        rollout,
        1200,
        t0=1001.0,
        err={"baseline": 0.01, "canary": 0.3},
        neg={"baseline": 0.1, "canary": 0.1},
        rng=random.Random(1),
    )
    why = "57 records are in this gateway's spool, not yet in the store"
    held = controller.tick_running(reg, log, now=1010.0, incomplete=why)["support-bot"]
    assert held.action == "continue" and why in held.reason and "no decision on a partial log" in held.reason
    record = reg.get_rollout("support-bot")
    assert record.status == "running" and record.last_decision["reason"] == held.reason
    assert controller.load_state(record)[0].state.canary_requests == 0  # nothing was read
    decided = controller.tick_running(reg, log, now=1020.0)["support-bot"]
    assert decided.action == "rollback" and decided.canary_requests > 0
