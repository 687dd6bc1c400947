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

Durability: every registration also writes the version's record (row, lineage, metrics, gates, the
model's aliases then) beside the artifacts (``artifacts/.versions/<model>-<hash>/<n>.json``), and every
event is appended, with the model's aliases after it, to ``artifacts/.versions/events.jsonl``, both before
the transaction commits. A missing, empty or version-less database next to such records is refused
(:class:`RegistryLostError`, exit 2) instead of reading as an empty registry;
:func:`~tuneloop.registry.recovery.recover_database` (``tuneloop models recover``, ``registry/recovery.py``) rebuilds versions, lineage, tags, deletions, events and the last known
aliases from them. A registry made before records existed gets them written once, when it is next opened.

Trust: an alias only ever moves to a version whose artifact verifies (every file's sha256 against its
manifest) at that moment. Registering the same artifact with the same content lineage and gate results as
a live version (``lineage.origin_key``) returns that version (``"existing": True``) instead of adding one.

Rollouts (``registry/rollouts.py``): ``start_rollout`` / ``update_rollout`` keep canary rollouts in the
``rollouts`` table (schema 3; older databases gain it in place when opened) with a compare-and-set on each
record's revision inside one write transaction; ending one moves the aliases in that same transaction. Each
rollout event is journaled with the record after it, so ``recover_database`` restores rollouts too.

Aliases: ``promote`` moves an alias (default ``champion``) and records the version it pointed at under its
*previous* alias (``previous`` for ``champion``, ``<alias>-previous`` otherwise); ``rollback`` swaps the two,
so rolling back twice returns to where it started.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError, IntegrityError, TuneloopError
from tuneloop.fsutil import LOW_SPACE_BYTES, free_bytes, is_disk_full, utcnow
from tuneloop.registry.events import RegistryEvent
from tuneloop.registry.names import (
    alias_hint,
    check_alias_name,
    check_model_name,
    check_tag,
    parse_ref,
    previous_alias,
    version_ranges,
)
from tuneloop.registry.records import ARTIFACT_KINDS, ModelVersion, check_note_event, to_json, version_record
from tuneloop.registry.rollouts import (
    CANARY_ALIAS,
    ENDED,
    Rollout,
    check_json,
    check_start,
    check_update,
    check_weight,
    decision_details,
    new_record,
    update_event_kind,
    updated_record,
)
from tuneloop.registry.store import ArtifactStore

SCHEMA_VERSION = 3  # 3: rollouts

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
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id  TEXT PRIMARY KEY,
    model       TEXT NOT NULL REFERENCES models(name),
    number      INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'promoted', 'rolled_back', 'aborted')),
    revision    INTEGER NOT NULL,
    record      TEXT NOT NULL,
    UNIQUE (model, number)
);
CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_running ON rollouts(model) WHERE status = 'running';
CREATE TRIGGER IF NOT EXISTS rollouts_ended_final BEFORE UPDATE ON rollouts WHEN OLD.status != 'running' BEGIN
    SELECT RAISE(ABORT, 'an ended rollout is final');
END;
CREATE TRIGGER IF NOT EXISTS rollouts_kept BEFORE DELETE ON rollouts BEGIN
    SELECT RAISE(ABORT, 'rollout records are kept');
END;
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


class RegistryLostError(InputError):
    """The registry database is missing or empty although the artifact store holds registered versions."""


def _default_actor() -> str:
    from tuneloop.registry.lineage import actor

    return actor()


def insert_event(
    conn: sqlite3.Connection,
    model: str,
    version: int | None,
    kind: str,
    actor: str | None,
    reason: str,
    details: dict[str, Any],
    at: str | None = None,
) -> dict[str, Any]:
    """Insert one event row and return it as a dict."""
    event = {
        "model": model,
        "version": version,
        "kind": kind,
        "at": at or utcnow(),
        "actor": actor or _default_actor(),
        "reason": reason or "",
        "details": details,
    }
    conn.execute(
        "INSERT INTO events (model, version, kind, at, actor, reason, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (model, version, kind, event["at"], event["actor"], event["reason"], to_json(details, "event details")),
    )
    return event


