"""Formats (detection + normalisers), sources (JSON, JSONL, Parquet, CSV, directories, HF datasets), hostile
records, over-long samples, near duplicates / contamination in the report, PII policies, data gates, diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneloop.data.diff import diff_datasets
from tuneloop.data.formats import FORMATS, RULES, detect_format, normalise, sft_messages
from tuneloop.data.gates import data_gates, gate_failures
from tuneloop.data.validate import Checks, validate_dataset
from tuneloop.errors import InputError

SHARED = Path(__file__).parents[1] / ".." / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")
REMOVED = ("invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped", "overlong_dropped")


def codes(reasons):
    return [r.split(":", 1)[0] for r in reasons]


def read_jsonl(path) -> list[dict]:
    # split on "\n" only: str.splitlines() would also split on U+0085/U+2028 inside (unescaped) strings
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").split("\n") if x]


def write_jsonl(path: Path, rows) -> Path:
    data = b""
    for row in rows:
        data += (row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n"
    path.write_bytes(data)
    return path


def accounted(report) -> tuple[list[dict], list[dict]]:
    """Every record is in exactly one of clean / quarantine, and the report's accounting adds up."""
    clean, quarantine = read_jsonl(report["clean_path"]), read_jsonl(report["quarantine_path"])
    assert report["records"] == report["valid"] + sum(report[k] for k in REMOVED), report["accounting"]
    assert len(clean) == report["valid"] and len(quarantine) == sum(report[k] for k in REMOVED)
    assert all(q["reasons"] and all(r.split(":")[0] in RULES for r in q["reasons"]) for q in quarantine)
    positions = [(r.get("_file"), r["_line"]) for r in clean] + [(q.get("file"), q["line"]) for q in quarantine]
    assert len(set(positions)) == report["records"]
    return clean, quarantine


NO_SIM = Checks(near_dup_threshold=None)  # exact rules only, for tests about single records


# --- the shared datasets ------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize(
    "name, fmt, records, invalid",
    [
        ("alpaca_en_demo.json", "alpaca", 999, 0),
        ("identity.json", "alpaca", 91, 85),  # {{name}} / {{author}} left unfilled
        ("dpo_en_demo.json", "preference", 300, 0),
        ("glaive_toolcall_en_demo.json", "sharegpt", 300, 0),
        ("kto_en_demo.json", "kto", 300, 0),
        ("c4_demo.jsonl", "text", 300, 0),
    ],
)
def test_shared_datasets_detected_and_accounted(tmp_path, name, fmt, records, invalid):
    report = validate_dataset(SHARED / name, tmp_path)
    assert (report["format"], report["records"], report["invalid"]) == (fmt, records, invalid)
    clean, quarantine = accounted(report)
    if name == "identity.json":
        assert report["rules"]["placeholder"] == 85
        assert all("{{" not in json.dumps(r) for r in clean)
        assert "{{name}}" in quarantine[0]["reasons"][0]
    if fmt == "preference":
        assert all(set(r) >= {"messages", "chosen", "rejected"} and r["messages"][-1]["role"] == "user" for r in clean)
    if fmt == "kto":
        assert {r["label"] for r in clean} == {True, False}
    if fmt == "sharegpt":
        tool_records = [r for r in clean if any(m["role"] == "tool" for m in r["messages"])]
        assert tool_records and all("tools" in r for r in clean[:5])
        assert any(m.get("tool_call") for m in tool_records[0]["messages"])


# --- normalisers --------------------------------------------------------------------------------


