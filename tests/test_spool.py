"""The request log's spool (``monitor/spool.py``) and the recorder that spools while the store is unavailable
(``AsyncRecorder`` with a spool): nothing acknowledged is lost, order is kept, replay is idempotent, a restart
finds what was left, the bound is kept, a full disk loses only the batch it refused."""

from __future__ import annotations

import errno
import time

import pytest
import sqlalchemy as sa

from tuneloop.monitor.requestlog import AsyncRecorder, RequestLog, RequestRecord, open_request_log
from tuneloop.monitor.spool import Spool, SpoolBusy, SpoolFull, open_spool


def rec(rid: str, t: float | None = None) -> RequestRecord:
    return RequestRecord(
        rid,
        time.time() if t is None else t,
        "chat.completions",
        "bot",
        "bot",
        1,
        None,
        "baseline",
        None,
        "call me at 555-123-4567",
        "ok",
        200,
    )


def entries(n: int, start: int = 0) -> list[dict]:
    return [{"kind": "request", "row": {"request_id": f"r{i}"}} for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------------- the journal


def test_append_head_consume_in_order_across_segments(tmp_path):
    sp = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=200)
    sp.append(entries(10))
    sp.append(entries(10, start=10))
    assert sp.records == 20 and len(sp.segments) > 1
    seen = []
    while not sp.empty:
        got, cursor = sp.head(3)
        seen += [e["row"]["request_id"] for e in got]
        sp.consume(cursor)
    assert seen == [f"r{i}" for i in range(20)]
    assert sp.bytes == 0 and not list((tmp_path / "s").glob("*.jsonl"))
    sp.append(entries(2, start=20))  # a fresh segment after the spool emptied
    assert [e["row"]["request_id"] for e in sp.head(10)[0]] == ["r20", "r21"]
    sp.close()


def test_reopen_finds_what_was_left_and_cuts_a_torn_line(tmp_path):
    sp = Spool(tmp_path / "s", max_bytes=1 << 20)
    sp.append(entries(5))
    got, cursor = sp.head(2)
    sp.consume(cursor)  # consumed in memory only: a restart replays the segment from its start (idempotent)
    sp.close()
    seg = sorted((tmp_path / "s").glob("*.jsonl"))[-1]
    with open(seg, "ab") as f:
        f.write(b'{"kind":"request","row":{"request_id":"to')  # a process killed inside a write
    sp = Spool(tmp_path / "s", max_bytes=1 << 20)
    assert sp.torn == 1 and sp.records == 5
    assert [e["row"]["request_id"] for e in sp.head(10)[0]] == [f"r{i}" for i in range(5)]
    sp.append(entries(1, start=5))  # appends after the cut, never after half a line
    assert [e["row"]["request_id"] for e in sp.head(10)[0]][-1] == "r5"
    sp.close()


def test_bound_refuses_the_newest_and_keeps_the_spooled(tmp_path):
    sp = Spool(tmp_path / "s", max_bytes=300)
    sp.append(entries(3))
    with pytest.raises(SpoolFull, match="would pass its bound of 300 bytes"):
        sp.append(entries(10, start=3))
    assert [e["row"]["request_id"] for e in sp.head(10)[0]] == ["r0", "r1", "r2"]
    sp.close()


def test_a_failed_write_is_cut_back(tmp_path, monkeypatch):
    sp = Spool(tmp_path / "s", max_bytes=1 << 20)
    sp.append(entries(2))
    real_fsync = __import__("os").fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tuneloop.monitor.spool.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        sp.append(entries(3, start=2))
    monkeypatch.setattr("tuneloop.monitor.spool.os.fsync", real_fsync)
    sp.append(entries(1, start=5))
    ids = [e["row"]["request_id"] for e in sp.head(10)[0]]
    assert ids == ["r0", "r1", "r5"] and sp.records == 3
    sp.close()


