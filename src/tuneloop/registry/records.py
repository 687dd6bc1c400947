"""What the registry stores and returns, the same on every backend: artifact kinds, event kinds, JSON fields,
and the record of a version kept beside its artifact (:func:`version_record`).

Both backends (``registry/sqlite.py``, ``registry/mlflow_backend.py``) check what they are given with these.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
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


def version_record(v: ModelVersion, registered: dict, aliases: dict[str, int]) -> dict:
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
    row = v.to_dict()
    return {
        "schema": 1,
        **{k: row[k] for k in keep},
        "aliases": dict(aliases),
        "registered": {k: registered[k] for k in ("at", "actor", "reason")},
    }


@dataclass(frozen=True)
class ModelVersion:
    """One registered version, as both backends return it (``get``, ``resolve``, ``list_versions``, ``register``...).

    Read it by attribute (``v.ref``, ``v.artifact_digest``); ``to_dict()`` is the JSON form ``--json`` prints
    (same keys in the same order as before records were typed).
    """

    model: str
    version: int
    created_at: str | None
    artifact_digest: str  # sha256 (64 hex) of the artifact directory's manifest: its address in the store
    artifact_path: str  # the local directory of that digest (for MLflow, in the local cache)
    artifact_kind: str | None
    base_model: str  # the hub id or path it was trained from
    cache_key: str | None
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    gates: dict[str, Any]
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    deleted: dict[str, Any] | None = None  # {at, actor, reason} once soft-deleted
    artifact_uri: str | None = None  # MLflow only: the model version's source
    run_id: str | None = None  # MLflow only: the run that holds the artifact
    existing: bool = False  # register() found this version instead of adding one
    backend: str = "sqlite"

    @property
    def ref(self) -> str:
        """The version's canonical ref, ``name:N`` (what a client pins; also the served model id)."""
        return f"{self.model}:{self.version}"

    def found(self) -> ModelVersion:
        """This version as ``register`` returns it when nothing new was added (``"existing": true``)."""
        return replace(self, existing=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "ref": self.ref,
            "created_at": self.created_at,
            "artifact_digest": self.artifact_digest,
            "artifact_path": self.artifact_path,
        }
        if self.backend == "mlflow":
            out["artifact_uri"] = self.artifact_uri
            out["run_id"] = self.run_id
        out.update(
            {
                "artifact_kind": self.artifact_kind,
                "base_model": self.base_model,
                "cache_key": self.cache_key,
                "lineage": copy.deepcopy(self.lineage),
                "metrics": copy.deepcopy(self.metrics),
                "gates": copy.deepcopy(self.gates),
                "aliases": list(self.aliases),
                "tags": dict(self.tags),
                "deleted": dict(self.deleted) if self.deleted is not None else None,
            }
        )
        if self.existing:
            out["existing"] = True
        return out
