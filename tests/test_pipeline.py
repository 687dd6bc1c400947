"""End-to-end runs of the real pipeline on a tiny local model: Python API, caching, gates, bad data."""

from __future__ import annotations

import json

import pytest
import yaml

from tuneloop import FineTunePipeline, PipelineConfig, PipelineStage, load_config
from tuneloop.registry.sqlite import SqliteRegistry
from tuneloop.workspace import Workspace

STAGES = [s.value for s in PipelineStage]


def _run(path, *overrides, use_cache=True):
    return FineTunePipeline(load_config(path, list(overrides)), use_cache=use_cache).run()


def test_full_loop_through_python_api(make_config):
    path = make_config()
    summary = _run(path)
    assert summary["overall"] == "passed", summary
    assert list(summary["stages"]) == STAGES
    for name, st in summary["stages"].items():
        assert st["status"] == "passed" and st["cached"] is False and st["error"] == "", name
        assert set(st) >= {"status", "duration_s", "metrics", "error", "cached"}
    ev = summary["stages"]["evaluation"]["metrics"]
    for key in ("accuracy", "base_accuracy", "harmful_rate", "capability_drop"):
        assert 0.0 <= ev[key] <= 1.0 or key == "capability_drop"
    assert ev["eval_items"] == 12 and ev["redteam_items"] >= 10

    run_dir = Workspace.for_config(load_config(path)).run_dir(summary["run_id"])
    for rel in [
        "config.yaml",
        "run.json",
        "summary.json",
        "report.html",
        "train_metrics.jsonl",
        "eval_items.jsonl",
        "run.log",
    ]:
        assert (run_dir / rel).is_file(), rel
    for stage in STAGES:
        assert (run_dir / "stages" / f"{stage}.json").is_file()
        assert (run_dir / "logs" / f"{stage}.log").is_file()
    losses = [json.loads(x)["loss"] for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lora_r"] == 4

    reg = SqliteRegistry(Workspace.for_config(load_config(path)).root)
    v = reg.get("tiny-bot", "champion")
    assert v.version == 1 and v.artifact_kind == "adapter"
    assert v.lineage["data"]["train_digest"] == summary["stages"]["data_validation"]["metrics"]["digest"]
    assert v.lineage["code_version"] and v.lineage["config_hash"]
    assert v.gates["min_accuracy"]["passed"] is True
    assert (reg.store.open_verified(v.artifact_digest) / "adapter_model.safetensors").is_file()


def test_unchanged_rerun_is_all_cached_and_threshold_change_skips_training(make_config):
    path = make_config()
    first = _run(path)
    again = _run(path)
    assert all(st["cached"] for st in again["stages"].values()), again["stages"]
    assert (
        again["stages"]["model_registry"]["metrics"]["version"]
        == first["stages"]["model_registry"]["metrics"]["version"]
    )

    changed = _run(path, "gates.max_harmful_rate=0.99")
    st = changed["stages"]
    assert [st[s]["cached"] for s in STAGES] == [True, True, True, False, False, False]
    assert st["evaluation"]["metrics"]["base_outputs_cached"] is True
    # Same weights, new gate verdicts: a new version whose artifact is the same stored blob.
    assert st["model_registry"]["metrics"]["version"] == 2
    assert (
        st["model_registry"]["metrics"]["artifact_sha256"]
        == first["stages"]["model_registry"]["metrics"]["artifact_sha256"]
    )


def test_blocking_gate_fails_the_run_and_registers_nothing(make_config):
    path = make_config(gates__min_accuracy=1.0)
    summary = _run(path)
    st = summary["stages"]
    assert summary["overall"] == "failed"
    assert st["evaluation"]["status"] == "failed"
    assert "min_accuracy" in st["evaluation"]["error"] and "is not >= 1.0" in st["evaluation"]["error"]
    assert st["model_registry"]["status"] == "skipped" and st["deployment"]["status"] == "skipped"
    assert SqliteRegistry(Workspace.for_config(load_config(path)).root).list_versions() == []


def test_classic_config_object_with_local_model(tmp_path, tiny_model, task_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig(
        name="support-bot",
        base_model=str(tiny_model),
        method="lora",
        train_data=str(task_data[0]),
        eval_data=str(task_data[1]),
        lora_r=4,
        learning_rate=1e-3,
        num_epochs=1,
        batch_size=16,
        min_accuracy=0.85,
        max_harmful_rate=0.01,
        max_capability_drop=0.02,
        auto_deploy=False,
    )
    summary = FineTunePipeline(cfg).run()
    # An untrained 2-layer model cannot reach 85% accuracy: the gate must block it.
    assert summary["overall"] == "failed"
    assert "deployment" not in summary["stages"]
    assert summary["stages"]["evaluation"]["status"] == "failed"
    assert summary["stages"]["training"]["metrics"]["steps"] == 3  # 48 records / batch 16, one epoch


def test_bad_records_are_quarantined_and_block_the_run(make_config, tmp_path):
    good = [json.loads(x) for x in open(load_config(make_config()).data.train_data)]
    lines = [json.dumps(r) for r in good[:20]] + ['{"messages": [ broken', '{"instruction": 1}', json.dumps(good[0])]
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("\n".join(lines) + "\n")
    # contamination_action=report: one of these training tickets shares a sentence with an eval ticket
    summary = _run(
        make_config(data__train_data=str(bad_file), data__min_valid_ratio=0.95, data__contamination_action="report")
    )
    st = summary["stages"]["data_validation"]
    assert summary["overall"] == "failed" and st["status"] == "failed"
    assert st["metrics"]["records"] == 23 and st["metrics"]["valid"] == 20 and st["metrics"]["duplicates"] == 1
    assert "quarantine" in st["error"] and "min_valid_ratio" in st["error"]
    stage_json = json.loads(
        (tmp_path / ".tuneloop" / "runs" / summary["run_id"] / "stages" / "data_validation.json").read_text()
    )
    assert stage_json["outputs"]["train_quarantine"] in st["error"]
    quarantine = [json.loads(x) for x in open(stage_json["outputs"]["train_quarantine"])]
    assert sorted(q["line"] for q in quarantine) == [21, 22, 23]
    assert all(q["reasons"] for q in quarantine)
    assert summary["stages"]["training"]["status"] == "skipped"


@pytest.mark.parametrize("method", ["full"])
def test_full_fine_tuning_registers_a_whole_model(make_config, method):
    summary = _run(make_config(train__method=method))
    assert summary["overall"] == "passed"
    reg = SqliteRegistry(Workspace.for_config(load_config(make_config(train__method=method))).root)
    v = reg.get("tiny-bot", "latest")
    assert v.artifact_kind == "model"
    assert (reg.store.open_verified(v.artifact_digest) / "model.safetensors").is_file()


def test_stages_are_a_declared_table_with_inputs_apart_from_the_work(tmp_path, tiny_model, task_data):
    """The stage table runs in PipelineStage order; each stage's cache key reads only what it declares."""
    from pathlib import Path

    from tuneloop import stages as st

    assert [s.stage for s in st.STAGES] == list(PipelineStage)
    cfg = PipelineConfig(
        name="decl",
        base_model=str(tiny_model),
        train_data=str(task_data[0]),
        eval_data=str(task_data[1]),
        workspace=str(tmp_path),
    )
    assert not st.STAGES[-1].enabled(cfg) and st.STAGES[-1].enabled(
        cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"auto_deploy": True})})
    )

    def outcome(key):
        return st.Outcome(key, {}, {})

    data = st.DataResult(outcome("d1"), Path("t"), None, "digest", None)
    prep = st.PreparedData(outcome("p1"), data, Path("x"), Path("e"), Path("tok"), Path("r"), Path("q"))
    model = st.TrainedModel(outcome("m1"), prep, Path("m"), "adapter")
    stricter = cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"min_accuracy": 0.99})})
    # A gate threshold is read by the evaluation only: training's inputs (and so its key) stay the same.
    assert st.training_inputs(stricter, prep) == st.training_inputs(cfg, prep)
    assert st.evaluation_inputs(stricter, model, None) != st.evaluation_inputs(cfg, model, None)
    # Each stage's inputs name the key of the stage before it, so a change upstream re-runs what follows.
    assert st.preprocessing_inputs(cfg, data)["data"] == "d1" and st.training_inputs(cfg, prep)["data"] == "p1"
    assert (
        st.evaluation_inputs(cfg, model, "champ")["model"] == "m1"
        and st.evaluation_inputs(cfg, model, "champ")["against"] == "champ"
    )
    assert "against" not in st.evaluation_inputs(cfg, model, None)
    evaluated = st.EvalResult(outcome("e1"), model, {})
    assert st.stage_keys(evaluated) == {
        "data_validation": "d1",
        "preprocessing": "p1",
        "training": "m1",
        "evaluation": "e1",
    }


