"""The `lmeval` suite kind: lm-evaluation-harness tasks from local YAMLs, offline, on the tiny model; per-item
outcomes paired for `max_mc_capability_drop`, checked against lm-eval's own aggregate and against tuneloop's
`capability_mc` scoring of the same items."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

FIXTURE = Path(__file__).parent / "fixtures" / "lmeval"
TASK = "tuneloop_tiny_mc"
N_DOCS = len([x for x in (FIXTURE / "tiny_mc.jsonl").read_text().splitlines() if x.strip()])


def tl(*args):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


@pytest.fixture
def lm_config(make_config, tmp_path):
    """A config with one lmeval suite whose include_path is relative to the config's directory."""
    shutil.copytree(FIXTURE, tmp_path / "lmtasks", dirs_exist_ok=True)

    def make(**suite):
        spec = {"kind": "lmeval", "tasks": [TASK], "include_path": "lmtasks", **suite}
        gates = {
            "min_accuracy": None,
            "max_harmful_rate": None,
            "max_capability_drop": None,
            "max_accuracy_drop": None,
            "max_mc_capability_drop": 0.2,
        }
        return make_config(eval={"max_new_tokens": 4, "suites": [spec]}, gates=gates)

    return make


def test_identical_candidate_passes_pairs_every_doc_and_audits(lm_config, tiny_model):
    path = lm_config()
    r = tl("eval", path, "--model", tiny_model, "--json")
    assert r.returncode in (0, 1), r.stderr
    rep = json.loads(r.stdout)
    g = rep["gates"]["max_mc_capability_drop[lmeval]"]
    assert g["verdict"] != "FAIL" and g["value"] == 0.0 and g["counts"]["discordant"] == 0 and g["n"] == N_DOCS
    recs = [json.loads(x) for x in (Path(rep["eval_dir"]) / "items.jsonl").read_text().splitlines()]
    lm = [x for x in recs if x["kind"] == "lmeval"]
    assert sorted(x["doc_id"] for x in lm) == list(range(N_DOCS))  # one record per document
    assert all(
        x["task"] == TASK
        and x["metric"] == "acc"
        and x["base_score"] in (0.0, 1.0)
        and x["base_score"] == x["candidate_score"]
        for x in lm
    )
    assert all(x["prompt"].startswith("Question: ") and len(x["prompt_sha256"]) == 64 for x in lm)
    assert rep["metrics"]["lmeval_items"] == N_DOCS
    assert rep["metrics"]["lmeval_accuracy"] == pytest.approx(sum(x["candidate_score"] for x in lm) / N_DOCS, abs=1e-6)
    # The reference's lm-eval outputs are cached like every other suite's.
    again = json.loads(tl("eval", path, "--model", tiny_model, "--json").stdout)
    assert again["metrics"]["base_outputs_cached"] is True
    assert again["gates"]["max_mc_capability_drop[lmeval]"]["value"] == 0.0


