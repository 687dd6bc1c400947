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
    ensure_schema,
    feedback_table,
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
    request_id: str  # the x-request-id the gateway returned
    created_at: float  # unix seconds (UTC)
    endpoint: str  # "chat.completions" | "completions"
    model: str  # registered model name, e.g. "support-bot"
    ref: str  # what the client asked for: "support-bot", "support-bot:3", "support-bot@champion"
    version: int | None  # the version that answered (None if the request failed before routing)
    artifact_sha256: str | None
    arm: str  # "baseline" | "canary" | "direct"
    user_hash: str | None  # sha256 (hex, first 16) of the sticky user key; never the key itself
    prompt: str  # chat: JSON of the messages list; completions: the prompt text
    response: str  # the generated text (first choice)
    status: int  # HTTP status returned to the client
    error: str | None = None  # error code/message when status >= 400 or the output was empty
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rollout_id: str | None = None


@dataclass
class FeedbackRecord:
    feedback_id: str
    request_id: str
    source: str  # who sent it ("api" by default); one record per (request_id, source)
    created_at: float  # when this source first sent feedback on the request
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
        return (
            f"unknown request id {self.request_id!r}: no request with this id is in the request log "
            "(it may have been purged by retention, or never served by this gateway)"
        )


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


def request_row(rec: RequestRecord) -> dict[str, Any]:
    row = {name: getattr(rec, name) for name in _REQUEST_FIELDS}  # not asdict(): it deep-copies (slow)
    for name in ("request_id", "endpoint", "model", "ref", "arm", "user_hash", "artifact_sha256", "rollout_id"):
        if row[name] is not None:
            row[name] = clean_text(str(row[name]))
    row["prompt"] = redact_prompt(clean_text(rec.prompt or ""))
    row["response"] = redact(clean_text(rec.response or ""))
    row["error"] = _redact_optional(rec.error)
    return row


def feedback_row(
    request_id: str,
    *,
    source: str = "api",
    rating: int | None = None,
    score: float | None = None,
    correction: str | None = None,
    comment: str | None = None,
) -> dict[str, Any]:
    """A feedback row as the store keeps it (checked, redacted, stamped now); ``ValueError`` for a bad value."""
    _check_feedback(source, rating, score)
    now = time.time()
    return {
        "feedback_id": uuid.uuid4().hex,
        "request_id": clean_text(request_id),
        "source": clean_text(source),
        "created_at": now,
        "updated_at": now,
        "rating": None if rating is None else int(rating),
        "score": None if score is None else float(score),
        "correction": _redact_optional(correction),
        "comment": _redact_optional(comment),
    }


def upsert_feedback(conn, row: dict[str, Any], *, newer_only: bool) -> bool | None:
    """Insert ``row`` or update the stored row of its ``(request_id, source)``; ``True`` if inserted, ``False``
    if updated (or, with ``newer_only``, left as it is because it is newer), ``None`` if its request is unknown."""
    ft = feedback_table
    known = conn.execute(
        sa.select(requests_table.c.request_id).where(requests_table.c.request_id == row["request_id"])
    ).first()
    if known is None:
        return None
    if insert_one_ignore(conn, ft, row):
        return True
    values = {k: row[k] for k in ("rating", "score", "correction", "comment", "updated_at")}
    where = [ft.c.request_id == row["request_id"], ft.c.source == row["source"]]
    if newer_only:
        where.append(ft.c.updated_at <= row["updated_at"])
    conn.execute(ft.update().where(*where).values(**values))
    return False


