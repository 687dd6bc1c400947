"""The registry's event log as a typed record: :class:`RegistryEvent`, what ``events()`` lists and
``record_event`` returns on both backends (``registry/sqlite.py``, ``registry/mlflow_backend.py``).

The event kinds and the JSON rules for details are in ``registry/records.py``; a version is
:class:`~tuneloop.registry.records.ModelVersion`, a canary rollout :class:`~tuneloop.registry.rollouts.Rollout`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RegistryEvent:
    """One entry of the registry's append-only event log, as ``events()`` lists it and ``record_event`` returns it.

    ``kind`` is what happened (``registered``, ``promoted``, ``rolled_back``, ``alias_set``, ``tagged``,
    ``deleted``, ``exported``, ``rollout_started``, ``rollout_decision``, ``rollout_ended``); ``details`` its
    JSON details (e.g. ``{"alias", "old", "new"}``; a rollout event's ``rollout_id`` and ``decision``).
    The log's order is ``id`` on SQLite (the row id) and ``seq`` on MLflow (``<time_ns>.<random>``, the tag's
    suffix). ``to_dict()`` is the JSON form, byte for byte the dict each backend returned before events were
    typed: SQLite ``id`` (listed events only), ``model``, ``version``, ``kind``, ``at``, ``actor``, ``reason``,
    ``details``; MLflow ``model`` then the stored tag's keys sorted (listed) or in the order written
    (``record_event``), with ``seq`` instead of ``id``.
    """

    model: str
    version: int | None  # None for an event about the model rather than one version
    kind: str
    at: str
    actor: str
    reason: str
    details: dict[str, Any]
    id: int | None = None  # SQLite: the row id (None on the event record_event returns: it is not read back)
    seq: str | None = None  # MLflow: the log's order
    backend: str = "sqlite"
    # MLflow: to_dict() sorts the keys after ``model`` for an event read back from its tag (JSON with sorted keys).
    sorted_keys: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def from_sqlite(cls, row: Any) -> RegistryEvent:
        """An event from an ``events`` row (a ``sqlite3.Row``, ``details`` still JSON text) or the dict
        ``insert_event`` made."""
        details = row["details"]
        return cls(
            model=row["model"],
            version=row["version"],
            kind=row["kind"],
            at=row["at"],
            actor=row["actor"],
            reason=row["reason"],
            details=json.loads(details) if isinstance(details, str) else details,
            id=row["id"] if "id" in row.keys() else None,
        )

    @classmethod
    def from_mlflow(cls, model: str, stored: Mapping[str, Any], *, sorted_keys: bool) -> RegistryEvent:
        """An event from its MLflow tag's JSON (``sorted_keys``: read back) or the dict just written."""
        return cls(
            model=model,
            version=stored["version"],
            kind=stored["kind"],
            at=stored["at"],
            actor=stored["actor"],
            reason=stored["reason"],
            details=stored["details"],
            seq=stored["seq"],
            backend="mlflow",
            sorted_keys=sorted_keys,
        )

    def to_dict(self) -> dict[str, Any]:
        details = copy.deepcopy(self.details)
        if self.backend == "mlflow":
            written = {
                "version": self.version,
                "kind": self.kind,
                "at": self.at,
                "seq": self.seq,
                "actor": self.actor,
                "reason": self.reason,
                "details": details,
            }
            return {"model": self.model, **(dict(sorted(written.items())) if self.sorted_keys else written)}
        out: dict[str, Any] = {} if self.id is None else {"id": self.id}
        out.update(
            {
                "model": self.model,
                "version": self.version,
                "kind": self.kind,
                "at": self.at,
                "actor": self.actor,
                "reason": self.reason,
                "details": details,
            }
        )
        return out
