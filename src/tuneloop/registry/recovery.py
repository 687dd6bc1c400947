"""Crash recovery of the SQLite registry: ``tuneloop models recover`` rebuilds the database from what the store keeps.

Every registration writes the version's record beside the artifacts (``artifacts/.versions/<model>-<hash>/<n>.json``,
:func:`tuneloop.registry.records.version_record`) and every event is journaled (``artifacts/.versions/events.jsonl``),
both before the transaction commits (``registry/sqlite.py``). Opening a missing, empty or version-less database
next to such records is refused there (:class:`~tuneloop.registry.sqlite.RegistryLostError`, exit 2);
:func:`recover_database` rebuilds versions, lineage, tags, deletions, events, rollouts and the last known aliases
from them.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError
from tuneloop.registry.records import to_json
from tuneloop.registry.sqlite import SqliteRegistry, insert_event
from tuneloop.registry.store import ArtifactStore


def recover_database(root: Path) -> dict[str, Any]:
    """Rebuild a missing, empty or unreadable ``root/registry.db`` from the version records and the journal.

    Versions (with lineage, metrics and gates) come from ``artifacts/.versions/<model>-<hash>/<n>.json``; events,
    tags, deletions and the last known aliases from the journal ``artifacts/.versions/events.jsonl``. A
    database that still holds versions is refused (move it aside first to rebuild anyway); an unreadable
    or version-less one is moved aside to ``registry.db.replaced-<time>``, never deleted.
    """
    root = Path(root)
    store = ArtifactStore(root / "artifacts")
    _refuse_live_database(root / "registry.db")
    records, unreadable = store.read_records()
    events, torn = store.read_events()
    if not records:
        raise InputError(
            f"nothing to recover: the artifact store {store.root} holds no version records"
            + (f" ({len(unreadable)} unreadable: {unreadable[0]})" if unreadable else "")
            + "; restore registry.db from a backup, or register the model directories again"
        )
    if not events:  # the journal itself was lost: the records still say who registered each version, and why
        events = [
            {
                "model": r["model"],
                "version": int(r["version"]),
                "kind": "registered",
                **r.get("registered", {}),
                "details": {
                    "artifact_digest": r["artifact_digest"],
                    "artifact_kind": r["artifact_kind"],
                    "cache_key": r.get("cache_key"),
                },
            }
            for r in records
        ]
    moved = _move_aside(root / "registry.db")
    reg = SqliteRegistry(root, check_lost=False)
    with reg._transaction(write=True) as conn:
        known = _insert_records(conn, records)
        replayed, skipped, deleted = _replay_events(conn, events, known)
        aliases = _restore_aliases(conn, records, events, known, deleted)
        rollouts = _restore_rollouts(conn, events, known)
    missing = [
        f"{m}:{n}" for (m, n), digest in sorted(known.items()) if (m, n) not in deleted and not store.exists(digest)
    ]
    recorded = set(known.values())
    return {
        "database": str(reg.db_path),
        "moved_aside": str(moved) if moved else None,
        "models": sorted({m for m, _ in known}),
        "versions": len(known),
        "aliases": aliases,
        "events": replayed,
        "rollouts": rollouts,
        "deleted": sorted(f"{m}:{n}" for m, n in deleted),
        "missing_artifacts": missing,
        "unrecorded_artifacts": [d for d in store.digests() if d not in recorded],
        "skipped_events": skipped,
        "unreadable": unreadable + ([f"{torn} unreadable line(s) in the journal"] if torn else []),
    }


def _refuse_live_database(db: Path) -> None:
    """Refuse to replace a database that still holds versions."""
    if not db.exists() or db.stat().st_size == 0:
        return
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            n = conn.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
    except sqlite3.DatabaseError:
        return  # unreadable, or no versions table: nothing in it to keep using
    if n:
        raise InputError(
            f"{db} holds {n} version(s): `tuneloop models recover` only rebuilds a missing, empty or "
            "unreadable database. To rebuild it from the store anyway, move it aside first "
            f"(`mv {db} {db}.old`) and run recover again"
        )


def _move_aside(db: Path) -> Path | None:
    """Move an empty or broken database (and its WAL files) aside, never deleting it; return where it went."""
    if not db.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = db.with_name(f"{db.name}.replaced-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        p = db.with_name(db.name + suffix)
        if p.exists():
            p.rename(target.with_name(target.name + suffix))
    return target


def _insert_records(conn: sqlite3.Connection, records: list[dict]) -> dict[tuple[str, int], str]:
    """Insert a model and version row per record; return ``{(model, version): artifact digest}``."""
    known: dict[tuple[str, int], str] = {}
    for r in records:
        model, number = r["model"], int(r["version"])
        conn.execute("INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)", (model, r["created_at"]))
        conn.execute(
            "INSERT INTO versions (model, version, created_at, artifact_digest, artifact_kind, base_model,"
            " cache_key, lineage, metrics, gates) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model,
                number,
                r["created_at"],
                r["artifact_digest"],
                r["artifact_kind"],
                r["base_model"],
                r.get("cache_key"),
                *(to_json(r.get(k) or {}, k) for k in ("lineage", "metrics", "gates")),
            ),
        )
        known[(model, number)] = r["artifact_digest"]
    return known


def _replay_events(
    conn: sqlite3.Connection, events: list[dict], known: dict[tuple[str, int], str]
) -> tuple[int, int, set[tuple[str, int]]]:
    """Re-insert journal events of recovered versions, re-applying tags and deletions; (replayed, skipped, deleted)."""
    replayed = skipped = 0
    deleted: set[tuple[str, int]] = set()
    for e in events:
        model, number, kind = e.get("model"), e.get("version"), e.get("kind")
        if (
            not isinstance(model, str)
            or not isinstance(number, int)
            or not isinstance(kind, str)
            or (model, number) not in known
        ):
            skipped += 1  # a version whose record never got written (e.g. a crash before commit)
            continue
        details = e.get("details") or {}
        insert_event(conn, model, number, kind, e.get("actor"), e.get("reason", ""), details, at=e.get("at"))
        replayed += 1
        if kind == "tagged" and details.get("new") is None:
            conn.execute(
                "DELETE FROM tags WHERE model = ? AND version = ? AND key = ?", (model, number, details.get("key"))
            )
        elif kind == "tagged":
            conn.execute(
                "INSERT INTO tags (model, version, key, value, updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                " (model, version, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (model, number, details.get("key"), details.get("new"), e.get("at")),
            )
        elif kind == "deleted" and (model, number) not in deleted:
            conn.execute(
                "INSERT INTO deletions (model, version, at, actor, reason) VALUES (?, ?, ?, ?, ?)",
                (model, number, e.get("at"), e.get("actor"), e.get("reason", "")),
            )
            deleted.add((model, number))
    return replayed, skipped, deleted


def _restore_aliases(
    conn: sqlite3.Connection,
    records: list[dict],
    events: list[dict],
    known: dict[tuple[str, int], str],
    deleted: set[tuple[str, int]],
) -> dict[str, dict[str, int]]:
    """Set each model's aliases to the last snapshot known: the journal's, else its newest record's."""
    last: dict[str, dict[str, int]] = {}
    for r in records:
        last[r["model"]] = r.get("aliases") or {}
    for e in events:
        if e.get("model") in last and isinstance(e.get("aliases"), dict):
            last[e["model"]] = e["aliases"]
    out: dict[str, dict[str, int]] = {}
    for model, aliases in sorted(last.items()):
        for alias, number in sorted(aliases.items()):
            if (model, number) in known and (model, number) not in deleted:
                SqliteRegistry._put_alias(conn, model, alias, number)
                out.setdefault(model, {})[alias] = number
    return out


def _restore_rollouts(conn: sqlite3.Connection, events: list[dict], known: dict[tuple[str, int], str]) -> list[str]:
    """Restore each rollout as of its last journaled event (start, decisions, end); return their ids.

    State stored between decision events is not journaled: a running rollout resumes from its last recorded
    decision, and its next tick counts the requests since then (the analysis works from cumulative counts).
    """
    last: dict[str, dict] = {}
    for e in events:
        r = e.get("rollout")
        if isinstance(r, dict) and (r.get("model"), r.get("candidate_version")) in known:
            last[r["rollout_id"]] = r
    for r in sorted(last.values(), key=lambda r: (r["model"], r["number"])):
        conn.execute(
            "INSERT OR IGNORE INTO rollouts (rollout_id, model, number, status, revision, record)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (r["rollout_id"], r["model"], r["number"], r["status"], r["revision"], to_json(r, "rollout record")),
        )
    return sorted(last)
