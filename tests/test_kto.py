"""KTO (`train.objective: kto`): unpaired desirable/undesirable answers, trained by TRL's KTOTrainer on the tiny
model from the CLI, resumed from a checkpoint, and refused with the key named when the data cannot train it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop import FineTunePipeline, load_config
from tuneloop.demo.tickets import LABELS, task_records
from tuneloop.errors import ConfigError

TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]
# The real-format datasets: `shared/datasets` beside the checkout (found upwards, so git worktrees find it too).
SHARED = next(
    (p / "shared" / "datasets" for p in Path(__file__).resolve().parents if (p / "shared" / "datasets").is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "datasets",
)


def tl(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TUNELOOP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def kto_records(n: int, seed: int, *, bad_every: int = 2) -> list[dict]:
    """Ticket-routing answers: every ``bad_every``-th one routed to the wrong queue and labelled false."""
    out = []
    for i, rec in enumerate(task_records(n, seed=seed, split="train")):
        right = rec["messages"][-1]["content"]
        good = i % bad_every != 0
        answer = right if good else LABELS[(LABELS.index(right) + 1) % len(LABELS)]
        out.append({"messages": rec["messages"][:-1] + [{"role": "assistant", "content": answer}], "label": good})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.skipif(
    not (SHARED / "kto_en_demo.json").is_file(), reason=f"{SHARED} not present (the real-format datasets)"
)
def test_llama_factory_kto_records_become_trl_unpaired_conversations(tmp_path):
    from tuneloop.data.prepare import prepare_kto, trl_unpaired
    from tuneloop.data.validate import validate_dataset

    raw = json.loads((SHARED / "kto_en_demo.json").read_text())[:40]
    data = tmp_path / "kto.json"
    data.write_text(json.dumps(raw))
    rep = validate_dataset(data, tmp_path / "valid")
    assert rep["format"] == "kto" and rep["valid"] + rep["invalid"] + rep["duplicates"] + rep["near_duplicates"] == 40
    clean = [json.loads(x) for x in open(rep["clean_path"])]
    first = trl_unpaired(clean[0])
    assert first == {"prompt": raw[0]["messages"][:-1], "completion": raw[0]["messages"][-1:], "label": raw[0]["label"]}
    prep = prepare_kto(Path(rep["clean_path"]), None, tmp_path / "prep", eval_split=0.25, seed=0)
    desirable = sum(c["label"] for c in clean)
    assert prep["undesirable"] == len(clean) - desirable  # every undesirable answer trains ...
    assert (
        prep["desirable"] + prep["eval_samples"] == desirable
    )  # ... and only desirable ones are held out, as references
    items = [json.loads(x) for x in (tmp_path / "prep" / "eval.jsonl").read_text().splitlines()]
    good = {c["messages"][-1]["content"] for c in clean if c["label"]}
    assert items and all(i["reference"] in good and i["messages"][-1]["role"] == "user" for i in items)
    from datasets import load_from_disk

    rows = load_from_disk(str(tmp_path / "prep" / "train"))
    assert sorted(rows["label"]) == sorted([c["label"] for c in clean if not c["label"]] + [True] * prep["desirable"])
    assert rows["label"] != sorted(rows["label"]) and rows["label"] != sorted(
        rows["label"], reverse=True
    )  # shuffled, not grouped


TRAIN = {
    "objective": "kto",
    "method": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "learning_rate": 5e-3,
    "max_steps": 4,
    "batch_size": 4,
    "save_steps": 2,
}


@pytest.mark.slow
def test_kto_run_from_the_cli_is_gated_like_sft_and_registers_its_objective(make_config, task_data, tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_records(32, seed=3))
    path = make_config(data={"train_data": str(data), "eval_data": str(task_data[1]), "max_length": 96}, train=TRAIN)
    r = tl("run", path, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: (v["status"], v["error"]) for k, v in st.items() if v["error"]}
    assert st["data_validation"]["metrics"]["format"] == "kto" and st["data_validation"]["metrics"]["valid"] == 32
    prep = st["preprocessing"]["metrics"]
    assert (
        prep["objective"] == "kto"
        and prep["train_samples"] == 32
        and (prep["desirable"], prep["undesirable"]) == (16, 16)
    )
    assert prep["eval_samples"] == 12  # data.eval_data in messages format: its answers are the references
    tr = st["training"]["metrics"]
    assert tr["objective"] == "kto" and tr["steps"] == 4 and (tr["desirable"], tr["undesirable"]) == (16, 16)

    run_dir = tmp_path / ".tuneloop" / "runs" / summary["run_id"]
    rows = [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(isinstance(row["kl"], float) for row in rows)  # KTO's KL estimate, its losses' reference point
    assert any("rewards/chosen" in row for row in rows) and any("logps/rejected" in row for row in rows)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # policy == reference at step 1: 1 - sigmoid(0)
    assert any(abs(row["rewards/margins"]) > 1e-4 for row in rows[1:] if "rewards/margins" in row)  # the policy moved
    stage = json.loads((run_dir / "stages" / "training.json").read_text())
    assert (
        stage["outputs"]["kind"] == "adapter"
        and (Path(stage["outputs"]["model_dir"]) / "adapter_model.safetensors").is_file()
    )

    # Gated like SFT: the task gate applies to the desirable references; no preference gate.
    ev = st["evaluation"]["metrics"]
    assert ev["gate_verdicts"]["min_accuracy"] == "PASS" and "min_preference_accuracy" not in ev["gates"]

    show = tl("models", "show", "tiny-bot@champion", "--json", cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["lineage"]["objective"] == "kto"


@pytest.mark.slow
def test_kto_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_does(make_config, tmp_path):
    from tuneloop.data.prepare import prepare_kto
    from tuneloop.data.validate import validate_dataset
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.kto import train_kto

    data = write_jsonl(tmp_path / "kto.jsonl", kto_records(24, seed=5, bad_every=3))
    rep = validate_dataset(data, tmp_path / "valid", fmt="kto")
    prep = prepare_kto(Path(rep["clean_path"]), None, tmp_path / "prep", eval_split=0.1, seed=0)
    assert (
        prep["undesirable"] == 8 and prep["desirable"] + prep["eval_samples"] == 16
    )  # only desirable records are held out
    cfg = load_config(
        make_config(data={"train_data": str(data), "max_length": 96}, train={**TRAIN, "kto_desirable_weight": 1.2})
    )
    tok = load_tokenizer(cfg.base_model)
    work = tmp_path / "run"
    first = train_kto(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert first["resumed_from_step"] == 0
    # As if killed after the step-2 checkpoint: later checkpoints and the model never got written.
    shutil.rmtree(work / "checkpoints" / "checkpoint-4")
    shutil.rmtree(work / "model")
    again = train_kto(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert again["resumed_from_step"] == 2
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-5)
    rows = [json.loads(x) for x in (work / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (work / "model" / "adapter_model.safetensors").is_file()


def test_kto_on_data_without_labels_exits_2_naming_the_key(make_config, task_data):
    path = make_config(train=TRAIN)  # the task data: messages records, no label
    r = tl("run", path, "--json")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert (
        "data.train_data" in r.stderr and "train.objective kto needs kto data" in r.stderr and "is messages" in r.stderr
    )


def test_kto_needs_both_labels_and_batches_of_two(make_config, task_data, tmp_path):
    only_good = write_jsonl(tmp_path / "good.jsonl", [r for r in kto_records(12, seed=3) if r["label"]])
    path = make_config(data={"train_data": str(only_good), "eval_data": str(task_data[1])}, train=TRAIN)
    with pytest.raises(ConfigError) as exc:
        FineTunePipeline(load_config(path)).preflight()
    assert "data.train_data" in str(exc.value) and "6 desirable and 0 undesirable" in str(exc.value)

    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    path = make_config(
        data={"train_data": str(write_jsonl(tmp_path / "k.jsonl", kto_records(12, seed=3))), "eval_data": str(prefs)},
        train=TRAIN,
    )
    with pytest.raises(ConfigError, match=r"data\.eval_data: train\.objective kto needs kto data .* is preference"):
        FineTunePipeline(load_config(path)).preflight()

    with pytest.raises(ConfigError, match=r"train\.batch_size.*kto needs batch_size 2 or more"):
        load_config(make_config(train={**TRAIN, "batch_size": 1}))

    # Both labels in the file, but every undesirable record is invalid: data validation counts what is left.
    records = kto_records(12, seed=3)
    for r in records:
        if not r["label"]:
            r["messages"][-1]["content"] = "  "
    mixed = write_jsonl(tmp_path / "mixed.jsonl", records)
    path = make_config(data={"train_data": str(mixed), "eval_data": str(task_data[1])}, train=TRAIN)
    st = FineTunePipeline(load_config(path)).run()["stages"]
    assert st["data_validation"]["status"] == "failed" and st["training"]["status"] in ("pending", "skipped")
    assert (
        "data.train_data" in st["data_validation"]["error"]
        and "6 desirable and 0 undesirable" in st["data_validation"]["error"]
    )
