"""Tests for tuneloop.data.formats and tuneloop.data.validate (format detection, rules, quarantine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneloop.data.formats import FORMATS, RULES, detect_format, normalise
from tuneloop.data.validate import Checks, validate_dataset
from tuneloop.errors import InputError
from tuneloop.fsutil import sha256_json

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def msg(role, content):
    return {"role": role, "content": content}


def chat(*pairs):
    return {"messages": [msg(r, c) for r, c in pairs]}


def codes(reasons):
    return [r.split(":", 1)[0] for r in reasons]


def write_jsonl(path: Path, lines: list) -> Path:
    """Write values (json-encoded) or raw str/bytes lines."""
    out = b""
    for line in lines:
        if isinstance(line, bytes):
            out += line + b"\n"
        elif isinstance(line, str):
            out += line.encode() + b"\n"
        else:
            out += json.dumps(line).encode() + b"\n"
    path.write_bytes(out)
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --- detection ----------------------------------------------------------------------------------


def test_detect_alpaca_and_messages():
    assert detect_format([{"instruction": "a", "input": "", "output": "b"}]) == "alpaca"
    assert detect_format([chat(("user", "hi"), ("assistant", "yo"))]) == "messages"


def test_detect_ignores_non_objects_and_takes_majority():
    records = ["junk", 3, {"messages": []}, {"messages": []}, {"instruction": "a", "output": "b"}]
    assert detect_format(records) == "messages"


def test_detect_unknown_lists_keys_and_formats():
    with pytest.raises(InputError) as e:
        detect_format([{"prompt": "a", "completion": "b"}])
    text = str(e.value)
    assert "'prompt'" in text and "'completion'" in text
    for name in FORMATS:
        assert name in text


def test_detect_no_objects():
    with pytest.raises(InputError, match="no record is a JSON object"):
        detect_format([1, "x", None])


# --- normalise: alpaca --------------------------------------------------------------------------


def test_alpaca_full_record():
    rec = {
        "system": "Be brief.",
        "history": [["h1", "a1"]],
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
    }
    out, reasons = normalise(rec, "alpaca")
    assert reasons == []
    assert out == chat(
        ("system", "Be brief."),
        ("user", "h1"),
        ("assistant", "a1"),
        ("user", "Translate\n\nbonjour"),
        ("assistant", "hello"),
    )


def test_alpaca_empty_input_and_extra_keys():
    out, reasons = normalise({"instruction": "Hi", "input": "  ", "output": "Yo", "id": 7}, "alpaca")
    assert reasons == [] and out == chat(("user", "Hi"), ("assistant", "Yo"))
    out, _ = normalise({"instruction": "Hi", "output": "Yo", "input": None, "system": ""}, "alpaca")
    assert out == chat(("user", "Hi"), ("assistant", "Yo"))


@pytest.mark.parametrize(
    "record, code",
    [
        ({"instruction": "a"}, "missing_field"),
        ({"instruction": "a", "output": "   "}, "empty_content"),
        ({"instruction": "a", "output": 5}, "non_string_content"),
        ({"instruction": "a", "output": "b", "history": "x"}, "bad_structure"),
        ({"instruction": "a", "output": "b", "history": [["only one"]]}, "bad_structure"),
        ({"instruction": "a", "output": "b", "history": [["u", ""]]}, "empty_content"),
        ({"instruction": "a\ud800", "output": "b"}, "invalid_utf8"),
        (["a", "b"], "not_an_object"),
    ],
)
def test_alpaca_rules(record, code):
    out, reasons = normalise(record, "alpaca")
    assert out is None
    assert code in codes(reasons)


def test_alpaca_missing_field_message():
    _, reasons = normalise({"instruction": "a"}, "alpaca")
    assert reasons == ["missing_field: 'output' is missing"]


# --- normalise: messages ------------------------------------------------------------------------


def test_messages_ok_with_system_and_extra_keys():
    rec = chat(("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "u2"), ("assistant", "a2"))
    rec["label"] = True
    rec["messages"][1]["name"] = "bob"
    out, reasons = normalise(rec, "messages")
    assert reasons == []
    assert out == chat(("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "u2"), ("assistant", "a2"))


@pytest.mark.parametrize(
    "record, code",
    [
        ({"text": "x"}, "missing_field"),
        ({"messages": "hi"}, "bad_structure"),
        ({"messages": []}, "bad_structure"),
        ({"messages": ["hi"]}, "not_an_object"),
        ({"messages": [{"content": "x"}]}, "missing_field"),
        ({"messages": [{"role": "user"}]}, "missing_field"),
        (chat(("user", "u"), ("assistant", " \n\t")), "empty_content"),
        ({"messages": [msg("user", "u"), msg("assistant", None)]}, "non_string_content"),
        ({"messages": [msg("user", "u"), msg("assistant", [{"type": "text", "text": "a"}])]}, "non_string_content"),
        (chat(("user", "u"), ("tool", "t"), ("assistant", "a")), "role_order"),  # tool must follow assistant
        (chat(("user", "u"), ("wizard", "t"), ("assistant", "a")), "bad_role"),
        ({"messages": [msg(["user"], "u"), msg("assistant", "a")]}, "bad_role"),
        (chat(("assistant", "a"), ("user", "u"), ("assistant", "a")), "role_order"),
        (chat(("user", "u"), ("user", "u"), ("assistant", "a")), "role_order"),
        (chat(("user", "u"), ("system", "s"), ("assistant", "a")), "role_order"),
        (chat(("user", "u"), ("assistant", "a"), ("user", "u")), "no_final_assistant"),
        (chat(("system", "s")), "no_final_assistant"),
        ("a string", "not_an_object"),
        (None, "not_an_object"),
    ],
)
def test_messages_rules(record, code):
    out, reasons = normalise(record, "messages")
    assert out is None
    assert code in codes(reasons), reasons


def test_messages_reason_text_names_message():
    _, reasons = normalise(chat(("user", "u"), ("assistant", "")), "messages")
    assert reasons == ["empty_content: message 2 (assistant) is empty or whitespace"]


def test_messages_collects_all_problems():
    _, reasons = normalise({"messages": [msg("user", ""), msg("assistant", 3)]}, "messages")
    assert codes(reasons) == ["empty_content", "non_string_content"]


def test_unknown_format_is_input_error():
    with pytest.raises(InputError, match="supported"):
        normalise({}, "sharegpt-v9")


# --- normalise never raises (property) ----------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["system", "user", "assistant", "tool"]) | json_values
texts = st.sampled_from(["", " ", "hi"]) | json_values
messages_like = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": roles, "content": texts}) | json_values, max_size=5)}
)
alpaca_like = st.fixed_dictionaries(
    {"instruction": texts, "output": texts},
    optional={
        "input": texts,
        "system": texts,
        "history": st.lists(st.lists(texts, max_size=3), max_size=3) | json_values,
    },
)


@settings(max_examples=200, deadline=None)
@given(value=json_values | messages_like | alpaca_like, fmt=st.sampled_from(sorted(FORMATS)))
def test_normalise_never_raises(value, fmt):
    out, reasons = normalise(value, fmt)
    if out is None:
        assert reasons and all(isinstance(r, str) for r in reasons)
        assert all(code in RULES for code in codes(reasons)), reasons
    else:
        assert reasons == []
        messages = out["messages"]
        assert messages[-1]["role"] == "assistant"
        assert all(m["role"] in ("system", "user", "assistant", "tool") and m["content"].strip() for m in messages)


# --- validate_dataset ---------------------------------------------------------------------------

GOOD = [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(3)]


def check_invariant(report):
    clean = read_jsonl(report["clean_path"])
    quarantine = read_jsonl(report["quarantine_path"])
    removed = ("invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped", "overlong_dropped")
    assert report["records"] == report["valid"] + sum(report[k] for k in removed)
    assert len(clean) == report["valid"]
    assert len(quarantine) == sum(report[k] for k in removed)
    assert all(q["reasons"] for q in quarantine)
    lines = [r["_line"] for r in clean] + [q["line"] for q in quarantine]
    assert len(lines) == len(set(lines)) == report["records"]
    assert [r["_line"] for r in clean] == sorted(r["_line"] for r in clean)
    return clean, quarantine


def test_jsonl_malformed_line_is_quarantined(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], "", '{"messages": [oops', b"\xff\xfe{}", GOOD[1], "   "])
    report = validate_dataset(path, tmp_path / "out")
    assert (report["format"], report["position"]) == ("messages", "line")
    assert (report["records"], report["valid"], report["invalid"]) == (4, 2, 2)
    clean, quarantine = check_invariant(report)
    assert [r["_line"] for r in clean] == [1, 5]
    assert clean[0] == {**GOOD[0], "_line": 1}
    bad_json, bad_utf8 = quarantine
    assert bad_json["line"] == 3 and bad_json["record"] == '{"messages": [oops'
    assert bad_json["reasons"][0].startswith("invalid_json: Expecting value (col 15)")
    assert bad_utf8["line"] == 4 and codes(bad_utf8["reasons"]) == ["invalid_utf8"]
    assert report["rules"] == {"invalid_json": 1, "invalid_utf8": 1}
    assert report["examples"]["invalid_json"] == [{"line": 3, "reason": bad_json["reasons"][0]}]
    assert report["valid_ratio"] == 0.5
    on_disk = json.loads((tmp_path / "out" / "train.report.json").read_text())
    assert on_disk == report


def test_jsonl_nan_is_invalid_json(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], '{"messages": NaN}'])
    report = validate_dataset(path, tmp_path / "out")
    assert report["rules"] == {"invalid_json": 1}


def test_duplicates_whitespace_collapsed(tmp_path):
    dup = chat(("user", "q0  "), ("assistant", "a0"))
    case = chat(("user", "Q0"), ("assistant", "a0"))
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], GOOD[1], dup, case, GOOD[1]])
    report = validate_dataset(path, tmp_path / "out", checks=Checks(near_dup_threshold=None))  # exact dedup only
    assert (report["valid"], report["invalid"], report["duplicates"]) == (3, 0, 2)
    assert report["valid_ratio"] == 1.0
    _, quarantine = check_invariant(report)
    assert [(q["line"], q["reasons"]) for q in quarantine] == [
        (3, ["exact_duplicate: same as line 1"]),
        (5, ["exact_duplicate: same as line 2"]),
    ]
    assert quarantine[0]["record"] == dup


def test_invariant_on_mixed_records(tmp_path):
    rows = [GOOD[0], 5, {"messages": []}, chat(("user", "u")), GOOD[0], "{bad", GOOD[2], {"instruction": "x"}]
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", fmt="messages")
    check_invariant(report)
    assert (report["valid"], report["invalid"], report["duplicates"]) == (2, 5, 1)
    assert sum(report["rules"].values()) >= report["invalid"] + report["duplicates"]


def test_json_array_lines_and_alpaca(tmp_path):
    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": ""},
        {"instruction": "e", "output": "f"},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    report = validate_dataset(path, tmp_path / "out", name="eval")
    assert report["format"] == "alpaca" and report["position"] == "line"
    clean, quarantine = check_invariant(report)
    assert [r["_line"] for r in clean] == [2, 12]  # each element's opening '{'
    assert quarantine == [{"line": 7, "reasons": ["empty_content: 'output' is empty or whitespace"], "record": rows[1]}]
    assert clean[1]["messages"][0] == msg("user", "e")
    assert (tmp_path / "out" / "eval.clean.jsonl").exists()


def test_digest_stable_and_content_addressed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    first = validate_dataset(path, tmp_path / "a")
    second = validate_dataset(path, tmp_path / "b")
    assert first["digest"] == second["digest"]
    canonical = [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(first["clean_path"])]
    assert first["digest"] == sha256_json(canonical)
    # Same records, different layout (blank lines, extra keys, .json) -> same version.
    other = tmp_path / "d.json"
    other.write_text(json.dumps([{**r, "id": i} for i, r in enumerate(GOOD)], indent=4))
    assert validate_dataset(other, tmp_path / "c")["digest"] == first["digest"]
    # One changed character -> new version.
    changed = [GOOD[0], GOOD[1], chat(("user", "q2"), ("assistant", "a2!"))]
    assert validate_dataset(write_jsonl(tmp_path / "e.jsonl", changed), tmp_path / "d")["digest"] != first["digest"]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        validate_dataset(tmp_path / "nope.jsonl", tmp_path / "out")
    assert "nope.jsonl" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("a,b\n")
    with pytest.raises(InputError, match=r"\.json, \.jsonl, \.parquet, \.csv"):
        validate_dataset(path, tmp_path / "out")


def test_invalid_json_file_reports_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(InputError, match=r"d\.json:3:17: invalid JSON"):
        validate_dataset(path, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.jsonl"))  # nothing half-written


def test_json_file_that_is_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n")
    with pytest.raises(InputError, match=r"d\.json:1:1: .*rename it to \.jsonl"):
        validate_dataset(path, tmp_path / "out")


def test_undetectable_and_empty(tmp_path):
    with pytest.raises(InputError, match="'prompt'"):
        validate_dataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p"}]), tmp_path / "out")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no records"):
        validate_dataset(tmp_path / "e.jsonl", tmp_path / "out")
    with pytest.raises(InputError, match="unknown dataset format"):
        validate_dataset(write_jsonl(tmp_path / "f.jsonl", GOOD), tmp_path / "out", fmt="csv")


def test_lone_surrogate_round_trips_through_quarantine(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], r'{"messages": [{"role": "user", "content": "x\ud800"}]}'])
    report = validate_dataset(path, tmp_path / "out")
    _, quarantine = check_invariant(report)
    assert quarantine[0]["record"]["messages"][0]["content"] == "x\ud800"


# --- real datasets ------------------------------------------------------------------------------

needs_datasets = pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} not present")


@needs_datasets
def test_alpaca_demo(tmp_path):
    report = validate_dataset(DATASETS / "alpaca_en_demo.json", tmp_path)
    assert report["format"] == "alpaca" and report["records"] == 999
    assert report["invalid"] == 0
    assert report["duplicates"] == 14  # the demo file really holds 14 verbatim repeats
    assert set(report["rules"]) == {"exact_duplicate"}
    check_invariant(report)


@needs_datasets
def test_kto_demo_detected_as_kto(tmp_path):
    report = validate_dataset(DATASETS / "kto_en_demo.json", tmp_path)
    assert report["format"] == "kto"
    assert (report["records"], report["invalid"]) == (300, 0)
    clean, _ = check_invariant(report)
    assert set(clean[0]) == {"messages", "label", "_line"}
    assert {r["label"] for r in clean} == {True, False}
