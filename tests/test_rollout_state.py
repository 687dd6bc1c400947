"""Rollout state in the registry, on both backends (SQLite in a temp workspace; MLflow on a real server started
on loopback by the fixture of test_registry_mlflow.py): start/update/end with the aliases, one running rollout
per model, compare-and-set conflicts, decisions as events with their statistics, survival across a reopen,
the in-place upgrade of a schema-2 database, and ``models recover`` restoring rollouts from the journal.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tuneloop.errors import InputError, IntegrityError
from tuneloop.registry.api import ModelRegistry, open_registry
from tuneloop.registry.recovery import recover_database
from tuneloop.registry.rollouts import RECORD_KEYS, Rollout, RolloutConflict
from tuneloop.registry.sqlite import SqliteRegistry
from tuneloop.rollout.analysis import ArmCounts, CanaryAnalysis, RolloutPolicy

try:  # the real MLflow server (module-scoped); the MLflow cases skip where mlflow is not installed
    from test_registry_mlflow import mlflow_server  # noqa: F401

    HAVE_MLFLOW = True
except pytest.skip.Exception:
    HAVE_MLFLOW = False

POLICY = RolloutPolicy(weights=(0.05, 0.25, 1.0)).to_dict()


def model_dir(path: Path, value: float) -> Path:
    path.mkdir(parents=True)
    save_file({"w": np.full((2, 2), value, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def sqlite_registry(tmp_path: Path, versions: int) -> SqliteRegistry:
    """A SQLite registry in ``tmp_path/ws`` holding ``bot:1`` (champion) to ``bot:<versions>``."""
    reg = SqliteRegistry(tmp_path / "ws")
    for i in range(1, versions + 1):
        reg.register(
            "bot",
            model_dir(tmp_path / f"m{i}", i),
            artifact_kind="model",
            base_model="b",
            lineage={},
            metrics={},
            gates={},
        )
    reg.promote("bot", 1)
    return reg


@pytest.fixture(params=["sqlite", pytest.param("mlflow", marks=pytest.mark.slow)])
def reg(request, tmp_path, monkeypatch) -> ModelRegistry:
    """A registry holding ``bot:1`` (champion) and ``bot:2``, on each backend."""
    monkeypatch.setenv("TUNELOOP_USER", "ci-bot")
    if request.param == "mlflow":
        if not HAVE_MLFLOW:
            pytest.skip("mlflow is not installed (pip install 'tuneloop[mlflow]')")
        server = request.getfixturevalue("mlflow_server")
        r = open_registry(server["url"], tmp_path / "ws")
        name = f"bot-{tmp_path.name.replace('_', '-')}"[:60]  # one server for the module: a model per test
    else:
        r, name = SqliteRegistry(tmp_path / "ws"), "bot"
    for i in (1, 2, 3):
        r.register(
            name,
            model_dir(tmp_path / f"m{i}", i),
            artifact_kind="model",
            base_model="tiny",
            lineage={"i": i},
            metrics={},
            gates={},
        )
    r.promote(name, 1)
    r.test_model = name
    return r


def decision(action: str = "continue", canary_errors: int = 9) -> dict:
    """A real decision with statistics, from the analysis."""
    a = CanaryAnalysis(RolloutPolicy.from_dict(POLICY), now=0.0)
    d = a.observe(ArmCounts(requests=100, errors=canary_errors), ArmCounts(requests=1900, errors=19), now=5.0)
    return {**d.to_dict(), "action": action}


def test_start_update_promote_with_events_and_statistics(reg):
    m = reg.test_model
    r = reg.start_rollout(m, 2, policy=POLICY, actor="alice", reason="weekly", state_json='{"x": 1}')
    assert (r.rollout_id, r.status, r.weight, r.revision) == (f"{m}-r1", "running", 0.05, 1)
    assert (r.candidate, r.baseline) == (f"{m}:2", f"{m}:1")
    assert reg.aliases(m) == {"canary": 2, "champion": 1}
    assert reg.get_rollout(m) == r and reg.get_rollout(m, r.rollout_id) == r
    with pytest.raises(InputError, match="already has a running rollout"):
        reg.start_rollout(m, 3, policy=POLICY)

    big_state = json.dumps({"loglik": [0.123456789012345] * 3000})  # ~60 KB: many MLflow tag parts
    stepped = reg.update_rollout(
        m,
        r.rollout_id,
        revision=1,
        state_json=big_state,
        weight=0.25,
        decision=decision("step_up"),
        actor="tuneloop-rollout",
        reason="no harm shown",
    )
    assert (stepped.revision, stepped.weight, stepped.status) == (2, 0.25, "running")
    assert reg.get_rollout(m).state_json == big_state
    if reg.backend == "mlflow":  # the pointer and the parts of the current revision only: old parts are deleted
        keys = [k for k in reg.client.get_registered_model(m).tags if k.startswith("tuneloop.rollout.")]
        assert "tuneloop.rollout.1" in keys and len(keys) == 1 + -(-len(json.dumps(stepped.to_dict())) // 4500)
        assert all(k == "tuneloop.rollout.1" or k.startswith("tuneloop.rollout.1.2.") for k in keys)
    quiet = reg.update_rollout(m, r.rollout_id, revision=2, state_json='{"y": 2}', weight=0.25)
    assert quiet.revision == 3 and quiet.last_decision["action"] == "step_up"

    done = reg.update_rollout(
        m,
        r.rollout_id,
        revision=3,
        status="promoted",
        decision=decision("promote", 5),
        actor="tuneloop-rollout",
        reason="non-inferior",
    )
    assert (done.status, done.weight, done.revision) == ("promoted", 1.0, 4) and done.ended_at
    assert reg.aliases(m) == {"champion": 2, "previous": 1}
    with pytest.raises(InputError, match="already ended"):
        reg.update_rollout(m, r.rollout_id, revision=4, weight=0.5)

    kinds = [e.kind for e in reg.events(m) if e.kind.startswith("rollout") or e.kind == "promoted"]
    assert kinds == ["promoted", "rollout_started", "rollout_decision", "promoted", "rollout_ended"]
    ended = [e for e in reg.events(m) if e.kind == "rollout_ended"][0]
    assert ended.version == 2 and ended.actor == "tuneloop-rollout" and ended.reason == "non-inferior"
    stats = ended.details["decision"]["metrics"]["errors"]
    assert stats["canary"] == {"requests": 100, "events": 5, "rate": 0.05}
    assert {"estimate", "interval", "log_evalue", "threshold", "requests_seen", "requests_needed"} <= stats.keys()
    assert ended.details["canary"] == {"old": 2, "new": None}
    assert ended.details["champion"] == {"old": 1, "new": 2}


def test_rollback_and_abort_keep_the_champion(reg):
    m = reg.test_model
    r = reg.start_rollout(m, 2, policy=POLICY)
    back = reg.update_rollout(
        m,
        r.rollout_id,
        revision=1,
        status="rolled_back",
        decision=decision("rollback", 30),
        reason="errors: canary worse",
    )
    assert back.weight == 0.0 and reg.aliases(m) == {"champion": 1}
    r2 = reg.start_rollout(m, 3, policy=POLICY)
    assert r2.rollout_id == f"{m}-r2" and reg.aliases(m) == {"canary": 3, "champion": 1}
    reg.update_rollout(m, r2.rollout_id, revision=1, status="aborted", reason="pager")
    assert reg.aliases(m) == {"champion": 1}
    assert [x.status for x in reg.list_rollouts(m)] == ["rolled_back", "aborted"]
    assert reg.get_rollout(m).rollout_id == r2.rollout_id  # no running one: the latest


def test_compare_and_set_lets_one_decision_per_revision_land(reg):
    m = reg.test_model
    r = reg.start_rollout(m, 2, policy=POLICY)
    reg.update_rollout(m, r.rollout_id, revision=1, weight=0.25, decision=decision("step_up"))
    with pytest.raises(RolloutConflict, match="revision 2, not 1"):  # the second replica read revision 1 too
        reg.update_rollout(m, r.rollout_id, revision=1, status="rolled_back", decision=decision("rollback"))
    assert reg.get_rollout(m).status == "running" and reg.aliases(m)["canary"] == 2
    assert sum(e.kind == "rollout_decision" for e in reg.events(m)) == 1


def test_bad_input_is_refused(reg):
    m = reg.test_model
    with pytest.raises(InputError, match="already the champion"):
        reg.start_rollout(m, 1, policy=POLICY)
    with pytest.raises(InputError, match="has no rollout"):
        reg.get_rollout(m, "nope")
    assert reg.get_rollout(m) is None and reg.list_rollouts(m) == []
    r = reg.start_rollout(m, 2, policy=POLICY)
    with pytest.raises(InputError, match="from 0 to 1"):
        reg.update_rollout(m, r.rollout_id, revision=1, weight=1.5)
    with pytest.raises(InputError, match="status"):
        reg.update_rollout(m, r.rollout_id, revision=1, status="done")
    with pytest.raises(InputError, match="finite"):
        reg.update_rollout(m, r.rollout_id, revision=1, decision={"x": float("inf")})


def test_sqlite_rollout_survives_a_reopen_and_a_schema_2_database_is_upgraded(tmp_path):
    reg = sqlite_registry(tmp_path, 2)
    with sqlite3.connect(tmp_path / "ws" / "registry.db") as conn:  # what tuneloop wrote before rollouts (schema 2)
        conn.executescript("DROP TABLE rollouts; PRAGMA user_version = 2;")
    reg = SqliteRegistry(tmp_path / "ws")
    r = reg.start_rollout("bot", 2, policy=POLICY)
    reg.update_rollout("bot", r.rollout_id, revision=1, weight=0.25, state_json="{}", decision=decision("step_up"))
    again = SqliteRegistry(tmp_path / "ws")  # another process, or the gateway after a restart
    assert again.get_rollout("bot").revision == 2 and again.get_rollout("bot").weight == 0.25
    with sqlite3.connect(tmp_path / "ws" / "registry.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        with pytest.raises(sqlite3.DatabaseError, match="kept"):
            conn.execute("DELETE FROM rollouts")


def test_recover_restores_rollouts_from_the_journal(tmp_path):
    reg = sqlite_registry(tmp_path, 3)
    first = reg.start_rollout("bot", 2, policy=POLICY)
    reg.update_rollout("bot", first.rollout_id, revision=1, status="rolled_back", decision=decision("rollback", 30))
    running = reg.start_rollout("bot", 3, policy=POLICY, state_json='{"s": 0}')
    reg.update_rollout(
        "bot", running.rollout_id, revision=1, weight=0.25, state_json='{"s": 1}', decision=decision("step_up")
    )
    reg.update_rollout("bot", running.rollout_id, revision=2, state_json='{"s": 2}')  # no decision: not journaled
    (tmp_path / "ws" / "registry.db").unlink()

    report = recover_database(tmp_path / "ws")
    assert report["rollouts"] == ["bot-r1", "bot-r2"]
    rec = SqliteRegistry(tmp_path / "ws")
    assert [r.status for r in rec.list_rollouts("bot")] == ["rolled_back", "running"]
    back = rec.get_rollout("bot")
    assert (back.rollout_id, back.weight, back.revision, back.state_json) == ("bot-r2", 0.25, 2, '{"s": 1}')
    assert rec.aliases("bot") == {"canary": 3, "champion": 1}
    assert [e.kind for e in rec.events("bot") if e.kind.startswith("rollout")] == [
        "rollout_started",
        "rollout_ended",
        "rollout_started",
        "rollout_decision",
    ]
    # the recovered rollout goes on: its revision is the one recovered
    done = rec.update_rollout("bot", "bot-r2", revision=2, status="promoted", decision=decision("promote", 5))
    assert done.status == "promoted" and rec.aliases("bot") == {"champion": 3, "previous": 1}


def test_the_controller_rolls_back_a_bad_canary_on_this_backend(reg, tmp_path):
    from test_rollout_controller import POLICY as SMALL_STEPS
    from test_rollout_controller import run_rollout
    from tuneloop.monitor.requestlog import open_request_log
    from tuneloop.rollout import controller

    m = reg.test_model
    controller.start(reg, f"{m}:2", policy=SMALL_STEPS, actor="ci", now=1000.0)
    with open_request_log(tmp_path / "requests.db") as log:
        decisions = run_rollout(
            reg, log, err={"baseline": 0.01, "canary": 0.10}, neg={"baseline": 0.1, "canary": 0.1}, model=m
        )
    assert decisions[-1].action == "rollback" and reg.get_rollout(m).status == "rolled_back"
    assert reg.aliases(m) == {"champion": 1}
    ended = [e for e in reg.events(m) if e.kind == "rollout_ended"]
    assert (
        ended[0].details["decision"]["metrics"]["errors"]["log_evalue"]
        >= ended[0].details["decision"]["metrics"]["errors"]["threshold"]
    )


def test_sqlite_compare_and_set_under_real_concurrency(tmp_path):
    """Eight threads (own connections, as replicas would have) update from the same revision: exactly one lands."""
    import threading

    reg = sqlite_registry(tmp_path, 2)
    r = reg.start_rollout("bot", 2, policy=POLICY)
    results, barrier = [], threading.Barrier(8)

    def replica(k: int) -> None:
        mine = SqliteRegistry(tmp_path / "ws")
        barrier.wait()
        try:
            mine.update_rollout(
                "bot", r.rollout_id, revision=1, weight=0.25, decision=decision("step_up"), reason=f"replica {k}"
            )
            results.append(k)
        except RolloutConflict:
            results.append(None)

    threads = [threading.Thread(target=replica, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and sum(x is not None for x in results) == 1
    assert reg.get_rollout("bot").revision == 2
    assert sum(e.kind == "rollout_decision" for e in reg.events("bot")) == 1


def test_the_rollout_record_keeps_its_json_form_and_refuses_a_damaged_one(tmp_path):
    """``to_dict()`` is the dict the registry returned before rollouts were typed: RECORD_KEYS order from
    ``start_rollout``, sorted keys as read back from storage; a stored record without every key is refused."""
    reg = sqlite_registry(tmp_path, 2)
    started = reg.start_rollout("bot", 2, policy=POLICY, reason="try")
    assert list(started.to_dict()) == list(RECORD_KEYS) and started.to_dict()["candidate"] == "bot:2"
    back = reg.get_rollout("bot")
    assert back == started and list(back.to_dict()) == sorted(RECORD_KEYS)
    assert Rollout.from_dict(back.to_dict()).to_dict() == back.to_dict()
    with pytest.raises(IntegrityError, match="lacks revision"):
        Rollout.from_dict({k: v for k, v in back.to_dict().items() if k != "revision"})
