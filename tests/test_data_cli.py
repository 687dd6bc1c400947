"""`tuneloop data validate` / `tuneloop data diff` as users call them, and a pipeline run stopped by a data gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).parents[1] / ".." / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")
TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]
KEYS = {
    "format",
    "records",
    "valid",
    "invalid",
    "duplicates",
    "near_duplicates",
    "contaminated",
    "pii",
    "digest",
    "rules",
}


def tl(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(u, a):
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


@needs_shared
def test_validate_json_on_shared_datasets(tmp_path):
    r = tl("data", "validate", SHARED / "glaive_toolcall_en_demo.json", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert KEYS <= set(rep)
    assert (rep["format"], rep["records"]) == ("sharegpt", 300)
    assert (
        rep["records"]
        == rep["valid"]
        + rep["invalid"]
        + rep["duplicates"]
        + rep["near_duplicates"]
        + rep["contaminated"]
        + rep["pii_dropped"]
        + rep["overlong_dropped"]
    )
    assert rep["pii"]["email"] > 0 and rep["passed"] is True
    out = tmp_path / "tuneloop-data-report"
    for suffix in ("report.json", "report.html", "clean.jsonl", "quarantine.jsonl"):
        assert (out / f"glaive_toolcall_en_demo.json.{suffix}").is_file()  # named from the whole file name
    html = (out / "glaive_toolcall_en_demo.json.report.html").read_text()
    assert html.startswith("<!doctype html>") and "<script" not in html and "sharegpt" in html

    # identity.json: its {{name}} placeholders fail the min_valid_ratio gate -> exit 1, with the report
    r = tl("data", "validate", SHARED / "identity.json", "--json", "--out", tmp_path / "id")
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["rules"] == {"placeholder": 85} and rep["passed"] is False
    assert "min_valid_ratio" in rep["failures"][0] and str(tmp_path / "id") in rep["failures"][0]
    assert "overlong" in rep["rules_not_checked"]  # no tokenizer for a bare file

    r = tl("data", "validate", SHARED / "alpaca_en_demo.json", "--format", "text", "--json", "--out", tmp_path / "t")
    assert r.returncode == 1 and json.loads(r.stdout)["rules"] == {"missing_field": 999}  # the override is honoured


def test_validate_human_output_and_input_errors(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("hello there", "hi"), chat("mail me: x.y@example.org", "ok")])
    r = tl("data", "validate", data, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert (
        "email" in r.stdout
        and "x.y@example.org" not in r.stdout
        and "records 2 = valid 2" in " ".join(r.stdout.split())
    )
    assert tl("data", "validate", tmp_path / "missing.jsonl").returncode == 2
    (tmp_path / "bad.json").write_text("[{]")
    r = tl("data", "validate", tmp_path / "bad.json", "--json")
    assert r.returncode == 2 and r.stdout == "" and "bad.json:1:3" in r.stderr


def test_validate_with_eval_reports_contamination(tmp_path):
    text = "the quick brown fox jumps over the lazy dog while the cat sleeps on the mat"
    train = write_jsonl(
        tmp_path / "train.jsonl", [chat("q one", text), chat("q two", "something unrelated entirely here")]
    )
    ev = write_jsonl(tmp_path / "eval.jsonl", [chat("eval question", text)])
    r = tl("data", "validate", train, "--eval", ev, "--json", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["contaminated"] == 1 and rep["valid"] == 1 and rep["eval"]["records"] == 1


def test_diff_json(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat("q1", "a1"), chat("q2", "a2"), chat("q3", "a3")])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("q1", "a1"), chat("q2", "a2 fixed"), chat("q4", "a4")])
    r = tl("data", "diff", a, b, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["added"], d["removed"], d["changed"], d["unchanged"]) == (1, 1, 1, 1)
    assert d["examples"]["changed"][0] == {
        "a_line": 2,
        "b_line": 2,
        "prompt": "q2",
        "before": "a2",
        "after": "a2 fixed",
    }
    assert d["a"]["digest"] != d["b"]["digest"]
    r = tl("data", "diff", a, b)
    assert r.returncode == 0 and "+1 added, -1 removed, ~1 changed, 1 unchanged" in " ".join(r.stdout.split())
    assert tl("data", "diff", a, tmp_path / "nope.jsonl").returncode == 2


@pytest.mark.slow  # the second run trains the tiny model end to end
def test_pipeline_blocked_by_a_data_gate(make_config, task_data, tmp_path):
    rows = [json.loads(x) for x in task_data[0].read_text().splitlines()]
    rows[0]["messages"][1]["content"] += " (card 4111 1111 1111 1111)"
    rows[1]["messages"][1]["content"] += " write to jo@example.com"
    train = write_jsonl(tmp_path / "train_pii.jsonl", rows)
    cfg = make_config(data__train_data=str(train), data__max_pii_records=1)
    r = tl("run", cfg, "--json")
    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout)
    st = summary["stages"]["data_validation"]
    assert st["status"] == "failed" and summary["stages"]["training"]["status"] == "skipped"
    assert "max_pii_records" in st["error"] and "2 is not <= 1" in st["error"]
    report_path = Path(st["error"].split("report: ")[1].split(";")[0])
    assert report_path.is_file() and report_path.with_suffix(".html").is_file()
    rep = json.loads(report_path.read_text())
    assert rep["pii"] == {"credit_card": 1, "email": 1}
    assert not any(g["passed"] for g in rep["gates"] if g["name"] == "max_pii_records")
    # one gate vocabulary: the stage's metrics hold the data gates in the shape of the evaluation gates
    gate = st["metrics"]["gates"]["max_pii_records[train]"]
    assert gate["verdict"] == "FAIL" and gate["blocks"] is True and gate["value"] == 2 and gate["suite"] == "data.train"
    assert st["metrics"]["gates"]["min_valid_ratio[train]"]["verdict"] == "PASS"
    run_html = (Path(summary["run_dir"]) / "report.html").read_text()
    assert "<h2>Data gates</h2>" in run_html and "max_pii_records[train]" in run_html and "FAIL (blocks)" in run_html
    assert "4111 1111 1111 1111" not in report_path.read_text() and "jo@example.com" not in st["error"]

    # the same data with pii: redact passes the gate (nothing unredacted is kept) and trains on [CREDIT_CARD]
    r = tl("run", cfg, "--json", "-o", "data.pii=redact")
    summary = json.loads(r.stdout)
    assert summary["stages"]["data_validation"]["status"] == "passed", summary["stages"]["data_validation"]


@pytest.mark.slow  # builds the tiny model fixture and loads its tokenizer in a subprocess
def test_validate_a_config_uses_its_eval_data_tokenizer_and_gates(make_config, tmp_path):
    cfg = make_config(data__max_length=16, data__overlong="drop", data__min_valid_ratio=0.5)
    r = tl("data", "validate", cfg, "--json")
    rep = json.loads(r.stdout)
    assert "overlong" not in rep["rules_not_checked"] and "contaminated" not in rep["rules_not_checked"]
    assert rep["overlong_dropped"] > 0 and rep["rules"]["overlong"] == rep["overlong_dropped"]
    assert rep["eval"]["records"] == 12 and rep["out_dir"] == str(tmp_path / ".tuneloop" / "data-report")
    assert r.returncode == (0 if rep["passed"] else 1) and {g["name"] for g in rep["gates"]} == {
        "min_usable_records",
        "min_valid_ratio",
    }
