"""`data.train_data` as a list of sources with weights: config forms and errors, validation across sources,
weighting in preprocessing, cache keys, the other readers of the training data, and a pipeline run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tuneloop.config import TrainSource, build_config, load_config
from tuneloop.errors import ConfigError, InputError

SYSTEM = (
    "Answer with one word. Route this customer support ticket: refund, shipping, password, cancel, billing or other."
)


def chat(user: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


# Six tickets of an intent the task data never has, each worded differently (no near duplicates).
FEEDBACK = [
    chat("The blender I bought stopped working after a week, is it still under warranty?", "warranty"),
    chat("Does the two year guarantee cover a cracked phone screen from a drop?", "warranty"),
    chat("My headphones broke at the hinge; can the manufacturer repair them for free?", "warranty"),
    chat("Kettle leaks from the base since March. Which repair coverage applies here?", "warranty"),
    chat("Who pays for fixing a faulty washing machine motor within the covered period?", "warranty"),
    chat("Is water damage on my smartwatch included in the extended protection plan?", "warranty"),
]


def project(
    tmp_path: Path, train: list[dict], feedback: list[dict], weight: float = 3, extra: str = "", base: str = "m"
) -> Path:
    """A config in tmp_path reading data/train.jsonl and feedback/sft.jsonl (weight ``weight``); ``base``:
    a local model for what loads the tokenizer (nothing may reach the hub)."""
    write_jsonl(tmp_path / "data" / "train.jsonl", train)
    write_jsonl(tmp_path / "feedback" / "sft.jsonl", feedback)
    path = tmp_path / "tuneloop.yaml"
    path.write_text(
        f"name: x\nbase_model: {base}\ndata:\n  train_data: [data/train.jsonl, {{path: feedback/sft.jsonl, weight: {weight}}}]\n{extra}"
    )
    return path


# ------------------------------------------------------------------------------------------------ config


def test_single_string_is_unchanged_and_a_list_takes_paths_and_weights(tmp_path):
    one = build_config({"name": "x", "base_model": "m", "train_data": "a.jsonl"}, base_dir=tmp_path)
    assert one.data.train_data == str(tmp_path / "a.jsonl")  # still a plain string
    assert one.data.train_sources == [TrainSource(path=str(tmp_path / "a.jsonl"))]
    assert one.to_dict()["data"]["train_data"] == str(tmp_path / "a.jsonl")

    cfg = load_config(project(tmp_path, [chat("a", "b")], [chat("c", "d")]))  # the YAML flow form of the docs
    srcs = cfg.data.train_sources
    assert [(s.path, s.weight, s.label) for s in srcs] == [
        (str(tmp_path / "data" / "train.jsonl"), 1.0, "data/train.jsonl"),
        (str(tmp_path / "feedback" / "sft.jsonl"), 3.0, "feedback/sft.jsonl"),
    ]
    assert json.loads(json.dumps(cfg.to_dict()))["data"]["train_data"][1] == {
        "path": str(tmp_path / "feedback" / "sft.jsonl"),
        "weight": 3.0,
    }
    flat = build_config(
        {"name": "x", "base_model": "m", "train_data": ["a.jsonl", {"path": "/abs/b.jsonl", "weight": 0.5}]},
        base_dir=tmp_path,
    )
    assert [s.path for s in flat.data.train_sources] == [str(tmp_path / "a.jsonl"), "/abs/b.jsonl"]
    over = load_config(
        tmp_path / "tuneloop.yaml", ["data.train_data=[data/train.jsonl, {path: feedback/sft.jsonl, weight: 2}]"]
    )
    assert over.data.train_sources[1].weight == 2.0


@pytest.mark.parametrize(
    "value, message",
    [
        ([], "train_data: an empty list; give at least one source"),
        (["a.jsonl", "a.jsonl"], "train_data[1]: 'a.jsonl' is listed twice"),
        (["a.jsonl", {"path": "b.jsonl", "weight": 0}], "train_data[1].weight: bad value 0; expected a number > 0"),
        (["a.jsonl", {"path": "b.jsonl", "weight": -2}], "train_data[1].weight: bad value -2; expected a number > 0"),
        (
            ["a.jsonl", {"path": "b.jsonl", "weight": float("nan")}],
            "train_data[1].weight: bad value nan; expected a finite number",
        ),
        (
            ["a.jsonl", {"path": "b.jsonl", "weight": 101}],
            "train_data[1].weight: bad value 101; expected a number <= 100",
        ),
        (["a.jsonl", {"path": "b.jsonl", "wieght": 2}], "train_data[1].wieght: unknown key; did you mean `weight`?"),
        ([{"weight": 2}], "train_data[0].path: required key is missing"),
        (["a.jsonl", 3], "train_data[1]: bad value 3; expected a path (a string) or {path: ..., weight: ...}"),
        (5, "train_data: bad value 5; expected a dataset path or name (a string), or a list of sources"),
    ],
)
def test_bad_source_lists_are_reported_by_item(tmp_path, value, message):
    with pytest.raises(ConfigError) as exc:
        build_config({"name": "x", "base_model": "m", "data": {"train_data": value}}, base_dir=tmp_path)
    assert len(exc.value.problems) == 1, exc.value.problems  # no "expected a string" noise from the other form
    assert exc.value.problems[0].startswith("data." + message), exc.value.problems


def test_a_bad_weight_in_a_yaml_file_points_at_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\nbase_model: m\ndata:\n  eval_split: 0.2\n  train_data: [a.jsonl, {path: b.jsonl, weight: .nan}]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == [f"data.train_data[1].weight ({path}:5): bad value nan; expected a finite number"]


# --------------------------------------------------------------------------------------------- validation


def test_records_are_validated_together_and_named_by_their_source(tmp_path):
    from tuneloop.data.validate import validate_splits

    train = [
        chat(f"Ticket {i}: the order with number {1000 + i} never arrived at my flat in town {i}", "shipping")
        for i in range(10)
    ]
    bad = {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "other"}]}
    exported = {
        **train[4],
        "id": "fb-1",
        "meta": {"origin": "rated_good", "request_ids": ["r1"]},
    }  # as feedback export writes it
    cfg = load_config(
        project(tmp_path, train, [exported, FEEDBACK[0], bad, FEEDBACK[1]], extra="  min_valid_ratio: 0.95\n")
    )
    verdict = validate_splits(cfg.data, tmp_path / "out")
    rep = verdict.reports["train"]
    assert rep["path"] == "data/train.jsonl + feedback/sft.jsonl"
    assert rep["sources"] == [
        {"path": "data/train.jsonl", "records": 10, "valid": 10},
        {"path": "feedback/sft.jsonl", "records": 4, "valid": 2},
    ]
    assert (rep["records"], rep["valid"], rep["duplicates"], rep["invalid"]) == (14, 12, 1, 1)
    quarantined = [json.loads(x) for x in (tmp_path / "out" / "train.quarantine.jsonl").read_text().splitlines()]
    assert [(q["file"], q["line"]) for q in quarantined] == [("feedback/sft.jsonl", 1), ("feedback/sft.jsonl", 3)]
    assert quarantined[0]["reasons"] == ["exact_duplicate: same as line 5 of data/train.jsonl"]
    # The gate's "file:line: rule: reason" names the second source and its own line.
    assert any("feedback/sft.jsonl:3: empty_content" in f for f in verdict.failures), verdict.failures
    html = (tmp_path / "out" / "train.report.html").read_text()
    assert "<h2>Sources</h2>" in html and "<td>feedback/sft.jsonl</td><td>4</td><td>2</td>" in html
    clean = [json.loads(x) for x in (tmp_path / "out" / "train.clean.jsonl").read_text().splitlines()]
    assert [(c["_file"], c["_line"], c["_source"]) for c in clean[-2:]] == [
        ("feedback/sft.jsonl", 2, 1),
        ("feedback/sft.jsonl", 4, 1),
    ]


def test_data_validate_on_a_config_with_sources_and_a_single_source_as_before(tmp_path, tiny_model):
    from tuneloop.checks import validate_target
    from tuneloop.data.validate import validate_dataset

    # 4 records hold out 1 eval item, on which no model could pass min_accuracy 0.85 (exit 2): this test is
    # about the data, so that gate is off
    path = project(
        tmp_path,
        [chat("Where is my parcel with the new lamp?", "shipping")],
        FEEDBACK[:3],
        base=str(tiny_model),
        extra="gates:\n  min_accuracy: null\n",
    )
    rep = validate_target(str(path), out_dir=tmp_path / "out")
    assert rep["passed"] and rep["valid"] == 4 and [s["valid"] for s in rep["sources"]] == [1, 3]
    single = validate_dataset(str(tmp_path / "feedback" / "sft.jsonl"), tmp_path / "single")
    assert single["path"] == str(tmp_path / "feedback" / "sft.jsonl") and "sources" not in single
    clean = [json.loads(x) for x in (tmp_path / "single" / "train.clean.jsonl").read_text().splitlines()]
    assert [sorted(k for k in c if k.startswith("_")) for c in clean] == [["_line"]] * 3  # no _file, no _source


def test_a_near_duplicate_across_sources_is_found(tmp_path):
    from tuneloop.data.validate import validate_dataset

    text = (
        "I ordered a blue winter jacket in size medium three weeks ago and it still has not been shipped to me, "
        "although the shop said on the phone last Monday that every order placed before the sale would go out within two days"
    )
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [chat(text, "shipping"), chat("How do I reset the password of my account please", "password")],
    )
    b = write_jsonl(tmp_path / "b.jsonl", [chat(text + " yet", "shipping")])
    rep = validate_dataset([TrainSource(path=str(a)), TrainSource(path=str(b))], tmp_path / "out")
    assert rep["near_duplicates"] == 1
    assert rep["examples"]["near_duplicate"][0]["file"] == str(b)
    assert f"similar to line 1 of {a}" in rep["examples"]["near_duplicate"][0]["reason"]


def test_sources_must_share_a_format_and_may_be_directories(tmp_path):
    from tuneloop.data.sources import open_sources, source_problem
    from tuneloop.data.validate import validate_dataset

    msgs = write_jsonl(tmp_path / "msgs.jsonl", [chat("hello there", "other")])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "hi", "output": "other"}])
    with pytest.raises(InputError, match="alpaca.jsonl holds alpaca records but .*msgs.jsonl holds messages"):
        open_sources([TrainSource(path=str(msgs)), TrainSource(path=str(alpaca))])
    assert open_sources([TrainSource(path=str(msgs)), TrainSource(path=str(alpaca))], "messages").format == "messages"

    write_jsonl(tmp_path / "fb" / "day1.jsonl", [FEEDBACK[2]])
    write_jsonl(tmp_path / "fb" / "day2.jsonl", [FEEDBACK[3], {"messages": []}])
    cfg = build_config({"name": "x", "base_model": "m", "train_data": ["msgs.jsonl", "fb"]}, base_dir=tmp_path)
    rep = validate_dataset(cfg.data.train_data, tmp_path / "out")
    assert (
        rep["examples"]["bad_structure"][0]["file"] == "fb/day2.jsonl"
        and rep["examples"]["bad_structure"][0]["line"] == 2
    )
    assert [s["valid"] for s in rep["sources"]] == [1, 2]

    nested = build_config({"name": "x", "base_model": "m", "train_data": ["fb", "fb/day1.jsonl"]}, base_dir=tmp_path)
    assert "fb and fb/day1.jsonl hold the same files" in source_problem(nested.data.train_data)
    missing = build_config(
        {"name": "x", "base_model": "m", "train_data": ["msgs.jsonl", "nope.jsonl"]}, base_dir=tmp_path
    )
    assert source_problem(missing.data.train_data).startswith("[1] nope.jsonl: file not found")


# ------------------------------------------------------------------------------------------- weighting


def test_weights_repeat_or_sample_records_deterministically():
    from tuneloop.data.prepare import apply_weights

    records = [{"_source": 0, "i": i} for i in range(10)] + [{"_source": 1, "i": i} for i in range(1000)]
    srcs = [TrainSource(path="a", weight=3), TrainSource(path="b", weight=0.5)]
    out, rows = apply_weights(records, srcs, seed=7)
    assert rows[0] == {"path": "a", "weight": 3.0, "train_records": 10, "samples": 30}
    assert rows[1]["train_records"] == 1000 and 430 < rows[1]["samples"] < 570  # a seeded half sample
    assert len(out) == 30 + rows[1]["samples"]
    assert out == apply_weights(records, srcs, seed=7)[0]  # the same seed, the same set
    assert out != apply_weights(records, srcs, seed=8)[0]
    mixed, rows = apply_weights(records[:10], [TrainSource(path="a", weight=1.5)], seed=1)
    assert 10 <= rows[0]["samples"] <= 20 and all(mixed.count(r) in (1, 2) for r in records[:10])
    assert apply_weights(records, None, seed=7) == (records, None)  # a single source: untouched


def test_the_eval_split_is_drawn_before_weighting(tmp_path, tiny_model):
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.fsutil import read_jsonl
    from tuneloop.modeling import load_tokenizer

    recs = [
        {**chat(f"question {i} about parcel number {i * 13}", "shipping"), "_line": i + 1, "_source": i % 2}
        for i in range(40)
    ]
    clean = write_jsonl(tmp_path / "train.clean.jsonl", recs)
    srcs = [TrainSource(path="a.jsonl"), TrainSource(path="b.jsonl", weight=3)]
    metrics = prepare_dataset(
        load_tokenizer(str(tiny_model)),
        clean,
        None,
        tmp_path / "out",
        max_length=96,
        eval_split=0.25,
        seed=3,
        sources=srcs,
    )
    held = {r["messages"][1]["content"] for r in read_jsonl(tmp_path / "out" / "eval_records.jsonl")}
    trained = [r["messages"][1]["content"] for r in read_jsonl(tmp_path / "out" / "train_records.jsonl")]
    assert len(held) == 10 and not held & set(trained)  # no copy of an eval record is trained on
    rows = metrics["sources"]
    assert [r["records"] for r in rows] == [20, 20] and sum(r["train_records"] for r in rows) == 30
    assert rows[1]["samples"] == 3 * rows[1]["train_records"] and rows[0]["samples"] == rows[0]["train_records"]
    assert metrics["train_samples"] == len(trained) == rows[0]["samples"] + rows[1]["samples"]


def test_preference_pairs_are_weighted_too(tmp_path):
    from tuneloop.data.prepare import prepare_preferences

    def pair(i: int, source: int) -> dict:
        return {
            "messages": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
            "_line": i + 1,
            "_source": source,
        }

    clean = write_jsonl(tmp_path / "clean.jsonl", [pair(i, 0) for i in range(4)] + [pair(i, 1) for i in range(4, 6)])
    ev = write_jsonl(tmp_path / "eval.jsonl", [pair(9, 0)])
    metrics = prepare_preferences(
        clean,
        ev,
        tmp_path / "out",
        eval_split=0.1,
        seed=0,
        sources=[TrainSource(path="a"), TrainSource(path="b", weight=2)],
    )
    assert metrics["train_samples"] == 4 + 2 * 2
    assert [(r["records"], r["samples"]) for r in metrics["sources"]] == [(4, 4), (2, 4)]


# ------------------------------------------------------------------------------------------- cache keys


def test_weights_key_preprocessing_not_validation_and_a_moved_project_keeps_its_keys(tmp_path, tiny_model):
    import shutil

    from tuneloop import stages as st

    first = load_config(project(tmp_path / "a", [chat("a question", "other")], [FEEDBACK[0]], base=str(tiny_model)))
    heavier = load_config(
        tmp_path / "a" / "tuneloop.yaml", ["data.train_data=[data/train.jsonl, {path: feedback/sft.jsonl, weight: 4}]"]
    )
    swapped = load_config(tmp_path / "a" / "tuneloop.yaml", ["data.train_data=[feedback/sft.jsonl, data/train.jsonl]"])
    data = st.DataResult(st.Outcome("d1", {}, {}), Path("t"), None, "digest", None)
    assert st.data_validation_inputs(first) == st.data_validation_inputs(heavier)
    assert st.data_validation_inputs(first) != st.data_validation_inputs(swapped)  # order matters
    assert st.preprocessing_inputs(first, data)["weights"] == [1.0, 3.0]
    assert st.preprocessing_inputs(first, data) != st.preprocessing_inputs(heavier, data)
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "b")
    moved = load_config(tmp_path / "moved" / "b" / "tuneloop.yaml")
    assert st.data_validation_inputs(moved) == st.data_validation_inputs(first)
    single = build_config(
        {"name": "x", "base_model": str(tiny_model), "train_data": str(tmp_path / "a" / "data" / "train.jsonl")}
    )
    assert "weights" not in st.preprocessing_inputs(single, data)


# ------------------------------------------------------------------------------------ other readers


def test_drift_feedback_and_export_read_every_source(tmp_path, tiny_model):
    from tuneloop.feedback.export import eval_texts_for_config
    from tuneloop.monitor.drift import training_prompts
    from tuneloop.train.external import export_config

    train = [chat("Where is my parcel with the new lamp?", "shipping")]
    cfg = load_config(project(tmp_path, train, FEEDBACK[:2], weight=1, base=str(tiny_model)))
    prompts = training_prompts(cfg.data.train_data)
    assert prompts == [
        "Where is my parcel with the new lamp?",
        FEEDBACK[0]["messages"][1]["content"],
        FEEDBACK[1]["messages"][1]["content"],
    ]
    assert len(eval_texts_for_config(cfg)) == 3  # no eval_data: the eval items are a split of every source

    ax = yaml.safe_load(export_config(cfg, "axolotl"))
    assert [d["path"] for d in ax["datasets"]] == [s.path for s in cfg.data.train_sources]
    lf = tmp_path / "lf" / "llamafactory.yaml"
    assert yaml.safe_load(export_config(cfg, "llamafactory", lf))["dataset"] == "x_train,x_train_1"
    assert set(json.loads((lf.parent / "dataset_info.json").read_text())) == {"x_train", "x_train_1"}
    weighted = load_config(
        tmp_path / "tuneloop.yaml", ["data.train_data=[data/train.jsonl, {path: feedback/sft.jsonl, weight: 3}]"]
    )
    with pytest.raises(
        ConfigError, match=r"cannot carry source weights \(feedback/sft.jsonl \(weight 3\)\).*train_records.jsonl"
    ):
        export_config(weighted, "axolotl")


# ------------------------------------------------------------------------------------------ pipeline


@pytest.mark.slow
def test_pipeline_trains_on_weighted_sources_and_a_weight_change_reuses_validation(make_config, task_data, tmp_path):
    from tuneloop import FineTunePipeline
    from tuneloop.registry.sqlite import SqliteRegistry
    from tuneloop.workspace import Workspace

    write_jsonl(tmp_path / "feedback" / "sft.jsonl", FEEDBACK)
    path = make_config(data__train_data=[str(task_data[0]), {"path": "feedback/sft.jsonl", "weight": 3}])
    first = FineTunePipeline(load_config(path)).run()
    assert first["overall"] == "passed", first
    st = first["stages"]
    kept = st["data_validation"]["metrics"]["valid"]
    rows = st["preprocessing"]["metrics"]["sources"]
    assert rows[1] == {"path": "feedback/sft.jsonl", "weight": 3.0, "records": 6, "train_records": 6, "samples": 18}
    assert (
        rows[0]["records"] == rows[0]["train_records"] == rows[0]["samples"] == kept - 6
    )  # eval_data given: nothing held out
    assert st["preprocessing"]["metrics"]["train_samples"] == kept - 6 + 18
    assert st["data_validation"]["metrics"]["sources"][1] == {"path": "feedback/sft.jsonl", "records": 6, "valid": 6}
    assert first["stages"]["model_registry"]["status"] == "passed"

    again = FineTunePipeline(
        load_config(path, [f"data.train_data=[{task_data[0]}, {{path: feedback/sft.jsonl, weight: 2}}]"])
    ).run()
    cached = {name: s["cached"] for name, s in again["stages"].items()}
    assert cached["data_validation"] is True and cached["preprocessing"] is False and cached["training"] is False, (
        cached
    )
    assert again["stages"]["preprocessing"]["metrics"]["train_samples"] == kept - 6 + 12
    assert math.isclose(again["stages"]["preprocessing"]["metrics"]["sources"][1]["weight"], 2.0)
    lineage = SqliteRegistry(Workspace.for_config(load_config(path)).root).get("tiny-bot", "latest").lineage
    assert lineage["data"]["train_path"] == [
        {"path": str(task_data[0]), "weight": 1.0},
        {"path": str(tmp_path / "feedback" / "sft.jsonl"), "weight": 2.0},
    ]