def test_cache_keys_use_paths_relative_to_the_config(tmp_path, tiny_model, task_data):
    """Two copies of one project (config, data, base model) have the same stage inputs, so the same keys."""
    import shutil

    from tuneloop import stages as st

    keys = []
    for name in ("a", "b"):
        proj = tmp_path / name
        shutil.copytree(task_data[0].parent, proj / "data")
        shutil.copytree(tiny_model, proj / "base")
        (proj / "general.txt").write_text("The cat sat on the mat. " * 20)
        (proj / "tuneloop.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "copy-bot",
                    "base_model": "./base",
                    "data": {"train_data": "data/train.jsonl", "eval_data": "data/eval.jsonl"},
                    "eval": {
                        "general_text": "general.txt",
                        "suites": ["task", {"kind": "general_text", "path": "general.txt", "name": "gt"}],
                    },
                }
            )
        )
        cfg = load_config(proj / "tuneloop.yaml")
        assert cfg.base_model == str((proj / "base").resolve())  # resolved for the work ...
        prep = st.PreparedData(
            st.Outcome("p1", {}, {}),
            st.DataResult(st.Outcome("d1", {}, {}), proj, None, "x", None),
            proj,
            proj,
            proj,
            proj,
            proj,
        )
        model = st.TrainedModel(st.Outcome("m1", {}, {}), prep, proj, "adapter")
        keys.append((st.training_inputs(cfg, prep), st.evaluation_inputs(cfg, model, None)))
        assert keys[-1][0]["base_model"] == "base"  # ... but relative in the key
        assert keys[-1][1]["eval"]["suites"][1]["path"] == "general.txt"
    assert keys[0] == keys[1]
    assert st.config_relative("org/model", tmp_path) == "org/model"  # a hub id stays as it is
    assert st.config_relative("/elsewhere/base", tmp_path) == "/elsewhere/base"  # outside the project: as given


