"""DPO: preference records from both accepted shapes, and a real DPO run of the pipeline on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop import FineTunePipeline, load_config
from tuneloop.data.prepare import trl_preference
from tuneloop.data.validate import validate_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def test_preference_records_become_trl_conversations(tmp_path):
    raw = json.loads((SHARED / "dpo_en_demo.json").read_text())[0]
    simple = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be brief."}
    bad = [{"prompt": "x", "chosen": "a"}, {"prompt": "x", "chosen": "a", "rejected": "a"},
           {"conversations": [{"from": "robot", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": "b"}]
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
def test_dpo_pipeline_on_dpo_en_demo(make_config, tmp_path):
    records = json.loads((SHARED / "dpo_en_demo.json").read_text())[:24]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(records))
    path = make_config(
        data={"train_data": str(data), "max_length": 128, "eval_split": 0.1},
        train={"objective": "dpo", "method": "lora", "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3,
               "max_steps": 4, "batch_size": 4, "save_steps": 2},
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
    assert (Path(model_dir) / "adapter_config.json").is_file() and (Path(model_dir) / "adapter_model.safetensors").is_file()
    assert stage["outputs"]["kind"] == "adapter"
    ev = st["evaluation"]["metrics"]
    assert ev["eval_items"] == 2  # the chosen answer is the reference


@pytest.mark.slow
def test_dpo_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_does(make_config, tmp_path):
    import shutil

    from tuneloop.data.prepare import prepare_preferences
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.dpo import train_dpo

    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(json.loads((SHARED / "dpo_en_demo.json").read_text())[:16]))
    rep = validate_dataset(data, tmp_path / "valid", fmt="preference")
    prepare_preferences(Path(rep["clean_path"]), None, tmp_path / "prep", eval_split=0.1, seed=0)
    cfg = load_config(make_config(
        data={"train_data": str(data), "max_length": 96},
        train={"objective": "dpo", "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3, "max_steps": 4, "batch_size": 4,
               "save_steps": 2, "lora_dropout": 0.0},
    ))
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
