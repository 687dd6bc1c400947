"""Rollout records: what both registry backends store about a canary rollout, and the rules they share.

A rollout is a typed record, :class:`Rollout` (the same from SQLite and MLflow; ``to_dict()`` is its JSON form,
the keys of ``RECORD_KEYS``)::

    Rollout(rollout_id="support-bot-r3", model="support-bot", number=3,
            candidate_version=5, baseline_version=4,   # .candidate "support-bot:5", .baseline "support-bot:4"
            status="running" | "promoted" | "rolled_back" | "aborted",
            weight=0.05,                  # the canary's share of traffic now (0 after a rollback, 1 after a promote)
            policy={...},                 # RolloutPolicy.to_dict() (deploy.canary)
            state_json="...",             # the controller's stored analysis state (opaque to the registry)
            revision=7,                   # +1 on every update: the compare-and-set counter
            started_at=..., updated_at=..., ended_at=..., actor=..., reason=...,
            last_decision={...} | None)   # the newest decision with its statistics: Decision.to_dict()

``last_decision`` stays the decision's JSON dict: ``Decision`` lives in ``rollout/analysis.py``, a layer above
the registry, which stores it as it gets it and never reads it.

Lifecycle: ``start_rollout`` points the ``canary`` alias at the candidate (one running rollout per model);
``update_rollout(..., revision=R)`` lands only when the stored revision is still ``R`` (else
:class:`RolloutConflict`), so of two gateway replicas deciding the same tick only one decision is stored. An
update whose ``status`` ends the rollout moves the aliases in the same step: ``promoted`` points ``champion``
at the candidate (``previous`` keeps the old champion) and removes ``canary``; ``rolled_back`` and ``aborted``
remove ``canary`` and leave ``champion`` as it is. An ended rollout is final.

Events (the registry's append-only event log, :class:`~tuneloop.registry.events.RegistryEvent`, so
``models lineage`` shows them): ``rollout_started``, ``rollout_decision`` (each decision passed to
``update_rollout``, with its statistics: per-arm counts and rates, estimate, interval, test statistic, requests
seen) and ``rollout_ended``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from tuneloop.errors import InputError, IntegrityError, TuneloopError

CANARY_ALIAS = "canary"
STATUSES = ("running", "promoted", "rolled_back", "aborted")
ENDED = ("promoted", "rolled_back", "aborted")
RECORD_KEYS = (
    "rollout_id",
    "model",
    "number",
    "candidate_version",
    "baseline_version",
    "candidate",
    "baseline",
    "status",
    "weight",
    "policy",
    "state_json",
    "revision",
    "started_at",
    "updated_at",
    "ended_at",
    "actor",
    "reason",
    "last_decision",
)


@dataclass(frozen=True)
class Rollout:
    """One canary rollout, as both backends return it (``start_rollout``, ``get_rollout``, ``list_rollouts``,
    ``update_rollout``); read it by attribute, ``to_dict()`` is the JSON form ``--json`` prints."""

    rollout_id: str  # rollout_id_for(model, number)
    model: str
    number: int  # 1, 2, ... per model
    candidate_version: int
    baseline_version: int
    status: str  # one of STATUSES
    weight: float
    policy: dict[str, Any]
    state_json: str | None
    revision: int
    started_at: str
    updated_at: str
    ended_at: str | None
    actor: str
    reason: str
    last_decision: dict[str, Any] | None
    # to_dict()'s key order, kept byte-compatible with the dicts returned before records were typed: a record read
    # back from storage (get_rollout, list_rollouts, and update_rollout, which starts from one) has its keys sorted,
    # as the stored JSON does; the one start_rollout returns has RECORD_KEYS order.
    sorted_keys: bool = field(default=False, compare=False, repr=False)

    @property
    def candidate(self) -> str:
        """The candidate's ref, ``name:N``."""
        return f"{self.model}:{self.candidate_version}"

    @property
    def baseline(self) -> str:
        """The baseline's ref (the champion when the rollout started), ``name:N``."""
        return f"{self.model}:{self.baseline_version}"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, sorted_keys: bool = True) -> Rollout:
        """A rollout from its stored JSON (every key of ``RECORD_KEYS``; ``candidate``/``baseline`` follow from
        the model and version numbers)."""
        missing = [k for k in RECORD_KEYS if k not in d]
        if missing:
            raise IntegrityError(
                f"a stored rollout record lacks {', '.join(missing)} (damaged or written by hand): {str(d)[:200]}; "
                "restore the registry from a backup (a SQLite registry: `tuneloop models recover` rebuilds it from its journal)"
            )
        return cls(**{k: d[k] for k in RECORD_KEYS if k not in ("candidate", "baseline")}, sorted_keys=sorted_keys)

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(getattr(self, k)) for k in RECORD_KEYS}
        return dict(sorted(out.items())) if self.sorted_keys else out


