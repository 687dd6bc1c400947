"""`tuneloop demo` end to end: the main job a newcomer runs first. `--quick` (iteration 1 only, about a minute on
2 cores) and the closed loop (two iterations, simulated users, drift, feedback export, a canary; about two minutes).

Both run in one demo directory, as the README has a newcomer run them (`tuneloop demo --quick`, then `tuneloop demo`):
the loop starts from an empty registry but keeps the stage cache, so its iteration 1 re-uses the quick demo's
training and base outputs (CI time: the same fine-tune is not done twice) and the loop test also checks that."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuneloop.demo.quick import showcase_tickets, write_demo_data
from tuneloop.demo.tickets import LABELS, NEW_INTENT, new_intent_records, production_tickets, task_records

# `quick_demo` (tests/conftest.py): `tuneloop demo --quick --json` once per test session, shared with the UI tests.


@pytest.mark.slow
def test_quick_demo_runs_iteration_one_and_fine_tuning_clearly_helps(quick_demo):
    workdir, r = quick_demo
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
        capture_output=True,
        text=True,
        timeout=300,
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


@pytest.mark.slow
def test_loop_demo_closes_the_loop_and_the_analysis_promotes_iteration_two(quick_demo):
    workdir, quick = quick_demo  # the loop after the quick demo, in its directory (as the README runs them)
    assert quick.returncode == 0, quick.stderr[-3000:]
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "demo", "--workdir", str(workdir), "--json", "--lang", "en"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert out["overall"] == "passed"
    first, second = out["iterations"]
    assert first["overall"] == second["overall"] == "passed"
    # a fresh registry (version 1 again, below), but the stage cache kept: iteration 1 re-used the quick demo's
    # fine-tune, and its evaluation (gated differently) re-used the base model's outputs
    assert "previous demo's registry, runs and request log removed" in " ".join(r.stderr.split())
    assert first["stages"]["training"]["cached"] is True, first["stages"]["training"]
    assert first["stages"]["evaluation"]["metrics"]["base_outputs_cached"] is True
    assert (first["model_version"], second["model_version"]) == ("support-router:1", "support-router:2")
    # iteration 2 trained on the original data plus the exported feedback, as weighted sources
    sources = second["stages"]["preprocessing"]["metrics"]["sources"]
    assert [s["path"] for s in sources] == ["data/train.jsonl", "feedback/sft.jsonl"], sources
    assert sources[1]["weight"] == 1.0 and sources[1]["samples"] == sources[1]["records"] > 0, sources
    assert second["stages"]["deployment"]["metrics"]["strategy"] == "canary"
    # each iteration is gated against the champion it would replace; the first, with none, against the base
    assert first["stages"]["evaluation"]["metrics"]["against"] == "base"
    assert second["stages"]["evaluation"]["metrics"]["against"] == "champion support-router:1"

    prod = out["production"]
    assert prod["failed"] == 0 and prod["by_intent"]["new"] > 0.2 * prod["requests"]
    assert prod["accuracy_by_intent"]["new"] <= 0.2 and prod["corrections"] >= prod["by_intent"]["new"] * 0.8
    assert out["drift"]["drifted"] is True and out["drift"]["new_intent_in_top"] >= 15  # the new intent is what drifted
    fb = out["feedback_export"]
    assert fb["sft_records"] > 0 and fb["dpo_records"] > 0
    assert fb["counts"]["sft"]["dropped"].get("contaminated", 0) > 0  # production tickets like eval items are kept out

    rollout = out["rollout"]
    assert rollout["decision"] == "promoted", rollout
    assert [d["action"] for d in rollout["decisions"]] == ["step_up", "promote"]  # by the analysis, through each step
    assert rollout["decisions"][0]["weight"] == 0.5 and rollout["canary_requests"] >= 40
    neg = rollout["statistics"]["negative_feedback"]
    assert neg["non_inferior"] and neg["canary"]["rate"] < neg["baseline"]["rate"]
    assert rollout["traffic"]["failed"] == 0 and out["champion_after"] == "support-router:2"

    acc, orig = out["new_intent_accuracy"], out["original_accuracy"]
    assert acc["after"] - acc["before"] >= 0.5, acc
    assert orig["after"] >= 0.85 and orig["before"] >= 0.85, orig  # the accuracy gate (min_accuracy 0.85) holds
    assert out["seconds"] > 0 and "demo finished in" in r.stderr


def test_production_tickets_mix_a_new_intent_whose_held_out_tickets_never_reach_users():
    tickets = production_tickets(300, seed=1, new_share=0.3)
    assert len(tickets) == 300 and sum(t["intent"] == "new" for t in tickets) == 90
    assert all(t["expected"] == NEW_INTENT["label"] for t in tickets if t["intent"] == "new")
    assert {t["expected"] for t in tickets if t["intent"] == "original"} == set(LABELS)
    assert tickets == production_tickets(300, seed=1, new_share=0.3)  # deterministic
    held_out = {r["messages"][1]["content"] for r in new_intent_records(60, seed=0, split="eval")}
    sent = {r["messages"][1]["content"] for r in new_intent_records(2000, seed=1, split="train")}
    assert len(held_out) == 60 and not held_out & sent
    # no original training ticket uses a new-intent sentence
    train_users = [r["messages"][1]["content"] for r in task_records(1920, seed=0, split="train")]
    assert not any(s.rstrip(".?") in u for s in NEW_INTENT["sentences"] for u in train_users)


def test_loop_demo_starts_from_an_empty_registry_and_refuses_a_workspace_it_did_not_make(tmp_path):
    from rich.console import Console

    from tuneloop.demo.loop import fresh_workspace
    from tuneloop.demo.quick import DEMO_HEADER
    from tuneloop.errors import InputError

    ws = tmp_path / ".tuneloop"
    for d in ("cache/training/k", "runs/r1", "artifacts/a"):
        (ws / d).mkdir(parents=True)
    (ws / "registry.db").write_text("x")
    (tmp_path / "feedback").mkdir()
    (tmp_path / "tuneloop.yaml").write_text("name: mine\n")
    with pytest.raises(InputError, match="did not make"):
        fresh_workspace(tmp_path, Console(quiet=True))
    assert (ws / "registry.db").exists()  # nothing removed

    (tmp_path / "tuneloop.yaml").write_text(
        DEMO_HEADER + " Run it again with: tuneloop run tuneloop.yaml\nname: support-router\n"
    )
    fresh_workspace(tmp_path, Console(quiet=True))
    assert sorted(p.name for p in ws.iterdir()) == ["cache"] and (ws / "cache" / "training" / "k").is_dir()
    assert not (tmp_path / "feedback").exists()