def test_sharegpt_tools_system_and_function_calls():
    rec = {
        "system": "Be helpful.",
        "tools": [{"name": "add", "parameters": {}}],
        "conversations": [
            {"from": "human", "value": "1+2?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "It is 3."},
        ],
    }
    out, reasons = normalise(rec, "sharegpt")
    assert reasons == []
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert out["messages"][2]["tool_call"] is True
    assert json.loads(out["tools"]) == [{"name": "add", "parameters": {}}]
    assert detect_format([rec]) == "sharegpt"


@pytest.mark.parametrize(
    "turns, code",
    [
        ([("gpt", "hi")], "role_order"),
        ([("human", "a"), ("observation", "x"), ("gpt", "b")], "role_order"),
        ([("human", "a"), ("wizard", "b")], "bad_role"),
        ([("human", "a"), ("gpt", "")], "empty_content"),
        ([("human", "a"), ("gpt", 7)], "non_string_content"),
        ([("human", "a"), ("gpt", "b"), ("human", "c")], "no_final_assistant"),
    ],
)
def test_sharegpt_rules(turns, code):
    out, reasons = normalise({"conversations": [{"from": f, "value": v} for f, v in turns]}, "sharegpt")
    assert out is None and code in codes(reasons), reasons


def test_messages_with_openai_tool_calls():
    rec = {
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
            {"role": "assistant", "content": "It rains."},
        ]
    }
    out, reasons = normalise(rec, "messages")
    assert reasons == []
    call = out["messages"][1]
    assert call["tool_call"] is True and json.loads(call["content"]) == {
        "name": "weather",
        "arguments": {"city": "Oslo"},
    }
    bad = {"messages": [rec["messages"][0], {"role": "assistant", "content": None, "tool_calls": "x"}]}
    assert codes(normalise(bad, "messages")[1]) == ["bad_structure"]


def test_preference_plain_and_sharegpt_shapes():
    out, reasons = normalise({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "preference")
    assert reasons == []
    assert out == {
        "messages": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert sft_messages(out)[-1] == {"role": "assistant", "content": "good"}
    rec = {
        "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    out, reasons = normalise(rec, "preference")
    assert reasons == [] and [m["role"] for m in out["messages"]] == ["system", "user"]
    assert detect_format([rec]) == "preference"
    for broken, code in [
        ({"prompt": "q", "chosen": "a"}, "missing_field"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "bad_structure"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "non_string_content"),
        (
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "chosen": "x",
                "rejected": "y",
            },
            "role_order",
        ),
        ({"prompt": "q", "chosen": {"from": "human", "value": "x"}, "rejected": "y"}, "role_order"),
    ]:
        out, reasons = normalise(broken, "preference")
        assert out is None and code in codes(reasons), (broken, reasons)


def test_kto_and_text():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert normalise({"messages": msgs, "label": False}, "kto") == ({"messages": msgs, "label": False}, [])
    for label in (None, "true", 1):
        out, reasons = normalise({"messages": msgs, "label": label}, "kto")
        assert out is None and codes(reasons) == ["bad_label"]
    assert detect_format([{"messages": msgs, "label": True}]) == "kto"
    assert normalise({"text": "hello", "meta": 1}, "text") == ({"text": "hello"}, [])
    assert codes(normalise({"text": "  "}, "text")[1]) == ["empty_content"]
    assert codes(normalise({"text": ["a"]}, "text")[1]) == ["non_string_content"]
    assert detect_format([{"text": "x"}]) == "text"


# --- property: normalisers never crash, validation accounts for every record ---------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=12
)
texts = st.sampled_from(["", " ", "hi", "{{name}}", "a@b.co"]) | json_values
turn = st.fixed_dictionaries(
    {
        "from": st.sampled_from(["human", "gpt", "system", "function_call", "observation", "x"]) | json_values,
        "value": texts,
    }
)
oturn = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]) | json_values, "content": texts}
)
conversations = st.lists(turn | json_values, max_size=4)
messages = st.lists(oturn | json_values, max_size=4)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"conversations": conversations}, optional={"tools": json_values, "system": texts}),
    st.fixed_dictionaries({"messages": messages}, optional={"label": json_values | st.booleans()}),
    st.fixed_dictionaries(
        {"chosen": texts | oturn | turn, "rejected": texts | messages},
        optional={"prompt": texts | messages, "conversations": conversations},
    ),
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"history": json_values}),
    st.fixed_dictionaries({"text": texts}),
)


