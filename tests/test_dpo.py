"""DPO: preference records from both accepted shapes, and a real DPO run of the pipeline on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop import FineTunePipeline, load_config
from tuneloop.data.prepare import trl_preference
from tuneloop.data.validate import validate_dataset

# The real-format datasets: `shared/datasets` beside the checkout (found upwards, so git worktrees find it too).
SHARED = next(
    (p / "shared" / "datasets" for p in Path(__file__).resolve().parents if (p / "shared" / "datasets").is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "datasets",
)
needs_shared = pytest.mark.skipif(
    not (SHARED / "dpo_en_demo.json").is_file(), reason=f"{SHARED} not present (the real-format datasets)"
)


@needs_shared
def test_preference_records_become_trl_conversations(tmp_path):
    raw = json.loads((SHARED / "dpo_en_demo.json").read_text())[0]
    simple = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be brief."}
    bad = [
        {"prompt": "x", "chosen": "a"},
        {"prompt": "x", "chosen": "a", "rejected": "a"},
        {"conversations": [{"from": "robot", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": "b"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [simple, raw, *bad]) + "{oops\n")
    rep = validate_dataset(path, tmp_path / "out", fmt="preference")
    assert rep["records"] == 6 and rep["valid"] == 2 and rep["invalid"] == 4
    clean = [json.loads(x) for x in open(rep["clean_path"])]
    assert trl_preference(clean[0]) == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    rec = trl_preference(clean[1])
    assert rec["prompt"][-1] == {"role": "user", "content": raw["conversations"][-1]["value"]}
    assert rec["chosen"] == [{"role": "assistant", "content": raw["chosen"]["value"]}]
    assert rec["rejected"] == [{"role": "assistant", "content": raw["rejected"]["value"]}]
    quarantine = [json.loads(x) for x in open(rep["quarantine_path"])]
    assert [q["line"] for q in quarantine] == [3, 4, 5, 6]
    text = json.dumps(quarantine)
    assert "missing_field" in text and "same answer" in text and "invalid_json" in text


@pytest.mark.slow
@needs_shared
def test_dpo_pipeline_on_dpo_en_demo(make_config, tmp_path):
    records = json.loads((SHARED / "dpo_en_demo.json").read_text())[:24]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(records))
    path = make_config(
        data={"train_data": str(data), "max_length": 128, "eval_split": 0.1},
        train={
            "objective": "dpo",
            "method": "lora",
            "lora_r": 4,
            "lora_alpha": 8,
            "learning_rate": 5e-3,
            "max_steps": 4,
            "batch_size": 4,
            "save_steps": 2,
        },
        # min_accuracy 1.0 would block if exact match against the chosen answer still decided a DPO run
        gates={
            "min_accuracy": 1.0,
            "max_harmful_rate": 1.0,
            "max_capability_drop": 1.0,
            "min_preference_accuracy": 0.0,
            "max_preference_accuracy_drop": 1.0,
        },
    )
    summary = FineTunePipeline(load_config(path)).run()
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: (v["status"], v["error"]) for k, v in st.items() if v["error"]}
    assert st["data_validation"]["metrics"]["format"] == "preference"
    assert st["data_validation"]["metrics"]["valid"] == 24
    assert st["preprocessing"]["metrics"]["train_samples"] == 22 and st["preprocessing"]["metrics"]["eval_samples"] == 2
    tr = st["training"]["metrics"]
    assert tr["objective"] == "dpo" and tr["steps"] == 4
    assert "final_rewards_margins" in tr and "final_rewards_accuracies" in tr
    run_dir = tmp_path / ".tuneloop" / "runs" / summary["run_id"]
    rows = [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("rewards/margins" in r and "rewards/chosen" in r and "logps/chosen" in r for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: -log sigmoid(0)
    assert any(abs(r["rewards/margins"]) > 1e-4 for r in rows[1:])  # the policy moved
    stage = json.loads((run_dir / "stages" / "training.json").read_text())
    model_dir = stage["outputs"]["model_dir"]
    assert (Path(model_dir) / "adapter_config.json").is_file() and (
        Path(model_dir) / "adapter_model.safetensors"
    ).is_file()
    assert stage["outputs"]["kind"] == "adapter"
    ev = st["evaluation"]["metrics"]
    assert ev["eval_items"] == 2  # the chosen answer is the reference: reported ...
    assert ev["gate_verdicts"]["min_accuracy"] == "NOT_APPLIED"  # ... not gated
    assert (
        ev["preference_pairs"] == 2
        and 0.0 <= ev["preference_accuracy"] <= 1.0
        and 0.0 <= ev["base_preference_accuracy"] <= 1.0
    )
    assert isinstance(ev["preference_margin"], float) and isinstance(ev["base_preference_margin"], float)
    assert ev["preference_margin"] != ev["base_preference_margin"]  # the candidate is another model than its base
    assert "not length-normalised" in ev["preference_loglik"] and "preference_accuracy_norm" in ev
    gates = st["evaluation"]["metrics"]["gates"]
    assert (
        gates["min_preference_accuracy"]["verdict"] == "PASS"
        and gates["max_preference_accuracy_drop"]["verdict"] == "PASS"
    )
    items = [json.loads(x) for x in (run_dir / "eval_items.jsonl").read_text().splitlines()]
    pairs = [r for r in items if r["kind"] == "preference"]
    assert len(pairs) == 2 and all(
        len(r["candidate_logprobs"]) == 2 and r["candidate_score"] in (0.0, 1.0) for r in pairs
    )

    # A preference threshold the candidate cannot show blocks it, re-using the trained model.
    strict = FineTunePipeline(load_config(path, ["gates.min_preference_accuracy=0.99"])).run()["stages"]
    assert strict["training"]["cached"] is True and strict["evaluation"]["status"] == "failed"
    assert (
        "min_preference_accuracy" in strict["evaluation"]["error"]
        and "min_accuracy " not in strict["evaluation"]["error"]
    )


@pytest.mark.slow
@needs_shared
def test_dpo_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_does(make_config, tmp_path):
    import shutil

    from tuneloop.data.prepare import prepare_preferences
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.dpo import train_dpo

    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(json.loads((SHARED / "dpo_en_demo.json").read_text())[:16]))
    rep = validate_dataset(data, tmp_path / "valid", fmt="preference")
    prepare_preferences(Path(rep["clean_path"]), None, tmp_path / "prep", eval_split=0.1, seed=0)
    cfg = load_config(
        make_config(
            data={"train_data": str(data), "max_length": 96},
            train={
                "objective": "dpo",
                "lora_r": 4,
                "lora_alpha": 8,
                "learning_rate": 5e-3,
                "max_steps": 4,
                "batch_size": 4,
                "save_steps": 2,
                "lora_dropout": 0.0,
            },
        )
    )
    tok = load_tokenizer(cfg.base_model)
    work = tmp_path / "run"
    first = train_dpo(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert first["resumed_from_step"] == 0
    # As if killed after the step-2 checkpoint: later checkpoints and the model never got written.
    shutil.rmtree(work / "checkpoints" / "checkpoint-4")
    shutil.rmtree(work / "model")
    again = train_dpo(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert again["resumed_from_step"] == 2
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-5)
    assert again["final_rewards_margins"] == pytest.approx(first["final_rewards_margins"], abs=1e-5)
    rows = [json.loads(x) for x in (work / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (work / "model" / "adapter_model.safetensors").is_file()


def _gates_cfg(tmp_path, **gates):
    from tuneloop.config import PipelineConfig

    return PipelineConfig(
        name="pref",
        base_model="org/none",
        train_data=str(tmp_path / "x.jsonl"),
        workspace=str(tmp_path),
        train={"objective": "dpo"},
        gates=gates,
    )


def test_preference_gates_pass_fail_and_inconclusive_from_per_pair_outcomes(tmp_path):
    from tuneloop.evaluate.gates import check_gates

    def results(base, cand):
        return {
            "task": {
                "kind": "task",
                "base": [0.0] * 10,
                "candidate": [0.0] * 10,
                "n": 10,
                "not_gated": "train.objective is dpo: reported, not gated",
            },
            "preference": {
                "kind": "preference",
                "base": base,
                "candidate": cand,
                "n": len(cand),
                "base_margin": -0.5,
                "candidate_margin": 1.5,
                "loglik": "sum",
            },
        }

    cfg = _gates_cfg(
        tmp_path,
        min_accuracy=0.9,
        max_accuracy_drop=0.0,
        min_preference_accuracy=0.6,
        max_preference_accuracy_drop=0.05,
    )
    better = check_gates(cfg, results([0.0] * 150 + [1.0] * 50, [1.0] * 180 + [0.0] * 20))
    # Exact match against the chosen answer is 0 of 10 here, yet it is reported, not applied.
    assert better["min_accuracy"].verdict == "NOT_APPLIED" and better["min_accuracy"].passed is None
    assert "dpo" in better["min_accuracy"].reason and better["min_accuracy"].value == 0.0
    assert better["max_accuracy_drop"].verdict == "NOT_APPLIED"
    pa, drop = better["min_preference_accuracy"], better["max_preference_accuracy_drop"]
    assert pa.verdict == "PASS" and pa.value == 0.9 and pa.method == "wilson" and pa.interval[0] >= 0.6
    assert (
        drop.verdict == "PASS"
        and drop.value == pytest.approx(-0.65)
        and drop.counts == {"b": 20, "c": 150, "discordant": 170}
    )
    assert pa.candidate_margin == 1.5 and pa.base_margin == -0.5

    worse = check_gates(cfg, results([1.0] * 200, [1.0] * 100 + [0.0] * 100))
    assert worse["min_preference_accuracy"].verdict == "FAIL" and worse["min_preference_accuracy"].passed is False
    assert (
        worse["max_preference_accuracy_drop"].verdict == "FAIL" and worse["max_preference_accuracy_drop"].value == 0.5
    )

    few = check_gates(cfg, results([1.0, 0.0, 1.0], [1.0, 1.0, 0.0]))
    assert few["min_preference_accuracy"].verdict == "INCONCLUSIVE" and few["min_preference_accuracy"].blocks is True
    assert few["min_preference_accuracy"].needed_n and few["max_preference_accuracy_drop"].verdict == "INCONCLUSIVE"

    # Without `not_gated` (an SFT run, or a DPO task suite with its own path) the task gate applies as before.
    sft = check_gates(cfg, {"task": {"kind": "task", "base": [0.0] * 10, "candidate": [0.0] * 10, "n": 10}})
    assert sft["min_accuracy"].verdict == "FAIL" and "min_preference_accuracy" not in sft


def test_answer_logprob_is_the_summed_log_likelihood_of_the_answer_turn(tiny_model):
    """Checked against transformers' own loss on prompt + answer with the prompt masked."""
    import torch

    from tuneloop.evaluate.preference import answer_logprob, pair_item
    from tuneloop.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(str(tiny_model)), load_causal_lm(str(tiny_model))
    item = pair_item({"prompt": "Where is my refund?", "chosen": "It is on its way.", "rejected": "No."}, 0, "t")
    total, n = answer_logprob(model, tok, item["prompt"], item["chosen"], 256)
    ctx = tok.apply_chat_template(item["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(item["prompt"] + item["chosen"], tokenize=False)
    assert full.startswith(ctx) and full[len(ctx) :].startswith("It is on its way.<|im_end|>")
    c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    x_ids = tok(full[len(ctx) :], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([c_ids + x_ids])
    labels = ids.clone()
    labels[0, : len(c_ids)] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    assert n == len(x_ids) and total == pytest.approx(-float(loss) * n, rel=1e-4)
    # Cut to max_length as in training: the answer keeps its start.
    short, n_short = answer_logprob(model, tok, item["prompt"], item["chosen"], 4)
    assert n_short == 3 and short > total


def test_dpo_evaluation_finds_its_held_out_pairs_or_says_what_is_missing(tmp_path):
    from tuneloop.errors import InputError
    from tuneloop.evaluate.evaluation import load_suites

    cfg = _gates_cfg(tmp_path)
    items = tmp_path / "prep" / "eval.jsonl"
    items.parent.mkdir()
    items.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "reference": "4"}) + "\n")
    with pytest.raises(InputError, match="no held-out preference pairs"):
        load_suites(cfg, items)
    (items.parent / "eval_records.jsonl").write_text(
        json.dumps(
            {
                "messages": [{"role": "user", "content": "2+2?"}],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
                "_line": 7,
            }
        )
        + "\n"
    )
    suites = load_suites(cfg, items)
    pref = suites[-1]
    assert pref.kind == "preference" and pref.items[0]["line"] == 7 and pref.items[0]["rejected"][0]["content"] == "5"
    longer = load_suites(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": 2048})}), items)[-1]
    assert longer.digest != pref.digest  # what is scored depends on the length cut
    sft = load_suites(cfg.model_copy(update={"train": cfg.train.model_copy(update={"objective": "sft"})}), items)
    assert all(s.kind != "preference" for s in sft)
