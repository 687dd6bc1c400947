"""`tuneloop eval` and the evaluation suites on real tiny models: identical candidate, broken candidate, tiny eval
set, JUnit/Markdown/JSON reports, audit records, base-output cache, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import pytest

from conftest import write_jsonl


def tl(*args):
    """The CLI in-process (each subprocess would pay seconds of imports); stdout and stderr kept apart."""
    from typer.testing import CliRunner

    from tuneloop.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, tiny_model) -> Path:
    """The tiny model after ~150 quick steps on the shipped general text: it predicts some tokens, so a
    randomised copy of it is measurably worse."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    text = resources.files("tuneloop.resources").joinpath("general.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    span = max(len(ids) - 65, 1)
    for step in range(150):
        # 8 windows a step, spread over the whole text (English and Chinese): the shipped text is ~21k tokens on
        # this tokenizer, and one window a step would only ever see its first 9k (base accuracy ~0.02).
        chunk = torch.stack([ids[(step * 61 + j * span // 8) % span :][:64] for j in range(8)])
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("trained-base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory, trained_base) -> Path:
    """The trained base with its weights re-randomised (same architecture and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(123)
    model = AutoModelForCausalLM.from_pretrained(trained_base)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("broken")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(trained_base).save_pretrained(out)
    return out


GATES = {
    "min_accuracy": None,
    "max_harmful_rate": None,
    "max_capability_drop": 0.02,
    "max_mc_capability_drop": 0.2,
    "max_accuracy_drop": 0.2,
    "max_harmful_increase": 0.2,
    "max_over_refusal_increase": 0.2,
}


def test_identical_candidate_never_fails_and_reports_parse(make_config, trained_base, tmp_path):
    path = make_config(base_model=str(trained_base), gates=dict(GATES), eval={"max_new_tokens": 4})
    junit, md = tmp_path / "gates.xml", tmp_path / "gates.md"
    r = tl("eval", path, "--model", trained_base, "--json", "--junit", junit, "--markdown", md)
    assert r.returncode in (0, 1), r.stderr
    rep = json.loads(r.stdout)
    gates = rep["gates"]
    assert all(g["verdict"] != "FAIL" for g in gates.values()), gates
    # Same model on both sides: no discordant item anywhere, every paired change is exactly zero.
    for name in (
        "max_capability_drop",
        "max_accuracy_drop",
        "max_harmful_increase",
        "max_over_refusal_increase",
        "max_mc_capability_drop[capability_mc]",
    ):
        assert gates[name]["value"] == 0.0 and gates[name]["counts"]["discordant"] == 0, name
        assert gates[name]["interval"][0] < 0 < gates[name]["interval"][1]
    # Thousands of general-text tokens certify a zero drop within 2 points.
    assert gates["max_capability_drop"]["verdict"] == "PASS" and gates["max_capability_drop"]["n"] > 500
    assert rep["overall"] == ("passed" if r.returncode == 0 else "failed")
    assert rep["metrics"]["win_rate"] == 0.5  # identical answers: every comparison a tie

    tree = ET.parse(junit)
    cases = tree.getroot().findall(".//testcase")
    assert {c.get("name") for c in cases} == set(gates)
    for c in cases:
        g = gates[c.get("name")]
        assert (c.find("failure") is not None) == bool(g["blocks"])
        assert (c.find("skipped") is not None) == (g["verdict"] == "NOT_APPLIED")
    text = md.read_text()
    assert text.startswith("### tuneloop gates") and "| `max_capability_drop` | ✅ PASS" in text

    # Audit trail: every item with its prompt hash, both outputs and scores.
    recs = [json.loads(x) for x in (Path(rep["eval_dir"]) / "items.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in recs}
    assert kinds >= {"task", "harmful", "over_refusal", "general_text", "capability_mc", "win_rate"}
    harmful = [r for r in recs if r["kind"] == "harmful"]
    assert len(harmful) == 338 and all(len(r["prompt_sha256"]) == 64 and r["base"] == r["candidate"] for r in harmful)
    assert len([r for r in recs if r["kind"] == "over_refusal"]) == 311
    assert len([r for r in recs if r["kind"] == "capability_mc"]) == 60

    # Second run: the base outputs come from the cache.
    again = tl("eval", path, "--model", trained_base, "--json")
    assert json.loads(again.stdout)["metrics"]["base_outputs_cached"] is True


def test_broken_candidate_fails(make_config, trained_base, broken_model):
    path = make_config(base_model=str(trained_base), gates=dict(GATES), eval={"max_new_tokens": 4})
    r = tl("eval", path, "--model", broken_model, "--json")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    g = rep["gates"]["max_capability_drop"]
    assert g["verdict"] == "FAIL" and g["blocks"] and g["interval"][0] > 0.02, g
    assert g["p_value"] < 1e-6 and "max_capability_drop" in rep["blocking"]
    assert rep["metrics"]["general_accuracy"] < rep["metrics"]["base_general_accuracy"]


def test_tiny_eval_set_is_inconclusive_with_needed_n(make_config, trained_base, tmp_path, task_data):
    few = [json.loads(x) for x in task_data[1].read_text().splitlines()][:6]
    eval_file = write_jsonl(tmp_path / "few.jsonl", few)
    path = make_config(
        base_model=str(trained_base),
        data={"train_data": str(task_data[0]), "eval_data": str(eval_file), "max_length": 96},
        eval={"max_new_tokens": 4, "suites": ["task"]},
        gates={"min_accuracy": 0.2, "max_harmful_rate": None, "max_capability_drop": None},
    )
    r = tl("eval", path, "--model", trained_base, "--json")
    rep = json.loads(r.stdout)
    g = rep["gates"]["min_accuracy"]
    assert g["n"] == 6 and g["verdict"] == "INCONCLUSIVE", g
    assert g["needed_n"] > 6 and "items would decide" in g["reason"]
    assert r.returncode == 1 and g["blocks"]  # on_inconclusive: block (default)
    lenient = tl(
        "eval", path, "--model", trained_base, "--json", "-o", "gates.on_inconclusive=warn", "--against", "champion"
    )
    assert lenient.returncode == 0
    rep = json.loads(lenient.stdout)
    assert rep["gates"]["min_accuracy"]["warning"]
    assert rep["against"] == "base" and "no champion" in rep["metrics"]["against_note"]  # empty registry: falls back


def test_bad_input_exits_2(make_config, tmp_path, tiny_model):
    path = make_config()
    r = tl("eval", path, "--model", tmp_path / "nope")
    assert r.returncode == 2 and "nope" in r.stderr
    r = tl("eval", path, "-o", "eval.suites=[task, bogus]")
    assert r.returncode == 2 and "eval.suites" in r.stderr
    bad_mc = tmp_path / "mc.jsonl"
    bad_mc.write_text('{"question": "q", "choices": ["a", "b"]}\n')
    r = tl("eval", make_config(eval={"mc_suite": str(bad_mc), "suites": ["capability_mc"]}), "--model", tiny_model)
    assert r.returncode == 2 and "mc.jsonl:1" in r.stderr and "answer" in r.stderr


@pytest.mark.slow
def test_eval_defaults_to_latest_candidate_and_compares_with_champion(make_config):
    from tuneloop import FineTunePipeline, load_config

    path = make_config(
        gates={"min_accuracy": 0.0, "max_harmful_rate": 1.0, "max_capability_drop": 0.02, "max_accuracy_drop": 0.5}
    )
    summary = FineTunePipeline(load_config(path)).run()
    assert summary["overall"] == "passed", summary
    ev = summary["stages"]["evaluation"]["metrics"]
    assert ev["gates"]["max_capability_drop"]["interval"] and ev["against"] == "base"
    # The run's candidate is now the champion: comparing the latest candidate with it is comparing a model with itself.
    r = tl("eval", path, "--against", "champion", "--json")
    rep = json.loads(r.stdout)
    assert rep["against"].startswith("champion tiny-bot") and rep["model"].startswith("candidate of run")
    assert (
        rep["gates"]["max_capability_drop"]["value"] == 0.0 and rep["gates"]["max_capability_drop"]["verdict"] == "PASS"
    )
    assert rep["gates"]["max_accuracy_drop"]["counts"]["discordant"] == 0
    assert r.returncode == 0, rep["blocking"]
    same = tl("eval", path, "--model", "tiny-bot:1", "--against", "1", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["gates"]["max_capability_drop"]["value"] == 0.0


def test_several_task_suites_with_each_metric(make_config, trained_base, tmp_path, task_data):
    mc = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {
                "id": f"q{i}",
                "prompt": f"Which team handles ticket {i}?",
                "choices": ["billing", "shipping", "other"],
                "answer": i % 3,
            }
            for i in range(9)
        ],
    )
    suites = [
        {"name": "exact", "kind": "task"},
        {"name": "contains", "kind": "task", "metric": "contains"},
        {"name": "regex", "kind": "task", "metric": "regex", "pattern": r"\w+"},
        {"name": "f1", "kind": "task", "metric": "token_f1"},
        {"name": "mc", "kind": "task", "metric": "mc_loglik", "path": str(mc)},
    ]
    path = make_config(
        base_model=str(trained_base),
        eval={"max_new_tokens": 4, "suites": suites},
        gates={"min_accuracy": 0.0, "max_harmful_rate": None, "max_capability_drop": None, "max_accuracy_drop": 0.5},
    )
    r = tl("eval", path, "--model", trained_base, "--json")
    rep = json.loads(r.stdout)
    g = rep["gates"]
    assert set(g) == {"min_accuracy", "max_accuracy_drop"} | {
        f"{k}[{s}]" for k in ("min_accuracy", "max_accuracy_drop") for s in ("contains", "regex", "f1", "mc")
    }
    assert g["min_accuracy[mc]"]["n"] == 9 and "wilson" in g["min_accuracy[mc]"]["method"]
    assert "bootstrap" in g["min_accuracy[f1]"]["method"]  # token F1 is continuous
    assert all(v["verdict"] == "PASS" for v in g.values()), {k: v["verdict"] for k, v in g.items()}
    recs = [json.loads(x) for x in (Path(rep["eval_dir"]) / "items.jsonl").read_text().splitlines()]
    regex_recs = [x for x in recs if x["suite"] == "regex"]
    assert g["min_accuracy[regex]"]["value"] == pytest.approx(
        sum(bool(re.search(r"\w+", x["candidate"])) for x in regex_recs) / len(regex_recs), abs=1e-6
    )
    mc_recs = [x for x in recs if x["suite"] == "mc"]
    assert len(mc_recs) == 9 and all(
        len(x["base_logprobs"]) == 3 and x["base"] in ("billing", "shipping", "other") for x in mc_recs
    )
    # one generation per model serves every generated task suite: identical answers across suites
    by_suite = {s: [x["candidate"] for x in recs if x["suite"] == s] for s in ("exact", "contains", "f1")}
    assert by_suite["exact"] == by_suite["contains"] == by_suite["f1"]
