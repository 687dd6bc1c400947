"""`tuneloop demo --json` end to end: the main job a newcomer runs first (about a minute on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuneloop.demo import showcase_tickets
from tuneloop.demo_assets import LABELS, write_demo_data


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_fine_tuning_clearly_helps(tmp_path):
    workdir = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "demo", "--workdir", str(workdir), "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert summary["overall"] == "passed"
    assert [s["status"] for s in summary["stages"].values()] == ["passed"] * 6
    ev = summary["stages"]["evaluation"]["metrics"]
    assert ev["accuracy"] >= 0.85 and ev["base_accuracy"] <= 0.3, ev
    demo = summary["demo"]
    assert demo["model"] == "support-router:1" and demo["answer"].strip()
    assert (workdir / "tuneloop.yaml").is_file() and (workdir / "base-model" / "config.json").is_file()
    assert "demo finished in" in r.stderr
    assert "FutureWarning" not in r.stderr, r.stderr[-3000:]
    # The base model comes from the package (same weights on every machine), not from minutes of pretraining.
    assert demo["base_model_source"] == "shipped" and demo["base_model_reused"] is False
    # Six held-out tickets, one per label, asked through the gateway and marked as the eval gate scores them.
    tickets = demo["tickets"]
    assert [t["expected"] for t in tickets] == list(LABELS)
    eval_users = {json.loads(line)["messages"][-2]["content"] for line in (workdir / "data" / "eval.jsonl").open()}
    assert all(t["ticket"] in eval_users for t in tickets)
    for t in tickets:  # right means the served answer is the label (case and punctuation aside)
        if t["answer"].strip().lower().rstrip(".!") == t["expected"]:
            assert t["correct"] is True, t
        else:
            assert t["correct"] is False or t["expected"] in t["answer"].lower(), t
    assert demo["tickets_correct"] == sum(t["correct"] for t in tickets) >= 4, tickets
    assert (demo["question"], demo["answer"]) == (tickets[0]["ticket"], tickets[0]["answer"])

    # Unchanged re-run of the same demo: the base model is re-used and every stage is cached.
    again = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "run", str(workdir / "tuneloop.yaml"), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0
    assert all(s["cached"] for s in json.loads(again.stdout)["stages"].values())


def test_showcase_tickets_one_held_out_ticket_per_label(tmp_path):
    _, eval_path = write_demo_data(tmp_path, n_train=12, n_eval=30, seed=0)
    records = [json.loads(line) for line in eval_path.open()]
    picked = showcase_tickets(eval_path)
    assert [t["expected"] for t in picked] == list(LABELS)
    for t in picked:
        assert [m["role"] for m in t["messages"]] == ["system", "user"]
        assert {"messages": [*t["messages"], {"role": "assistant", "content": t["expected"]}]} in records
    twelve = showcase_tickets(eval_path, 12)
    assert twelve[:6] == picked and [t["expected"] for t in twelve[6:]] == list(LABELS)
    assert len({t["messages"][-1]["content"] for t in twelve}) == 12
