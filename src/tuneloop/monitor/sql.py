"""The one SQL layer under the request log: SQLite (default, WAL) or PostgreSQL, through SQLAlchemy Core.

Entry points: :func:`make_engine` (a URL or a path -> an engine with the right connection settings),
:func:`ensure_schema` (create or upgrade the tables, guarded against concurrent replicas),
:func:`write_tx` (a write transaction that takes SQLite's write lock up front) and :func:`insert_ignore` /
:func:`insert_one_ignore` (``INSERT ... ON CONFLICT DO NOTHING`` for either dialect).

Schema version 1 (``meta.schema_version``):

* ``requests``: one row per gateway request; primary key ``request_id``; indexes on ``created_at``,
  ``(model, created_at)`` and ``rollout_id``.
* ``feedback``: one row per ``(request_id, source)`` (unique); ``request_id`` references ``requests``
  (``ON DELETE CASCADE``); index on ``updated_at``.
* ``meta``: key/value; ``schema_version``.

A later version adds columns with a migration step in ``MIGRATIONS`` (``version -> function``); a
database written by a newer tuneloop is refused with a message rather than misread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from tuneloop.errors import TuneloopError

SCHEMA_VERSION = 1
#: Seconds to wait for a PostgreSQL connection.
CONNECT_TIMEOUT_S = 5
#: ``n -> step`` upgrades a database from schema ``n`` to ``n + 1`` inside the schema transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}
# An arbitrary constant key for PostgreSQL's advisory lock around schema creation (replicas start at once).
_PG_SCHEMA_LOCK = 7_406_113_201

metadata = sa.MetaData()

requests_table = sa.Table(
    "requests",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("ref", sa.String(300), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("artifact_sha256", sa.String(64), nullable=True),
    sa.Column("arm", sa.String(32), nullable=False),
    sa.Column("user_hash", sa.String(64), nullable=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("latency_s", sa.Float, nullable=False),
    sa.Column("ttft_s", sa.Float, nullable=True),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("rollout_id", sa.String(128), nullable=True),
    sa.Index("ix_requests_created_at", "created_at"),
    sa.Index("ix_requests_model_created_at", "model", "created_at"),
    sa.Index("ix_requests_rollout_id", "rollout_id"),
)

feedback_table = sa.Table(
    "feedback",
    metadata,
    sa.Column("feedback_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(128), sa.ForeignKey("requests.request_id", ondelete="CASCADE"), nullable=False),
    sa.Column("source", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("rating", sa.Integer, nullable=True),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("correction", sa.Text, nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.UniqueConstraint("request_id", "source", name="uq_feedback_request_source"),
    sa.Index("ix_feedback_updated_at", "updated_at"),
)

meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


class SchemaError(TuneloopError):
    """The database's schema is newer than this tuneloop understands."""

    exit_code = 2


def sqlite_path(url: str | os.PathLike) -> Path | None:
    """The file of a SQLite URL or plain path; ``None`` for a server URL."""
    text = os.fspath(url)
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///") :])
    if "://" in text:
        return None
    return Path(text)


def make_engine(url: str | os.PathLike) -> Engine:
    """An engine for ``sqlite:///path``, a plain path (SQLite) or ``postgresql://...`` (psycopg 3)."""
    path = sqlite_path(url)
    if path is not None:
        return _sqlite_engine(path)
    text = os.fspath(url)
    scheme = text.split("://", 1)[0]
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return _postgres_engine("postgresql+psycopg://" + text.split("://", 1)[1])
    raise ValueError(
        f"request log store {text!r}: unsupported URL scheme {scheme!r}; use a file path, "
        "'sqlite:///abs/path.db' or 'postgresql://user@host:port/db'"
    )


def _sqlite_engine(path: Path) -> Engine:
    if str(path) in ("", ":memory:"):
        raise ValueError("request log store: an in-memory SQLite database is not supported; give a file path")
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        f"sqlite:///{path}", connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8, max_overflow=8
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below), as SQLAlchemy documents
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock at BEGIN, so it waits (busy_timeout) instead of failing
        # when it later upgrades from a read snapshot that another writer has moved past.
        immediate = conn.get_execution_options().get("tuneloop_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgres_engine(url: str) -> Engine:
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "a PostgreSQL request log needs the psycopg driver: pip install 'tuneloop[postgres]'"
        ) from exc
    # connect_timeout: an unreachable server fails a write in seconds (the recorder then spools), instead of
    # holding the writer for the TCP timeout while the gateway's queue fills.
    return sa.create_engine(
        url, pool_size=8, max_overflow=8, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
    )


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction, committed on success and rolled back on an exception."""
    with engine.connect() as conn:
        conn = conn.execution_options(tuneloop_write=True)
        with conn.begin():
            yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    """A connection in a read transaction (one consistent snapshot on SQLite)."""
    with engine.connect() as conn, conn.begin():
        yield conn


def _insert(conn: Connection, table: sa.Table):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()


def insert_ignore(conn: Connection, table: sa.Table, rows: list[dict]) -> None:
    """Insert ``rows`` (one statement), skipping any whose primary or unique key exists."""
    if rows:
        conn.execute(_insert(conn, table), rows)


def insert_one_ignore(conn: Connection, table: sa.Table, row: dict) -> bool:
    """Insert ``row`` unless its primary or unique key exists; ``True`` if it went in."""
    # RETURNING says whether it went in on both dialects (a driver's rowcount for INSERT may be -1).
    key = list(table.primary_key.columns)[0]
    return conn.execute(_insert(conn, table).returning(key), row).first() is not None


def ensure_schema(engine: Engine, attempts: int = 5) -> int:
    """Create the tables if needed and upgrade an older schema; returns the schema version in use.

    On SQLite, a brand-new file opened by several processes at once can report "database is locked" without
    waiting (switching it to WAL needs an exclusive lock, and SQLite refuses a wait that could deadlock);
    that is retried with a short backoff.
    """
    for attempt in range(1, attempts):
        try:
            return _ensure_schema_once(engine)
        except sa.exc.OperationalError as exc:
            if engine.dialect.name != "sqlite" or "locked" not in str(exc.orig):
                raise
            time.sleep(0.05 * 2**attempt)
    return _ensure_schema_once(engine)


def _ensure_schema_once(engine: Engine) -> int:
    with write_tx(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
        metadata.create_all(conn, checkfirst=True)
        row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
        if row is None:
            conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            return SCHEMA_VERSION
        found = int(row[0])
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"the request log {engine.url.render_as_string(hide_password=True)} has schema version {found}, "
                f"newer than this tuneloop understands ({SCHEMA_VERSION}); upgrade tuneloop"
            )
        for version in range(found, SCHEMA_VERSION):
            MIGRATIONS[version](conn)
        if found < SCHEMA_VERSION:
            conn.execute(
                meta_table.update().where(meta_table.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
            )
        return SCHEMA_VERSION
