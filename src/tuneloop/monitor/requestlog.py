"""The request and feedback log: every gateway request and the feedback sent on it.

Entry points: :func:`open_request_log` (a path or URL -> :class:`RequestLog`) and :class:`AsyncRecorder`
(non-blocking writes for the gateway). Storage is SQLite (WAL, in the workspace) by default, or PostgreSQL
when several gateway replicas share one log; both go through ``monitor/sql.py``.

Privacy rule: personal data and secrets (the data module's detectors, ``tuneloop.data.pii``) are redacted
in ``prompt``, ``response``, ``error``, ``correction`` and ``comment`` before anything is stored; a chat
prompt (JSON of the messages) is redacted string by string, so it stays valid JSON. The user key is only
ever stored as a hash (``user_hash``, computed by the gateway).

Feedback is one row per ``(request_id, source)``: a second call with the same source updates that row
(last write wins: rating, score, correction and comment are replaced, ``updated_at`` moves) and returns
``created=False``; ``feedback_id`` and ``created_at`` keep their first values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from tuneloop.data.pii import redact, redact_value, scan
from tuneloop.errors import TuneloopError
from tuneloop.monitor.sql import (
    feedback_table,
    ensure_schema,
    insert_ignore,
    insert_one_ignore,
    make_engine,
    read_tx,
    requests_table,
    write_tx,
)

log = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    request_id: str            # the x-request-id the gateway returned
    created_at: float          # unix seconds (UTC)
    endpoint: str              # "chat.completions" | "completions"
    model: str                 # registered model name, e.g. "support-bot"
    ref: str                   # what the client asked for: "support-bot", "support-bot:3", "support-bot@champion"
    version: int | None        # the version that answered (None if the request failed before routing)
    artifact_sha256: str | None
    arm: str                   # "baseline" | "canary" | "direct"
    user_hash: str | None      # sha256 (hex, first 16) of the sticky user key; never the key itself
    prompt: str                # chat: JSON of the messages list; completions: the prompt text
    response: str              # the generated text (first choice)
    status: int                # HTTP status returned to the client
    error: str | None = None   # error code/message when status >= 400 or the output was empty
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rollout_id: str | None = None


@dataclass
class FeedbackRecord:
    feedback_id: str
    request_id: str
    source: str                # who sent it ("api" by default); one record per (request_id, source)
    created_at: float          # when this source first sent feedback on the request
    rating: int | None = None  # +1 | -1
    score: float | None = None  # 0..1
    correction: str | None = None
    comment: str | None = None
    updated_at: float | None = None  # when it was last changed (== created_at until a second call)


class UnknownRequest(KeyError):
    """Feedback names a request id that the log does not hold (the gateway answers 404)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(request_id)

    def __str__(self) -> str:
        return (f"unknown request id {self.request_id!r}: no request with this id is in the request log "
                "(it may have been purged by retention, or never served by this gateway)")


class RequestLogError(TuneloopError):
    """The request log's database cannot be opened (a bad URL, an unreachable server, no permission)."""

    exit_code = 2