def _check_feedback(source: str, rating: int | None, score: float | None) -> None:
    if not isinstance(source, str) or not 1 <= len(source) <= 128:
        raise ValueError(f"feedback source must be a string of 1 to 128 characters, got {source!r}")
    if rating is None and score is None:
        raise ValueError("feedback needs a rating (+1 or -1) or a score (a number from 0 to 1); got neither")
    if rating is not None and (isinstance(rating, bool) or rating not in (1, -1)):
        raise ValueError(f"feedback rating must be +1 or -1, got {rating!r}")
    if score is not None:
        if (
            isinstance(score, bool)
            or not isinstance(score, (int, float))
            or not math.isfinite(score)
            or not 0.0 <= score <= 1.0
        ):
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
        self.write_rows([request_row(r) for r in recs])

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        """Store rows made by :func:`request_row` (redacted) in one transaction; ids already stored are skipped."""
        if rows:
            with write_tx(self.engine) as conn:
                insert_ignore(conn, requests_table, rows)

    def replay(self, entries: list[dict[str, Any]]) -> dict[str, int]:
        """Store spooled entries (``{"kind": "request" | "feedback", "row"}``, oldest first) in one transaction.

        Idempotent: a request already stored is skipped; feedback is an upsert on ``(request_id, source)`` that
        keeps the newest ``updated_at``, so replaying the same entries twice leaves the same rows. Returns
        ``{"request": n, "feedback": n, "unknown_request": n, "corrupt": n}``: feedback on a request id the log
        does not hold, and lines that did not parse, are not stored (the caller counts them as dropped).
        """
        out = {"request": 0, "feedback": 0, "unknown_request": 0, "corrupt": 0}
        with write_tx(self.engine) as conn:
            run: list[dict[str, Any]] = []
            for entry in [*entries, {"kind": "end"}]:
                kind = entry.get("kind")
                if kind == "request":
                    run.append(entry["row"])
                    continue
                insert_ignore(conn, requests_table, run)  # a run of requests in one statement
                out["request"] += len(run)
                run = []
                if kind == "feedback":
                    stored = upsert_feedback(conn, entry["row"], newer_only=True)
                    out["feedback" if stored is not None else "unknown_request"] += 1
                elif kind != "end":
                    out["corrupt"] += 1
                    log.error(
                        "request log spool: a line that is not a record was skipped (%s)", entry.get("where", "?")
                    )
        return out

    def add_feedback(
        self,
        request_id: str,
        *,
        source: str = "api",
        rating: int | None = None,
        score: float | None = None,
        correction: str | None = None,
        comment: str | None = None,
    ) -> tuple[FeedbackRecord, bool]:
        """Store feedback on a request; returns ``(record, created)``.

        Raises :class:`UnknownRequest` for an id the log does not hold and ``ValueError`` for a rating other
        than +1/-1, a score outside [0, 1], or neither. A second call with the same ``source`` replaces the
        stored values (last write wins) and returns ``created=False``.
        """
        return self.store_feedback_row(
            feedback_row(request_id, source=source, rating=rating, score=score, correction=correction, comment=comment)
        )

    def store_feedback_row(self, row: dict[str, Any]) -> tuple[FeedbackRecord, bool]:
        """Store a row made by :func:`feedback_row`; ``(record as stored, created)``; :class:`UnknownRequest`
        when the log does not hold its request."""
        with write_tx(self.engine) as conn:
            created = upsert_feedback(conn, row, newer_only=False)
            if created is None:
                raise UnknownRequest(row["request_id"])
            ft = feedback_table
            stored = conn.execute(
                sa.select(ft).where(ft.c.request_id == row["request_id"], ft.c.source == row["source"])
            ).one()
        return _feedback(stored), created

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
            row = conn.execute(sa.select(requests_table).where(requests_table.c.request_id == request_id)).first()
        return None if row is None else _request(row)

    def requests(
        self, *, since: float | None = None, model: str | None = None, limit: int | None = None
    ) -> list[RequestRecord]:
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

    def feedback(self, *, since: float | None = None, request_ids: list[str] | None = None) -> list[FeedbackRecord]:
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
                chunk = request_ids[start : start + 500]
                out += [_feedback(r) for r in conn.execute(query.where(t.c.request_id.in_(chunk)))]
        out.sort(key=lambda f: (f.updated_at or 0.0, f.feedback_id))
        return out

    def arm_counts(self, *, model: str, since: float | None = None, rollout_id: str | None = None) -> dict:
        """Per-arm aggregates for rollout analysis.

        ``{arm: {"requests", "errors", "latency_sum", "feedback", "negative_feedback"}}`` over the requests
        of ``model`` created at or after ``since`` (and of ``rollout_id`` when given). An error is a status
        >= 500, or a non-4xx answer with ``error`` set or an empty response (timeouts, empty outputs);
        client errors (4xx) are not the model's and are not counted, nor are calls the gateway ended unanswered
        while shutting down (503 ``shutting_down``: not requests of either arm). ``latency_sum`` is over all counted
        requests. ``feedback`` counts feedback rows; ``negative_feedback`` those with rating -1 or score < 0.5.
        """
        t, f = requests_table, feedback_table
        conds = _request_filters(model, since, rollout_id)
        is_error = sa.or_(
            t.c.status >= 500, sa.and_(t.c.status < 400, sa.or_(t.c.error.is_not(None), t.c.response == ""))
        )
        per_arm = (
            sa.select(
                t.c.arm,
                sa.func.count(),
                sa.func.sum(sa.case((is_error, 1), else_=0)),
                sa.func.coalesce(sa.func.sum(t.c.latency_s), 0.0),
            )
            .where(*conds)
            .group_by(t.c.arm)
        )
        negative = sa.or_(f.c.rating == -1, f.c.score < 0.5)
        per_arm_fb = (
            sa.select(t.c.arm, sa.func.count(), sa.func.sum(sa.case((negative, 1), else_=0)))
            .select_from(f.join(t, f.c.request_id == t.c.request_id))
            .where(*conds)
            .group_by(t.c.arm)
        )
        out: dict[str, dict] = {}
        with read_tx(self.engine) as conn:
            for arm, n, errors, latency_sum in conn.execute(per_arm):
                out[arm] = {
                    "requests": int(n),
                    "errors": int(errors or 0),
                    "latency_sum": float(latency_sum),
                    "feedback": 0,
                    "negative_feedback": 0,
                }
            for arm, n, neg in conn.execute(per_arm_fb):
                out[arm].update(feedback=int(n), negative_feedback=int(neg or 0))
        return out

    def latencies(
        self, *, model: str, arm: str, since: float | None = None, rollout_id: str | None = None
    ) -> list[float]:
        """Latencies (seconds) of one arm's requests, in order of creation (same filters as ``arm_counts``)."""
        t = requests_table
        query = (
            sa.select(t.c.latency_s)
            .where(*_request_filters(model, since, rollout_id), t.c.arm == arm)
            .order_by(t.c.created_at, t.c.request_id)
        )
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
    # A call the gateway ended unanswered because it was shutting down (503 "shutting_down: ...", serve/errors.py)
    # says nothing about the version that was to answer it: not counted for either arm.
    shutdown = sa.and_(t.c.status == 503, sa.func.coalesce(t.c.error, "").like("shutting_down:%"))
    conds = [t.c.model == model, sa.not_(shutdown)]
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


