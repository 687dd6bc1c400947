"""Issue 14, data points 11-16: zero usable records, the bad lines in gate failures, unreadable and compressed
files, report names, CSV line numbers and one huge record."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.config import DataConfig
from tuneloop.data import filetypes
from tuneloop.data.sources import data_suffix, open_detected, source_problem
from tuneloop.data.validate import Checks, check_splits, validate_dataset, validate_splits
from tuneloop.errors import InputError

NO_SIM = Checks(near_dup_threshold=None, num_workers=1)
TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]


def chat(u: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def jsonl_bytes(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


GOOD = [chat(f"question number {i} about the invoice", f"answer {i}") for i in range(4)]


# --- 11: zero usable records --------------------------------------------------------------------

EVALISH = [
    chat(f"how do I reset the password of account {i} when the reset mail never arrives", f"use the form {i}")
    for i in range(8)
]


def _all_removed(tmp_path: Path) -> DataConfig:
    """32 training records: 8 eval records, each 4 times (24 exact duplicates, 8 contaminated by eval)."""
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_bytes(jsonl_bytes([r for r in EVALISH for _ in range(4)]))
    ev.write_bytes(jsonl_bytes(EVALISH))
    return DataConfig(train_data=str(train), eval_data=str(ev), near_dup_threshold=None, num_workers=1)


def test_zero_usable_records_fail_with_the_accounting(tmp_path):
    data = _all_removed(tmp_path)
    verdict = validate_splits(data, tmp_path / "out")
    assert not verdict.passed and len(verdict.failures) == 1
    msg = verdict.failures[0]
    assert msg.startswith("data gate min_usable_records failed on train: 0 is not >= 1")
    assert "32 records: 24 exact duplicates, 8 contaminated by eval; 0 left for training" in msg
    gate = next(g for g in verdict.reports["train"]["gates"] if g["name"] == "min_usable_records")
    assert gate["verdict"] == "FAIL" and gate["metric"] == "valid" and gate["problems"]
    # without the gate nothing else catches it: every record is well-formed (the defect that was seen)
    assert validate_splits(data.model_copy(update={"min_usable_records": None}), tmp_path / "out2").passed
    # a higher floor: 1 usable record is still too few; the eval split is gated too
    loose = data.model_copy(update={"contamination_action": "report", "min_usable_records": 9})
    verdict = validate_splits(loose, tmp_path / "out3")
    assert "8 left for training" in verdict.failures[0] and "8 left for evaluation" in verdict.failures[1]


def test_default_min_usable_records_is_documented():
    field = DataConfig.model_fields["min_usable_records"]
    assert field.default == 1 and "0 left for training" in field.description
    assert "min_usable_records" in (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()


@pytest.mark.slow  # builds the tiny model fixture and runs the CLI in a subprocess
def test_run_with_nothing_usable_fails_in_data_validation(make_config, tmp_path):
    data = _all_removed(tmp_path)
    cfg = make_config(data__train_data=data.train_data, data__eval_data=data.eval_data)
    r = subprocess.run([*TUNELOOP, "run", str(cfg), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    stages = json.loads(r.stdout)["stages"]
    err = stages["data_validation"]["error"]
    assert stages["data_validation"]["status"] == "failed" and stages["preprocessing"]["status"] in (
        "skipped",
        "pending",
    )
    assert "0 left for training" in err and "train.jsonl:2: exact_duplicate: same as line 1" in err
    assert stages["data_validation"]["metrics"]["gates"]["min_usable_records[train]"]["verdict"] == "FAIL"


# --- 12: the bad lines in gate failures and the CLI table -----------------------------------------


def test_gate_failures_name_the_first_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes([GOOD[0], "{oops", GOOD[1], {"messages": 1}, "[1,", GOOD[2], "{x", "{y", "{z", "{w"]))
    verdict = validate_splits(DataConfig(train_data=str(path), near_dup_threshold=None), tmp_path / "out")
    failure = verdict.failures[0]
    head, *problems = failure.splitlines()
    assert "min_valid_ratio failed on train" in head and "report: " in head
    assert problems[0] == f"  {path}:2: invalid_json: Expecting property name enclosed in double quotes (col 2)"
    assert problems[1].startswith(f"  {path}:4: bad_structure:") and problems[2].startswith(
        f"  {path}:5: invalid_json:"
    )
    assert (
        problems[3].startswith(f"  {path}:7: invalid_json:") and len(problems) == 4
    )  # the report keeps 3 examples a rule
    gate = next(g for g in verdict.reports["train"]["gates"] if g["name"] == "min_valid_ratio")
    assert gate["problems"] == [p.strip() for p in problems]
    ok = next(g for g in verdict.reports["train"]["gates"] if g["name"] == "min_usable_records")
    assert ok["passed"] and ok["problems"] == []
    html = Path(verdict.reports["train"]["html_path"]).read_text()
    assert "First problems of the failed gates" in html and f"{path}:2: invalid_json:" in html


def test_gate_problems_of_a_directory_and_of_duplicates(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.jsonl").write_bytes(jsonl_bytes(GOOD[:2]))
    (d / "b.jsonl").write_bytes(jsonl_bytes([GOOD[2], GOOD[0]]))
    verdict = validate_splits(
        DataConfig(train_data=str(d), max_duplicate_ratio=0.0, near_dup_threshold=None), tmp_path / "out"
    )
    assert f"\n  {d}/b.jsonl:2: exact_duplicate: same as line 1 of a.jsonl" in verdict.failures[0]


def test_cli_table_shows_the_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes([GOOD[0], "{oops", "{x"]))
    env = {**os.environ, "COLUMNS": "400"}
    r = subprocess.run(
        [*TUNELOOP, "data", "validate", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert (
        "first problems" in r.stdout
        and f"{path}:2: invalid_json:" in r.stdout
        and f"{path}:3: invalid_json:" in r.stdout
    )


# --- 13: unreadable and compressed files ----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", ".jsonl.gz"])
def test_empty_file_says_empty(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"the file is empty \(0 bytes\)") as e:
        validate_dataset(path, tmp_path / "out")
    assert "rename" not in str(e.value)
    if suffix in (".parquet", ".jsonl.gz"):
        return
    path.write_bytes(b"  \n\n")
    with pytest.raises(InputError, match=r"empty \(only 4 bytes of whitespace\), so the dataset has no records"):
        validate_dataset(path, tmp_path / "out")


@pytest.mark.parametrize(
    "content, what",
    [
        (
            '{"text": "héllo"}\n'.encode("utf-16"),
            r"UTF-16 \(little-endian\) text; tuneloop reads UTF-8 JSON Lines: convert it",
        ),
        ('{"text": "hello"}\n'.encode("utf-16-be"), r"UTF-16 \(big-endian, no byte-order mark\) text"),
        ('{"text": "長い中国語のテキストです。返金について"}\n'.encode("utf-16"), r"UTF-16 \(little-endian\) text"),
        ('{"text": "hello"}\n'.encode("utf-32"), r"UTF-32 \(little-endian\) text"),
        (bytes(range(256)) * 8, r"binary \(\d+ of its first 2048 bytes are NUL or other control bytes"),
        (b"PAR1" + bytes(500), r"binary: a Parquet file \(rename it to \.parquet\)"),
        (
            gzip.compress('{"text": "hi"}\n'.encode("utf-16")),
            r"gzip-compressed and its content is UTF-16 \(little-endian\) text",
        ),
    ],
)
def test_unreadable_files_say_what_they_are(tmp_path, content, what):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=what) as e:
        validate_dataset(path, tmp_path / "out")
    assert "no record is a JSON object" not in str(e.value) and str(path) in str(e.value)


def test_a_stray_control_byte_or_bom_like_line_is_one_quarantined_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xff\xfe{\n\xff\xfe{\n" + jsonl_bytes(GOOD) + b'{"text": "a\x00b"}\n')
    rep = validate_dataset(path, tmp_path / "out", checks=NO_SIM)
    assert rep["valid"] == 4 and rep["invalid"] == 3


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.JSONL.GZ", "d.jsonl"])  # the last: gzip data misnamed
def test_gzip_jsonl_reads_like_the_plain_file(tmp_path, name):
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(jsonl_bytes(GOOD + ["{bad"]))
    packed = tmp_path / name
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a = validate_dataset(plain, tmp_path / "a", checks=NO_SIM)
    b = validate_dataset(packed, tmp_path / "b", checks=NO_SIM)
    assert (b["valid"], b["invalid"], b["digest"], b["position"]) == (a["valid"], a["invalid"], a["digest"], "line")
    assert json.loads(Path(b["quarantine_path"]).read_text())["line"] == 5


def test_gzip_json_array_csv_and_directories(tmp_path):
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps(GOOD, indent=1).encode()))
    rep = validate_dataset(tmp_path / "d.json.gz", tmp_path / "o1", checks=NO_SIM)
    assert rep["valid"] == 4 and rep["format"] == "messages"
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(GOOD[:2])))
    (d / "b.jsonl").write_bytes(jsonl_bytes(GOOD[2:]))
    (d / "empty.jsonl").write_bytes(b"")  # adds nothing in a directory
    rep = validate_dataset(d, tmp_path / "o2", checks=NO_SIM)
    assert rep["valid"] == 4
    assert {json.loads(line)["_file"] for line in Path(rep["clean_path"]).read_text().splitlines()} == {
        "a.jsonl.gz",
        "b.jsonl",
    }
    assert (
        data_suffix("x.JSONL.gz") == ".jsonl.gz" and data_suffix("x.tar.gz") == ".gz" and data_suffix("x.csv") == ".csv"
    )
    assert source_problem(str(d / "a.jsonl.gz")) is None and "unsupported" in source_problem(
        str(tmp_path / "o2" / "train.report.html")
    )


def test_truncated_gzip_is_an_input_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    data = gzip.compress(jsonl_bytes(GOOD * 200))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="gzip data is truncated or corrupt"):
        validate_dataset(path, tmp_path / "out", checks=NO_SIM)


def test_zstd_files(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    raw = jsonl_bytes(GOOD)
    path = tmp_path / "d.jsonl.zst"
    # two frames, as `zstd` writes for concatenated input
    path.write_bytes(zstandard.ZstdCompressor().compress(raw[:50]) + zstandard.ZstdCompressor().compress(raw[50:]))
    rep = validate_dataset(path, tmp_path / "o", checks=NO_SIM)
    assert rep["valid"] == 4
    misnamed = tmp_path / "m.jsonl"
    misnamed.write_bytes(path.read_bytes())
    assert validate_dataset(misnamed, tmp_path / "o2", checks=NO_SIM)["digest"] == rep["digest"]
    whole = zstandard.ZstdCompressor().compress(raw * 50)
    path.write_bytes(whole[:-20])
    with pytest.raises(InputError, match="zstd data is truncated"):
        validate_dataset(path, tmp_path / "o3", checks=NO_SIM)


def test_zstd_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(filetypes.ZSTD_MAGIC + b"\x00" * 20)
    monkeypatch.setattr(filetypes, "zstd_module", lambda: None)
    with pytest.raises(
        InputError,
        match=r"zstd-compressed and the optional package zstandard is not installed: `pip install 'tuneloop\[zstd\]'`",
    ):
        open_detected(path)


# --- 14: report names ----------------------------------------------------------------------------


def test_reports_of_x_json_and_x_jsonl_do_not_collide(tmp_path):
    from tuneloop.checks import validate_target

    (tmp_path / "x.json").write_text(json.dumps(GOOD[:2]))
    (tmp_path / "x.jsonl").write_bytes(jsonl_bytes(GOOD[:3]))
    out = tmp_path / "report"
    a = validate_target(str(tmp_path / "x.json"), out_dir=out)
    b = validate_target(str(tmp_path / "x.jsonl"), out_dir=out)
    assert Path(a["report_path"]).name == "x.json.report.json" and Path(b["report_path"]).name == "x.jsonl.report.json"
    assert json.loads(Path(a["report_path"]).read_text())["records"] == 2
    assert json.loads(Path(b["report_path"]).read_text())["records"] == 3
    assert Path(a["clean_path"]).name == "x.json.clean.jsonl" and Path(a["clean_path"]).is_file()


def test_train_named_eval_does_not_overwrite_the_eval_split(tmp_path):
    (tmp_path / "t.jsonl").write_bytes(jsonl_bytes(GOOD))
    (tmp_path / "e.jsonl").write_bytes(jsonl_bytes(GOOD[:1]))
    data = DataConfig(
        train_data=str(tmp_path / "t.jsonl"), eval_data=str(tmp_path / "e.jsonl"), near_dup_threshold=None
    )
    checked = check_splits(data, tmp_path / "out", train_name="eval")
    assert Path(checked.train["report_path"]).name == "eval.train.report.json"
    assert json.loads((tmp_path / "out" / "eval.report.json").read_text())["records"] == 1
    # the run's per-split names are unchanged
    assert Path(check_splits(data, tmp_path / "run").train["report_path"]).name == "train.report.json"


# --- 15: CSV line numbers ------------------------------------------------------------------------


def test_csv_positions_are_physical_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"instruction,output\r\n"  # line 1
        b"one,first\r\n"  # 2
        b"\r\n"  # 3: blank, skipped
        b'"two\r\nspans\r\nthree lines",second\r\n'  # 4-6
        b"three,third,extra\r\n"  # 7: one cell too many
        b"four,\r\n"  # 8: empty answer
    )
    rep = validate_dataset(path, tmp_path / "o", checks=NO_SIM)
    clean = [json.loads(x) for x in Path(rep["clean_path"]).read_text().splitlines()]
    quarantine = {
        json.loads(x)["line"]: json.loads(x)["reasons"][0].split(":")[0]
        for x in Path(rep["quarantine_path"]).read_text().splitlines()
    }
    assert rep["position"] == "line" and [r["_line"] for r in clean] == [2, 4]
    assert quarantine == {7: "bad_structure", 8: "empty_content"}


# --- 16: one huge record -------------------------------------------------------------------------


class Spy:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, tok) -> None:
        self.tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def apply_chat_template(self, *a, **kw):
        return self.tok.apply_chat_template(*a, **kw)


@pytest.fixture(scope="module")
def tok():
    from tuneloop.demo.base_model import make_tokenizer

    return make_tokenizer(["hello world short answer"] * 20 + ["a long question " * 5], vocab_size=300)


def test_token_count_stops_past_max_length(tok):
    from tuneloop.data.rules import count_tokens, token_count

    huge = "a long question about the invoice " * 60_000  # 2 MB
    for record in (
        {"text": huge},
        chat(huge, "ok"),
        {
            "messages": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": huge}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    ):
        spy = Spy(tok)
        n, exact = token_count(spy, record, stop_after=64)
        assert n > 64 and not exact and spy.longest < 20_000, (n, spy.longest)
    short = chat("hello world", "short answer")
    assert token_count(tok, short, stop_after=64) == (count_tokens(tok, short), True)
    # a text whose tokens hold many characters each is still counted exactly when it fits
    spaced = {"text": "hello" + " " * 3000 + "world"}
    n, exact = token_count(tok, spaced, stop_after=4000)
    assert exact and n == count_tokens(tok, spaced)


def test_overlong_rule_on_a_huge_record(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes([chat("word " * 400_000, "ok"), GOOD[0]]))
    rep = validate_dataset(
        path,
        tmp_path / "o",
        checks=Checks(max_length=64, overlong="drop", near_dup_threshold=None, num_workers=1),
        tokenizer=tok,
    )
    assert rep["overlong_dropped"] == 1 and rep["valid"] == 1
    reason = rep["examples"]["overlong"][0]["reason"]
    assert reason.startswith("overlong: over ") and "> data.max_length 64 (dropped; counting stopped there)" in reason


def test_preprocessing_tokenizes_only_up_to_max_length(tok):
    from tuneloop.data.prepare import tokenize_conversation

    spy = Spy(tok)
    ex = tokenize_conversation(spy, chat("word " * 400_000, "ok")["messages"], max_length=64)
    assert ex["truncated"] and len(ex["input_ids"]) == 64 and spy.longest < 20_000
    full = tokenize_conversation(tok, chat("word " * 10, "ok")["messages"], max_length=64)
    assert (
        not full["truncated"]
        and full["input_ids"]
        == tok(tok.apply_chat_template(chat("word " * 10, "ok")["messages"], tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
