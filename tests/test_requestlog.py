"""The request and feedback log, run against both stores: SQLite (a file) and a real PostgreSQL server
(started on loopback by tests/pg_server.py; the PostgreSQL cases skip with a message where it is absent)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tuneloop.monitor.requestlog import (
    AsyncRecorder,
    RequestLog,
    RequestLogError,
    RequestRecord,
    UnknownRequest,
    open_request_log,
)
from tuneloop.monitor.sql import SchemaError, meta_table

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
PHONE = "+1 415 555 0132"
KEY = "sk-" + "a1B2c3D4" * 4


@pytest.fixture(params=["sqlite", "postgres"])
def log_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ws' / '.tuneloop' / 'requests.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def rlog(log_url):
    log = open_request_log(log_url)
    yield log
    log.close()


def rec(
    request_id: str,
    *,
    t: float = 1000.0,
    model: str = "bot",
    arm: str = "baseline",
    status: int = 200,
    response: str = "fine",
    error: str | None = None,
    latency: float = 0.1,
    rollout: str | None = None,
    prompt: str = "hello",
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        created_at=t,
        endpoint="completions",
        model=model,
        ref=model,
        version=1 if arm == "baseline" else 2,
        artifact_sha256="ab" * 32,
        arm=arm,
        user_hash="0123456789abcdef",
        prompt=prompt,
        response=response,
        status=status,
        error=error,
        latency_s=latency,
        ttft_s=latency / 2,
        prompt_tokens=3,
        completion_tokens=5,
        rollout_id=rollout,
    )


def test_record_get_and_requests_since(rlog: RequestLog):
    first = rec("r1", t=100.0)
    rlog.record(first)
    rlog.record_many([rec("r3", t=300.0, model="other"), rec("r2", t=200.0)])
    assert rlog.get("r1") == first
    assert rlog.get("nope") is None
    assert [r.request_id for r in rlog.requests()] == ["r1", "r2", "r3"]  # oldest first
    assert [r.request_id for r in rlog.requests(since=200.0)] == ["r2", "r3"]
    assert [r.request_id for r in rlog.requests(model="bot")] == ["r1", "r2"]
    assert [r.request_id for r in rlog.requests(limit=1)] == ["r1"]
    # Recording an id again (a retried batch) keeps the first row and adds none.
    rlog.record(rec("r1", t=999.0, response="different"))
    assert rlog.get("r1") == first and len(rlog.requests()) == 3


def test_nullable_fields_round_trip(rlog: RequestLog):
    r = RequestRecord(
        request_id="failed-early",
        created_at=5.0,
        endpoint="chat.completions",
        model="bot",
        ref="bot@champion",
        version=None,
        artifact_sha256=None,
        arm="direct",
        user_hash=None,
        prompt="[]",
        response="",
        status=503,
        error="upstream_unavailable",
    )
    rlog.record(r)
    assert rlog.get("failed-early") == r


def test_text_any_store_accepts(rlog: RequestLog):
    # PostgreSQL refuses NUL in text and neither store can encode a lone surrogate: both become U+FFFD.
    rlog.record(rec("u1", prompt="a\x00b \ud800 c", response="ok\x00"))
    chat = json.dumps([{"role": "user", "content": f"\ud83d {EMAIL}"}])  # escaped surrogate + PII
    rlog.record(rec("u2", prompt=chat))
    assert rlog.get("u1").prompt == "a\ufffdb \ufffd c" and rlog.get("u1").response == "ok\ufffd"
    assert json.loads(rlog.get("u2").prompt) == [{"role": "user", "content": "\ufffd [EMAIL]"}]
    with pytest.raises(UnknownRequest):  # a hostile id is unknown, not a database error
        rlog.add_feedback("u1\x00\udc00", rating=1)
    assert rlog.get("u1\x00") is None


def test_unreachable_server_is_a_clear_error():
    from pg_server import free_port

    with pytest.raises(RequestLogError, match=r"cannot open the request log at postgresql\+psycopg://u@127.0.0.1"):
        open_request_log(f"postgresql://u@127.0.0.1:{free_port()}/db")


def _stored_text(log: RequestLog) -> str:
    with log.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT prompt, response, error FROM requests")).all()
        rows += conn.execute(sa.text("SELECT correction, comment, source FROM feedback")).all()
    return json.dumps([list(r) for r in rows])


def test_pii_is_redacted_before_storing(rlog: RequestLog, log_url: str):
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": f"my card is {CARD}, mail {EMAIL}, key {KEY}"},
    ]
    rlog.record(rec("p1", prompt=json.dumps(messages), response=f"call {PHONE}", error=f"bad {EMAIL}"))
    rlog.record(rec("p2", prompt=f"completion prompt for {EMAIL}"))
    fb, _ = rlog.add_feedback("p1", rating=-1, correction=f"write to {EMAIL}", comment=f"I am {PHONE}")
    stored = rlog.get("p1")
    prompt = json.loads(stored.prompt)  # still valid JSON, redacted value by value
    assert prompt[0] == {"role": "system", "content": "be nice"}
    assert "[CREDIT_CARD]" in prompt[1]["content"] and "[EMAIL]" in prompt[1]["content"]
    assert "[OPENAI_KEY]" in prompt[1]["content"]
    assert stored.response == "call [PHONE]" and stored.error == "bad [EMAIL]"
    assert rlog.get("p2").prompt == "completion prompt for [EMAIL]"
    assert fb.correction == "write to [EMAIL]" and fb.comment == "I am [PHONE]"
    everything = _stored_text(rlog)
    for secret in (EMAIL, CARD, PHONE, KEY, "4111"):
        assert secret not in everything
    if log_url.startswith("sqlite"):  # not in the database files at all (WAL included)
        db = Path(log_url[len("sqlite:///") :])
        raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert EMAIL.encode() not in raw and b"4111 1111" not in raw


def test_feedback_idempotent_per_source_last_write_wins(rlog: RequestLog):
    rlog.record(rec("f1"))
    first, created = rlog.add_feedback("f1", rating=1, comment="good")
    assert created and first.source == "api" and first.rating == 1 and first.created_at == first.updated_at
    again, created = rlog.add_feedback("f1", rating=-1, score=0.2)
    assert not created
    assert again.feedback_id == first.feedback_id and again.created_at == first.created_at
    assert (again.rating, again.score, again.comment) == (-1, 0.2, None)  # replaced, not merged
    assert again.updated_at >= first.updated_at
    other, created = rlog.add_feedback("f1", source="labeler", score=1.0)
    assert created and other.feedback_id != first.feedback_id
    assert sorted(f.source for f in rlog.feedback()) == ["api", "labeler"]


def test_feedback_unknown_request_and_validation(rlog: RequestLog):
    with pytest.raises(UnknownRequest, match="unknown request id 'missing'") as err:
        rlog.add_feedback("missing", rating=1)
    assert isinstance(err.value, KeyError) and err.value.request_id == "missing"
    rlog.record(rec("v1"))
    for bad in (
        {"rating": 0},
        {"rating": 2},
        {"rating": True},
        {"score": 1.5},
        {"score": -0.1},
        {"score": float("nan")},
        {"score": float("inf")},
        {"score": "0.5"},
        {},
    ):
        with pytest.raises(ValueError, match="rating|score"):
            rlog.add_feedback("v1", **bad)
    assert rlog.feedback() == []
    ok, _ = rlog.add_feedback("v1", score=0)
    assert ok.score == 0.0 and ok.rating is None


def test_feedback_filters(rlog: RequestLog):
    rlog.record_many([rec("a"), rec("b"), rec("c")])
    rlog.add_feedback("a", rating=1)
    cut = time.time()
    time.sleep(0.01)
    rlog.add_feedback("b", rating=-1)
    rlog.add_feedback("c", score=0.3)
    assert [f.request_id for f in rlog.feedback(since=cut)] == ["b", "c"]
    assert [f.request_id for f in rlog.feedback(request_ids=["a", "c", "zzz"])] == ["a", "c"]
    assert rlog.feedback(request_ids=[]) == []
    time.sleep(0.01)
    rlog.add_feedback("a", rating=-1)  # a changed rating shows up again for an incremental export
    assert [f.request_id for f in rlog.feedback(since=cut)] == ["b", "c", "a"]


def test_purge_removes_old_requests_and_their_feedback(rlog: RequestLog):
    rlog.record_many([rec(f"old{i}", t=100.0 + i) for i in range(5)] + [rec(f"new{i}", t=500.0 + i) for i in range(3)])
    rlog.add_feedback("old1", rating=-1)
    rlog.add_feedback("new1", rating=1)
    assert rlog.purge(older_than=500.0) == 5
    assert [r.request_id for r in rlog.requests()] == ["new0", "new1", "new2"]
    assert [f.request_id for f in rlog.feedback()] == ["new1"]
    assert rlog.purge(older_than=500.0) == 0
    with pytest.raises(UnknownRequest):
        rlog.add_feedback("old1", rating=1)


def test_arm_counts_and_latencies(rlog: RequestLog):
    recs = [
        # baseline (rollout R): 6 requests; errors: a 500, an empty 200; the 400 is the client's, not an error
        rec("b1", t=10, latency=0.1, rollout="R"),
        rec("b2", t=11, latency=0.2, rollout="R"),
        rec("b3", t=12, latency=0.3, status=500, response="", error="backend_error", rollout="R"),
        rec("b4", t=13, latency=0.4, response="", rollout="R"),
        rec("b5", t=14, latency=0.5, status=400, response="", error="invalid_request", rollout="R"),
        rec("b6", t=15, latency=0.6, rollout="R"),
        # canary (rollout R): 3 requests; errors: a 503 and a 200 flagged with a timeout
        rec("c1", t=10, arm="canary", latency=1.0, rollout="R"),
        rec("c2", t=11, arm="canary", latency=2.0, status=503, response="", error="x", rollout="R"),
        rec("c3", t=12, arm="canary", latency=3.0, error="timeout", rollout="R"),
        # not counted: another model, another rollout, too old for `since`, a call ended by the gateway's shutdown
        rec(
            "c4",
            t=13,
            arm="canary",
            latency=9.0,
            status=503,
            response="",
            rollout="R",
            error="shutting_down: server shutting down: the gateway stopped before this request finished",
        ),
        rec("o1", t=10, model="other", rollout="R"),
        rec("x1", t=10, rollout="S"),
        rec("early", t=1, rollout="R"),
    ]
    rlog.record_many(recs)
    rlog.add_feedback("b1", rating=1)
    rlog.add_feedback("b2", score=0.4)  # negative (score < 0.5)
    rlog.add_feedback("b2", source="judge", score=0.5)  # not negative
    rlog.add_feedback("c1", rating=-1)  # negative
    rlog.add_feedback("early", rating=-1)  # outside `since`
    counts = rlog.arm_counts(model="bot", since=10, rollout_id="R")
    assert counts["baseline"] == {
        "requests": 6,
        "errors": 2,
        "latency_sum": pytest.approx(2.1),
        "feedback": 3,
        "negative_feedback": 1,
    }
    assert counts["canary"] == {
        "requests": 3,
        "errors": 2,
        "latency_sum": pytest.approx(6.0),
        "feedback": 1,
        "negative_feedback": 1,
    }
    assert set(counts) == {"baseline", "canary"}
    everything = rlog.arm_counts(model="bot")
    assert everything["baseline"]["requests"] == 8 and everything["baseline"]["feedback"] == 4
    assert rlog.arm_counts(model="nobody") == {}
    assert rlog.latencies(model="bot", arm="canary", rollout_id="R") == pytest.approx([1.0, 2.0, 3.0])
    assert rlog.latencies(model="bot", arm="baseline", since=14, rollout_id="R") == pytest.approx([0.5, 0.6])


def _write_from_threads(logs: list[RequestLog], threads_per_log: int, per_thread: int) -> list[str]:
    ids: list[str] = []
    errors: list[BaseException] = []

    def work(log: RequestLog, prefix: str) -> None:
        try:
            mine = [f"{prefix}-{i}" for i in range(per_thread)]
            for i, rid in enumerate(mine):
                if i % 2:
                    log.record(rec(rid, t=float(i)))
                else:
                    log.record_many([rec(rid, t=float(i))])
        except BaseException as exc:  # reported below, not swallowed
            errors.append(exc)

    workers = []
    for n, log in enumerate(logs):
        for k in range(threads_per_log):
            prefix = f"L{n}T{k}"
            ids += [f"{prefix}-{i}" for i in range(per_thread)]
            workers.append(threading.Thread(target=work, args=(log, prefix)))
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors
    return ids


def test_concurrent_writers_threads_and_two_replicas(log_url: str):
    replica_a, replica_b = open_request_log(log_url), open_request_log(log_url)
    try:
        ids = _write_from_threads([replica_a, replica_b], threads_per_log=4, per_thread=60)
        stored = replica_b.requests()
        assert len(stored) == len(ids) == 480
        assert {r.request_id for r in stored} == set(ids)
        # Both replicas send the same feedback at once: exactly one creates it.
        results: list[bool] = []
        barrier = threading.Barrier(8)

        def feedback(log: RequestLog) -> None:
            barrier.wait()
            results.append(log.add_feedback(ids[0], source="api", rating=-1)[1])

        threads = [threading.Thread(target=feedback, args=(log,)) for log in [replica_a, replica_b] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == [False] * 7 + [True]
        assert len(replica_a.feedback()) == 1
    finally:
        replica_a.close()
        replica_b.close()


def test_replicas_create_the_schema_at_once(log_url: str):
    logs: list[RequestLog] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            logs.append(open_request_log(log_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors, errors
        assert [log.schema_version for log in logs] == [1] * 4
    finally:
        for log in logs:
            log.close()


def test_schema_version_newer_database_is_refused(rlog: RequestLog, log_url: str):
    with rlog.engine.begin() as conn:
        assert conn.execute(sa.select(meta_table.c.value)).scalar_one() == "1"
        conn.execute(meta_table.update().values(value="99"))
    with pytest.raises(SchemaError, match="schema version 99, newer than this tuneloop understands"):
        open_request_log(log_url)


def test_store_urls(tmp_path):
    plain = open_request_log(tmp_path / "sub" / "plain.db")  # a plain path, parent created
    with plain.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    plain.close()
    with pytest.raises(ValueError, match="unsupported URL scheme 'mysql'.*postgresql://"):
        open_request_log("mysql://u@h/db")
    with pytest.raises(ValueError, match="in-memory"):
        open_request_log("sqlite:///:memory:")


class SlowLog(RequestLog):
    """A real log whose writes wait for ``gate``: a slow database, to fill the recorder's queue."""

    def __init__(self, url, gate: threading.Event):
        super().__init__(url)
        self.gate = gate
        self.entered = threading.Event()

    def write_rows(self, rows):
        self.entered.set()
        self.gate.wait(30)
        super().write_rows(rows)


