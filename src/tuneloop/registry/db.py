"""The model registry: numbered immutable versions, movable aliases and an append-only event log.

State lives in one SQLite database (``root/registry.db``, WAL mode) and the artifacts themselves in a
content-addressed ``ArtifactStore`` under ``root/artifacts``. Registering copies the artifact into the
store first and only then, in a single transaction, records the version, so a process killed at any point
leaves either no version or a complete one (at worst an unreferenced artifact in the store).

Versions and events cannot be changed or deleted: SQLite triggers abort any such statement. Deleting a
version is a soft delete (a row in ``deletions`` plus a ``deleted`` event): the version disappears from
listings and from ``latest``, keeps its lineage for ``show``, and its artifact is garbage-collected once no
live version references it. Tags are mutable key/value pairs per version; every change is an event.
Refs look like ``support-bot:3``, ``support-bot@champion`` or ``support-bot`` (the latest live version).

Aliases: ``promote`` moves an alias (default ``champion``) and records the version it pointed at under its
*previous* alias (``previous`` for ``champion``, ``<alias>-previous`` otherwise); ``rollback`` swaps the two,
so rolling back twice returns to where it started.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError, TuneloopError
from tuneloop.fsutil import utcnow
from tuneloop.registry.store import ArtifactStore

ARTIFACT_KINDS = ("adapter", "model")
SCHEMA_VERSION = 2
RESERVED_TAG_PREFIX = "tuneloop."
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/ ]{0,249}$")
MAX_TAG_VALUE = 5000
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name        TEXT PRIMARY KEY,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    id               INTEGER PRIMARY KEY,
    model            TEXT NOT NULL REFERENCES models(name),
    version          INTEGER NOT NULL CHECK (version >= 1),
    created_at       TEXT NOT NULL,
    artifact_digest  TEXT NOT NULL,
    artifact_kind    TEXT NOT NULL CHECK (artifact_kind IN ('adapter', 'model')),
    base_model       TEXT NOT NULL,
    cache_key        TEXT,
    lineage          TEXT NOT NULL,
    metrics          TEXT NOT NULL,
    gates            TEXT NOT NULL,
    UNIQUE (model, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_cache_key ON versions(model, cache_key)
    WHERE cache_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS aliases (
    model       TEXT NOT NULL,
    alias       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES versions(model, version)
);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    model    TEXT NOT NULL,
    version  INTEGER,
    kind     TEXT NOT NULL,
    at       TEXT NOT NULL,
    actor    TEXT NOT NULL,
    reason   TEXT NOT NULL DEFAULT '',
    details  TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS tags (
    model       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (model, version, key),
    FOREIGN KEY (model, version) REFERENCES versions(model, version)
);
CREATE TABLE IF NOT EXISTS deletions (
    model    TEXT NOT NULL,
    version  INTEGER NOT NULL,
    at       TEXT NOT NULL,
    actor    TEXT NOT NULL,
    reason   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (model, version),
    FOREIGN KEY (model, version) REFERENCES versions(model, version)
);
CREATE TRIGGER IF NOT EXISTS deletions_final_update BEFORE UPDATE ON deletions BEGIN
    SELECT RAISE(ABORT, 'registry deletions are final');
END;
CREATE TRIGGER IF NOT EXISTS deletions_final_delete BEFORE DELETE ON deletions BEGIN
    SELECT RAISE(ABORT, 'registry deletions are final');
END;
CREATE TRIGGER IF NOT EXISTS versions_immutable_update BEFORE UPDATE ON versions BEGIN
    SELECT RAISE(ABORT, 'registry versions are immutable: register a new version instead of changing one');
END;
CREATE TRIGGER IF NOT EXISTS versions_immutable_delete BEFORE DELETE ON versions BEGIN
    SELECT RAISE(ABORT, 'registry versions are immutable and cannot be deleted');
END;
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events BEGIN
    SELECT RAISE(ABORT, 'registry events are append-only');
END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events BEGIN
    SELECT RAISE(ABORT, 'registry events are append-only');
END;
"""


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``model:3``, ``model@alias`` or ``model`` into ``(model, version_str)``.

    A bare model name means ``"latest"``. ``model:alias`` and ``model@3`` are accepted too.
    """
    ref = ref.strip() if isinstance(ref, str) else ref
    if not isinstance(ref, str) or not ref:
        raise InputError(f"empty model ref {ref!r}; use 'name', 'name:VERSION' or 'name@ALIAS'")
    sep = "@" if "@" in ref else ":" if ":" in ref else None
    if sep is None:
        return ref, "latest"
    model, _, version = ref.rpartition(sep)
    if not model or not version:
        raise InputError(f"malformed model ref {ref!r}; use 'name', 'name:VERSION' or 'name@ALIAS'")
    return model, version


def _default_actor() -> str:
    from tuneloop.registry.lineage import actor

    return actor()


def previous_alias(alias: str) -> str:
    """Where ``promote`` keeps the version an alias pointed at before: ``previous`` for ``champion``."""
    return "previous" if alias == "champion" else f"{alias}-previous"


def to_json(value: Any, what: str) -> str:
    """``value`` as canonical JSON for a registry field (lineage, metrics, gates, event details); InputError if it is not JSON."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be JSON-serialisable (plain dicts, lists, str, finite numbers): {e}") from e