@settings(max_examples=300, deadline=None)
@given(value=records, fmt=st.sampled_from(sorted(FORMATS)))
def test_normalisers_never_crash(value, fmt):
    out, reasons = normalise(value, fmt)
    if out is None:
        assert reasons and all(code in RULES for code in codes(reasons)), reasons
        return
    assert reasons == []
    if "messages" in out:
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in out["messages"])
        assert out["messages"][-1]["role"] == ("user" if fmt == "preference" else "assistant")
    else:
        assert fmt == "text" and out["text"].strip()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(rows=st.lists(records | st.sampled_from([b"\xff\xfe{", b"{not json", b"[1, 2"]), min_size=1, max_size=12))
def test_every_record_kept_or_quarantined(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("prop")
    path = write_jsonl(d / "d.jsonl", rows)
    try:
        report = validate_dataset(path, d / "out", fmt="messages", checks=Checks(pii="redact"))
    except InputError as e:  # only for a file without any record (all rows blank): none here
        raise AssertionError(e) from e
    accounted(report)


# --- sources ------------------------------------------------------------------------------------

ALPACA = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i}."} for i in range(6)]


def test_parquet_and_csv_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "d.parquet")
    rep = validate_dataset(tmp_path / "d.parquet", tmp_path / "o1", checks=NO_SIM)
    assert (rep["format"], rep["position"], rep["valid"]) == ("alpaca", "record", 6)
    (tmp_path / "d.csv").write_bytes(
        b'instruction,input,output\nHi,,Hello\n"Multi\nline",x,"a, b"\nBad,,\xff\xfe oops\nEmpty,,\n'
    )
    rep = validate_dataset(tmp_path / "d.csv", tmp_path / "o2", checks=NO_SIM)
    clean, quarantine = accounted(rep)
    # physical lines: the header is line 1 and the quoted field of the second record spans lines 3-4
    assert rep["format"] == "alpaca" and rep["position"] == "line" and [r["_line"] for r in clean] == [2, 3]
    assert clean[1]["messages"][0]["content"] == "Multi\nline\n\nx"
    assert {q["line"]: codes(q["reasons"]) for q in quarantine} == {5: ["invalid_utf8"], 6: ["empty_content"]}


def test_csv_messages_column_and_kto_label(tmp_path):
    msgs = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]).replace('"', '""')
    (tmp_path / "k.csv").write_text(f'messages,label\n"{msgs}",true\n"{msgs}",false\n')
    rep = validate_dataset(tmp_path / "k.csv", tmp_path / "o", checks=NO_SIM)
    clean, _ = accounted(rep)
    assert rep["format"] == "kto" and [r["label"] for r in clean] == [True, False]