class BrokenLog(RequestLog):
    def write_rows(self, rows):
        raise sa.exc.OperationalError("INSERT", {}, Exception("database is down"))


class PickyLog(RequestLog):
    """A real log that refuses one record (as a store may refuse a value): the rest of its batch must land."""

    def write_rows(self, rows):
        if any(r["request_id"] == "poison" for r in rows):
            raise ValueError("value refused by the store")
        super().write_rows(rows)


def test_async_recorder_writes_everything(rlog: RequestLog):
    recorder = AsyncRecorder(rlog, flush_interval_s=0.05)
    for i in range(1500):
        recorder.submit(rec(f"a{i}", t=float(i)))
    assert recorder.flush(timeout=60)
    assert len(rlog.requests()) == 1500 and recorder.dropped == 0
    recorder.submit(rec("late"))
    recorder.close()
    assert rlog.get("late") is not None
    recorder.submit(rec("after-close"))
    assert recorder.dropped == 1 and rlog.get("after-close") is None


def test_async_recorder_feedback_waits_for_a_queued_request(tmp_path):
    gate = threading.Event()
    log = SlowLog(tmp_path / "slow.db", gate)
    recorder = AsyncRecorder(log, flush_interval_s=0.01)
    recorder.submit(rec("queued"))
    assert log.entered.wait(10)
    with pytest.raises(UnknownRequest):
        log.add_feedback("queued", rating=1)  # the log alone does not hold it yet
    threading.Timer(0.2, gate.set).start()
    fb, created = recorder.add_feedback("queued", rating=-1, comment="slow answer")
    assert created and fb.rating == -1 and log.get("queued") is not None
    with pytest.raises(UnknownRequest):  # nothing queued: unknown after an immediate flush
        recorder.add_feedback("never-served", rating=1)
    recorder.close()
    log.close()