def test_one_process_per_spool_directory(tmp_path):
    a = open_spool(tmp_path / "root", max_bytes=1 << 20)
    b = open_spool(tmp_path / "root", max_bytes=1 << 20)
    assert a.dir.name == "0" and b.dir.name == "1"
    with pytest.raises(SpoolBusy):
        Spool(tmp_path / "root" / "0", max_bytes=1 << 20)
    a.close()
    assert open_spool(tmp_path / "root", max_bytes=1 << 20).dir.name == "0"  # a restarted gateway takes slot 0
    b.close()


# ------------------------------------------------------------------------------------- the recorder with a spool


class SwitchableLog(RequestLog):
    """A real SQLite log whose store can be made unavailable (every write and read raises OperationalError):
    the database outage, at the process boundary we cannot cut otherwise in a unit test (the PostgreSQL test in
    test_request_log_outage.py stops a real server)."""

    down = False

    def _check(self):
        if self.down:
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))

    def write_rows(self, rows):
        self._check()
        super().write_rows(rows)

    def replay(self, entries):
        self._check()
        return super().replay(entries)

    def store_feedback_row(self, row):
        self._check()
        return super().store_feedback_row(row)


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_outage_spools_then_replays_everything_in_order(tmp_path):
    log = SwitchableLog(tmp_path / "r.db")
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24)
    recorder = AsyncRecorder(log, spool=spool, flush_interval_s=0.01, retry_interval_s=0.05)
    recorder.submit(rec("before"))
    assert recorder.flush(10)
    assert recorder.health()["status"] == "ok" and recorder.incomplete() is None
    fb, created = recorder.add_feedback("before", rating=1)
    assert created is True

    log.down = True
    for i in range(300):
        recorder.submit(rec(f"out{i}"))
    assert recorder.flush(10)
    fb, created = recorder.add_feedback("out7", rating=-1, comment="wrong, mail me at a@b.example")
    assert created is None and fb.request_id == "out7"  # accepted into the spool
    fb, created = recorder.add_feedback("before", rating=-1)  # changed its mind during the outage
    assert created is None
    health = recorder.health()
    assert health["status"] == "degraded" and health["spooled"] == 302
    assert any("unavailable" in r for r in health["reasons"]) and "in this gateway's spool" in recorder.incomplete()
    # nothing in clear on disk that the store would not hold
    text = "".join(p.read_text() for p in (tmp_path / "spool").glob("*.jsonl"))
    assert "555-123-4567" not in text and "a@b.example" not in text

    log.down = False
    recorder.submit(rec("after"))
    assert wait_for(lambda: spool.empty and recorder.incomplete() is None)
    assert recorder.flush(10)
    ids = [r.request_id for r in log.requests()]
    assert set(ids) == {"before", "after", *(f"out{i}" for i in range(300))}
    assert {(f.request_id, f.rating) for f in log.feedback()} == {("before", -1), ("out7", -1)}
    # "after" went behind the spooled ones if the spool was not empty yet when it came (order is kept)
    assert recorder.counts[("request", "spooled")] == recorder.counts[("request", "replayed")] in (300, 301)
    assert recorder.counts[("feedback", "replayed")] == 2 and recorder.dropped == 0
    assert recorder.health()["status"] == "ok"
    recorder.close()
    log.close()


def test_replay_twice_is_harmless(tmp_path):
    log = open_request_log(tmp_path / "r.db")
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24)
    from tuneloop.monitor.requestlog import feedback_row, request_row

    old = feedback_row("a", rating=1)
    new = feedback_row("a", rating=-1)
    batch = [
        {"kind": "request", "row": request_row(rec("a"))},
        {"kind": "feedback", "row": old},
        {"kind": "feedback", "row": new},
        {"kind": "feedback", "row": feedback_row("ghost", rating=1)},
    ]
    spool.append(batch)
    got, _ = spool.head(10)
    first = log.replay(got)
    second = log.replay(got)  # as after a crash between storing and consuming
    assert first == second == {"request": 1, "feedback": 2, "unknown_request": 1, "corrupt": 0}
    assert len(log.requests()) == 1 and [(f.rating, f.feedback_id) for f in log.feedback()] == [
        (-1, old["feedback_id"])
    ]
    log.replay([{"kind": "feedback", "row": old}])  # an older value replayed late does not win
    assert log.feedback()[0].rating == -1
    spool.close()
    log.close()


