"""What the registry stores and returns, the same on every backend: artifact kinds, event kinds, JSON fields,
and the record of a version kept beside its artifact (:func:`version_record`).

Both backends (``registry/sqlite.py``, ``registry/mlflow_backend.py``) check what they are given with these.
"""

from __future__ import annotations

import json
from typing import Any

from tuneloop.errors import InputError

ARTIFACT_KINDS = ("adapter", "model")
# Events that only record something done with a version (``record_event``): no alias, tag or deletion follows from
# them, so ``recover`` replays them as they are. ``exported``: a file written from it (format, path, sha256).
NOTE_EVENT_KINDS = ("exported",)


def to_json(value: Any, what: str) -> str:
    """``value`` as canonical JSON for a registry field (lineage, metrics, gates, event details); InputError if it is not JSON."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be JSON-serialisable (plain dicts, lists, str, finite numbers): {e}") from e


def check_note_event(kind: str) -> None:
    """``record_event`` takes only note events; the others are recorded by the operation that makes them."""
    if kind not in NOTE_EVENT_KINDS:
        raise InputError(f"record_event takes the event kinds {', '.join(NOTE_EVENT_KINDS)}, not {kind!r}")


def version_record(v: dict, registered: dict, aliases: dict[str, int]) -> dict:
    """The record of a version kept beside its artifact: its row, lineage, and the model's aliases then."""
    keep = (
        "model",
        "version",
        "created_at",
        "artifact_digest",
        "artifact_kind",
        "base_model",
        "cache_key",
        "lineage",
        "metrics",
        "gates",
    )
    return {
        "schema": 1,
        **{k: v[k] for k in keep},
        "aliases": dict(aliases),
        "registered": {k: registered[k] for k in ("at", "actor", "reason")},
    }