_REQUEST_FIELDS = tuple(f.name for f in fields(RequestRecord))
_FEEDBACK_FIELDS = tuple(f.name for f in fields(FeedbackRecord))


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` storable in both databases: NUL (PostgreSQL refuses it) and lone surrogates (not UTF-8)
    become U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
    return text


def redact_prompt(prompt: str) -> str:
    """``prompt`` with PII redacted; a JSON list/object (a chat's messages) is redacted value by value."""
    stripped = prompt.lstrip()
    if stripped[:1] in ("[", "{"):
        if "\\" not in prompt and not scan(prompt):
            # No escapes: every JSON string is a verbatim slice between quotes (which the detectors treat
            # like the ends of a text), so nothing found in the whole means nothing in any part.
            return prompt
        try:
            value = json.loads(prompt)
        except ValueError:
            return redact(prompt)
        cleaned = redact_value(value)
        return prompt if cleaned == value else clean_text(json.dumps(cleaned, ensure_ascii=False))
    return redact(prompt)


def _redact_optional(text: str | None) -> str | None:
    return None if text is None else redact(clean_text(text))


def _request_row(rec: RequestRecord) -> dict[str, Any]:
    row = {name: getattr(rec, name) for name in _REQUEST_FIELDS}  # not asdict(): it deep-copies (slow)
    for name in ("request_id", "endpoint", "model", "ref", "arm", "user_hash", "artifact_sha256", "rollout_id"):
        if row[name] is not None:
            row[name] = clean_text(str(row[name]))
    row["prompt"] = redact_prompt(clean_text(rec.prompt or ""))
    row["response"] = redact(clean_text(rec.response or ""))
    row["error"] = _redact_optional(rec.error)
    return row


def _check_feedback(source: str, rating: int | None, score: float | None) -> None:
    if not isinstance(source, str) or not 1 <= len(source) <= 128:
        raise ValueError(f"feedback source must be a string of 1 to 128 characters, got {source!r}")
    if rating is None and score is None:
        raise ValueError("feedback needs a rating (+1 or -1) or a score (a number from 0 to 1); got neither")
    if rating is not None and (isinstance(rating, bool) or rating not in (1, -1)):
        raise ValueError(f"feedback rating must be +1 or -1, got {rating!r}")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0.0 <= score <= 1.0:
            raise ValueError(f"feedback score must be a finite number from 0 to 1, got {score!r}")


class RequestLog:
    """The request and feedback log on one database; safe to share between threads."""

    def __init__(self, url: str | os.PathLike):
        self.url = os.fspath(url)
        try:
            self.engine = make_engine(url)
        except OSError as exc:
            raise RequestLogError(
                f"cannot create the request log at {self.url}: {exc}; check the directory and its permissions, "
                "or set another request log store in the serve: section"
            ) from exc
        try:
            self.schema_version = ensure_schema(self.engine)
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            where = self.engine.url.render_as_string(hide_password=True)
            raise RequestLogError(
                f"cannot open the request log at {where}: {str(exc.orig).strip()}; check that the database "
                "server is running and reachable, and the request log store setting in the serve: section"
            ) from exc

    # -- writes -------------------------------------------------------------------------------------------

    def record(self, rec: RequestRecord) -> None:
        """Store one request (PII redacted first). A request id already stored is left as it is."""
        self.record_many([rec])

    def record_many(self, recs: list[RequestRecord]) -> None:
        """Store several requests in one transaction; ids already stored are skipped."""
        rows = [_request_row(r) for r in recs]
        if rows:
            with write_tx(self.engine) as conn:
                insert_ignore(conn, requests_table, rows)

    def add_feedback(self, request_id: str, *, source: str = "api", rating: int | None = None,
                     score: float | None = None, correction: str | None = None,
                     comment: str | None = None) -> tuple[FeedbackRecord, bool]:
        """Store feedback on a request; returns ``(record, created)``.

        Raises :class:`UnknownRequest` for an id the log does not hold and ``ValueError`` for a rating other
        than +1/-1, a score outside [0, 1], or neither. A second call with the same ``source`` replaces the
        stored values (last write wins) and returns ``created=False``.
        """
        _check_feedback(source, rating, score)
        request_id, source = clean_text(request_id), clean_text(source)  # ids with NUL are unknown, not a 500
        now = time.time()
        values = {"rating": None if rating is None else int(rating),
                  "score": None if score is None else float(score),
                  "correction": _redact_optional(correction), "comment": _redact_optional(comment),
                  "updated_at": now}
        ft = feedback_table
        with write_tx(self.engine) as conn:
            known = conn.execute(sa.select(requests_table.c.request_id)
                                 .where(requests_table.c.request_id == request_id)).first()
            if known is None:
                raise UnknownRequest(request_id)
            new = {"feedback_id": uuid.uuid4().hex, "request_id": request_id, "source": source,
                   "created_at": now, **values}
            created = insert_one_ignore(conn, ft, new)
            if not created:
                conn.execute(ft.update().where(ft.c.request_id == request_id, ft.c.source == source)
                             .values(**values))
            row = conn.execute(sa.select(ft).where(ft.c.request_id == request_id, ft.c.source == source)).one()
        return _feedback(row), created

    def purge(self, older_than: float) -> int:
        """Retention: delete requests created before ``older_than`` (unix seconds) and all their feedback.

        Returns the number of requests removed (their feedback rows go with them).
        """
        old = sa.select(requests_table.c.request_id).where(requests_table.c.created_at < older_than)
        with write_tx(self.engine) as conn:
            conn.execute(feedback_table.delete().where(feedback_table.c.request_id.in_(old)))
            result = conn.execute(requests_table.delete().where(requests_table.c.created_at < older_than))
        return max(result.rowcount, 0)

    # -- reads --------------------------------------------------------------------------------------------

    def get(self, request_id: str) -> RequestRecord | None:
        request_id = clean_text(request_id)
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(requests_table)
                               .where(requests_table.c.request_id == request_id)).first()
        return None if row is None else _request(row)

    def requests(self, *, since: float | None = None, model: str | None = None,
                 limit: int | None = None) -> list[RequestRecord]:
        """Requests created at or after ``since`` (for ``model``), oldest first, at most ``limit``."""
        t = requests_table
        query = sa.select(t).order_by(t.c.created_at, t.c.request_id)
        if since is not None:
            query = query.where(t.c.created_at >= since)
        if model is not None:
            query = query.where(t.c.model == model)
        if limit is not None:
            query = query.limit(limit)
        with read_tx(self.engine) as conn:
            return [_request(r) for r in conn.execute(query)]

    def feedback(self, *, since: float | None = None,
                 request_ids: list[str] | None = None) -> list[FeedbackRecord]:
        """Feedback last changed at or after ``since`` (and/or on ``request_ids``), oldest change first."""
        t = feedback_table
        query = sa.select(t).order_by(t.c.updated_at, t.c.feedback_id)
        if since is not None:
            query = query.where(t.c.updated_at >= since)
        out: list[FeedbackRecord] = []
        with read_tx(self.engine) as conn:
            if request_ids is None:
                return [_feedback(r) for r in conn.execute(query)]
            for start in range(0, len(request_ids), 500):  # bounded IN lists
                chunk = request_ids[start:start + 500]
                out += [_feedback(r) for r in conn.execute(query.where(t.c.request_id.in_(chunk)))]
        out.sort(key=lambda f: (f.updated_at or 0.0, f.feedback_id))
        return out

    def arm_counts(self, *, model: str, since: float | None = None, rollout_id: str | None = None) -> dict:
        """Per-arm aggregates for rollout analysis.

        ``{arm: {"requests", "errors", "latency_sum", "feedback", "negative_feedback"}}`` over the requests
        of ``model`` created at or after ``since`` (and of ``rollout_id`` when given). An error is a status
        >= 500, or a non-4xx answer with ``error`` set or an empty response (timeouts, empty outputs);
        client errors (4xx) are not the model's and are not counted. ``latency_sum`` is over all counted
        requests. ``feedback`` counts feedback rows; ``negative_feedback`` those with rating -1 or score < 0.5.
        """
        t, f = requests_table, feedback_table
        conds = _request_filters(model, since, rollout_id)
        is_error = sa.or_(t.c.status >= 500,
                          sa.and_(t.c.status < 400, sa.or_(t.c.error.is_not(None), t.c.response == "")))
        per_arm = (sa.select(t.c.arm, sa.func.count(),
                             sa.func.sum(sa.case((is_error, 1), else_=0)),
                             sa.func.coalesce(sa.func.sum(t.c.latency_s), 0.0))
                   .where(*conds).group_by(t.c.arm))
        negative = sa.or_(f.c.rating == -1, f.c.score < 0.5)
        per_arm_fb = (sa.select(t.c.arm, sa.func.count(), sa.func.sum(sa.case((negative, 1), else_=0)))
                      .select_from(f.join(t, f.c.request_id == t.c.request_id))
                      .where(*conds).group_by(t.c.arm))
        out: dict[str, dict] = {}
        with read_tx(self.engine) as conn:
            for arm, n, errors, latency_sum in conn.execute(per_arm):
                out[arm] = {"requests": int(n), "errors": int(errors or 0), "latency_sum": float(latency_sum),
                            "feedback": 0, "negative_feedback": 0}
            for arm, n, neg in conn.execute(per_arm_fb):
                out[arm].update(feedback=int(n), negative_feedback=int(neg or 0))
        return out

    def latencies(self, *, model: str, arm: str, since: float | None = None,
                  rollout_id: str | None = None) -> list[float]:
        """Latencies (seconds) of one arm's requests, in order of creation (same filters as ``arm_counts``)."""
        t = requests_table
        query = (sa.select(t.c.latency_s).where(*_request_filters(model, since, rollout_id), t.c.arm == arm)
                 .order_by(t.c.created_at, t.c.request_id))
        with read_tx(self.engine) as conn:
            return [float(v) for (v,) in conn.execute(query)]

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _request_filters(model: str, since: float | None, rollout_id: str | None) -> list:
    t = requests_table
    conds = [t.c.model == model]
    if since is not None:
        conds.append(t.c.created_at >= since)
    if rollout_id is not None:
        conds.append(t.c.rollout_id == rollout_id)
    return conds


def _request(row) -> RequestRecord:
    return RequestRecord(**{name: row._mapping[name] for name in _REQUEST_FIELDS})


def _feedback(row) -> FeedbackRecord:
    return FeedbackRecord(**{name: row._mapping[name] for name in _FEEDBACK_FIELDS})


def default_log_url(workspace_root: str | os.PathLike) -> str:
    """The workspace's own request log: ``sqlite:///<workspace>/requests.db``."""
    return f"sqlite:///{os.path.abspath(workspace_root)}/requests.db"


def open_request_log(url: str | os.PathLike) -> RequestLog:
    """``"sqlite:///abs/path.db"`` or a plain path -> SQLite (WAL); ``"postgresql://user@host:port/db"`` ->
    PostgreSQL (needs ``tuneloop[postgres]``). Creates the tables on first use."""
    return RequestLog(url)


class AsyncRecorder:
    """Non-blocking writes for the gateway: a background thread writes submitted records in batches.

    ``submit`` never blocks; when ``max_queue`` records are waiting, the new one is dropped, counted in
    ``dropped`` and logged. A batch that cannot be written after 3 tries is counted in ``failed`` and logged.
    """

    batch_size = 500
    retries = 3

    def __init__(self, log: RequestLog, *, max_queue: int = 10000, flush_interval_s: float = 0.2):
        self.log = log
        self.flush_interval_s = flush_interval_s
        self.dropped = 0
        self.failed = 0
        self._queue: queue.Queue[RequestRecord] = queue.Queue(maxsize=max_queue)
        self._pending = 0  # submitted and not yet written (or given up on)
        self._cond = threading.Condition()
        self._flush_now = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tuneloop-request-log", daemon=True)
        self._thread.start()

    def submit(self, rec: RequestRecord) -> None:
        """Queue ``rec`` for writing; never blocks."""
        with self._cond:
            if self._closed:
                self._drop("the recorder is closed")
                return
            try:
                self._queue.put_nowait(rec)
            except queue.Full:
                self._drop(f"the queue is full ({self._queue.maxsize} records waiting)")
                return
            self._pending += 1

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("request log: dropped a record because %s (%d dropped so far); the database may be "
                        "slow or unreachable", why, self.dropped)

    def add_feedback(self, request_id: str, *, flush_timeout: float = 5.0, **kwargs) -> tuple[FeedbackRecord, bool]:
        """``RequestLog.add_feedback``, for feedback that may arrive before its request is written.

        An id the log does not hold is retried once after a flush of what is queued (immediate when nothing
        is); so a client that sends feedback right after its answer gets it stored, not a 404.
        """
        try:
            return self.log.add_feedback(request_id, **kwargs)
        except UnknownRequest:
            pass
        self.flush(flush_timeout)
        return self.log.add_feedback(request_id, **kwargs)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written; ``False`` if ``timeout`` passed first."""
        self._flush_now.set()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("request log: flush timed out with %d records still queued", self._pending)
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout``) and stop the thread; later submits are dropped."""
        with self._cond:
            self._closed = True
        self.flush(timeout)
        self._flush_now.set()
        self._thread.join(timeout=max(timeout, 1.0))

    def _write_one_by_one(self, batch: list[RequestRecord]) -> None:
        for rec in batch:
            try:
                self.log.record(rec)
            except Exception as exc:  # noqa: BLE001 - the gateway must keep serving whatever the store does
                self.failed += 1
                log.error("request log: could not write request %s (%s: %s); it is lost",
                          rec.request_id, type(exc).__name__, exc)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed and self._pending == 0:
                    return
            batch = self._next_batch()
            if batch:
                self._write(batch)

    def _next_batch(self) -> list[RequestRecord]:
        try:
            first = self._queue.get(timeout=self.flush_interval_s)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            if self._flush_now.is_set() or self._closed or time.monotonic() >= deadline:
                break
            self._flush_now.wait(min(0.01, max(deadline - time.monotonic(), 0.0)))
        self._flush_now.clear()
        return batch

    def _write(self, batch: list[RequestRecord]) -> None:
        for attempt in range(1, self.retries + 1):
            try:
                self.log.record_many(batch)
                break
            except sa.exc.OperationalError as exc:  # the store is unavailable or busy: retry, then give up
                if attempt == self.retries:
                    self.failed += len(batch)
                    log.error("request log: could not write %d records after %d tries (%s); they are lost",
                              len(batch), attempt, exc.orig)
                else:
                    time.sleep(0.1 * 2 ** attempt)
            except Exception:  # noqa: BLE001 - a record the store refuses must not sink its whole batch
                self._write_one_by_one(batch)
                break
        with self._cond:
            self._pending -= len(batch)
            self._cond.notify_all()