def test_a_restarted_recorder_replays_what_was_left(tmp_path):
    log = SwitchableLog(tmp_path / "r.db")
    log.down = True
    recorder = AsyncRecorder(log, spool=open_spool(tmp_path / "spool", max_bytes=1 << 24), flush_interval_s=0.01)
    for i in range(50):
        recorder.submit(rec(f"k{i}"))
    recorder.close()  # the gateway stops during the outage: the records stay in the spool
    assert log.requests() == []  # nothing reached the store
    log.down = False
    assert len(list((tmp_path / "spool" / "0").glob("*.jsonl"))) == 1
    recorder = AsyncRecorder(log, spool=open_spool(tmp_path / "spool", max_bytes=1 << 24), flush_interval_s=0.01)
    assert wait_for(lambda: recorder.spool.empty)
    assert {r.request_id for r in log.requests()} == {f"k{i}" for i in range(50)}
    recorder.close()
    log.close()


def test_a_full_spool_drops_the_newest_and_says_so(tmp_path, caplog):
    log = SwitchableLog(tmp_path / "r.db")
    log.down = True
    recorder = AsyncRecorder(
        log, spool=Spool(tmp_path / "spool", max_bytes=4000), flush_interval_s=0.01, retry_interval_s=0.05
    )
    for i in range(40):
        recorder.submit(rec(f"f{i}"))
        recorder.flush(5)  # one record a batch, so the bound is reached record by record
    spooled = recorder.counts[("request", "spooled")]
    assert 0 < spooled < 40 and recorder.dropped == 40 - spooled
    assert "would pass its bound" in caplog.text
    health = recorder.health()
    assert health["status"] == "degraded" and any("lost" in r for r in health["reasons"])
    log.down = False
    assert wait_for(lambda: recorder.spool.empty)
    assert [r.request_id for r in log.requests()] == [f"f{i}" for i in range(spooled)]  # the oldest kept, in order
    recorder.close()
    log.close()


def test_feedback_on_a_spooled_request_waits_behind_it(tmp_path):
    log = SwitchableLog(tmp_path / "r.db")
    recorder = AsyncRecorder(
        log, spool=Spool(tmp_path / "spool", max_bytes=1 << 24), flush_interval_s=0.01, retry_interval_s=60
    )  # no replay during this test
    log.down = True
    recorder.submit(rec("q"))
    assert recorder.flush(5)
    log.down = False  # the store is back, but "q" is still only in the spool
    fb, created = recorder.add_feedback("q", rating=1)
    assert created is None  # spooled behind its request, not a 404
    recorder._next_try = 0  # let the writer replay now
    assert wait_for(lambda: recorder.spool.empty)
    assert [f.request_id for f in log.feedback()] == ["q"]
    recorder.close()
    log.close()


def test_metrics_export_the_recorder(tmp_path):
    from tuneloop.monitor.metrics import GatewayMetrics

    log = SwitchableLog(tmp_path / "r.db")
    recorder = AsyncRecorder(
        log, spool=Spool(tmp_path / "spool", max_bytes=1 << 24), flush_interval_s=0.01, retry_interval_s=60
    )
    metrics = GatewayMetrics()
    metrics.watch_request_log(recorder)
    recorder.submit(rec("w"))
    recorder.flush(5)
    log.down = True
    recorder.submit(rec("s"))
    recorder.flush(5)
    text = metrics.render()[0].decode()
    assert 'tuneloop_request_log_records_total{kind="request",outcome="written"} 1.0' in text
    assert 'tuneloop_request_log_records_total{kind="request",outcome="spooled"} 1.0' in text
    assert "tuneloop_request_log_spooled_records 1.0" in text and "tuneloop_request_log_store_up 0.0" in text
    recorder.close()
    log.close()