class SqliteRegistry:
    """Model versions, aliases and events in ``root/registry.db``; artifacts in ``root/artifacts``."""

    parse_ref = staticmethod(parse_ref)
    backend = "sqlite"

    def __init__(self, root: Path, *, check_lost: bool = True):
        self.root = Path(root)
        self.db_path = self.root / "registry.db"
        self.store = ArtifactStore(self.root / "artifacts")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InputError(
                f"the registry directory {self.root} (or a folder above it) is a file, not a directory; point the "
                "workspace (`workspace:` in the config, or -w) at a directory"
            ) from None
        if check_lost:
            self._check_not_lost(before_open=True)
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
                versions = conn.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise TuneloopError(_open_error(e, self.db_path)) from e
        if check_lost and versions == 0:
            self._check_not_lost(before_open=False)
        elif versions and not self.store.has_records():
            self._backfill_records()
        self.removed_temps = self.store.remove_dead_temps()

    def _check_not_lost(self, *, before_open: bool) -> None:
        """Refuse a missing, empty or version-less database next to a store that holds registered versions."""
        if before_open:
            wal = self.db_path.with_name(self.db_path.name + "-wal")
            # A new database in WAL mode stays 0 bytes until its first checkpoint: its pages are in the -wal file
            # (seen when 8 processes open a fresh registry at once and one has registered already).
            if self.db_path.exists() and (self.db_path.stat().st_size > 0 or (wal.exists() and wal.stat().st_size)):
                return
            state = "missing" if not self.db_path.exists() else "empty (0 bytes)"
        else:
            state = "without any versions"
        records = self.store.has_records()
        if not records and not (before_open and self.store.has_artifacts()):
            return
        what = (
            "version records"
            if records
            else "artifacts but no version records (they were registered by a tuneloop that did not write records)"
        )
        fix = (
            "Run `tuneloop models recover` (with the same --workspace or --config) to rebuild versions, lineage "
            "and the last known aliases from those records"
            if records
            else "`tuneloop models recover` cannot rebuild those versions: restore registry.db from a backup, or "
            "register the model directories again"
        )
        raise RegistryLostError(
            f"the registry database {self.db_path} is {state}, but the artifact store {self.store.root} holds "
            f"{what}: the registry's state (versions, champion, lineage) was lost, and it is not shown as an "
            f"empty registry. {fix}. To start over with an empty registry instead, delete {self.store.root}. "
            "Nothing was changed."
        )

    def _backfill_records(self) -> None:
        """Write the records and journal a registry made before tuneloop kept them (once, under the write lock)."""
        with self._transaction(write=True) as conn:
            if self.store.has_records():
                return  # another process did it first
            rows = conn.execute("SELECT model, version FROM versions ORDER BY model, version").fetchall()
            for r in rows:
                v = self._get(conn, r["model"], r["version"])
                first = conn.execute(
                    "SELECT * FROM events WHERE model = ? AND version = ? AND kind = 'registered' ORDER BY id LIMIT 1",
                    (r["model"], r["version"]),
                ).fetchone()
                registered = dict(first) if first else {"at": v.created_at, "actor": "unknown", "reason": ""}
                self.store.write_record(
                    r["model"], r["version"], version_record(v, registered, self._aliases(conn, r["model"]))
                )
            for e in conn.execute("SELECT * FROM events ORDER BY id").fetchall():
                event = {k: e[k] for k in ("model", "version", "kind", "at", "actor", "reason")}
                self.store.append_event(
                    {
                        **event,
                        "details": json.loads(e["details"]),
                        "backfilled": True,
                        "aliases": self._aliases(conn, e["model"]),
                    }
                )

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
    ) -> ModelVersion:
        """Store ``artifact_dir`` and record it as the next version of ``model``; return that version.

        The directory must hold safetensors weights and no pickle files. With a ``cache_key`` already
        registered for this model, or a live version of it with the same artifact digest and the same
        content lineage and gate results (``lineage.origin_key``: base and data digests, code version, gates),
        nothing new is created: the existing version is returned with ``"existing": True``.
        """
        from tuneloop.registry.lineage import check_artifact_dir, origin_key

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
                found = self._by_origin(conn, model, origin_key(digest, artifact_kind, lineage, gates))
                if found is not None:
                    return found
                row = (digest, artifact_kind, base_model, cache_key, *payload)
                return self._insert_version(conn, model, row, actor, reason)
        raise TuneloopError(f"could not register {model}: its artifact kept being garbage-collected; try again")

    def _insert_version(
        self, conn: sqlite3.Connection, model: str, row: tuple, actor: str | None, reason: str
    ) -> ModelVersion:
        """Record the next version of ``model`` (inside the write transaction) and its record in the store."""
        digest, artifact_kind, _, cache_key = row[:4]
        now = utcnow()
        conn.execute("INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)", (model, now))
        version = conn.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE model = ?", (model,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO versions (model, version, created_at, artifact_digest, artifact_kind, base_model,"
            " cache_key, lineage, metrics, gates) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (model, version, now, *row),
        )
        event = self._event(
            conn,
            model,
            version,
            "registered",
            actor,
            reason,
            {"artifact_digest": digest, "artifact_kind": artifact_kind, "cache_key": cache_key},
        )
        v = self._get(conn, model, version)
        # Written before COMMIT: a failure here rolls the version back, so no version lacks its record.
        self.store.write_record(model, version, version_record(v, event, self._aliases(conn, model)))
        return v

    def set_alias(
        self, model: str, alias: str, version: int | str, *, actor: str | None = None, reason: str = ""
    ) -> None:
        """Point ``alias`` at ``version`` (a number, ``latest`` or another alias); records ``alias_set``."""
        check_alias_name(alias)
        number = self._verified(model, version, alias)
        with self._transaction(write=True) as conn:
            target = self._get_live(conn, model, number, f"point alias {alias!r} at").version
            old = self._alias(conn, model, alias)
            self._put_alias(conn, model, alias, target)
            self._event(conn, model, target, "alias_set", actor, reason, {"alias": alias, "old": old, "new": target})

    def promote(
        self,
        model: str,
        version: int | str,
        *,
        alias: str = "champion",
        actor: str | None = None,
        reason: str = "",
    ) -> ModelVersion:
        """Point ``alias`` (default ``champion``) at ``version``; the version it left becomes its previous.

        The previous alias is ``previous`` for ``champion`` and ``<alias>-previous`` otherwise. Promoting
        the version the alias already points at changes nothing and records nothing. Returns the version.
        """
        check_alias_name(alias)
        prev_name = previous_alias(alias)
        if alias == "previous" or alias.endswith("-previous"):
            raise InputError(f"alias {alias!r} is kept by promote/rollback; promote to the alias it backs up instead")
        number = self._verified(model, version, alias)
        with self._transaction(write=True) as conn:
            target = self._get_live(conn, model, number, f"promote to {alias!r}").version
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
                self._event(conn, model, target, "promoted", actor, reason, details)
            return self._get(conn, model, target)

    def rollback(
        self, model: str, *, alias: str = "champion", actor: str | None = None, reason: str = ""
    ) -> ModelVersion:
        """Point ``alias`` back at its previous version, and keep the rolled-back one as the previous.

        So two rollbacks in a row return to where they started. Returns the version now behind ``alias``.
        """
        check_alias_name(alias)
        prev_name = previous_alias(alias)
        verified = self.get_alias(model, prev_name)
        if verified is not None:
            self._verified(model, verified, alias)
        with self._transaction(write=True) as conn:
            self._check_known_model(conn, model)
            current = self._alias(conn, model, alias)
            previous = self._alias(conn, model, prev_name)
            if previous != verified:
                raise TuneloopError(
                    f"{model}@{prev_name} changed while rolling back (from {verified} to {previous}); run the rollback again"
                )
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
            details = {
                "alias": alias,
                alias: {"old": current, "new": previous},
                prev_name: {"old": previous, "new": current},
            }
            self._event(conn, model, previous, "rolled_back", actor, reason, details)
            return self._get(conn, model, previous)

    def _verified(self, model: str, version: int | str, alias: str) -> int:
        """Resolve ``version`` and check its artifact's bytes against its manifest before ``alias`` may point at it."""
        v = self.get(model, version)
        if not v.deleted:  # a deleted version is refused with its own message inside the transaction
            try:
                self.store.verify(v.artifact_digest)
            except IntegrityError as e:
                raise IntegrityError(f"refusing to point {model}@{alias} at {v.ref}: {e}") from None
        return v.version

    def set_tag(
        self, model: str, version: int | str, key: str, value: str, *, actor: str | None = None, reason: str = ""
    ) -> ModelVersion:
        """Set tag ``key`` to ``value`` on a version; records a ``tagged`` event. Returns the version."""
        check_tag(key, value)
        with self._transaction(write=True) as conn:
            number = self._get(conn, model, version).version
            old = self._tags(conn, model, number).get(key)
            if old != value:
                conn.execute(
                    "INSERT INTO tags (model, version, key, value, updated_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (model, version, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (model, number, key, value, utcnow()),
                )
                self._event(conn, model, number, "tagged", actor, reason, {"key": key, "old": old, "new": value})
            return self._get(conn, model, number)

    def remove_tag(
        self, model: str, version: int | str, key: str, *, actor: str | None = None, reason: str = ""
    ) -> ModelVersion:
        """Remove tag ``key`` from a version (a ``tagged`` event with ``new: null``). Returns the version."""
        with self._transaction(write=True) as conn:
            number = self._get(conn, model, version).version
            tags = self._tags(conn, model, number)
            if key not in tags:
                raise InputError(f"{model}:{number} has no tag {key!r}; its tags: {', '.join(sorted(tags)) or 'none'}")
            conn.execute("DELETE FROM tags WHERE model = ? AND version = ? AND key = ?", (model, number, key))
            self._event(conn, model, number, "tagged", actor, reason, {"key": key, "old": tags[key], "new": None})
            return self._get(conn, model, number)

    def record_event(
        self, model: str, version: int | str, kind: str, details: dict, *, actor: str | None = None, reason: str = ""
    ) -> RegistryEvent:
        """Record a note event (one of ``NOTE_EVENT_KINDS``, e.g. ``exported``) on a version; returns the event
        (without its row ``id``: it is not read back)."""
        check_note_event(kind)
        with self._transaction(write=True) as conn:
            number = self._get(conn, model, version).version
            return RegistryEvent.from_sqlite(self._event(conn, model, number, kind, actor, reason, details))

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
            number = v.version
            if v.deleted:
                raise InputError(f"{model}:{number} was already deleted on {v.deleted['at']} by {v.deleted['actor']}")
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
            self._event(
                conn,
                model,
                number,
                "deleted",
                actor,
                reason,
                {"artifact_digest": v.artifact_digest, "removed_aliases": pointing},
            )
            collected = self._collect(conn, [v.artifact_digest])
            deleted = self._get(conn, model, number)
        return {"version": deleted, "removed_aliases": pointing, "collected": collected}

    def gc(self) -> list[tuple[str, int]]:
        """Remove every stored artifact no live version references; return ``(digest, bytes freed)`` of each."""
        from tuneloop.registry.store import tree_size

        with self._transaction(write=True) as conn:
            sizes = {d: tree_size(self.store.path(d)) for d in self.store.digests()}
            return [(d, sizes[d]) for d in self._collect(conn, list(sizes))]

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

    # -- rollouts (see registry/rollouts.py) -------------------------------------------------------

    def start_rollout(
        self,
        model: str,
        candidate_version: int | str,
        *,
        baseline_version: int | str | None = None,
        policy: dict,
        actor: str | None = None,
        reason: str = "",
        weight: float | None = None,
        state_json: str | None = None,
    ) -> Rollout:
        """Start a canary rollout of ``candidate_version`` against ``baseline_version`` (default: the champion).

        Points the ``canary`` alias at the candidate (its artifact verified first) and records ``rollout_started``.
        One running rollout per model: a second start is an InputError naming the running one. ``weight``
        defaults to the policy's first weight. Returns the rollout record.
        """
        number = self._verified(model, candidate_version, CANARY_ALIAS)
        weight = float(policy.get("weights", [0.05])[0]) if weight is None else weight
        check_weight(weight)
        policy_json = check_json(policy, "the rollout policy")
        with self._transaction(write=True) as conn:
            cand = self._get_live(conn, model, number, "start a rollout of").version
            base = self._alias(conn, model, "champion") if baseline_version is None else baseline_version
            if base is not None:
                base = self._get_live(conn, model, base, "compare a canary with").version
            base = check_start(model, cand, base, self._running_rollout(conn, model))
            n = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM rollouts WHERE model = ?", (model,)).fetchone()[
                0
            ]
            record = new_record(
                model,
                n,
                cand,
                base,
                policy=json.loads(policy_json),
                weight=weight,
                state_json=state_json,
                actor=actor or _default_actor(),
                reason=reason,
                now=utcnow(),
            )
            conn.execute(
                "INSERT INTO rollouts (rollout_id, model, number, status, revision, record) VALUES (?, ?, ?, ?, ?, ?)",
                (record.rollout_id, model, n, "running", 1, check_json(record.to_dict(), "the rollout record")),
            )
            old = self._alias(conn, model, CANARY_ALIAS)
            self._put_alias(conn, model, CANARY_ALIAS, cand)
            details = {
                **decision_details(record, None),
                "policy": record.policy,
                CANARY_ALIAS: {"old": old, "new": cand},
            }
            self._event(
                conn, model, cand, "rollout_started", actor, reason, details, journal={"rollout": record.to_dict()}
            )
        return record

    def get_rollout(self, model: str, rollout_id: str | None = None) -> Rollout | None:
        """A rollout by id, else the running one, else the latest; None when the model never had one."""
        with self._transaction(write=False) as conn:
            self._check_known_model(conn, model)
            if rollout_id is not None:
                return self._rollout(conn, model, rollout_id)
            row = conn.execute(
                "SELECT record FROM rollouts WHERE model = ? ORDER BY status = 'running' DESC, number DESC LIMIT 1",
                (model,),
            ).fetchone()
        return None if row is None else Rollout.from_dict(json.loads(row["record"]))

    def list_rollouts(self, model: str) -> list[Rollout]:
        """Every rollout of ``model``, oldest first."""
        with self._transaction(write=False) as conn:
            self._check_known_model(conn, model)
            rows = conn.execute("SELECT record FROM rollouts WHERE model = ? ORDER BY number", (model,)).fetchall()
        return [Rollout.from_dict(json.loads(r["record"])) for r in rows]

    def update_rollout(
        self,
        model: str,
        rollout_id: str,
        *,
        revision: int,
        state_json: str | None = None,
        weight: float | None = None,
        status: str = "running",
        decision: dict | None = None,
        actor: str | None = None,
        reason: str = "",
        event: bool = True,
    ) -> Rollout:
        """Store a rollout's new state, weight, status and decision if it is still at ``revision`` (compare-and-set).

        Raises :class:`RolloutConflict` when another writer updated it first. A decision becomes the record's
        ``last_decision`` and, unless ``event=False``, a ``rollout_decision`` event with its statistics (the
        controller records ``continue`` decisions sparingly); an ending status (``promoted``, ``rolled_back``,
        ``aborted``) moves the aliases in the same transaction and records ``rollout_ended`` (and ``promoted``).
        Returns the new record.
        """
        if status == "promoted":  # verify the candidate's bytes before champion may point at it
            with self._transaction(write=False) as conn:
                current = self._rollout(conn, model, rollout_id)  # an InputError naming the known ones if absent
            self._verified(model, current.candidate_version, "champion")
        decision_json = None if decision is None else json.loads(check_json(decision, "the rollout decision"))
        with self._transaction(write=True) as conn:
            record = self._rollout(conn, model, rollout_id)
            check_update(record, revision, status, weight)
            new = updated_record(
                record, state_json=state_json, weight=weight, status=status, decision=decision_json, now=utcnow()
            )
            conn.execute(
                "UPDATE rollouts SET status = ?, revision = ?, record = ? WHERE rollout_id = ? AND revision = ?",
                (status, new.revision, check_json(new.to_dict(), "the rollout record"), rollout_id, record.revision),
            )
            changes = self._end_rollout_aliases(conn, new, actor, reason) if status in ENDED else {}
            if (decision is not None and event) or status in ENDED:
                details = {**decision_details(new, decision_json), **changes}
                self._event(
                    conn,
                    model,
                    new.candidate_version,
                    update_event_kind(status),
                    actor,
                    reason,
                    details,
                    journal={"rollout": new.to_dict()},
                )
        return new

    def _end_rollout_aliases(
        self, conn: sqlite3.Connection, record: Rollout, actor: str | None, reason: str
    ) -> dict[str, Any]:
        """Promote: champion -> candidate, previous -> the old champion; any end: remove ``canary``."""
        model, cand = record.model, record.candidate_version
        changes: dict[str, Any] = {}
        if record.status == "promoted":
            self._get_live(conn, model, cand, "promote")
            old, old_previous = self._alias(conn, model, "champion"), self._alias(conn, model, "previous")
            if old != cand:
                self._put_alias(conn, model, "champion", cand)
                if old is not None:
                    self._put_alias(conn, model, "previous", old)
                changes = {
                    "alias": "champion",
                    "champion": {"old": old, "new": cand},
                    "previous": {"old": old_previous, "new": old if old is not None else old_previous},
                }
                self._event(conn, model, cand, "promoted", actor, reason, {**changes, "rollout_id": record.rollout_id})
        canary = self._alias(conn, model, CANARY_ALIAS)
        if canary == cand:
            conn.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (model, CANARY_ALIAS))
        changes[CANARY_ALIAS] = {"old": canary, "new": None if canary == cand else canary}
        return changes

    def _rollout(self, conn: sqlite3.Connection, model: str, rollout_id: str) -> Rollout:
        row = conn.execute(
            "SELECT record FROM rollouts WHERE model = ? AND rollout_id = ?", (model, rollout_id)
        ).fetchone()
        if row is None:
            known = [
                r[0] for r in conn.execute("SELECT rollout_id FROM rollouts WHERE model = ? ORDER BY number", (model,))
            ]
            raise InputError(f"{model} has no rollout {rollout_id!r}; its rollouts: {', '.join(known) or 'none'}")
        return Rollout.from_dict(json.loads(row["record"]))

    @staticmethod
    def _running_rollout(conn: sqlite3.Connection, model: str) -> Rollout | None:
        row = conn.execute("SELECT record FROM rollouts WHERE model = ? AND status = 'running'", (model,)).fetchone()
        return None if row is None else Rollout.from_dict(json.loads(row["record"]))

    # -- reading --------------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.db_path)

    def get(self, model: str, version: int | str = "latest") -> ModelVersion:
        """One version by number, digit string, ``"latest"`` or alias name (deleted ones too, marked)."""
        with self._transaction(write=False) as conn:
            return self._get(conn, model, version)

    def resolve(self, ref: str) -> ModelVersion:
        """The version a ref like ``support-bot@champion`` points at."""
        return self.get(*parse_ref(ref))

    def open_artifact(self, model: str, version: int | str = "latest") -> Path:
        """Verify a version's artifact and return its directory (what loaders should call)."""
        v = self.get(model, version)
        if v.deleted:
            raise InputError(f"{v.ref} was deleted on {v.deleted['at']} by {v.deleted['actor']}; its artifact is gone")
        return self.store.open_verified(v.artifact_digest)

    def list_versions(self, model: str | None = None, *, include_deleted: bool = False) -> list[ModelVersion]:
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
                out.append(self._row_to_version(r, names.get(k, []), tags.get(k, {}), deletions.get(k)))
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

    def events(self, model: str | None = None, version: int | None = None) -> list[RegistryEvent]:
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
        return [RegistryEvent.from_sqlite(r) for r in rows]

    # -- internals (all take an open connection) ------------------------------------------------

    def _get(self, conn: sqlite3.Connection, model: str, version: int | str) -> ModelVersion:
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
        return self._row_to_version(row, names, self._tags(conn, model, number), _deletion(d) if d else None)

    def _get_live(self, conn: sqlite3.Connection, model: str, version: int | str, doing: str) -> ModelVersion:
        v = self._get(conn, model, version)
        if v.deleted:
            raise InputError(
                f"cannot {doing} {v.ref}: it was deleted on {v.deleted['at']} by {v.deleted['actor']}"
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

    def _by_cache_key(self, conn: sqlite3.Connection, model: str, cache_key: str) -> ModelVersion | None:
        row = conn.execute(
            "SELECT version FROM versions WHERE model = ? AND cache_key = ?", (model, cache_key)
        ).fetchone()
        if row is None:
            return None
        found = self._get(conn, model, row[0])
        if found.deleted:
            raise InputError(
                f"these exact inputs were registered as {found.ref}, which was deleted on "
                f"{found.deleted['at']} by {found.deleted['actor']} ({found.deleted['reason'] or 'no reason given'}); "
                "a deleted version is not registered again: change the data or config (e.g. the seed) to train a new one"
            )
        return found.found()

    def _by_origin(self, conn: sqlite3.Connection, model: str, key: str) -> ModelVersion | None:
        from tuneloop.registry.lineage import origin_key

        rows = conn.execute(
            "SELECT version, artifact_digest, artifact_kind, lineage, gates FROM versions v WHERE model = ? AND NOT"
            " EXISTS (SELECT 1 FROM deletions d WHERE d.model = v.model AND d.version = v.version) ORDER BY version",
            (model,),
        ).fetchall()
        for r in rows:
            if (
                origin_key(r["artifact_digest"], r["artifact_kind"], json.loads(r["lineage"]), json.loads(r["gates"]))
                == key
            ):
                return self._get(conn, model, r["version"]).found()
        return None

    def _event(
        self,
        conn: sqlite3.Connection,
        model: str,
        version: int | None,
        kind: str,
        actor: str | None,
        reason: str,
        details: dict[str, Any],
        journal: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record an event in the database and in the store's journal, with the model's aliases after it.

        ``journal`` adds keys to the journal's entry only (a rollout event carries the rollout record there,
        so ``recover`` can restore it).
        """
        event = insert_event(conn, model, version, kind, actor, reason, details)
        self.store.append_event({**event, "aliases": self._aliases(conn, model), **(journal or {})})
        return event

    @staticmethod
    def _version_numbers(conn: sqlite3.Connection, model: str) -> list[int]:
        return [
            r[0]
            for r in conn.execute(
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
        rows = conn.execute(
            "SELECT key, value FROM tags WHERE model = ? AND version = ? ORDER BY key", (model, version)
        )
        return {r["key"]: r["value"] for r in rows}

    @staticmethod
    def _put_alias(conn: sqlite3.Connection, model: str, alias: str, version: int) -> None:
        conn.execute(
            "INSERT INTO aliases (model, alias, version, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (model, alias, version, utcnow()),
        )

    def _row_to_version(
        self, row: sqlite3.Row, alias_names: list[str], tags: dict[str, str], deleted: dict | None
    ) -> ModelVersion:
        return ModelVersion(
            model=row["model"],
            version=row["version"],
            created_at=row["created_at"],
            artifact_digest=row["artifact_digest"],
            artifact_path=str(self.store.path(row["artifact_digest"])),
            artifact_kind=row["artifact_kind"],
            base_model=row["base_model"],
            cache_key=row["cache_key"],
            lineage=json.loads(row["lineage"]),
            metrics=json.loads(row["metrics"]),
            gates=json.loads(row["gates"]),
            aliases=tuple(sorted(alias_names)),
            tags=dict(sorted(tags.items())),
            deleted=deleted,
        )


def _deletion(row: sqlite3.Row) -> dict:
    return {"at": row["at"], "actor": row["actor"], "reason": row["reason"]}


def _open_error(e: sqlite3.DatabaseError, db_path: Path) -> str:
    """What to say when the registry database cannot be opened: a full disk, a damaged file, or something else.

    On a full disk SQLite reports ``SQLITE_FULL`` ("database or disk is full") or, in WAL mode even to read, an
    I/O error growing its shared-memory file (``SQLITE_IOERR_SHMSIZE``); neither means the file is damaged.
    """
    name = getattr(e, "sqlite_errorname", "")  # Python >= 3.11
    text = str(e)
    free = free_bytes(db_path.parent)
    io_error = name.startswith("SQLITE_IOERR") or "disk I/O error" in text
    if is_disk_full(e) or (io_error and free is not None and free < LOW_SPACE_BYTES):
        left = f" ({free} bytes free)" if free is not None else ""
        return (
            f"cannot open the registry database {db_path}: {text}: the disk holding it is full{left}. That is "
            "no sign of damage (SQLite needs room for its write-ahead log even to read) and nothing was changed: "
            "free space on that disk and run the command again; `tuneloop models recover` is not needed"
        )
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in text or "not a database" in text:
        return (
            f"cannot open the registry database {db_path}: {text}: it is damaged or not a tuneloop registry; "
            "move it aside and run `tuneloop models recover` to rebuild it from the artifact store"
        )
    return (
        f"cannot open the registry database {db_path}: {text}; check that the directory is writable and the "
        "disk is healthy; if the file is damaged, move it aside and run `tuneloop models recover` to rebuild it "
        "from the artifact store"
    )


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
