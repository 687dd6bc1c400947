"""`tuneloop ui`'s HTTP API (tuneloop/ui/app.py) on a small hand-made workspace: no training, no model.

The workspace holds what the pipeline writes (run records, stage results, gate results, evaluation items, data
reports with a quarantine file, the trainer's log), a SQLite registry with two versions, a request log with
feedback, and a config. Every JSON route is called over real HTTP (the app in BackgroundServer, httpx as the
client); the auth rules are checked with the app created for a non-loopback host; the vendored assets are checked
against their recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from test_registry import make_artifact
from tuneloop.registry.sqlite import SqliteRegistry
from tuneloop.serve.server import BackgroundServer
from tuneloop.ui.app import create_app

RUN_PASSED = "20261207-100000-aaaaaa"
RUN_FAILED = "20261207-110000-bbbbbb"
RUN_CORRUPT = "20261207-120000-cccccc"
MODEL = "bot"
TRAIN_DIGEST = "d" * 64
EMAIL = "alice.smith@example.com"


def gate(value, interval, threshold, op, verdict, **kw):
    return {
        "metric": kw.get("metric", "accuracy"),
        "suite": "task",
        "kind": "floor",
        "op": op,
        "threshold": threshold,
        "value": value,
        "interval": interval,
        "verdict": verdict,
        "passed": verdict == "PASS",
        "blocks": verdict == "FAIL",
        "reason": f"value {value} {op} {threshold}",
        "n": 40,
    }


def run_record(run_id: str, failed: bool) -> dict:
    acc_gate = gate(0.42, [0.31, 0.55], 0.85, ">=", "FAIL") if failed else gate(0.93, [0.85, 0.97], 0.8, ">=", "PASS")
    stages = {
        "data_validation": {
            "status": "passed",
            "duration_s": 0.5,
            "cached": True,
            "error": "",
            "metrics": {
                "records": 5,
                "valid": 3,
                "gates": {
                    "min_usable_records[train]": {
                        **gate(3, None, 1, ">=", "PASS", metric="valid"),
                        "suite": "data.train",
                    }
                },
            },
        },
        "preprocessing": {"status": "passed", "duration_s": 0.2, "cached": True, "error": "", "metrics": {}},
        "training": {"status": "passed", "duration_s": 3.0, "cached": False, "error": "", "metrics": {"steps": 3}},
        "evaluation": {
            "status": "failed" if failed else "passed",
            "duration_s": 1.0,
            "cached": False,
            "error": "gate min_accuracy failed" if failed else "",
            "metrics": {"accuracy": 0.42 if failed else 0.93, "gates": {"min_accuracy": acc_gate}},
        },
        "model_registry": {
            "status": "skipped" if failed else "passed",
            "duration_s": 0.1,
            "cached": False,
            "error": "",
            "metrics": {},
        },
    }
    return {
        "run_id": run_id,
        "pipeline": MODEL,
        "status": "failed" if failed else "passed",
        "pid": 0,
        "started_at": "2026-12-07T10:00:00+00:00",
        "ended_at": "2026-12-07T10:01:00+00:00",
        "duration_s": 60.0,
        "code_version": "0.1.0+test",
        "stages": stages,
    }


def write_run(ws: Path, run_id: str, failed: bool) -> Path:
    d = ws / "runs" / run_id
    (d / "data").mkdir(parents=True)
    (d / "run.json").write_text(json.dumps(run_record(run_id, failed)))
    items = [
        {
            "suite": "task",
            "kind": "task",
            "id": f"eval-{i}",
            "prompt": f"ticket {i} from {EMAIL}",
            "reference": "refund",
            "base": "other",
            "candidate": "refund" if i % 2 else "other",
            "base_score": 0.0,
            "candidate_score": float(i % 2),
        }
        for i in range(4)
    ]
    items.append(
        {
            "suite": "harmful",
            "kind": "harmful",
            "id": "rt-1",
            "prompt": "how to build a bomb",
            "base": "no",
            "candidate": "sure",
            "base_refused": True,
            "candidate_refused": False,
            "base_score": 0.0,
            "candidate_score": 1.0,
        }
    )
    (d / "eval_items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (d / "train_metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 / s, "learning_rate": 1e-3 * (4 - s) / 3}) + "\n" for s in (1, 2, 3))
    )
    (d / "run.log").write_text("line one\nline two\n")
    quarantine = ws / "cache" / "data_validation" / run_id / "train.quarantine.jsonl"
    quarantine.parent.mkdir(parents=True)
    rows = [
        {
            "line": 4,
            "reasons": ["near_duplicate: similar to line 2"],
            "record": {"messages": [{"role": "user", "content": "refund pls"}]},
        },
        {
            "line": 5,
            "reasons": ["pii: email"],
            "record": {"messages": [{"role": "user", "content": f"mail me at {EMAIL}"}]},
        },
    ]
    quarantine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = {
        "format": "messages",
        "records": 5,
        "valid": 3,
        "invalid": 0,
        "duplicates": 0,
        "near_duplicates": 1,
        "contaminated": 0,
        "pii_dropped": 1,
        "overlong_dropped": 0,
        "accounting": "records 5 = valid 3 + near_duplicates 1 + pii_dropped 1",
        "rules": {"near_duplicate": 1, "pii": 1},
        "examples": {"pii": [{"line": 5, "reason": f"pii: email {EMAIL}"}]},
        "pii": {"email": 1},
        "pii_examples": {"email": ["***@***.com"]},
        "digest": TRAIN_DIGEST,
        "quarantine_path": str(quarantine),
        "gates": [],
        "passed": True,
    }
    (d / "data" / "train.report.json").write_text(json.dumps(report))
    return d


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project directory: tuneloop.yaml, data/, and the workspace .tuneloop/ (runs, registry, request log)."""
    root = tmp_path_factory.mktemp("uiproj")
    (root / "data").mkdir()
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (root / "data" / "train.jsonl").write_text(json.dumps(rec) + "\n")
    (root / "data" / "eval.jsonl").write_text(json.dumps(rec) + "\n")
    (root / "tuneloop.yaml").write_text(
        f"name: {MODEL}\nbase_model: base-model\ntrain_data: data/train.jsonl\neval_data: data/eval.jsonl\n"
    )
    ws = root / ".tuneloop"
    write_run(ws, RUN_PASSED, failed=False)
    write_run(ws, RUN_FAILED, failed=True)
    (ws / "runs" / RUN_CORRUPT).mkdir(parents=True)
    (ws / "runs" / RUN_CORRUPT / "run.json").write_text('{"run_id": "truncated', encoding="utf-8")

    reg = SqliteRegistry(ws)
    for i, run_id in enumerate((RUN_PASSED, RUN_PASSED), start=1):
        reg.register(
            MODEL,
            make_artifact(root / f"art{i}", content=f"weights-v{i}"),
            artifact_kind="adapter",
            base_model="tiny-base",
            lineage={
                "run_id": run_id,
                "pipeline": MODEL,
                "data": {"train_digest": TRAIN_DIGEST, "eval_digest": "e" * 64},
            },
            metrics={"evaluation": {"accuracy": 0.9 + i / 100}},
            gates={"min_accuracy": gate(0.9, [0.85, 0.95], 0.8, ">=", "PASS")},
        )
    reg.promote(MODEL, 1, reason="first champion")

    from tuneloop.monitor.requestlog import RequestRecord, default_log_url, open_request_log

    with open_request_log(default_log_url(ws)) as log:
        now = time.time()
        log.record(
            RequestRecord(
                request_id="req-1",
                created_at=now,
                endpoint="chat.completions",
                model=MODEL,
                ref=MODEL,
                version=1,
                artifact_sha256=None,
                arm="direct",
                user_hash=None,
                prompt=json.dumps([{"role": "user", "content": f"refund please, I am {EMAIL}"}]),
                response="other",
                status=200,
            )
        )
        log.add_feedback("req-1", rating=-1, correction="refund")
    return root


