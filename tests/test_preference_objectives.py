"""ORPO and SimPO (`train.objective: orpo | simpo`): CLI runs on the tiny model that train, gate on the held-out
pairs and register a version naming the objective; the loss TRL computed is the one configured; resume; prompts
that leave no answer token; bad input; export to Axolotl and LLaMA-Factory."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tuneloop import load_config

TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]


def tl(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _pairs(records: list[dict]) -> list[dict]:
    """Ticket-routing preference pairs: the right queue chosen, the next queue in the list rejected."""
    from tuneloop.demo.tickets import LABELS

    out = []
    for r in records:
        good = r["messages"][-1]["content"]
        out.append(
            {"messages": r["messages"][:-1], "chosen": good, "rejected": LABELS[(LABELS.index(good) + 1) % len(LABELS)]}
        )
    return out


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> tuple[Path, Path]:
    from tuneloop.demo.tickets import task_records

    d = tmp_path_factory.mktemp("pref-data")
    return (
        write_jsonl(d / "train.jsonl", _pairs(task_records(24, seed=3, split="train"))),
        write_jsonl(d / "eval.jsonl", _pairs(task_records(8, seed=4, split="eval"))),
    )


def _config(make_config, pref_data, objective: str, **train) -> Path:
    return make_config(
        data={"train_data": str(pref_data[0]), "eval_data": str(pref_data[1]), "max_length": 96},
        train={
            "objective": objective,
            "lora_r": 4,
            "lora_alpha": 8,
            "learning_rate": 5e-3,
            "max_steps": 4,
            "batch_size": 4,
            "save_steps": 2,
            **train,
        },
        # min_accuracy 1.0 would block if exact match against the chosen answer decided a preference run
        gates={
            "min_accuracy": 1.0,
            "max_harmful_rate": 1.0,
            "max_capability_drop": 1.0,
            "min_preference_accuracy": 0.0,
            "max_preference_accuracy_drop": 1.0,
        },
    )


@pytest.mark.slow  # about 22 s each on the CPU: two CLI runs (train + gates + register, then the stricter gate)
@pytest.mark.parametrize(
    "objective, settings",
    [
        ("orpo", {"beta": 0.1}),
        ("simpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}),
    ],
)
def test_cli_run_trains_gates_on_the_pairs_and_registers_the_objective(
    make_config, pref_data, tmp_path, objective, settings
):
    path = _config(make_config, pref_data, objective)
    r = tl("run", path, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    st = summary["stages"]
    assert summary["overall"] == "passed"
    assert (
        st["preprocessing"]["metrics"]["objective"] == objective
        and st["preprocessing"]["metrics"]["train_samples"] == 24
    )
    tr = st["training"]["metrics"]
    assert (
        tr["objective"] == objective
        and tr["steps"] == 4
        and tr["train_pairs"] == 24
        and tr["loss_settings"] == settings
    )
    assert tr["pairs_prompt_too_long"] == 0 and "final_rewards_margins" in tr and "final_nll_loss" in tr
    run_dir = tmp_path / ".tuneloop" / "runs" / summary["run_id"]
    rows = [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(
        math.isfinite(row["loss"]) and "rewards/margins" in row and "logps/chosen" in row and "nll_loss" in row
        for row in rows
    )
    assert any(abs(row["rewards/margins"] - rows[0]["rewards/margins"]) > 1e-6 for row in rows[1:])  # the policy moved
    stage = json.loads((run_dir / "stages" / "training.json").read_text())
    assert (
        stage["outputs"]["kind"] == "adapter"
        and (Path(stage["outputs"]["model_dir"]) / "adapter_model.safetensors").is_file()
    )

    ev = st["evaluation"]["metrics"]
    assert ev["preference_pairs"] == 8 and 0.0 <= ev["preference_accuracy"] <= 1.0
    assert (
        ev["gate_verdicts"]["min_accuracy"] == "NOT_APPLIED"
    )  # exact match against the chosen answer: reported, not gated
    gates = ev["gates"]
    assert (
        gates["min_preference_accuracy"]["verdict"] == "PASS"
        and gates["max_preference_accuracy_drop"]["verdict"] == "PASS"
    )

    show = tl("models", "show", "tiny-bot@champion", "--json", cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    version = json.loads(show.stdout)
    assert (
        version["lineage"]["objective"] == objective and version["lineage"]["config"]["train"]["objective"] == objective
    )
    assert version["metrics"]["training"]["objective"] == objective

    # The preference gate decides: a threshold the candidate cannot show blocks it. On 8
    # pairs 0.74 is the highest threshold that can still PASS (8 of 8: lower bound 0.747), so it is not refused up front.
    assert ev["preference_accuracy"] < 1.0
    strict = tl("run", path, "--json", "-o", "gates.min_preference_accuracy=0.74")
    assert strict.returncode == 1, strict.stderr[-3000:]
    st2 = json.loads(strict.stdout)["stages"]
    # (training is normally re-used from the cache; not asserted: its key includes the code version, which an edit
    # of the package between the two runs changes)
    assert st2["evaluation"]["status"] == "failed", strict.stderr[-3000:]
    assert "min_preference_accuracy" in st2["evaluation"]["error"]


def _prepared(tmp_path, pref_data) -> Path:
    from tuneloop.data.prepare import prepare_preferences
    from tuneloop.data.validate import validate_dataset

    rep = validate_dataset(pref_data[0], tmp_path / "valid", fmt="preference")
    prepare_preferences(Path(rep["clean_path"]), None, tmp_path / "prep", eval_split=0.1, seed=0)
    return tmp_path / "prep" / "train"


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_the_configured_loss_is_trained_and_a_killed_run_resumes_to_the_same_end(
    make_config, pref_data, tmp_path, objective
):
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.objectives import OBJECTIVES

    train = OBJECTIVES[objective].load_trainer()
    dataset = _prepared(tmp_path, pref_data)
    # batch 1: each logged step is one pair, so its loss can be recomputed from the values logged beside it
    cfg = load_config(
        _config(
            make_config,
            pref_data,
            objective,
            batch_size=1,
            lora_dropout=0.0,
            orpo_beta=0.3,
            simpo_beta=2.5,
            simpo_gamma=0.7,
        )
    )
    tok = load_tokenizer(cfg.base_model)
    work = tmp_path / "run"
    first = train(cfg, dataset, work, tokenizer=tok)
    assert first["resumed_from_step"] == 0 and first["objective"] == objective
    rows = [json.loads(x) for x in (work / "train_metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if objective == "orpo":  # NLL of the chosen answer minus lambda * log sigmoid(log odds ratio)
            assert row["loss"] == pytest.approx(row["nll_loss"] - 0.3 * row["log_odds_ratio"], rel=1e-4)
            assert row["rewards/chosen"] == pytest.approx(0.3 * row["logps/chosen"], rel=1e-4)
        else:  # -log sigmoid(beta * mean-logp margin - gamma), no NLL term (cpo_alpha 0)
            assert row["nll_loss"] == 0.0
            assert row["rewards/chosen"] == pytest.approx(
                2.5 * row["logps/chosen"], rel=1e-4
            )  # length-normalised logp x beta
            assert row["loss"] == pytest.approx(math.log1p(math.exp(-(row["rewards/margins"] - 0.7))), rel=1e-4)

    # As if killed after the step-2 checkpoint: later checkpoints and the model never got written.
    shutil.rmtree(work / "checkpoints" / "checkpoint-4")
    shutil.rmtree(work / "model")
    again = train(cfg, dataset, work, tokenizer=tok)
    assert again["resumed_from_step"] == 2
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-5)
    assert again["final_rewards_margins"] == pytest.approx(first["final_rewards_margins"], abs=1e-5)
    assert [json.loads(x)["step"] for x in (work / "train_metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (work / "model" / "adapter_model.safetensors").is_file()


def test_pairs_whose_prompt_fills_max_length_are_left_out_not_trained_as_nan(make_config, pref_data, tmp_path):
    """The TRL trainers cut only the answer: a prompt of max_length tokens leaves none, and the length-averaged
    log-probability would be 0/0. Such pairs are counted and left out; with none left the stage says what to raise."""
    from datasets import load_from_disk

    from tuneloop.errors import StageError
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.preference_objectives import train_simpo

    records = [json.loads(x) for x in pref_data[0].read_text().splitlines()]
    long_prompts = [
        {
            **r,
            "messages": [
                *r["messages"][:-1],
                {"role": "user", "content": f"ticket {i}: " + " ".join(["refund"] * 120)},
            ],
        }
        for i, r in enumerate(records[:6])
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", records + long_prompts)
    dataset = _prepared(tmp_path, (data, None))
    pairs = load_from_disk(str(dataset))
    n_long = sum("refund refund" in r["prompt"][-1]["content"] for r in pairs)
    assert 0 < n_long < len(pairs)
    cfg = load_config(_config(make_config, (data, pref_data[1]), "simpo", max_steps=6, batch_size=4))
    tok = load_tokenizer(cfg.base_model)
    m = train_simpo(cfg, dataset, tmp_path / "run", tokenizer=tok)
    assert m["pairs_prompt_too_long"] == n_long and m["train_pairs"] == len(pairs) - n_long
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) and math.isfinite(r["rewards/margins"]) for r in rows)

    tiny = load_config(_config(make_config, (data, pref_data[1]), "simpo"), ["data.max_length=16"])
    with pytest.raises(
        StageError,
        match=rf"data\.max_length: the prompt of every one of the {len(pairs)} preference pairs fills 16 tokens",
    ):
        train_simpo(tiny, dataset, tmp_path / "run-tiny", tokenizer=tok)


@pytest.mark.parametrize(
    "objective, override, needle",
    [
        ("orpo", [], "data.train_data: train.objective orpo needs preference data"),
        ("simpo", [], "data.train_data: train.objective simpo needs preference data"),
        ("simpo", ["-o", "train.simpo_beta=0"], "train.simpo_beta"),
        ("orpo", ["-o", "train.orpo_beta=-1"], "train.orpo_beta"),
    ],
)
def test_bad_input_exits_2_naming_the_key_before_any_work(
    make_config, task_data, tmp_path, objective, override, needle
):
    if override:  # preference data, a bad setting
        from tuneloop.demo.tickets import task_records

        prefs = write_jsonl(tmp_path / "p.jsonl", _pairs(task_records(8, seed=3, split="train")))
        path = make_config(data={"train_data": str(prefs), "max_length": 96}, train={"objective": objective})
    else:  # the conversations of the SFT task: no chosen/rejected
        path = make_config(train={"objective": objective})
    r = tl("run", path, *override)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    assert not (tmp_path / ".tuneloop" / "runs").exists() or not any((tmp_path / ".tuneloop" / "runs").iterdir())


def test_export_maps_orpo_and_simpo_where_the_tools_have_them(make_config, pref_data, tmp_path):
    from tuneloop.errors import ConfigError
    from tuneloop.train.external import export_config

    simpo = load_config(_config(make_config, pref_data, "simpo", simpo_beta=2.5, simpo_gamma=0.8))
    ax = yaml.safe_load(export_config(simpo, "axolotl"))
    assert (ax["rl"], ax["rl_beta"], ax["simpo_gamma"], ax["cpo_alpha"]) == ("simpo", 2.5, 0.8, 0.0)
    assert ax["datasets"][0]["type"] == "chat_template.default" and ax["sample_packing"] is False
    lf = yaml.safe_load(export_config(simpo, "llamafactory"))
    assert (lf["stage"], lf["pref_loss"], lf["pref_beta"], lf["simpo_gamma"]) == ("dpo", "simpo", 2.5, 0.8)

    orpo = load_config(_config(make_config, pref_data, "orpo", orpo_beta=0.2))
    lf = yaml.safe_load(export_config(orpo, "llamafactory"))
    assert (lf["stage"], lf["pref_loss"], lf["pref_beta"]) == ("dpo", "orpo", 0.2) and "simpo_gamma" not in lf
    with pytest.raises(ConfigError, match="train.objective: orpo cannot be exported to Axolotl.*--to llamafactory"):
        export_config(orpo, "axolotl")