def test_async_recorder_never_blocks_and_counts_drops(tmp_path, caplog):
    gate = threading.Event()
    log = SlowLog(tmp_path / "slow.db", gate)
    recorder = AsyncRecorder(log, max_queue=10, flush_interval_s=0.01)
    recorder.submit(rec("first"))
    assert log.entered.wait(10)  # the writer is now stuck in the database with one record
    start = time.perf_counter()
    for i in range(200):
        recorder.submit(rec(f"s{i}"))
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"submit blocked: {elapsed:.3f}s for 200 submits"
    assert recorder.dropped == 190 and recorder.queue_depth == 10
    assert "lost 1 request record(s) because the queue is full" in caplog.text
    assert not recorder.flush(timeout=0.05)
    gate.set()
    assert recorder.flush(timeout=30)
    assert len(log.requests()) == 11
    recorder.close()
    log.close()


def test_async_recorder_survives_a_failing_store(tmp_path, caplog):
    log = BrokenLog(tmp_path / "broken.db")
    recorder = AsyncRecorder(log, flush_interval_s=0.01)
    recorder.submit(rec("x1"))
    assert recorder.flush(timeout=10)
    assert recorder.dropped == 1 and "the store failed 3 tries" in caplog.text
    recorder.close()
    log.close()


def test_async_recorder_isolates_a_record_the_store_refuses(tmp_path, caplog):
    log = PickyLog(tmp_path / "picky.db")
    recorder = AsyncRecorder(log, flush_interval_s=0.2)
    for rid in ("ok1", "poison", "ok2"):
        recorder.submit(rec(rid))
    assert recorder.flush(timeout=10)
    assert {r.request_id for r in log.requests()} == {"ok1", "ok2"} and recorder.dropped == 1
    assert "the store refused request poison" in caplog.text
    recorder.close()
    log.close()