def test_per_item_outcomes_match_lmeval_aggregate_and_tuneloop_scoring(tiny_model, tmp_path):
    import torch

    from tuneloop.config import EvalConfig, SuiteConfig
    from tuneloop.evaluate.suites import load_suite, model_outputs, score_suite
    from tuneloop.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model), None)
    base = load_causal_lm(str(tiny_model))
    torch.manual_seed(7)
    cand = load_causal_lm(str(tiny_model))
    with torch.no_grad():  # a different candidate, so the two sides disagree on some items
        for p in cand.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    spec = SuiteConfig(kind="lmeval", tasks=[TASK], include_path=str(FIXTURE))
    ev = EvalConfig(suites=[spec])
    suite = load_suite(spec, ev, None)
    assert [it["id"] for it in suite.items] == [f"{TASK}/{i}" for i in range(N_DOCS)]
    bo = model_outputs(base, tok, suite, max_new_tokens=4)
    co = model_outputs(cand, tok, suite, max_new_tokens=4)
    res, recs = score_suite(suite, bo, co, None)
    assert res["n"] == N_DOCS == len(recs) and res["binary"]
    for out, scores in ((bo, res["base"]), (co, res["candidate"])):
        agg = out["aggregate"][TASK]
        assert agg["metric"] == "acc" and agg["value"] == pytest.approx(sum(scores) / len(scores), abs=1e-9)
    assert res["base"] != res["candidate"]

    # The same items through tuneloop's own capability_mc scoring ("Question: ...\nAnswer:" + " choice").
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text((FIXTURE / "tiny_mc.jsonl").read_text())
    mc_spec = SuiteConfig(kind="capability_mc", path=str(mc_file))
    mc = load_suite(mc_spec, ev, None)
    mres, _ = score_suite(
        mc, model_outputs(base, tok, mc, max_new_tokens=4), model_outputs(cand, tok, mc, max_new_tokens=4), None
    )
    assert mres["base"] == res["base"] and mres["candidate"] == res["candidate"]

    # max_items is lm-eval's limit: the first documents only.
    few = SuiteConfig(kind="lmeval", tasks=[TASK], include_path=str(FIXTURE), max_items=5)
    s5 = load_suite(few, ev, None)
    o5 = model_outputs(base, tok, s5, max_new_tokens=4)
    assert len(s5.items) == 5 and [x["doc_id"] for x in o5["lmeval"]] == list(range(5))
    assert [x["score"] for x in o5["lmeval"]] == res["base"][:5]
    assert s5.digest != suite.digest


def test_bad_lmeval_suites_exit_2(lm_config, tiny_model, monkeypatch):
    r = tl("eval", lm_config(tasks=["no_such_task"]), "--model", tiny_model, "--json")
    assert r.returncode == 2 and "no_such_task" in r.stderr and "tuneloop_tiny_mc" in r.stderr
    r = tl("eval", lm_config(include_path="missing-dir"), "--model", tiny_model, "--json")
    assert r.returncode == 2 and "include_path" in r.stderr and "missing-dir" in r.stderr
    # A task that would need the hub fails as bad input, offline, and the offline switch is undone afterwards.
    import os

    path = lm_config(tasks=["hub_task"])
    (path.parent / "lmtasks" / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: no-such-org/no-such-dataset\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    before = os.environ.get("HF_HUB_OFFLINE")
    r = tl("eval", path, "--model", tiny_model, "--json")
    assert r.returncode == 2 and "cannot build lm-eval task(s) hub_task" in r.stderr, r.stderr
    assert os.environ.get("HF_HUB_OFFLINE") == before
    import tuneloop.evaluate.lmeval as lmeval

    monkeypatch.setattr(lmeval, "lmeval_available", lambda: False)
    r = tl("eval", lm_config(), "--model", tiny_model, "--json")
    assert r.returncode == 2 and "pip install 'tuneloop[lmeval]'" in r.stderr


def test_pipeline_run_gates_an_adapter_candidate_and_reruns_when_task_data_change(lm_config, tmp_path):
    """A full `run` (LoRA adapter candidate through HFLM): the lmeval gate is decided; the evaluation stage is
    cached while nothing changes and re-runs when the task's data file under include_path changes."""
    from tuneloop import FineTunePipeline, load_config

    path = lm_config()
    first = FineTunePipeline(load_config(path)).run()
    ev = first["stages"]["evaluation"]
    assert ev["status"] == "passed" and ev["metrics"]["lmeval_items"] == N_DOCS, ev
    assert ev["metrics"]["gate_verdicts"]["max_mc_capability_drop[lmeval]"] in ("PASS", "INCONCLUSIVE")
    again = FineTunePipeline(load_config(path)).run()
    assert again["stages"]["evaluation"]["cached"] is True
    data = tmp_path / "lmtasks" / "tiny_mc.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:10]))
    third = FineTunePipeline(load_config(path)).run()
    ev3 = third["stages"]["evaluation"]
    assert ev3["cached"] is False and ev3["metrics"]["lmeval_items"] == 10
    assert ev3["metrics"]["base_outputs_cached"] is False  # new items: new suite digest, new reference outputs