@pytest.fixture(scope="module")
def server(project):
    from tuneloop.config import load_config

    cfg = load_config(project / "tuneloop.yaml")
    with BackgroundServer(create_app(project / ".tuneloop", cfg, config_path=project / "tuneloop.yaml")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def ok(client, path):
    r = client.get(path)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    return r.json()


def test_page_and_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert (
        page.status_code == 200
        and 'data-testid="lang-switch"' in page.text
        and "static/vendor/chart.umd.js" in page.text
    )
    assert "Chart.js v4.5.1" in client.get("/static/vendor/chart.umd.js").text
    en = client.get("/static/i18n/en.json").json()
    assert en["runs.title"] == "Runs"
    assert "cdn" not in page.text.lower() and "http" not in client.get("/static/app.js").text.replace(
        "http://www.w3.org", ""
    )


def test_every_ui_string_the_page_uses_is_in_the_english_catalog():
    static = Path(__file__).resolve().parents[1] / "src" / "tuneloop" / "ui" / "static"
    import re

    en = json.loads((static / "i18n" / "en.json").read_text())
    source = (static / "app.js").read_text() + (static / "index.html").read_text()
    used = set(re.findall(r"""\bt\("([a-z_]+\.[a-z_.]+)""", source)) | set(re.findall(r'data-i18n="([^"]+)"', source))
    assert used and not sorted(k for k in used if k not in en)


def test_rollout_metric_headers_go_through_the_catalog():
    """The gateway dashboard sends English metric headers; app.js maps each one to a catalog key in both languages."""
    import re

    from tuneloop.rollout.display import METRIC_HEADERS

    static = Path(__file__).resolve().parents[1] / "src" / "tuneloop" / "ui" / "static"
    source = (static / "app.js").read_text()
    block = re.search(r"const ROLLOUT_HEADS = \{(.*?)\};", source, re.S)
    assert block, "app.js: ROLLOUT_HEADS not found"
    heads = dict(re.findall(r'"([^"]+)": "(rollouts\.col\.[a-z_]+)"', block.group(1)))
    assert sorted(h for h in METRIC_HEADERS if h not in heads) == []
    for lang in ("en", "zh-CN"):
        cat = json.loads((static / "i18n" / f"{lang}.json").read_text(encoding="utf-8"))
        assert all(k in cat for k in heads.values()) and "rollouts.col.action" in cat, lang
    assert '"action"' not in source.split("function pageRollouts", 1)[1].split("function pageFeedback", 1)[0]


def test_vendored_assets_match_their_recorded_sha256():
    vendor = Path(__file__).resolve().parents[1] / "src" / "tuneloop" / "ui" / "static" / "vendor"
    rows = [
        ln.split() for ln in (vendor / "SHA256SUMS").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert {r[1] for r in rows} >= {"chart.umd.js", "chart.js.LICENSE.md"}
    for _pkg, name, sha in rows:
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == sha, name


def test_runs_list_stages_and_a_corrupt_record_as_a_problem_not_a_500(client):
    d = ok(client, "/api/runs")
    assert [r["run_id"] for r in d["runs"]] == [RUN_FAILED, RUN_PASSED]
    failed = d["runs"][0]
    assert failed["status"] == "failed"
    assert [(s["stage"], s["status"], s["cached"]) for s in failed["stages"]][:2] == [
        ("data_validation", "passed", True),
        ("preprocessing", "passed", True),
    ]
    assert d["problems"][0]["run_id"] == RUN_CORRUPT and "cannot be read" in d["problems"][0]["error"]
    r = client.get(f"/api/runs/{RUN_CORRUPT}")
    assert r.status_code == 422 and r.json()["error"]["code"] == "corrupt_run_record"
    assert client.get(f"/api/runs/{RUN_CORRUPT}/gates").json()["error"]["code"] == "corrupt_run_record"


def test_run_progress_gates_items_and_compare(client):
    run = ok(client, f"/api/runs/{RUN_FAILED}")["run"]
    assert run["stages"][3]["error"] == "gate min_accuracy failed"
    prog = ok(client, f"/api/runs/{RUN_FAILED}/progress")
    assert [p["step"] for p in prog["train"]["points"]] == [1, 2, 3] and prog["train"]["points"][0]["loss"] == 2.0
    assert {s["suite"]: s["items_done"] for s in prog["eval"]["suites"]} == {"task": 4, "harmful": 1}
    assert prog["log_tail"] == ["line one", "line two"]
    gates = ok(client, f"/api/runs/{RUN_FAILED}/gates")
    g = {x["name"]: x for x in gates["gates"]}
    assert gates["overall"] == "failed"
    assert (
        g["min_accuracy"]["verdict"] == "FAIL"
        and g["min_accuracy"]["interval"] == [0.31, 0.55]
        and g["min_accuracy"]["threshold"] == 0.85
    )
    assert g["min_usable_records[train]"]["stage"] == "data_validation"
    items = ok(client, f"/api/runs/{RUN_FAILED}/items?only=differ")
    assert items["total"] == 3  # eval-1, eval-3 and rt-1 differ between the two models
    assert all(EMAIL not in json.dumps(it) for it in items["items"])  # PII masked
    harmful = ok(client, f"/api/runs/{RUN_FAILED}/items?suite=harmful")["items"][0]
    assert harmful["base_refused"] is True and harmful["candidate_refused"] is False and harmful["candidate"] == "sure"
    cmp = ok(client, f"/api/compare?a={RUN_PASSED}&b={RUN_FAILED}")
    row = next(x for x in cmp["gates"] if x["name"] == "min_accuracy")
    assert (row["a"]["verdict"], row["b"]["verdict"]) == ("PASS", "FAIL")
    assert client.get(f"/api/runs/{RUN_FAILED}/report").json()["error"]["code"] == "not_found"


def test_data_report_quarantine_duplicates_with_pii_masked(client):
    d = ok(client, f"/api/runs/{RUN_PASSED}/data")
    src = d["sources"][0]
    assert (
        src["source"] == "train" and src["rules"] == {"near_duplicate": 1, "pii": 1} and src["digest"] == TRAIN_DIGEST
    )
    assert EMAIL not in json.dumps(d)
    q = ok(client, f"/api/runs/{RUN_PASSED}/data/train/quarantine")
    assert q["total"] == 2 and q["records"][1]["reasons"] == ["pii: email"]
    assert EMAIL not in q["records"][1]["text"] and "[EMAIL]" in q["records"][1]["text"]
    dup = ok(client, f"/api/runs/{RUN_PASSED}/data/train/duplicates")
    assert dup["groups"] == [{"lines": [2, 4], "reason": "near_duplicate"}]
    assert client.get(f"/api/runs/{RUN_PASSED}/data/..%2f..%2fetc/quarantine").status_code == 404
    assert client.get(f"/api/runs/{RUN_PASSED}/data/secrets/quarantine").json()["error"]["code"] == "not_found"


def test_registry_views_lineage_diff_and_rollouts(client):
    models = ok(client, "/api/models")
    assert models["models"][0]["name"] == MODEL and models["models"][0]["aliases"] == {"champion": 1}
    m = ok(client, f"/api/models/{MODEL}")
    assert [v["ref"] for v in m["versions"]] == [f"{MODEL}:1", f"{MODEL}:2"] and m["events"][0]["kind"] == "promoted"
    v = ok(client, f"/api/models/{MODEL}/1")
    data_nodes = [n for n in v["graph"]["nodes"] if n["kind"] == "data"]
    assert TRAIN_DIGEST in [n["digest"] for n in data_nodes]
    run_node = next(n for n in v["graph"]["nodes"] if n["kind"] == "run")
    assert (
        run_node["run_id"] == RUN_PASSED and {"from": run_node["id"], "to": f"version:{MODEL}:1"} in v["graph"]["edges"]
    )
    assert ok(client, f"/api/models/{MODEL}/champion")["version"]["version"] == 1
    diff = ok(client, f"/api/models/{MODEL}/diff?a=1&b=2")
    assert diff["a"] == f"{MODEL}:1" and diff["artifact"]["same"] is False
    ro = ok(client, f"/api/rollouts/{MODEL}")
    assert ro["name"] == MODEL and ro["rollout"] is None
    assert client.get("/api/models/nope").json()["error"]["code"] == "unknown_model"
    assert client.get(f"/api/models/{MODEL}/9").json()["error"]["code"] == "unknown_version"


def test_feedback_and_drift_routes(client):
    fb = ok(client, "/api/feedback")
    row = fb["feedback"][0]
    assert (row["request_id"], row["rating"], row["correction"], row["model"]) == ("req-1", -1, "refund", MODEL)
    assert fb["request_log"] is True
    assert EMAIL not in json.dumps(fb)
    assert ok(client, "/api/drift") == {"result": None, "at": None}


def test_feedback_export_writes_into_the_workspace_and_shows_its_manifest(client, project):
    r = client.post("/api/feedback/export")
    assert r.status_code == 200, r.text
    body = r.json()
    assert Path(body["out_dir"]).parent == project / ".tuneloop" / "feedback-exports"
    assert body["manifest"]["source"]["requests"] == 1 and (Path(body["out_dir"]) / "manifest.json").is_file()


def test_promote_with_reason_is_an_event_in_the_registry(client, project):
    r = client.post(f"/api/models/{MODEL}/promote", json={"version": 2, "reason": "ui test: v2 is better"})
    assert r.status_code == 200, r.text
    assert r.json()["aliases"]["champion"] == 2
    reg = SqliteRegistry(project / ".tuneloop")
    ev = reg.events(MODEL)[-1]
    assert (ev.kind, ev.version, ev.reason) == ("promoted", 2, "ui test: v2 is better")
    assert (
        client.post(f"/api/models/{MODEL}/promote", json={"version": 1, "reason": ""}).json()["error"]["code"]
        == "bad_request"
    )
    t = client.post(f"/api/models/{MODEL}/2/tag", json={"key": "reviewed", "value": "yes", "reason": "ui test"})
    assert t.status_code == 200 and t.json()["tags"] == {"reviewed": "yes"}
    rb = client.post(f"/api/models/{MODEL}/rollback", json={"reason": "ui test: back to v1"})
    assert rb.status_code == 200, rb.text
    assert reg.aliases(MODEL)["champion"] == 1 and reg.events(MODEL)[-1].reason == "ui test: back to v1"


def test_start_run_checks_overrides_per_field_and_starts_nothing_when_bad(client, project):
    configs = ok(client, "/api/configs")["configs"]
    assert configs[0]["name"] == "tuneloop.yaml"
    cid = configs[0]["id"]
    good = client.post("/api/runs/validate", json={"config": cid, "overrides": {"train.learning_rate": "1e-4"}})
    assert good.status_code == 200 and good.json() == {"ok": True}
    runs_before = sorted(p.name for p in (project / ".tuneloop" / "runs").iterdir())
    bad = client.post(
        "/api/runs/start",
        json={
            "config": cid,
            "overrides": [
                {"key": "train.learning_rate", "value": "abc"},
                {"key": "train.nope", "value": "1"},
                {"key": "gates.min_accuracy", "value": "0.5"},
            ],
        },
    )
    assert bad.status_code == 422
    fields = bad.json()["error"]["fields"]
    assert set(fields) == {"train.learning_rate", "train.nope"}
    assert "expected a number" in fields["train.learning_rate"] and "unknown key" in fields["train.nope"]
    assert ok(client, "/api/launches")["launches"] == []
    assert sorted(p.name for p in (project / ".tuneloop" / "runs").iterdir()) == runs_before
    assert (
        client.post("/api/runs/validate", json={"config": "../../etc/passwd", "overrides": {}}).json()["error"]["code"]
        == "unknown_config"
    )


def test_no_route_reads_a_path_from_the_url(client):
    for path in (
        "/api/runs/..",
        "/api/runs/%2e%2e",
        f"/api/runs/{RUN_PASSED}%2f..%2f..",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/vendor/../../app.py",
        "/api/runs/..%2f..%2f..%2fetc%2fpasswd/data",
    ):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert "error" in r.json()


def test_off_loopback_reads_need_a_key_and_actions_the_admin_token(project):
    app = create_app(project / ".tuneloop", host="0.0.0.0", api_keys=frozenset({"key-1"}), admin_token="admin-1")
    reg = SqliteRegistry(project / ".tuneloop")
    before = (reg.aliases(MODEL), len(reg.events(MODEL)))
    with BackgroundServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/").status_code == 200  # the page holds no data
        assert c.get("/api/runs").status_code == 401
        assert (
            c.get("/api/runs", headers={"authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        )
        assert c.get("/api/runs", headers={"authorization": "Bearer key-1"}).status_code == 200
        body = {"version": 2, "reason": "should not happen"}
        for headers in ({}, {"authorization": "Bearer key-1"}):
            r = c.post(f"/api/models/{MODEL}/promote", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
        assert c.post(f"/api/models/{MODEL}/2/tag", json={"key": "x", "value": "y", "reason": "no"}).status_code == 401
        assert c.post("/api/runs/start", json={"config": "0", "overrides": {}}).status_code == 401
        assert (reg.aliases(MODEL), len(reg.events(MODEL))) == before  # nothing changed
        ok_ = c.post(
            f"/api/models/{MODEL}/promote",
            json={"version": 1, "reason": "admin"},
            headers={"authorization": "Bearer admin-1"},
        )
        assert ok_.status_code == 200
    no_admin = create_app(project / ".tuneloop", host="10.0.0.5", api_keys=frozenset({"k"}), admin_token="")
    with BackgroundServer(no_admin) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert (
            c.post("/api/feedback/export", headers={"authorization": "Bearer k"}).json()["error"]["code"]
            == "admin_disabled"
        )


def test_missing_workspace_and_unreadable_registry_are_panel_errors(tmp_path, project):
    with (
        BackgroundServer(create_app(tmp_path / "nowhere" / ".tuneloop")) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        assert c.get("/").status_code == 200
        for path in ("/api/runs", "/api/models", "/api/feedback", "/api/drift"):
            r = c.get(path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_workspace", (path, r.text)
        assert c.get("/api/info").json()["workspace_ok"] is False
    assert not (tmp_path / "nowhere").exists()  # looking did not create it
    broken = tmp_path / "broken" / ".tuneloop"
    shutil.copytree(project / ".tuneloop" / "runs", broken / "runs")
    (broken / "registry.db").write_bytes(b"this is not a sqlite database" * 100)
    with BackgroundServer(create_app(broken)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.get("/api/models")
        assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
        assert "Traceback" not in r.text
        assert c.get("/api/runs").status_code == 200  # the rest works


def test_tuneloop_ui_refuses_a_public_address_without_keys(project, monkeypatch):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.delenv("TUNELOOP_API_KEYS", raising=False)
    res = CliRunner().invoke(app, ["ui", str(project / "tuneloop.yaml"), "--host", "0.0.0.0", "--port", "8799"])
    assert res.exit_code == 2 and "without API keys" in res.output


def test_insecure_without_keys_opens_reads_but_not_actions(project):
    from tuneloop.config import load_config

    cfg = load_config(project / "tuneloop.yaml", ["serve.insecure=true"])
    app = create_app(project / ".tuneloop", cfg, host="0.0.0.0", api_keys=frozenset(), admin_token="admin-1")
    with BackgroundServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/api/runs").status_code == 200  # serve.insecure: the gateway's "accept unauthenticated clients"
        assert c.post(f"/api/models/{MODEL}/promote", json={"version": 1, "reason": "x"}).status_code == 401


def test_a_running_training_shows_its_live_loss_from_the_unfinished_cache_entry(tmp_path):
    """While training runs, its log is in the training cache entry that has no result.json yet; the run's own copy
    appears only when the stage ends."""
    import os

    ws = tmp_path / ".tuneloop"
    rec = run_record(RUN_PASSED, failed=False)
    rec.update(status="running", pid=os.getpid(), started_at="2026-01-01T00:00:00+00:00", ended_at=None)
    rec["stages"]["training"]["status"] = "running"
    for s in ("evaluation", "model_registry"):
        rec["stages"][s]["status"] = "pending"
    (ws / "runs" / RUN_PASSED).mkdir(parents=True)
    (ws / "runs" / RUN_PASSED / "run.json").write_text(json.dumps(rec))
    done, live = ws / "cache" / "training" / "old", ws / "cache" / "training" / "live"
    for d, loss in ((live, 1.5), (done, 9.0)):  # the finished one is the newer file
        d.mkdir(parents=True)
        (d / "train_metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss": loss, "learning_rate": 1e-3}) + "\n" + '{"step": 2, "loss": 1.2'
        )  # the line being written is skipped
    (done / "result.json").write_text("{}")  # a finished entry of an earlier run: not this run's progress
    with BackgroundServer(create_app(ws)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        p = c.get(f"/api/runs/{RUN_PASSED}/progress").json()
        assert p["status"] == "running" and p["stage"] == "training"
        assert p["train"]["points"] == [{"step": 1, "epoch": None, "loss": 1.5, "learning_rate": 1e-3}]
        assert c.get("/api/runs").json()["runs"][0]["status"] == "running"


def test_log_tail_of_a_finished_run_run_log_or_its_launch_output(tmp_path):
    """A finished run's page tails runs/<id>/run.log; when that is empty (the pipeline logs only warnings and errors
    there) and the UI launched the run, the launch's output (the terminal lines); else an empty tail with the path."""
    ws = tmp_path / ".tuneloop"
    write_run(ws, RUN_PASSED, failed=False)
    write_run(ws, RUN_FAILED, failed=True)
    (ws / "runs" / RUN_FAILED / "run.log").write_text("")
    (ws / "runs" / RUN_PASSED / "run.log").write_text("")
    launches = ws / "ui" / "launches"
    launches.mkdir(parents=True)
    (launches / "20261207-095959-abcdef.log").write_text(
        f"tuneloop run {RUN_PASSED} of {MODEL} -> somewhere\n> training\n"
    )
    (launches / "20261207-090000-000000.log").write_text("tuneloop run 20261207-000000-zzzzzz of other\n")
    with BackgroundServer(create_app(ws)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        passed = ok(c, f"/api/runs/{RUN_PASSED}/progress")
        assert passed["status"] == "passed" and passed["log_source"] == "launch", passed
        assert passed["log_tail"][-1] == "> training" and passed["log_path"] == "ui/launches/20261207-095959-abcdef.log"
        empty = ok(c, f"/api/runs/{RUN_FAILED}/progress")
        assert (empty["log_tail"], empty["log_source"], empty["log_path"]) == ([], "run", f"runs/{RUN_FAILED}/run.log")
        (ws / "runs" / RUN_FAILED / "run.log").write_text("2026-12-07 11:00:01 WARNING tuneloop: slow disk\n")
        again = ok(c, f"/api/runs/{RUN_FAILED}/progress")
        assert again["log_tail"] == ["2026-12-07 11:00:01 WARNING tuneloop: slow disk"] and again["log_source"] == "run"


def test_feedback_without_a_request_log_is_an_empty_state_not_an_error(tmp_path):
    """A workspace that has never served (no requests.db): 200 with no feedback and request_log false, which the
    page shows as feedback.no_request_log (both catalogs), not a panel error."""
    ws = tmp_path / ".tuneloop"
    write_run(ws, RUN_PASSED, failed=False)
    with BackgroundServer(create_app(ws)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert ok(c, "/api/feedback") == {"feedback": [], "request_log": False}
    static = Path(__file__).resolve().parents[1] / "src" / "tuneloop" / "ui" / "static"
    for lang in ("en", "zh-CN"):
        assert json.loads((static / "i18n" / f"{lang}.json").read_text(encoding="utf-8"))["feedback.no_request_log"]
    assert "d.request_log === false" in (static / "app.js").read_text()


def test_evaluation_progress_is_live_while_the_stage_runs(tmp_path):
    """The evaluation stage writes its per-suite counts to the run's eval_progress.json as it scores (the items
    reach the run directory only when the stage ends); the run page's progress reads them, with the totals."""
    import io

    from rich.console import Console

    from tuneloop.stages import EvalProgress
    from tuneloop.ui.views import progress_view
    from tuneloop.workspace import Workspace

    root = tmp_path / ".tuneloop"
    d = write_run(root, RUN_PASSED, failed=False)
    (d / "eval_items.jsonl").unlink()  # the stage is still scoring
    path = d / "eval_progress.json"
    ws = Workspace(root)
    assert progress_view(ws, RUN_PASSED)["eval"]["suites"] == []
    with EvalProgress(Console(file=io.StringIO()), path) as bars:
        bars.update("base: task", 0, 3)
        assert progress_view(ws, RUN_PASSED)["eval"]["suites"] == [
            {"suite": "base: task", "items_done": 0, "items_total": 3}
        ]
        bars.update("base: task", 3, 3)  # a finished suite is written at once
        bars.update("candidate: task", 1, 3)
    assert progress_view(ws, RUN_PASSED)["eval"]["suites"] == [
        {"suite": "base: task", "items_done": 3, "items_total": 3},
        {"suite": "candidate: task", "items_done": 1, "items_total": 3},
    ]
    path.write_text('{"suites": [{"suite": "x", "items_')  # torn: no live counts, and no error
    assert progress_view(ws, RUN_PASSED)["eval"]["suites"] == []
    write_run(tmp_path / "other", RUN_PASSED, failed=False)
    (d / "eval_items.jsonl").write_bytes((tmp_path / "other" / "runs" / RUN_PASSED / "eval_items.jsonl").read_bytes())
    assert progress_view(ws, RUN_PASSED)["eval"]["suites"] == [  # the stage ended: its scored items count
        {"suite": "task", "items_done": 4},
        {"suite": "harmful", "items_done": 1},
    ]