REPLICA = """
import sys, time
from tuneloop.monitor.requestlog import AsyncRecorder, RequestRecord, open_request_log
url, name = sys.argv[1], sys.argv[2]
log = open_request_log(url)
recorder = AsyncRecorder(log, flush_interval_s=0.01)
for i in range(300):
    recorder.submit(RequestRecord(f"{name}-{i}", time.time(), "completions", "bot", "bot", 1, None, "baseline",
                                  None, "p", "r", 200))
    if i % 50 == 0:  # feedback right after the answer: the record may still be queued
        recorder.add_feedback(f"{name}-{i}", source="api", rating=1)
assert recorder.flush(60), "flush timed out"
recorder.close()
print(recorder.dropped, recorder.counts.get(("request", "written"), 0))
"""


def test_two_replica_processes_lose_nothing(log_url: str):
    import os
    import subprocess
    import sys

    open_request_log(log_url).close()  # as `tuneloop serve` would: the schema exists before replicas start
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, log_url, name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].split() for o in outs] == [["0", "300"], ["0", "300"]]
    log = open_request_log(log_url)
    try:
        ids = {r.request_id for r in log.requests()}
        assert ids == {f"{n}-{i}" for n in "ab" for i in range(300)}
        expected = sorted(f"{n}-{i}" for n in "ab" for i in range(0, 300, 50))
        assert sorted(f.request_id for f in log.feedback()) == expected
    finally:
        log.close()
