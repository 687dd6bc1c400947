"""Feedback export (tuneloop.feedback.export): the request log + feedback -> SFT records and DPO pairs.

The request log is an in-memory fake with the agreed interface of tuneloop.monitor.requestlog
(REQUESTLOG_API.md: RequestRecord / FeedbackRecord fields, ``requests(since=, model=, limit=)``,
``feedback(since=, request_ids=)``); export only reads through those two methods. The outputs are checked
by the real dataset validator (tuneloop.data.validate.validate_dataset)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuneloop.data.validate import Checks, validate_dataset
from tuneloop.demo.tickets import SYSTEM_PROMPT, task_records
from tuneloop.errors import InputError
from tuneloop.feedback import eval_texts_from_file, export_feedback


@dataclass
class RequestRecord:  # the fields of tuneloop.monitor.requestlog.RequestRecord
    request_id: str
    created_at: float
    endpoint: str
    model: str
    ref: str
    version: int | None
    artifact_sha256: str | None
    arm: str
    user_hash: str | None
    prompt: str
    response: str
    status: int
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rollout_id: str | None = None


@dataclass
class FeedbackRecord:  # the fields of tuneloop.monitor.requestlog.FeedbackRecord
    feedback_id: str
    request_id: str
    source: str
    created_at: float
    rating: int | None = None
    score: float | None = None
    correction: str | None = None
    comment: str | None = None


class FakeRequestLog:
    """In-memory stand-in for RequestLog: the read methods export uses, and small writers for the tests."""

    def __init__(self):
        self.reqs: list[RequestRecord] = []
        self.fbs: list[FeedbackRecord] = []

    def add(
        self, rid, user_text, response, *, t, version=1, arm="baseline", status=200, model="support-bot", system=True
    ):
        msgs = ([{"role": "system", "content": SYSTEM_PROMPT}] if system else []) + [
            {"role": "user", "content": user_text}
        ]
        self.reqs.append(
            RequestRecord(
                rid,
                float(t),
                "chat.completions",
                model,
                model,
                version,
                f"sha-{version}",
                arm,
                None,
                json.dumps(msgs),
                response,
                status,
            )
        )

    def rate(self, rid, *, rating=None, score=None, correction=None, source="api", t=None):
        created = t if t is not None else next(r.created_at for r in self.reqs if r.request_id == rid) + 1
        self.fbs.append(FeedbackRecord(f"fb-{len(self.fbs)}", rid, source, created, rating, score, correction))

    def requests(self, *, since=None, model=None, limit=None):
        out = sorted(
            (r for r in self.reqs if (since is None or r.created_at >= since) and (model is None or r.model == model)),
            key=lambda r: r.created_at,
        )
        return out[:limit] if limit is not None else out

    def feedback(self, *, since=None, request_ids=None):
        ids = set(request_ids) if request_ids is not None else None
        return [
            f for f in self.fbs if (since is None or f.created_at >= since) and (ids is None or f.request_id in ids)
        ]


def _user(record):
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


@pytest.fixture()
def tickets():
    return [(_user(r), r["messages"][-1]["content"]) for r in task_records(40, 11, system_prompt=False)]


@pytest.fixture()
def scenario(tickets, tmp_path):
    """A log with one case of every kind, and an eval file (two demo eval tickets)."""
    evals = task_records(2, 11, split="eval")
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in evals))
    log = FakeRequestLog()
    (t0, l0), (t1, l1), (t2, l2), (t3, l3), (t4, l4) = tickets[:5]
    log.add("good", t0, l0, t=10)
    log.rate("good", rating=1)
    log.add("fixed", t1, "other", t=11)
    log.rate("fixed", rating=-1, correction=l1)
    log.add("v1-good", t2, l2, t=12, version=1, arm="baseline")
    log.rate("v1-good", score=0.9)
    log.add("v2-bad", t2, "refund-ish", t=13, version=2, arm="canary")
    log.rate("v2-bad", score=0.1)
    eval_user, eval_label = _user(evals[0]), evals[0]["messages"][-1]["content"]
    log.add("copies-eval", eval_user, "other", t=14)
    log.rate("copies-eval", rating=-1, correction=eval_label)
    log.add("dup-exact", t0, l0, t=15, version=2, arm="canary")
    log.rate("dup-exact", rating=1)
    log.add("dup-near", t0.upper() + "!!", l0, t=16)
    log.rate("dup-near", rating=1)
    log.add("pii", f"{t3} You can reach me at jane.doe@example.com or +1 (415) 555-0100.", l3, t=17)
    log.rate("pii", rating=1)
    log.add("silent", t4, l4, t=18)
    log.add("conflict", tickets[5][0], tickets[5][1], t=19)
    log.rate("conflict", rating=1, source="api")
    log.rate("conflict", rating=-1, source="reviewer")
    log.add("failed", tickets[6][0], "", t=20, status=500)
    log.rate("failed", correction=tickets[6][1])
    log.add("old", tickets[7][0], tickets[7][1], t=1)
    log.rate("old", rating=1)
    return log, eval_path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_export_builds_sft_and_dpo_with_provenance_and_checks(scenario, tmp_path):
    log, eval_path = scenario
    result = export_feedback(log, tmp_path / "out", since=5, eval_texts=eval_texts_from_file(eval_path))
    sft, dpo = _lines(result.sft_path), _lines(result.dpo_path)
    by_request = {r["meta"]["request_ids"][0]: r for r in sft}
    # SFT: rated good answers and corrections (the correction is the assistant turn). Of the three copies
    # of one ticket ("good", "dup-exact", "dup-near"), the newest is kept.
    assert set(by_request) == {"dup-near", "fixed", "v1-good", "pii", "failed"}
    assert by_request["fixed"]["messages"][-1] == {"role": "assistant", "content": _lines_label(log, "fixed")}
    assert by_request["fixed"]["meta"]["origin"] == "correction"
    assert by_request["dup-near"]["meta"]["origin"] == "rated_good"
    # DPO: the correction against the original, and a good v1 answer against a bad v2 canary answer.
    pairs = {p["meta"]["origin"]: p for p in dpo}
    assert set(pairs) == {"correction_vs_original", "cross_answer"}
    assert pairs["correction_vs_original"]["rejected"] == [{"role": "assistant", "content": "other"}]
    cross = pairs["cross_answer"]["meta"]
    assert cross["request_ids"] == ["v1-good", "v2-bad"]
    assert cross["versions"] == ["support-bot:1", "support-bot:2"] and cross["arms"] == ["baseline", "canary"]
    assert pairs["cross_answer"]["messages"][-1]["role"] == "user"
    # Provenance on every record.
    for rec in sft + dpo:
        meta = rec["meta"]
        assert meta["request_ids"] and meta["feedback_ids"] and meta["versions"] and rec["id"].startswith("fb-")
        assert all(f.startswith("fb-") for f in meta["feedback_ids"])
    # The record that copies an eval item is kept out of both files.
    assert "copies-eval" not in {rid for rec in sft + dpo for rid in rec["meta"]["request_ids"]}
    counts = result.manifest["counts"]
    assert counts["sft"]["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1, "contaminated": 1}
    assert counts["dpo"]["dropped"] == {"contaminated": 1}
    # PII redacted.
    text = result.sft_path.read_text()
    assert "jane.doe@example.com" not in text and "555-0100" not in text and "[EMAIL]" in text
    assert result.manifest["pii"]["redacted_texts"] >= 1
    # Requests skipped, with reasons; the one before `since` is not read at all.
    assert result.manifest["source"]["skipped_requests"] == {"no_feedback": 1, "conflict": 1}
    assert result.manifest["source"]["requests"] == 11
    assert "old" not in {rid for rec in sft + dpo for rid in rec["meta"]["request_ids"]}


def _lines_label(log, rid):
    return next(f.correction for f in log.fbs if f.request_id == rid)


def test_outputs_round_trip_through_data_validate(scenario, tmp_path):
    log, eval_path = scenario
    eval_texts = eval_texts_from_file(eval_path)
    result = export_feedback(log, tmp_path / "out", eval_texts=eval_texts)
    for path, fmt, n in (
        (result.sft_path, "messages", result.sft_records),
        (result.dpo_path, "preference", result.dpo_records),
    ):
        report = validate_dataset(
            path, tmp_path / "validated", name=path.stem, checks=Checks(num_workers=1), eval_texts=eval_texts
        )
        assert report["format"] == fmt
        assert report["records"] == n > 0
        assert report["valid"] == n, report["accounting"]
        assert report["pii_records"] == 0
        assert report["rules"] == {}, report["rules"]


def test_manifest_digests_match_the_files(scenario, tmp_path):
    import hashlib

    log, _ = scenario
    result = export_feedback(log, tmp_path / "out")
    manifest = json.loads(result.manifest_path.read_text())
    for name, entry in manifest["files"].items():
        data = (tmp_path / "out" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert entry["records"] == len(data.splitlines())
    assert manifest["checks"]["contamination"] == {"not_checked": "no evaluation texts given"}
    # Without eval texts, the eval copy is not recognised (and is exported): the check is what keeps it out.
    ids = {rid for r in _lines(result.sft_path) for rid in r["meta"]["request_ids"]}
    assert "copies-eval" in ids


def test_held_out_corrections_go_to_the_regression_suite_not_training(scenario, tmp_path):
    log, _ = scenario
    suite = tmp_path / "suites" / "eval_regression.jsonl"
    suite.parent.mkdir()
    suite.write_text(
        json.dumps(
            {
                "id": "existing",
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "other"}],
            }
        )
        + "\n"
    )
    eval_texts = eval_texts_from_file(scenario[1])
    result = export_feedback(log, tmp_path / "out", regression_share=1.0, regression_path=suite, eval_texts=eval_texts)
    items = _lines(suite)
    # The copy of an eval item is held out of training but not added: the eval set has it already.
    assert [i["id"] for i in items] == ["existing", "feedback-fixed", "feedback-failed"]
    assert items[1]["messages"][-1]["content"] == _lines_label(log, "fixed")
    assert result.regression_added == 2 and result.manifest["files"]["eval_regression.jsonl"]["appended"] == 2
    trained = {rid for r in _lines(result.sft_path) + _lines(result.dpo_path) for rid in r["meta"]["request_ids"]}
    assert not trained & {"fixed", "copies-eval", "failed"}
    # Idempotent: a second export appends nothing new.
    again = export_feedback(log, tmp_path / "out2", regression_share=1.0, regression_path=suite)
    assert again.regression_added == 1 and len(_lines(suite)) == 4  # without eval texts the copy is added
    third = export_feedback(log, tmp_path / "out3", regression_share=1.0, regression_path=suite)
    assert third.regression_added == 0 and len(_lines(suite)) == 4


def test_redaction_can_be_turned_off_and_model_filter_applies(scenario, tmp_path):
    log, _ = scenario
    log.add("other-model", "Where is my package?", "shipping", t=30, model="other-bot")
    log.rate("other-model", rating=1)
    raw = export_feedback(log, tmp_path / "raw", redact=False, model="support-bot")
    assert "jane.doe@example.com" in raw.sft_path.read_text()
    assert "other-model" not in raw.sft_path.read_text()
    with pytest.raises(InputError, match="regression_share"):
        export_feedback(log, tmp_path / "bad", regression_share=2)


def test_chat_content_parts_are_read_as_text(tmp_path):
    log = FakeRequestLog()
    log.add("parts", "unused", "shipping", t=1)
    log.reqs[-1].prompt = json.dumps([{"role": "user", "content": [{"type": "text", "text": "Where is my parcel?"}]}])
    log.rate("parts", rating=1)
    result = export_feedback(log, tmp_path / "out")
    assert _lines(result.sft_path)[0]["messages"][0] == {"role": "user", "content": "Where is my parcel?"}


def test_empty_log_writes_empty_files_and_a_manifest(tmp_path):
    result = export_feedback(FakeRequestLog(), tmp_path / "out")
    assert result.sft_records == result.dpo_records == 0
    assert result.sft_path.read_text() == "" and result.manifest["counts"]["sft"]["candidates"] == 0


def test_eval_texts_from_a_task_suite_with_references(tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Where is it?"}],
                "reference": "shipping",
            }
        )
        + "\n"
    )
    assert eval_texts_from_file(path) == ["Where is it?\nshipping"]


def test_a_short_prompt_copied_from_the_eval_set_is_kept_out(tmp_path):
    log = FakeRequestLog()
    log.add("short-copy", "Where is my package??", "refund", t=1, system=False)
    log.rate("short-copy", correction="shipping")
    log.add("short-other", "Do you sell gift cards?", "other", t=2, system=False)
    log.rate("short-other", rating=1)
    log.add("one-word", "package", "shipping", t=3, system=False)  # a word of an eval item is no copy
    log.rate("one-word", rating=1)
    eval_texts = ["Where is my package?\nshipping", "My order has not arrived\nshipping"]
    result = export_feedback(log, tmp_path / "out", eval_texts=eval_texts)
    kept = {r["meta"]["request_ids"][0] for r in _lines(result.sft_path)}
    assert kept == {"short-other", "one-word"}
    assert result.manifest["counts"]["sft"]["dropped"] == {"contaminated": 1}
    assert result.manifest["counts"]["dpo"]["dropped"] == {"contaminated": 1}


def test_parse_since():
    from tuneloop.feedback import parse_since

    assert parse_since(None) is None
    assert parse_since("24h", now=100_000.0) == 100_000.0 - 86_400
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5_400
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("2026-11-30T00:00:00Z") == parse_since("2026-11-30") == 1_795_996_800.0
    with pytest.raises(InputError, match="not a time"):
        parse_since("yesterday")


def test_export_file_order_does_not_depend_on_when_the_requests_came(tickets, tmp_path):
    # The same answers and feedback, logged in two different time orders, give the same records in the same order
    # (only ``meta``: request times differ), so a training run on the export is reproducible.
    def log_in(order):
        log = FakeRequestLog()
        for t, i in enumerate(order):
            text, label = tickets[i]
            log.add(f"r{i}", text, label if i % 3 else "other", t=100 + t)
            log.rate(f"r{i}", **({"rating": 1} if i % 3 else {"rating": -1, "correction": label}))
        return log

    first = export_feedback(log_in(range(12)), tmp_path / "a")
    second = export_feedback(log_in(reversed(range(12))), tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "meta"} for r in rows]  # noqa: E731
    a, b = _lines(first.sft_path), _lines(second.sft_path)
    assert len(a) >= 10 and strip(a) == strip(b)
    origins = [r["meta"]["origin"] for r in a]
    assert origins.count("correction") >= 3 and origins == sorted(
        origins, key=lambda o: o != "correction"
    )  # corrections first
    assert strip(_lines(first.dpo_path)) == strip(_lines(second.dpo_path))


def test_kto_records_from_thumbs_alone_with_the_same_checks(scenario, tmp_path):
    log, eval_path = scenario
    result = export_feedback(log, tmp_path / "out", since=5, eval_texts=eval_texts_from_file(eval_path))
    kto = _lines(result.kto_path)
    got = {(r["meta"]["request_ids"][0], r["meta"]["origin"]): r for r in kto}
    # Every rated answer is a record, no pair needed: a thumbs up (rating +1, score >= 0.5) is desirable, a thumbs
    # down (score 0.1 here) undesirable; a correction gives the corrected text (true) and the answer it fixed (false).
    assert {k: r["label"] for k, r in got.items()} == {
        ("dup-near", "rated_good"): True,
        ("v1-good", "rated_good"): True,
        ("pii", "rated_good"): True,
        ("v2-bad", "rated_bad"): False,
        ("fixed", "correction"): True,
        ("fixed", "corrected_original"): False,
        ("failed", "correction"): True,
    }
    assert got[("v2-bad", "rated_bad")]["messages"][-1] == {"role": "assistant", "content": "refund-ish"}
    assert got[("fixed", "corrected_original")]["messages"][-1] == {"role": "assistant", "content": "other"}
    assert got[("fixed", "correction")]["messages"][-1]["content"] == _lines_label(log, "fixed")
    # The correction and the answer it fixed differ in one word, near duplicates by MinHash; they are looked for
    # within a label only, so both stay (the desirable copies of ticket 0 are still deduplicated, exactly and nearly).
    from tuneloop.data.dedup import near_duplicate_groups

    pair = [got[("fixed", "correction")], got[("fixed", "corrected_original")]]
    texts = ["\n".join(m["content"] for m in r["messages"] if m["role"] != "system") for r in pair]
    assert near_duplicate_groups(texts, threshold=0.85, workers=1) == [[0, 1]]
    counts = result.manifest["counts"]["kto"]
    assert counts["dropped"] == {
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "contaminated": 2,
    }  # the eval copy: both its records
    assert counts["kept"] == result.kto_records == 7 and counts["desirable"] == 5 and counts["undesirable"] == 2
    assert result.manifest["files"]["kto.jsonl"]["records"] == 7
    for rec in kto:  # provenance, as in the other files
        meta = rec["meta"]
        assert (
            rec["id"].startswith("fb-")
            and meta["request_ids"]
            and meta["feedback_ids"]
            and meta["versions"]
            and meta["source"] == "feedback"
        )
    assert got[("v2-bad", "rated_bad")]["meta"]["versions"] == ["support-bot:2"] and got[("v2-bad", "rated_bad")][
        "meta"
    ]["arms"] == ["canary"]
    text = result.kto_path.read_text()
    assert "jane.doe@example.com" not in text and "555-0100" not in text and "[EMAIL]" in text
    assert "copies-eval" not in text and '"old"' not in text
    # Held-out corrections stay out of kto.jsonl too.
    held = export_feedback(log, tmp_path / "held", regression_share=1.0, regression_path=tmp_path / "reg.jsonl")
    assert not {"fixed", "failed"} & {rid for r in _lines(held.kto_path) for rid in r["meta"]["request_ids"]}


def test_kto_export_is_read_by_tuneloop_data_validate_as_kto(scenario, tmp_path):
    import os
    import subprocess
    import sys

    log, eval_path = scenario
    result = export_feedback(log, tmp_path / "out", eval_texts=eval_texts_from_file(eval_path))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneloop.cli",
            "data",
            "validate",
            str(result.kto_path),
            "--out",
            str(tmp_path / "report"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (
        report["format"] == "kto"
        and report["records"] == result.kto_records == report["valid"] > 0
        and report["invalid"] == 0
    )
    clean = _lines(Path(report["clean_path"]))
    assert sorted(c["label"] for c in clean) == sorted(r["label"] for r in _lines(result.kto_path))