@pytest.mark.slow
def test_copied_workspace_is_fully_cached_and_registers_nothing_new(tmp_path, tiny_model, task_data):
    """Copy a project with its workspace elsewhere and delete the original: `run` there does no work."""
    import shutil

    proj = tmp_path / "proj"
    shutil.copytree(task_data[0].parent, proj / "data")
    shutil.copytree(tiny_model, proj / "base")
    (proj / "tuneloop.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "copy-bot",
                "base_model": "./base",
                "seed": 0,
                "data": {"train_data": "data/train.jsonl", "eval_data": "data/eval.jsonl", "max_length": 96},
                "train": {
                    "method": "lora",
                    "lora_r": 4,
                    "lora_alpha": 8,
                    "max_steps": 3,
                    "batch_size": 8,
                    "save_steps": 3,
                },
                "eval": {"max_new_tokens": 4, "suites": ["task", "general_text"]},
                "gates": {"min_accuracy": 0.0, "max_harmful_rate": 1.0, "max_capability_drop": 1.0},
                "deploy": {"auto_deploy": True},
            }
        )
    )
    first = _run(proj / "tuneloop.yaml")
    assert first["overall"] == "passed", first
    copy = tmp_path / "moved" / "proj-copy"
    shutil.copytree(proj, copy, symlinks=True)
    shutil.rmtree(proj)  # nothing may still point into the original

    again = _run(copy / "tuneloop.yaml")
    assert again["overall"] == "passed", {k: v["error"] for k, v in again["stages"].items()}
    assert {k: v["cached"] for k, v in again["stages"].items()} == {s: True for s in STAGES}, again["stages"]
    assert again["model_version"] == first["model_version"] == "copy-bot:1"
    reg = SqliteRegistry(copy / ".tuneloop")
    assert [v.version for v in reg.list_versions("copy-bot")] == [1]
    run_dir = copy / ".tuneloop" / "runs" / again["run_id"]
    training = json.loads((run_dir / "stages" / "training.json").read_text())
    assert training["outputs"]["model_dir"].startswith(str(copy / ".tuneloop"))  # paths follow the copy
    assert (run_dir / "train_metrics.jsonl").is_file() and (run_dir / "eval_items.jsonl").is_file()
    lineage = reg.get("copy-bot", 1).lineage
    assert lineage["base_model_given"] == "base"