def _add_event(
    conn: sqlite3.Connection,
    model: str,
    version: int | None,
    kind: str,
    actor: str | None,
    reason: str,
    details: dict[str, Any],
) -> None:
    conn.execute(
        "INSERT INTO events (model, version, kind, at, actor, reason, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (model, version, kind, utcnow(), actor or _default_actor(), reason or "", to_json(details, "event details")),
    )


class SqliteRegistry:
    """Model versions, aliases and events in ``root/registry.db``; artifacts in ``root/artifacts``."""

    parse_ref = staticmethod(parse_ref)
    backend = "sqlite"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.db_path = self.root / "registry.db"
        self.store = ArtifactStore(self.root / "artifacts")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as conn:
                _enable_wal(conn)
                conn.execute("BEGIN IMMEDIATE")
                if conn.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
                    conn.execute("ROLLBACK")
                    raise TuneloopError(
                        f"registry {self.db_path} was written by a newer tuneloop; upgrade tuneloop to use it"
                    )
                for statement in _split_sql(_SCHEMA):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise TuneloopError(
                f"cannot open the registry database {self.db_path}: {e}; "
                "check that it is a tuneloop registry and that the directory is writable"
            ) from e

    # -- connections ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One connection, one transaction: ``BEGIN IMMEDIATE`` for writes, a read snapshot otherwise."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- writing --------------------------------------------------------------------------------

    def register(
        self,
        model: str,
        artifact_dir: Path,
        *,
        artifact_kind: str,
        base_model: str,
        lineage: dict,
        metrics: dict,
        gates: dict,
        cache_key: str | None = None,
        actor: str | None = None,
        reason: str = "",
    ) -> dict:
        """Store ``artifact_dir`` and record it as the next version of ``model``; return that version.

        The directory must hold safetensors weights and no pickle files. With a ``cache_key`` already
        registered for this model, nothing new is created: the existing version is returned with
        ``"existing": True``.
        """
        from tuneloop.registry.lineage import check_artifact_dir

        check_model_name(model)
        if artifact_kind not in ARTIFACT_KINDS:
            raise InputError(f"artifact_kind must be one of {', '.join(ARTIFACT_KINDS)}, got {artifact_kind!r}")
        if not isinstance(base_model, str) or not base_model:
            raise InputError(f"base_model must be a non-empty string (a hub id or a path), got {base_model!r}")
        payload = (to_json(lineage, "lineage"), to_json(metrics, "metrics"), to_json(gates, "gates"))
        check_artifact_dir(Path(artifact_dir), artifact_kind)
        if cache_key is not None:
            with self._transaction(write=False) as conn:
                found = self._by_cache_key(conn, model, cache_key)
            if found is not None:
                return found

        for _ in range(3):
            digest = self.store.put_dir(Path(artifact_dir))
            with self._transaction(write=True) as conn:
                if cache_key is not None:
                    found = self._by_cache_key(conn, model, cache_key)
                    if found is not None:  # registered by a concurrent process since the check above
                        return found
                if not self.store.exists(digest):
                    continue  # garbage-collected by a concurrent delete between put and commit: store again
                now = utcnow()
                conn.execute("INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)", (model, now))
                version = conn.execute(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE model = ?", (model,)
                ).fetchone()[0]
                conn.execute(
                    "INSERT INTO versions (model, version, created_at, artifact_digest, artifact_kind, base_model,"
                    " cache_key, lineage, metrics, gates) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (model, version, now, digest, artifact_kind, base_model, cache_key, *payload),
                )
                _add_event(
                    conn, model, version, "registered", actor, reason,
                    {"artifact_digest": digest, "artifact_kind": artifact_kind, "cache_key": cache_key},
                )
                return self._get(conn, model, version)
        raise TuneloopError(f"could not register {model}: its artifact kept being garbage-collected; try again")

    def set_alias(
        self, model: str, alias: str, version: int | str, *, actor: str | None = None, reason: str = ""
    ) -> None:
        """Point ``alias`` at ``version`` (a number, ``latest`` or another alias); records ``alias_set``."""
        check_alias_name(alias)
        with self._transaction(write=True) as conn:
            target = self._get_live(conn, model, version, f"point alias {alias!r} at")["version"]
            old = self._alias(conn, model, alias)
            self._put_alias(conn, model, alias, target)
            _add_event(conn, model, target, "alias_set", actor, reason, {"alias": alias, "old": old, "new": target})

    def promote(
        self,
        model: str,
        version: int | str,
        *,
        alias: str = "champion",
        actor: str | None = None,
        reason: str = "",
    ) -> dict:
        """Point ``alias`` (default ``champion``) at ``version``; the version it left becomes its previous.

        The previous alias is ``previous`` for ``champion`` and ``<alias>-previous`` otherwise. Promoting
        the version the alias already points at changes nothing and records nothing. Returns the version.
        """
        check_alias_name(alias)
        prev_name = previous_alias(alias)
        if alias == "previous" or alias.endswith("-previous"):
            raise InputError(f"alias {alias!r} is kept by promote/rollback; promote to the alias it backs up instead")
        with self._transaction(write=True) as conn:
            target = self._get_live(conn, model, version, f"promote to {alias!r}")["version"]
            old = self._alias(conn, model, alias)
            if old != target:
                old_previous = self._alias(conn, model, prev_name)
                self._put_alias(conn, model, alias, target)
                if old is not None:
                    self._put_alias(conn, model, prev_name, old)
                details = {
                    "alias": alias,
                    alias: {"old": old, "new": target},
                    prev_name: {"old": old_previous, "new": old if old is not None else old_previous},
                }
                _add_event(conn, model, target, "promoted", actor, reason, details)
            return self._get(conn, model, target)

    def rollback(self, model: str, *, alias: str = "champion", actor: str | None = None, reason: str = "") -> dict:
        """Point ``alias`` back at its previous version, and keep the rolled-back one as the previous.

        So two rollbacks in a row return to where they started. Returns the version now behind ``alias``.
        """
        check_alias_name(alias)
        prev_name = previous_alias(alias)
        with self._transaction(write=True) as conn:
            self._check_known_model(conn, model)
            current = self._alias(conn, model, alias)
            previous = self._alias(conn, model, prev_name)
            if previous is None:
                raise InputError(
                    f"cannot roll back {model}@{alias}: there is no {prev_name!r} alias (nothing was promoted "
                    f"over another version yet){alias_hint(self._aliases(conn, model))}; "
                    f"use `tuneloop models promote {model}:VERSION --alias {alias}` to pick a version"
                )
            self._get_live(conn, model, previous, "roll back to")
            self._put_alias(conn, model, alias, previous)
            if current is not None:
                self._put_alias(conn, model, prev_name, current)
            else:
                conn.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (model, prev_name))
            details = {"alias": alias, alias: {"old": current, "new": previous}, prev_name: {"old": previous, "new": current}}
            _add_event(conn, model, previous, "rolled_back", actor, reason, details)
            return self._get(conn, model, previous)

    def set_tag(
        self, model: str, version: int | str, key: str, value: str, *, actor: str | None = None, reason: str = ""
    ) -> dict:
        """Set tag ``key`` to ``value`` on a version; records a ``tagged`` event. Returns the version."""
        check_tag(key, value)
        with self._transaction(write=True) as conn:
            number = self._get(conn, model, version)["version"]
            old = self._tags(conn, model, number).get(key)
            if old != value:
                conn.execute(
                    "INSERT INTO tags (model, version, key, value, updated_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (model, version, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (model, number, key, value, utcnow()),
                )
                _add_event(conn, model, number, "tagged", actor, reason, {"key": key, "old": old, "new": value})
            return self._get(conn, model, number)

    def remove_tag(
        self, model: str, version: int | str, key: str, *, actor: str | None = None, reason: str = ""
    ) -> dict:
        """Remove tag ``key`` from a version (a ``tagged`` event with ``new: null``). Returns the version."""
        with self._transaction(write=True) as conn:
            number = self._get(conn, model, version)["version"]
            tags = self._tags(conn, model, number)
            if key not in tags:
                raise InputError(
                    f"{model}:{number} has no tag {key!r}; its tags: {', '.join(sorted(tags)) or 'none'}"
                )
            conn.execute("DELETE FROM tags WHERE model = ? AND version = ? AND key = ?", (model, number, key))
            _add_event(conn, model, number, "tagged", actor, reason, {"key": key, "old": tags[key], "new": None})
            return self._get(conn, model, number)

    def delete(
        self, model: str, version: int | str, *, force: bool = False, actor: str | None = None, reason: str = ""
    ) -> dict:
        """Soft-delete a version: hidden from listings and ``latest``, lineage kept, artifact collected.

        A version that aliases point at is refused unless ``force`` (which removes those aliases). The
        artifact is removed from the store only when no live version of any model references it.
        Returns ``{"version": ..., "removed_aliases": [...], "collected": [digests]}``.
        """
        with self._transaction(write=True) as conn:
            v = self._get(conn, model, version)
            number = v["version"]
            if v["deleted"]:
                raise InputError(f"{model}:{number} was already deleted on {v['deleted']['at']} by {v['deleted']['actor']}")
            pointing = sorted(a for a, n in self._aliases(conn, model).items() if n == number)
            if pointing and not force:
                raise InputError(
                    f"{model}:{number} is what alias(es) {', '.join(pointing)} point at; promote or roll back "
                    f"to another version first, or delete with --force to remove the alias(es) too"
                )
            for a in pointing:
                conn.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (model, a))
            conn.execute(
                "INSERT INTO deletions (model, version, at, actor, reason) VALUES (?, ?, ?, ?, ?)",
                (model, number, utcnow(), actor or _default_actor(), reason or ""),
            )
            _add_event(
                conn, model, number, "deleted", actor, reason,
                {"artifact_digest": v["artifact_digest"], "removed_aliases": pointing},
            )
            collected = self._collect(conn, [v["artifact_digest"]])
            deleted = self._get(conn, model, number)
        return {"version": deleted, "removed_aliases": pointing, "collected": collected}

    def gc(self) -> list[str]:
        """Remove every stored artifact no live version references; return their digests."""
        with self._transaction(write=True) as conn:
            stored = [p.name for p in self.store.root.iterdir() if not p.name.startswith(".")] if self.store.root.is_dir() else []
            return self._collect(conn, stored)

    def _collect(self, conn: sqlite3.Connection, digests: list[str]) -> list[str]:
        """Inside a write transaction (so no registration can start referencing them): drop unreferenced artifacts."""
        gone = []
        for digest in digests:
            live = conn.execute(
                "SELECT 1 FROM versions v WHERE v.artifact_digest = ? AND NOT EXISTS"
                " (SELECT 1 FROM deletions d WHERE d.model = v.model AND d.version = v.version)",
                (digest,),
            ).fetchone()
            if live is None and self.store.remove(digest):
                gone.append(digest)
        return gone

    # -- reading --------------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.db_path)

    def get(self, model: str, version: int | str = "latest") -> dict:
        """One version by number, digit string, ``"latest"`` or alias name (deleted ones too, marked)."""
        with self._transaction(write=False) as conn:
            return self._get(conn, model, version)

    def resolve(self, ref: str) -> dict:
        """The version a ref like ``support-bot@champion`` points at."""
        return self.get(*parse_ref(ref))

    def open_artifact(self, model: str, version: int | str = "latest") -> Path:
        """Verify a version's artifact and return its directory (what loaders should call)."""
        v = self.get(model, version)
        if v["deleted"]:
            raise InputError(f"{v['ref']} was deleted on {v['deleted']['at']} by {v['deleted']['actor']}; its artifact is gone")
        return self.store.open_verified(v["artifact_digest"])

    def list_versions(self, model: str | None = None, *, include_deleted: bool = False) -> list[dict]:
        """Versions of ``model`` (or of every model), oldest first; deleted ones only with ``include_deleted``."""
        with self._transaction(write=False) as conn:
            if model is None:
                rows = conn.execute("SELECT * FROM versions ORDER BY model, version").fetchall()
            else:
                self._check_known_model(conn, model)
                rows = conn.execute("SELECT * FROM versions WHERE model = ? ORDER BY version", (model,)).fetchall()
            names: dict[tuple[str, int], list[str]] = {}
            for a in conn.execute("SELECT model, version, alias FROM aliases ORDER BY alias"):
                names.setdefault((a["model"], a["version"]), []).append(a["alias"])
            tags: dict[tuple[str, int], dict[str, str]] = {}
            for t in conn.execute("SELECT model, version, key, value FROM tags ORDER BY key"):
                tags.setdefault((t["model"], t["version"]), {})[t["key"]] = t["value"]
            deletions = {(d["model"], d["version"]): _deletion(d) for d in conn.execute("SELECT * FROM deletions")}
            out = []
            for r in rows:
                k = (r["model"], r["version"])
                if k in deletions and not include_deleted:
                    continue
                out.append(self._row_to_dict(r, names.get(k, []), tags.get(k, {}), deletions.get(k)))
            return out

    def models(self) -> list[str]:
        with self._transaction(write=False) as conn:
            return [r["name"] for r in conn.execute("SELECT name FROM models ORDER BY name")]

    def get_alias(self, model: str, alias: str) -> int | None:
        with self._transaction(write=False) as conn:
            self._check_known_model(conn, model)
            return self._alias(conn, model, alias)

    def aliases(self, model: str) -> dict[str, int]:
        with self._transaction(write=False) as conn:
            self._check_known_model(conn, model)
            return self._aliases(conn, model)

    def events(self, model: str | None = None, version: int | None = None) -> list[dict]:
        """The event log (oldest first), optionally for one model (and one version of it)."""
        with self._transaction(write=False) as conn:
            if model is None:
                rows = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
            elif version is None:
                rows = conn.execute("SELECT * FROM events WHERE model = ? ORDER BY id", (model,)).fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM events WHERE model = ? AND version = ? ORDER BY id", (model, version)
                ).fetchall()
        return [{**dict(r), "details": json.loads(r["details"])} for r in rows]

    # -- internals (all take an open connection) ------------------------------------------------

    def _get(self, conn: sqlite3.Connection, model: str, version: int | str) -> dict:
        self._check_known_model(conn, model)
        number = self._resolve_version(conn, model, version)
        row = conn.execute("SELECT * FROM versions WHERE model = ? AND version = ?", (model, number)).fetchone()
        if row is None:
            known = self._version_numbers(conn, model)
            raise InputError(
                f"model {model!r} has no version {number}; known versions: {version_ranges(known)}"
                f"{alias_hint(self._aliases(conn, model))}"
            )
        names = [a for a, v in self._aliases(conn, model).items() if v == number]
        d = conn.execute("SELECT * FROM deletions WHERE model = ? AND version = ?", (model, number)).fetchone()
        return self._row_to_dict(row, names, self._tags(conn, model, number), _deletion(d) if d else None)

    def _get_live(self, conn: sqlite3.Connection, model: str, version: int | str, doing: str) -> dict:
        v = self._get(conn, model, version)
        if v["deleted"]:
            raise InputError(
                f"cannot {doing} {v['ref']}: it was deleted on {v['deleted']['at']} by {v['deleted']['actor']}"
                f"; live versions: {version_ranges(self._version_numbers(conn, model))}"
            )
        return v

    def _resolve_version(self, conn: sqlite3.Connection, model: str, version: int | str) -> int:
        if isinstance(version, bool) or not isinstance(version, (int, str)):
            raise InputError(f"version must be a number, 'latest' or an alias name, got {version!r}")
        if isinstance(version, int):
            return version
        text = version.strip()
        if text.isdigit():
            return int(text)
        if text == "latest":
            number = conn.execute(
                "SELECT MAX(version) FROM versions v WHERE model = ? AND NOT EXISTS"
                " (SELECT 1 FROM deletions d WHERE d.model = v.model AND d.version = v.version)",
                (model,),
            ).fetchone()[0]
            if number is None:
                raise InputError(f"model {model!r} has no live versions (all were deleted); register a new one")
            return number
        number = self._alias(conn, model, text)
        if number is None:
            known = self._version_numbers(conn, model)
            raise InputError(
                f"model {model!r} has no alias {text!r}{alias_hint(self._aliases(conn, model))}; "
                f"use a version number ({version_ranges(known)}) or 'latest'"
            )
        return number

    def _check_known_model(self, conn: sqlite3.Connection, model: str) -> None:
        if conn.execute("SELECT 1 FROM models WHERE name = ?", (model,)).fetchone() is None:
            known = [r[0] for r in conn.execute("SELECT name FROM models ORDER BY name")]
            listing = ", ".join(known) if known else "none yet (register a model first)"
            raise InputError(f"unknown model {model!r} in registry {self.db_path}; known models: {listing}")

    def _by_cache_key(self, conn: sqlite3.Connection, model: str, cache_key: str) -> dict | None:
        row = conn.execute(
            "SELECT version FROM versions WHERE model = ? AND cache_key = ?", (model, cache_key)
        ).fetchone()
        if row is None:
            return None
        found = self._get(conn, model, row[0])
        if found["deleted"]:
            raise InputError(
                f"these exact inputs were registered as {found['ref']}, which was deleted on "
                f"{found['deleted']['at']} by {found['deleted']['actor']} ({found['deleted']['reason'] or 'no reason given'}); "
                "a deleted version is not registered again: change the data or config (e.g. the seed) to train a new one"
            )
        return {**found, "existing": True}

    @staticmethod
    def _version_numbers(conn: sqlite3.Connection, model: str) -> list[int]:
        return [
            r[0] for r in conn.execute(
                "SELECT version FROM versions v WHERE model = ? AND NOT EXISTS"
                " (SELECT 1 FROM deletions d WHERE d.model = v.model AND d.version = v.version) ORDER BY version",
                (model,),
            )
        ]

    @staticmethod
    def _alias(conn: sqlite3.Connection, model: str, alias: str) -> int | None:
        row = conn.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?", (model, alias)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _aliases(conn: sqlite3.Connection, model: str) -> dict[str, int]:
        rows = conn.execute("SELECT alias, version FROM aliases WHERE model = ? ORDER BY alias", (model,))
        return {r["alias"]: r["version"] for r in rows}

    @staticmethod
    def _tags(conn: sqlite3.Connection, model: str, version: int) -> dict[str, str]:
        rows = conn.execute("SELECT key, value FROM tags WHERE model = ? AND version = ? ORDER BY key", (model, version))
        return {r["key"]: r["value"] for r in rows}

    @staticmethod
    def _put_alias(conn: sqlite3.Connection, model: str, alias: str, version: int) -> None:
        conn.execute(
            "INSERT INTO aliases (model, alias, version, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (model, alias, version, utcnow()),
        )

    def _row_to_dict(
        self, row: sqlite3.Row, alias_names: list[str], tags: dict[str, str], deleted: dict | None
    ) -> dict:
        return {
            "model": row["model"],
            "version": row["version"],
            "ref": f"{row['model']}:{row['version']}",
            "created_at": row["created_at"],
            "artifact_digest": row["artifact_digest"],
            "artifact_path": str(self.store.path(row["artifact_digest"])),
            "artifact_kind": row["artifact_kind"],
            "base_model": row["base_model"],
            "cache_key": row["cache_key"],
            "lineage": json.loads(row["lineage"]),
            "metrics": json.loads(row["metrics"]),
            "gates": json.loads(row["gates"]),
            "aliases": sorted(alias_names),
            "tags": dict(sorted(tags.items())),
            "deleted": deleted,
        }