class RolloutConflict(TuneloopError):
    """The rollout changed since it was read (another replica or a person updated it first): re-read and retry."""

    exit_code = 1


def rollout_id_for(model: str, number: int) -> str:
    """``support-bot-r3``: the third rollout of ``support-bot`` (what the request log's ``rollout_id`` holds)."""
    return f"{model}-r{int(number)}"


def check_weight(weight: float | None) -> None:
    if weight is not None and (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or not 0.0 <= weight <= 1.0
    ):
        raise InputError(f"rollout weight must be a number from 0 to 1, got {weight!r}")


def check_update(record: Rollout, revision: int, status: str, weight: float | None) -> None:
    """Why an update may not land: an unknown status, a bad weight, an ended rollout, a stale revision."""
    if status not in STATUSES:
        raise InputError(f"rollout status {status!r}; allowed: {', '.join(STATUSES)}")
    check_weight(weight)
    if record.status != "running":
        raise InputError(
            f"rollout {record.rollout_id} already ended ({record.status} at {record.ended_at}); an ended "
            f"rollout is final: start a new one with `tuneloop rollout start {record.candidate}`"
        )
    if int(revision) != int(record.revision):
        raise RolloutConflict(
            f"rollout {record.rollout_id} is at revision {record.revision}, not {revision}: it was updated "
            "concurrently (another gateway replica or a person); re-read it and decide again"
        )


def check_start(model: str, candidate: int, baseline: int | None, running: Rollout | None) -> int:
    """Refuse a second running rollout, a missing baseline, or a candidate that already is the baseline; the
    baseline's version number."""
    if running is not None:
        raise InputError(
            f"{model} already has a running rollout, {running.rollout_id} ({running.candidate} against "
            f"{running.baseline}, weight {running.weight:.0%}); finish it first with `tuneloop rollout "
            f"promote {model}` or `tuneloop rollout abort {model} --reason ...`"
        )
    if baseline is None:
        raise InputError(
            f"{model} has no champion to compare a canary with; make one first (`tuneloop models promote "
            f"{model}:{candidate}`), or deploy with `deploy.strategy: direct`"
        )
    if int(candidate) == int(baseline):
        raise InputError(f"{model}:{candidate} is already the champion; a canary needs a different version")
    return int(baseline)


def new_record(
    model: str,
    number: int,
    candidate: int,
    baseline: int,
    *,
    policy: dict,
    weight: float,
    state_json: str | None,
    actor: str,
    reason: str,
    now: str,
) -> Rollout:
    """The record of a rollout that starts now (revision 1)."""
    return Rollout(
        rollout_id=rollout_id_for(model, number),
        model=model,
        number=int(number),
        candidate_version=int(candidate),
        baseline_version=int(baseline),
        status="running",
        weight=float(weight),
        policy=dict(policy),
        state_json=state_json,
        revision=1,
        started_at=now,
        updated_at=now,
        ended_at=None,
        actor=actor,
        reason=reason or "",
        last_decision=None,
    )


def updated_record(
    record: Rollout, *, state_json: str | None, weight: float | None, status: str, decision: dict | None, now: str
) -> Rollout:
    """``record`` after an update (revision + 1); the weight follows the status when it ends the rollout."""
    new_weight = record.weight if weight is None else float(weight)
    if status == "promoted":
        new_weight = 1.0
    elif status in ("rolled_back", "aborted"):
        new_weight = 0.0
    return replace(
        record,
        state_json=record.state_json if state_json is None else state_json,
        weight=new_weight,
        last_decision=record.last_decision if decision is None else decision,
        status=status,
        revision=int(record.revision) + 1,
        updated_at=now,
        ended_at=now if status in ENDED else record.ended_at,
    )


def decision_details(record: Rollout, decision: dict | None) -> dict[str, Any]:
    """An event's details for an update: which rollout and revision, status, weight, and the decision."""
    return {
        "rollout_id": record.rollout_id,
        "revision": record.revision,
        "status": record.status,
        "weight": record.weight,
        "candidate": record.candidate,
        "baseline": record.baseline,
        "decision": decision,
    }


def update_event_kind(status: str) -> str:
    return "rollout_ended" if status in ENDED else "rollout_decision"


def check_json(value: Any, what: str) -> str:
    """``value`` as strict JSON (no NaN/Infinity: a decision's infinite bound must be None already)."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be JSON-serialisable with finite numbers: {e}") from e


# -- chunks (MLflow tag values hold at most 5,000 characters on a SQL backend store) ------------------------

MAX_TAG_CHARS = 5000
CHUNK_CHARS = 4500


def split_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` in pieces of at most ``size`` characters (at least one piece)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