class RequestLogUnavailable(Exception):
    """Feedback could be neither stored nor spooled (the store is down and there is no room in a spool)."""


def store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store cannot be reached or is busy (worth spooling and retrying), as opposed to
    a record it refuses."""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


#: Seconds a lost record keeps ``/health`` degraded after it was lost.
LOST_RECENTLY_S = 300.0


class AsyncRecorder:
    """Non-blocking writes for the gateway: a background thread writes submitted records in batches.

    ``submit`` never blocks; when ``max_queue`` records are waiting, the new one is dropped, counted and logged.

    With a ``spool`` (``monitor/spool.py``; the gateway always gives one), nothing the writer takes is lost to
    an unavailable store: a batch the store does not take goes to the spool (fsync'd) at once, and so does
    every later record and feedback while the spool is not empty, so order is kept; every
    ``retry_interval_s`` the writer replays the spool, oldest first, and writes directly again once it is
    empty. What a ``kill -9`` can lose is what sits in the in-memory queue: at most about
    ``flush_interval_s`` of answered requests plus one write (measured in docs/benchmarks.md). Without a spool
    a batch is tried 3 times and then lost (counted).

    ``counts[(kind, outcome)]``: ``kind`` is ``request`` or ``feedback``; ``outcome`` is ``written``,
    ``spooled``, ``replayed`` or ``dropped`` (the reason of each drop is logged).
    """

    batch_size = 500
    retries = 3  # tries of a batch when there is no spool
    replay_slice_s = 0.5  # replay at most this long before taking new records again

    def __init__(
        self,
        log: RequestLog,
        *,
        spool=None,
        max_queue: int = 10000,
        flush_interval_s: float = 0.05,
        retry_interval_s: float = 1.0,
    ):
        self.log = log
        self.spool = spool
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.counts: dict[tuple[str, str], int] = {}
        self.store_error: str | None = None  # why the store is unavailable, while it is
        self.store_down_since: float | None = None
        self.last_lost_at: float | None = None
        self._next_try = 0.0
        self._queue: queue.Queue[RequestRecord] = queue.Queue(maxsize=max_queue)
        self._pending = 0  # submitted and not yet written, spooled or given up on
        self._cond = threading.Condition()
        self._flush_now = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tuneloop-request-log", daemon=True)
        self._thread.start()

    # -- what the gateway calls --------------------------------------------------------------------------

    def submit(self, rec: RequestRecord) -> None:
        """Queue ``rec`` for writing; never blocks."""
        with self._cond:
            if self._closed:
                self._lose("request", 1, "the recorder is closed")
                return
            try:
                self._queue.put_nowait(rec)
            except queue.Full:
                self._lose("request", 1, f"the queue is full ({self._queue.maxsize} records waiting)")
                return
            self._pending += 1

    def add_feedback(
        self, request_id: str, *, flush_timeout: float = 5.0, **kwargs
    ) -> tuple[FeedbackRecord, bool | None]:
        """Store feedback: ``(record, created)``, or ``(record, None)`` when it went to the spool (the store is
        unavailable, or records spooled before it are not replayed yet); it is stored on replay, and dropped then
        (counted) if its request id is unknown.

        Raises ``ValueError`` for a bad value, :class:`UnknownRequest` when the store is up and holds no such
        request even after a flush of the queue (a client that sends feedback right after its answer gets it
        stored, not a 404), and :class:`RequestLogUnavailable` when it can be neither stored nor spooled.
        """
        row = feedback_row(request_id, **kwargs)
        for attempt in range(2):
            if self._spooling():
                break
            try:
                stored = self.log.store_feedback_row(row)
                self._count("feedback", "written")
                return stored
            except UnknownRequest:
                if attempt == 1:
                    raise
            except Exception as exc:  # noqa: BLE001 - sorted below
                if not store_unavailable(exc):
                    raise
                if self.spool is None:
                    self._lose("feedback", 1, f"the store is unavailable ({_why(exc)})")
                    raise RequestLogUnavailable(f"the request log store is unavailable: {_why(exc)}") from exc
                self._store_failed(exc)
            self.flush(flush_timeout)  # the request may still be queued (or the queue must go to the spool first)
        self.flush(flush_timeout)
        if not self._to_spool("feedback", [row]):
            raise RequestLogUnavailable(
                "the request log store is unavailable and the spool cannot take more "
                "(see the gateway's log); send the feedback again later"
            )
        return _feedback_from_row(row), None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written or spooled; ``False`` if ``timeout`` passed first."""
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
        """Write (or spool) what is queued, up to ``timeout``, and stop the thread; later submits are dropped.
        What is still spooled stays on disk and is replayed by the next gateway that opens this spool."""
        with self._cond:
            self._closed = True
        self.flush(timeout)
        self._flush_now.set()
        self._thread.join(timeout=max(timeout, 1.0))
        if self.spool is not None:
            if not self.spool.empty:
                log.warning(
                    "request log: %d records stay in the spool %s; the next gateway replays them",
                    self.spool.records,
                    self.spool.dir,
                )
            self.spool.close()

    # -- state for /health, /metrics and the rollout analysis ----------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def dropped(self) -> int:
        """Records lost for any reason (a full queue, a closed recorder, a full spool, a refused record)."""
        return self.counts.get(("request", "dropped"), 0) + self.counts.get(("feedback", "dropped"), 0)

    @property
    def spooled_now(self) -> int:
        return 0 if self.spool is None else self.spool.records

    def incomplete(self) -> str | None:
        """Why the store does not hold every record this gateway answered, or None when it does."""
        parts = []
        if self.spooled_now:
            parts.append(f"{self.spooled_now} records are in this gateway's spool, not yet in the store")
        if self.store_error:
            parts.append(f"the store is unavailable ({self.store_error})")
        return "; ".join(parts) or None

    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded", "reasons": [...], "spooled": n, "lost": n}`` for ``GET /health``."""
        reasons = []
        if self.store_error:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.store_down_since or time.time()))
            reasons.append(f"request log store unavailable since {since}: {self.store_error}")
        if self.spooled_now:
            reasons.append(
                f"{self.spooled_now} request log records spooled in the workspace; they are replayed "
                "into the store when it takes writes again"
            )
        if self.last_lost_at is not None and time.time() - self.last_lost_at < LOST_RECENTLY_S:
            reasons.append(
                f"{self.dropped} request log records lost since start, the last "
                f"{time.time() - self.last_lost_at:.0f} s ago (the gateway's log says why)"
            )
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "spooled": self.spooled_now,
            "lost": self.dropped,
        }

    # -- the writer thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed and self._pending == 0:
                    return
            if self.spool is not None and not self.spool.empty and not self._closed:
                self._replay()
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
        try:
            rows = []
            for rec in batch:
                try:
                    rows.append(request_row(rec))
                except Exception as exc:  # noqa: BLE001 - one odd record must not sink its batch
                    self._lose(
                        "request", 1, f"request {rec.request_id} could not be prepared ({type(exc).__name__}: {exc})"
                    )
            if self._spooling():
                self._to_spool("request", rows)
            else:
                self._to_store(rows)
        finally:
            with self._cond:
                self._pending -= len(batch)
                self._cond.notify_all()

    def _spooling(self) -> bool:
        """While the spool holds anything, new records go behind it (so the store gets them in order)."""
        return self.spool is not None and not self.spool.empty

    def _to_store(self, rows: list[dict[str, Any]]) -> None:
        tries = 1 if self.spool is not None else self.retries
        for attempt in range(1, tries + 1):
            try:
                self.log.write_rows(rows)
            except Exception as exc:  # noqa: BLE001 - the gateway must keep serving whatever the store does
                if not store_unavailable(exc):
                    self._write_one_by_one(rows)
                    return
                if self.spool is not None:
                    self._store_failed(exc)
                    self._to_spool("request", rows)
                    return
                if attempt == tries:
                    self._lose("request", len(rows), f"the store failed {attempt} tries ({_why(exc)})")
                    return
                time.sleep(0.1 * 2**attempt)
            else:
                self._count("request", "written", len(rows))
                self._store_ok()
                return

    def _write_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        for i, row in enumerate(rows):
            try:
                self.log.write_rows([row])
                self._count("request", "written")
            except Exception as exc:  # noqa: BLE001
                if store_unavailable(exc) and self.spool is not None:
                    self._store_failed(exc)
                    self._to_spool("request", rows[i:])
                    return
                self._lose("request", 1, f"the store refused request {row['request_id']} ({_why(exc)})")

    def _to_spool(self, kind: str, rows: list[dict[str, Any]]) -> bool:
        from tuneloop.monitor.spool import SpoolFull

        if self.spool is None:
            return False
        try:
            self.spool.append([{"kind": kind, "row": r} for r in rows])
        except SpoolFull as exc:
            self._lose(kind, len(rows), str(exc))
            return False
        except OSError as exc:
            self._lose(kind, len(rows), f"the spool could not be written ({exc})")
            return False
        self._count(kind, "spooled", len(rows))
        return True

    def _replay(self) -> None:
        if time.monotonic() < self._next_try:
            return
        started = time.monotonic()
        while not self.spool.empty and time.monotonic() - started < self.replay_slice_s:
            entries, cursor = self.spool.head(self.batch_size)
            if not entries:
                break
            done: dict[str, int] | None
            try:
                done = self.log.replay(entries)
            except Exception as exc:  # noqa: BLE001
                if store_unavailable(exc):
                    self._store_failed(exc)
                    self._next_try = time.monotonic() + self.retry_interval_s
                    return
                done = self._replay_one_by_one(entries)
                if done is None:
                    return
            self.spool.consume(cursor)
            self._count("request", "replayed", done["request"])
            self._count("feedback", "replayed", done["feedback"])
            if done["unknown_request"]:
                self._lose(
                    "feedback",
                    done["unknown_request"],
                    "it was sent during an outage on a request id the log does not hold",
                )
            if done["corrupt"]:
                self._lose("request", done["corrupt"], "its spool line did not parse")
        if self.spool.empty:
            self._store_ok()

    def _replay_one_by_one(self, entries: list[dict[str, Any]]) -> dict[str, int] | None:
        """Replay entry by entry after a chunk was refused; None if the store went away meanwhile."""
        total = {"request": 0, "feedback": 0, "unknown_request": 0, "corrupt": 0}
        for entry in entries:
            try:
                done = self.log.replay([entry])
            except Exception as exc:  # noqa: BLE001
                if store_unavailable(exc):
                    self._store_failed(exc)
                    self._next_try = time.monotonic() + self.retry_interval_s
                    return None
                row = entry.get("row") or {}
                self._lose(
                    entry.get("kind", "request"),
                    1,
                    f"the store refused spooled {entry.get('kind')} {row.get('request_id')} ({_why(exc)})",
                )
                continue
            for k, v in done.items():
                total[k] += v
        return total

    # -- bookkeeping ------------------------------------------------------------------------------------------------

    def _count(self, kind: str, outcome: str, n: int = 1) -> None:
        if n:
            self.counts[(kind, outcome)] = self.counts.get((kind, outcome), 0) + n

    def _lose(self, kind: str, n: int, why: str) -> None:
        before = self.dropped
        self._count(kind, "dropped", n)
        self.last_lost_at = time.time()
        if before == 0 or before // 1000 != self.dropped // 1000 or n > 1:
            log.error("request log: lost %d %s record(s) because %s (%d lost so far)", n, kind, why, self.dropped)

    def _store_failed(self, exc: BaseException) -> None:
        why = _why(exc)
        if self.store_error is None:
            self.store_down_since = time.time()
            where = f"the spool {self.spool.dir}" if self.spool is not None else "nowhere (no spool)"
            log.error(
                "request log: the store is unavailable (%s); records go to %s and are replayed when it is back",
                why,
                where,
            )
        self.store_error = why

    def _store_ok(self) -> None:
        if self.store_error is not None and not self._spooling():
            down = time.time() - (self.store_down_since or time.time())
            log.warning(
                "request log: the store takes writes again after %.1f s; the spool is replayed (%d records "
                "replayed so far, %d lost)",
                down,
                self.counts.get(("request", "replayed"), 0),
                self.dropped,
            )
            self.store_error, self.store_down_since = None, None


def _why(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return f"{type(orig or exc).__name__}: {text[0] if text else ''}"


def _feedback_from_row(row: dict[str, Any]) -> FeedbackRecord:
    values: dict[str, Any] = {name: row.get(name) for name in _FEEDBACK_FIELDS}  # the store's row: typed by its schema
    return FeedbackRecord(**values)