def _deletion(row: sqlite3.Row) -> dict:
    return {"at": row["at"], "actor": row["actor"], "reason": row["reason"]}


def check_tag(key: str, value: str) -> None:
    if not isinstance(key, str) or not _TAG_KEY_RE.match(key):
        raise InputError(
            f"invalid tag key {key!r}: 1-250 characters, letters, digits, '_', '.', '-', '/' or spaces, "
            "not starting with a punctuation mark"
        )
    if key.startswith(RESERVED_TAG_PREFIX):
        raise InputError(f"tag keys starting with {RESERVED_TAG_PREFIX!r} are reserved for tuneloop itself")
    if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
        raise InputError(f"tag value for {key!r} must be a string of at most {MAX_TAG_VALUE} characters")


def check_model_name(model: str) -> None:
    if not isinstance(model, str) or not _MODEL_RE.match(model):
        raise InputError(
            f"invalid model name {model!r}: use letters, digits, '.', '_', '-' and '/' "
            "(no ':' or '@', which separate a version or alias in refs)"
        )


def check_alias_name(alias: str) -> None:
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias) or alias == "latest":
        raise InputError(
            f"invalid alias {alias!r}: start with a letter, then letters, digits, '.', '_' or '-'; "
            "'latest' is reserved"
        )


def version_ranges(numbers: list[int]) -> str:
    """Version numbers for a message: ``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    if not numbers:
        return "none"
    parts, start, prev = [], numbers[0], numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def alias_hint(aliases: dict[str, int]) -> str:
    """The aliases a model has, for an error message about an unknown version or alias."""
    if not aliases:
        return " (no aliases set)"
    return "; aliases: " + ", ".join(f"{a} -> {v}" for a, v in aliases.items())


def _enable_wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Switch the database to WAL (persistent, so usually a no-op).

    Changing the journal mode does not wait on the busy timeout when another process is doing the
    same, so several processes opening a fresh registry at once retry here for a while.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.05)


def _split_sql(script: str) -> list[str]:
    """Split the schema into statements (``sqlite3.complete_statement`` keeps trigger bodies whole)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s]