def test_directory_of_mixed_files(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_text(json.dumps(ALPACA[:3], indent=1))
    write_jsonl(d / "sub" / "b.jsonl", ALPACA[3:] + [{"instruction": "x", "output": ""}])
    (d / "notes.txt").write_text("ignored")
    rep = validate_dataset(d, tmp_path / "o", checks=NO_SIM)
    clean, quarantine = accounted(rep)
    assert rep["records"] == 7 and rep["valid"] == 6
    assert {r["_file"] for r in clean} == {"a.json", "sub/b.jsonl"}
    assert quarantine[0]["file"] == "sub/b.jsonl" and quarantine[0]["line"] == 4
    with pytest.raises(InputError, match="holds no"):
        validate_dataset(_empty_dir(tmp_path), tmp_path / "o2")


def _empty_dir(tmp_path: Path) -> Path:
    p = tmp_path / "empty"
    p.mkdir()
    return p


def test_hf_dataset_saved_to_disk_and_offline_name(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "ds"))
    rep = validate_dataset(tmp_path / "ds", tmp_path / "o1", checks=NO_SIM)
    assert (rep["format"], rep["valid"], rep["position"]) == ("alpaca", 6, "record")
    DatasetDict({"train": Dataset.from_list(ALPACA[:4]), "test": Dataset.from_list(ALPACA[4:])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert validate_dataset(tmp_path / "dd", tmp_path / "o2", checks=NO_SIM)["valid"] == 4
    with pytest.raises(InputError, match="offline"):
        validate_dataset("no-such-org/no-such-dataset-xyz", tmp_path / "o3")


# --- hostile records ----------------------------------------------------------------------------


def test_hostile_records_are_quarantined_with_reasons(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    huge = {"messages": [{"role": "user", "content": "x" * 2_000_000}, {"role": "assistant", "content": "ok"}]}
    rows = [
        good,
        None,
        {"messages": None},
        {"messages": [{"role": "user", "content": 12}, {"role": "assistant", "content": 3.5}]},
        {"messages": [{"role": {"nested": ["junk"]}, "content": [[[]]]}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # latin-1 byte in a JSONL line
        b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for the JSON parser
        huge,
        {"messages": [{"role": "user", "content": "\t \n"}, {"role": "assistant", "content": "a"}]},
    ]
    rep = validate_dataset(write_jsonl(tmp_path / "h.jsonl", rows), tmp_path / "o", checks=NO_SIM)
    clean, quarantine = accounted(rep)
    assert [r["_line"] for r in clean] == [1, 9] and len(clean[1]["messages"][0]["content"]) == 2_000_000
    got = {q["line"]: codes(q["reasons"])[0] for q in quarantine}
    assert got == {
        2: "not_an_object",
        3: "bad_structure",
        4: "non_string_content",
        5: "bad_role",
        6: "role_order",
        7: "invalid_utf8",
        8: "invalid_json",
        10: "empty_content",
    }
    assert rep["examples"]["invalid_utf8"][0]["line"] == 7


def test_invalid_utf8_in_json_array_is_a_record_problem(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"instruction": "ok", "output": "fine"},\n {"instruction": "bad \xff byte", "output": "x"}]')
    rep = validate_dataset(path, tmp_path / "o", checks=NO_SIM)
    _, quarantine = accounted(rep)
    assert rep["valid"] == 1 and codes(quarantine[0]["reasons"]) == ["invalid_utf8"] and quarantine[0]["line"] == 2


# --- over-long samples --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tokenizer():
    from tuneloop.demo.base_model import make_tokenizer

    return make_tokenizer(["hello world short answer"] * 20 + ["a long question " * 5], vocab_size=300)


def test_overlong_truncate_drop_and_not_checked(tmp_path, small_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = validate_dataset(
        path,
        tmp_path / "a",
        checks=Checks(max_length=64, overlong="drop", near_dup_threshold=None),
        tokenizer=small_tokenizer,
    )
    _, quarantine = accounted(rep)
    assert rep["overlong_dropped"] == 1 and rep["valid"] == 1 and quarantine[0]["line"] == 2
    assert quarantine[0]["reasons"][0].startswith("overlong:") and "> data.max_length 64" in quarantine[0]["reasons"][0]
    rep = validate_dataset(
        path, tmp_path / "b", checks=Checks(max_length=64, near_dup_threshold=None), tokenizer=small_tokenizer
    )
    assert rep["valid"] == 2 and rep["rules"] == {"overlong": 1} and rep["overlong"]["records"] == 1
    rep = validate_dataset(path, tmp_path / "c", checks=Checks(max_length=64, near_dup_threshold=None))
    assert "overlong" in rep["rules_not_checked"] and rep["overlong"] is None


# --- near duplicates and contamination ----------------------------------------------------------

BASE = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the door"


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_near_duplicates_dropped_or_reported(tmp_path):
    rows = [
        chat(BASE, "yes indeed"),
        chat("completely different text about taxes and forms", "no"),
        chat(BASE + "!", "yes indeed."),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = validate_dataset(path, tmp_path / "a")
    clean, quarantine = accounted(rep)
    assert rep["near_duplicates"] == 1 and rep["duplicates"] == 0 and [r["_line"] for r in clean] == [1, 2]
    assert quarantine[0]["reasons"] == ["near_duplicate: similar to line 1"]
    rep = validate_dataset(path, tmp_path / "b", checks=Checks(near_dup_action="report"))
    assert rep["valid"] == 3 and rep["near_duplicate_found"] == 1 and rep["rules"] == {"near_duplicate": 1}
    assert rep["duplicate_ratio"] == pytest.approx(1 / 3)


def test_contamination_against_eval(tmp_path):
    rows = [chat("what is the capital", BASE), chat("tell me something else entirely different now", "fine thanks")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = validate_dataset(path, tmp_path / "a", eval_texts=["an eval item: " + BASE])
    clean, quarantine = accounted(rep)
    assert (
        rep["contaminated"] == 1 and quarantine[0]["line"] == 1 and codes(quarantine[0]["reasons"]) == ["contaminated"]
    )
    assert rep["contamination_ratio"] == 0.5
    rep = validate_dataset(path, tmp_path / "b")
    assert "contaminated" in rep["rules_not_checked"]


# --- PII in the validation pass -----------------------------------------------------------------

SECRET_ROWS = [
    chat("mail jane.roe@corp-mail.com please", "card 4111 1111 1111 1111 noted"),
    chat("my key is AKIAIOSFODNN7EXAMPLE", "rotate it"),
    chat("clean question", "clean answer"),
]
ORIGINALS = ["jane.roe@corp-mail.com", "4111 1111 1111 1111", "AKIAIOSFODNN7EXAMPLE"]


def _all_output(out_dir: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in out_dir.iterdir() if p.is_file())


@pytest.mark.parametrize("policy", ["report", "redact", "drop"])
def test_pii_policies(tmp_path, policy):
    rep = validate_dataset(write_jsonl(tmp_path / "d.jsonl", SECRET_ROWS), tmp_path / "o", checks=Checks(pii=policy))
    clean, quarantine = accounted(rep)
    assert rep["pii"] == {"aws_access_key": 1, "credit_card": 1, "email": 1} and rep["pii_records"] == 2
    report_text = (tmp_path / "o" / "train.report.json").read_text() + (
        tmp_path / "o" / "train.report.html"
    ).read_text()
    assert not any(o in report_text for o in ORIGINALS)  # examples are masked
    assert not any(o in json.dumps(quarantine) for o in ORIGINALS)
    if policy == "report":
        assert rep["valid"] == 3 and rep["pii_records_kept"] == 2
        assert ORIGINALS[0] in json.dumps(clean)  # report only: the data is left as it is
    elif policy == "redact":
        assert rep["valid"] == 3 and rep["pii_records_kept"] == 0
        assert not any(o in _all_output(tmp_path / "o") for o in ORIGINALS)
        assert clean[0]["messages"][0]["content"] == "mail [EMAIL] please"
    else:
        assert rep["valid"] == 1 and rep["pii_dropped"] == 2 and rep["rules"]["pii"] == 2
        assert not any(o in _all_output(tmp_path / "o") for o in ORIGINALS)
        assert "[CREDIT_CARD]" in json.dumps(quarantine)


def test_quarantined_invalid_record_is_redacted(tmp_path):
    rows = [chat("q", "a"), {"instruction": "call +44 20 7946 0958", "output": 5}]
    rep = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "o", fmt="alpaca", checks=NO_SIM)
    _, quarantine = accounted(rep)
    text = json.dumps(quarantine)
    assert "7946" not in text and "[PHONE]" in text


# --- gates --------------------------------------------------------------------------------------


def test_data_gates(tmp_path):
    from tuneloop.config import DataConfig

    rows = SECRET_ROWS + [SECRET_ROWS[2], {"messages": 1}]
    rep = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "o", checks=NO_SIM)
    cfg = DataConfig(
        train_data="x", min_valid_ratio=0.9, max_duplicate_ratio=0.1, max_contamination=0.0, max_pii_records=1
    )
    gates = {g.name: g for g in data_gates(rep, cfg)}
    assert gates["min_valid_ratio"].value == pytest.approx(0.8) and not gates["min_valid_ratio"].passed
    assert gates["max_duplicate_ratio"].value == pytest.approx(0.2) and not gates["max_duplicate_ratio"].passed
    assert gates["max_contamination"].passed
    assert gates["max_pii_records"].value == 2 and not gates["max_pii_records"].passed
    failures = gate_failures(rep, cfg)
    assert len(failures) == 3 and all(rep["report_path"] in f for f in failures)
    assert any("max_pii_records" in f and "2 is not <= 1" in f for f in failures)
    # the other gates are off by default, but min_usable_records (issue 14, point 11)
    assert [g.name for g in data_gates(rep, DataConfig(train_data="x", min_valid_ratio=None))] == ["min_usable_records"]


def test_data_gates_speak_the_evaluation_gate_vocabulary(tmp_path):
    """PASS / FAIL with passed, blocks, metric and reason, in the report JSON, JUnit, Markdown and HTML."""
    import xml.etree.ElementTree as ET

    from tuneloop.config import DataConfig
    from tuneloop.data.gates import gate_records
    from tuneloop.data.validate import validate_splits
    from tuneloop.evaluate.reports import junit_xml, markdown_summary

    rows = SECRET_ROWS + [SECRET_ROWS[2], {"messages": 1}]
    train = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(
        train_data=str(train),
        eval_data=str(write_jsonl(tmp_path / "e.jsonl", SECRET_ROWS[:1])),
        min_valid_ratio=0.9,
        max_pii_records=5,
        near_dup_threshold=None,
        min_usable_records=None,
    )
    verdict = validate_splits(cfg, tmp_path / "o")
    assert (
        not verdict.passed and len(verdict.failures) == 1 and "min_valid_ratio failed on train" in verdict.failures[0]
    )
    on_disk = json.loads((tmp_path / "o" / "train.report.json").read_text())
    gates = {g["name"]: g for g in on_disk["gates"]}
    old_keys = {"name", "value", "op", "threshold", "passed", "detail"}
    assert all(old_keys <= set(g) for g in gates.values())  # the old shape is kept, the verdict added
    assert gates["min_valid_ratio"]["verdict"] == "FAIL" and gates["min_valid_ratio"]["blocks"] is True
    assert gates["min_valid_ratio"]["metric"] == "valid_ratio" and "is not >= 0.9" in gates["min_valid_ratio"]["reason"]
    assert gates["max_pii_records"]["verdict"] == "PASS" and gates["max_pii_records"]["blocks"] is False
    assert (
        on_disk["passed"] is False and json.loads((tmp_path / "o" / "eval.report.json").read_text())["passed"] is True
    )

    records = gate_records(
        {s: r["gates"] for s, r in verdict.reports.items()}, {s: r["records"] for s, r in verdict.reports.items()}
    )
    assert set(records) == {
        "min_valid_ratio[train]",
        "max_pii_records[train]",
        "min_valid_ratio[eval]",
        "max_pii_records[eval]",
    }
    assert records["min_valid_ratio[train]"]["n"] == 5 and records["min_valid_ratio[train]"]["suite"] == "data.train"
    suite = ET.fromstring(junit_xml(records)).find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    failed = [tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert failed == ["min_valid_ratio[train]"]
    md = markdown_summary(records, title="data gates")
    assert "blocked by min_valid_ratio[train]" in md and "| `max_pii_records[eval]` | ✅ PASS |" in md
    html = (tmp_path / "o" / "train.report.html").read_text()
    assert "FAIL (blocks)" in html and "PASS" in html and "<script" not in html


# --- diff ---------------------------------------------------------------------------------------


def test_diff_by_prompt_and_by_id(tmp_path):
    a = [chat(f"q{i}", f"a{i}") for i in range(5)]
    b = [chat("q0", "a0"), chat("q1", "CHANGED"), chat("q3", "a3"), chat("q4", "a4"), chat("new", "n")]
    d = diff_datasets(write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b))
    assert (d["added"], d["removed"], d["changed"], d["unchanged"], d["match"]) == (1, 1, 1, 3, "prompt")
    assert d["examples"]["changed"][0]["before"] == "a1" and d["examples"]["changed"][0]["after"] == "CHANGED"
    ida = [{"id": i, "instruction": f"q{i}", "output": "x"} for i in range(3)]
    idb = [{"id": 0, "instruction": "q0 reworded", "output": "x"}, {"id": 2, "instruction": "q2", "output": "x"}]
    d = diff_datasets(write_jsonl(tmp_path / "c.jsonl", ida), write_jsonl(tmp_path / "d.jsonl", idb))
    assert (d["added"], d["removed"], d["changed"], d["unchanged"], d["match"]) == (0, 1, 1, 1, "id")
