"""Starting and steering canary rollouts: the registry holds the state, the request log the evidence.

* :func:`start` points the ``canary`` alias at a version and stores a new rollout with a fresh analysis;
* :func:`tick` (or :func:`tick_running` for every model; called by the gateway every ``deploy.canary.tick_interval_s``, by any number of replicas) reads
  the rollout's per-arm totals from the request log (``RequestLog.arm_counts(model=, rollout_id=)``, plus new
  per-request latencies when latency is a metric), feeds them to the :class:`CanaryAnalysis` restored from the
  stored state, and stores the new state and decision with a compare-and-set on the rollout's revision: when
  two replicas tick at once, one stores its decision and the other gets ``None`` back and changes nothing.
  The stored decision is applied by the registry in the same step: a new weight (``step_up``), ``promoted``
  (champion -> candidate, ``previous`` keeps the old champion) or ``rolled_back`` (champion unchanged);
* :func:`promote` and :func:`abort` are a person's decisions, with the statistics at that moment;
* :func:`status` is the record (without the opaque state) with a summary of the analysis and its decisions, as
  the JSON document ``rollout status --json`` and the gateway's admin API return.

The actions return the registry's typed record, :class:`~tuneloop.registry.rollouts.Rollout`; :func:`shown`
is its JSON form without the opaque state.

Every decision is stored as the record's ``last_decision`` (what ``status`` and the dashboard show). Every
step-up, promote and rollback is also recorded as an event with its statistics; ``continue`` decisions
(including "hold: no traffic") become events when their kind changes and at most every
``RECORD_CONTINUE_EVERY_S`` seconds, so the event log shows the rollout's course without one event per tick.
Notifications (``start``, ``step``, ``promote``, ``rollback``, ``abort``) go through a :class:`Notifier`,
which queues them; a failed or broken notification never blocks a decision.

A restart loses nothing: the analysis state (its grid log-likelihoods and the cumulative totals it has
consumed) is in the registry, and the next tick counts from those totals. Known limits: per-request latencies
are read in full each tick (``RequestLog.latencies`` has no cursor), and requests logged late with an older
``created_at`` than ones already consumed shift the latency pairing slightly.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from tuneloop.errors import InputError, IntegrityError
from tuneloop.registry.api import ModelRegistry
from tuneloop.registry.events import RegistryEvent
from tuneloop.registry.rollouts import Rollout, RolloutConflict
from tuneloop.rollout.analysis import Action, AnalysisState, CanaryAnalysis, Decision, RolloutPolicy
from tuneloop.rollout.notify import Notifier

logger = logging.getLogger(__name__)

CONTROLLER_ACTOR = "tuneloop-rollout"
RECORD_CONTINUE_EVERY_S = 60.0
MANUAL_RETRIES = 5
STATUS_OF_ACTION = {"promote": "promoted", "rollback": "rolled_back", "step_up": "running", "continue": "running"}
ROLLOUT_EVENTS = ("rollout_started", "rollout_decision", "rollout_ended")


class ArmLog(Protocol):
    """What the controller reads from the request log (``monitor.requestlog.RequestLog`` has it)."""

    def arm_counts(self, *, model: str, since: float | None = None, rollout_id: str | None = None) -> dict: ...

    def latencies(
        self, *, model: str, arm: str, since: float | None = None, rollout_id: str | None = None
    ) -> list[float]: ...


# ------------------------------------------------------------------------------------------- the state


def dump_state(analysis: CanaryAnalysis, controller: dict[str, Any]) -> str:
    """What the registry stores as ``state_json``: the analysis (policy and state) and the controller's cursor."""
    return json.dumps(
        {"policy": analysis.policy.to_dict(), "state": analysis.state.to_dict(), "controller": controller}
    )


def load_state(record: Rollout) -> tuple[CanaryAnalysis, dict[str, Any]]:
    """The analysis and the controller's cursor stored with a rollout (a fresh one if none was stored)."""
    if not record.state_json:
        return CanaryAnalysis(RolloutPolicy.from_dict(record.policy), now=time.time()), fresh_cursor()
    data = json.loads(record.state_json)
    analysis = CanaryAnalysis(RolloutPolicy.from_dict(data["policy"]), AnalysisState.from_dict(data["state"]))
    return analysis, {**fresh_cursor(), **data.get("controller", {})}


def fresh_cursor() -> dict[str, Any]:
    return {"latencies_seen": {"canary": 0, "baseline": 0}, "recorded_at": None, "recorded_kind": ""}


def as_policy(policy: RolloutPolicy | dict | None) -> RolloutPolicy:
    if isinstance(policy, RolloutPolicy):
        return policy
    return RolloutPolicy.from_dict(policy or {})


# ------------------------------------------------------------------------------------------- actions


def start(
    reg: ModelRegistry,
    ref: str,
    *,
    policy: RolloutPolicy | dict | None = None,
    notifier: Notifier | None = None,
    actor: str | None = None,
    reason: str = "",
    now: float | None = None,
) -> Rollout:
    """Start a canary rollout of ``ref`` (``name:3``, ``name@alias`` or ``name``) against the champion."""
    from tuneloop.registry.lineage import version_kind

    model, version = reg.parse_ref(ref)
    candidate = reg.get(model, version)
    if version_kind(candidate) == "reward":
        raise InputError(
            f"{candidate.ref} is a reward model (its lineage has kind: reward): the gateway serves no chat traffic "
            "to it, so a canary would never see a request; roll out the chat model it was trained for instead"
        )
    pol = as_policy(policy)
    analysis = CanaryAnalysis(pol, now=time.time() if now is None else now)
    record = reg.start_rollout(
        model,
        candidate.version,
        policy=pol.to_dict(),
        actor=actor,
        reason=reason,
        weight=pol.weights[0],
        state_json=dump_state(analysis, fresh_cursor()),
    )
    announce(
        notifier,
        "start",
        record,
        None,
        f"canary {record.candidate} at {record.weight:.0%} of traffic against {record.baseline}",
    )
    return record


def tick(
    reg: ModelRegistry,
    log: ArmLog,
    model: str,
    *,
    now: float | None = None,
    notifier: Notifier | None = None,
    incomplete: str | None = None,
) -> Decision | None:
    """One analysis step for ``model``'s running rollout; the decision, or None (no running rollout, or another
    replica stored this step first). ``log`` is a ``RequestLog`` (``arm_counts`` and ``latencies``).

    ``incomplete``: why the request log does not hold every answered request yet (the gateway's spool is not
    replayed): then nothing is read or decided; the rollout holds, with that reason, until the log is whole.
    """
    now = time.time() if now is None else now
    record = reg.get_rollout(model)
    if record is None or record.status != "running":
        return None
    analysis, cursor = load_state(record)
    rid = record.rollout_id
    if incomplete:
        decision = analysis.hold(
            f"hold: the request log is incomplete ({incomplete}); no decision on a partial log", now=now
        )
    else:
        totals = log.arm_counts(model=model, rollout_id=rid)
        latencies = (
            new_latencies(log, model, rid, cursor) if "latency" in [m.name for m in analysis.policy.metrics] else None
        )
        decision = analysis.observe_totals(totals, now=now, latencies=latencies)
    recorded = mark_recorded(decision, cursor, now)
    status = STATUS_OF_ACTION[decision.action]
    try:
        new = reg.update_rollout(
            model,
            rid,
            revision=record.revision,
            state_json=dump_state(analysis, cursor),
            weight=decision.weight if status == "running" else None,
            status=status,
            decision=decision.to_dict(),
            event=recorded,
            actor=CONTROLLER_ACTOR,
            reason=decision.reason,
        )
    except RolloutConflict:
        logger.info("rollout %s: another replica stored this step first", rid)
        return None
    except IntegrityError as exc:  # the candidate's bytes changed since it was registered: never promote it
        return refuse_corrupt_candidate(reg, record, analysis, cursor, decision, exc, notifier, now)
    if recorded:  # every step, promote and rollback; a hold when its reason's kind changes, else once a minute
        logger.info("rollout %s: %s", rid, decision_message(new, decision))
    if decision.action != "continue":
        announce(
            notifier,
            {"step_up": "step", "promote": "promote", "rollback": "rollback"}[decision.action],
            new,
            decision,
            decision_message(new, decision),
        )
    return decision


def tick_running(
    reg: ModelRegistry,
    log: ArmLog,
    *,
    now: float | None = None,
    notifier: Notifier | None = None,
    incomplete: str | None = None,
) -> dict[str, Decision | None]:
    """:func:`tick` for every model with a running rollout (what each gateway replica calls every tick)."""
    out: dict[str, Decision | None] = {}
    for model in reg.models():
        record = reg.get_rollout(model)
        if record is not None and record.status == "running":
            out[model] = tick(reg, log, model, now=now, notifier=notifier, incomplete=incomplete)
    return out


def promote(
    reg: ModelRegistry,
    model: str,
    *,
    actor: str | None = None,
    reason: str = "",
    notifier: Notifier | None = None,
    now: float | None = None,
) -> Rollout:
    """A person promotes the running canary now: champion -> candidate; the record keeps the statistics then."""
    return end_by_hand(reg, model, "promoted", actor=actor, reason=reason, notifier=notifier, now=now)


def abort(
    reg: ModelRegistry,
    model: str,
    *,
    reason: str,
    actor: str | None = None,
    notifier: Notifier | None = None,
    now: float | None = None,
) -> Rollout:
    """A person stops the running canary now: the canary alias goes, the champion stays."""
    if not reason or not reason.strip():
        raise InputError("aborting a rollout needs a reason (--reason): it is recorded and sent with the notification")
    return end_by_hand(reg, model, "aborted", actor=actor, reason=reason, notifier=notifier, now=now)


def end_by_hand(
    reg: ModelRegistry,
    model: str,
    status: str,
    *,
    actor: str | None,
    reason: str,
    notifier: Notifier | None,
    now: float | None,
) -> Rollout:
    """End the running rollout with ``status``, retrying when a tick lands in between (a person's word wins)."""
    now = time.time() if now is None else now
    for _ in range(MANUAL_RETRIES):
        record = running_rollout(reg, model)
        analysis, cursor = load_state(record)
        action: Action = "promote" if status == "promoted" else "rollback"
        who = actor or "a person"
        decision = manual_decision(
            analysis, action, f"{status.replace('_', ' ')} by {who}: {reason or 'no reason given'}", now
        )
        try:
            new = reg.update_rollout(
                model,
                record.rollout_id,
                revision=record.revision,
                state_json=dump_state(analysis, cursor),
                status=status,
                decision=decision.to_dict(),
                actor=actor,
                reason=reason,
            )
        except RolloutConflict:
            continue
        announce(
            notifier, "promote" if status == "promoted" else "abort", new, decision, decision_message(new, decision)
        )
        return new
    raise RolloutConflict(
        f"the rollout of {model} kept changing while ending it ({MANUAL_RETRIES} tries); run the command again"
    )


def manual_decision(analysis: CanaryAnalysis, action: Action, reason: str, now: float) -> Decision:
    """A person's decision with the statistics as they stand; the analysis ends with it."""
    stats, st = analysis.stats(), analysis.state
    st.status = "promoted" if action == "promote" else "rolled_back"
    if action == "promote":
        st.step = len(analysis.policy.weights) - 1
    decision = Decision(
        action=action,
        reason=reason,
        step=st.step,
        weight=analysis.weight,
        canary_requests=st.canary_requests,
        baseline_requests=st.baseline_requests,
        at=now,
        metrics=stats,
    )
    st.final = {k: v for k, v in decision.to_dict().items() if k != "metrics"}
    return decision


def refuse_corrupt_candidate(
    reg: ModelRegistry,
    record: Rollout,
    analysis: CanaryAnalysis,
    cursor: dict,
    decision: Decision,
    exc: Exception,
    notifier: Notifier | None,
    now: float,
) -> Decision | None:
    """The analysis wanted to promote but the candidate's artifact no longer verifies: roll back instead."""
    rollback = Decision(
        action="rollback",
        reason=f"the candidate's artifact failed verification, not promoted: {exc}",
        step=decision.step,
        weight=0.0,
        canary_requests=decision.canary_requests,
        baseline_requests=decision.baseline_requests,
        at=now,
        metrics=decision.metrics,
    )
    analysis.state.status = "rolled_back"
    try:
        new = reg.update_rollout(
            record.model,
            record.rollout_id,
            revision=record.revision,
            state_json=dump_state(analysis, cursor),
            status="rolled_back",
            decision=rollback.to_dict(),
            actor=CONTROLLER_ACTOR,
            reason=rollback.reason,
        )
    except RolloutConflict:
        return None
    logger.info("rollout %s: %s", record.rollout_id, decision_message(new, rollback))
    announce(notifier, "rollback", new, rollback, decision_message(new, rollback))
    return rollback


# ------------------------------------------------------------------------------------------- reading


def running_rollout(reg: ModelRegistry, model: str) -> Rollout:
    record = reg.get_rollout(model)
    if record is None or record.status != "running":
        last = f"; its last rollout, {record.rollout_id}, ended {record.status}" if record else ""
        raise InputError(
            f"{model} has no running rollout{last}; start one with `tuneloop rollout start {model}:VERSION`"
        )
    return record


def status(reg: ModelRegistry, model: str) -> dict | None:
    """The running (else latest) rollout of ``model`` with its analysis summary and decisions (their events'
    ``to_dict()``), as a JSON document; None if none ever."""
    record = reg.get_rollout(model)
    if record is None:
        return None
    analysis, _ = load_state(record)
    st = analysis.state
    summary = {
        "step": st.step,
        "weights": list(analysis.policy.weights),
        "canary_requests": st.canary_requests,
        "baseline_requests": st.baseline_requests,
        "active_s": st.active_s,
        "alpha": analysis.policy.alpha,
    }
    return {
        **shown(record),
        "analysis": summary,
        "decisions": [e.to_dict() for e in decisions(reg, model, record.rollout_id)],
    }


def shown(record: Rollout) -> dict[str, Any]:
    """A rollout record for people and ``--json``: its ``to_dict()`` without the opaque analysis state."""
    return {k: v for k, v in record.to_dict().items() if k != "state_json"}


def decisions(reg: ModelRegistry, model: str, rollout_id: str) -> list[RegistryEvent]:
    """The rollout's events, oldest first: its start, recorded decisions (with statistics) and end."""
    return [
        e for e in reg.events(model) if e.kind in ROLLOUT_EVENTS and (e.details or {}).get("rollout_id") == rollout_id
    ]


# ------------------------------------------------------------------------------------------- helpers


def new_latencies(log: ArmLog, model: str, rollout_id: str, cursor: dict) -> dict[str, list[float]]:
    """Each arm's latencies logged since the last tick (by position in creation order); moves the cursor."""
    out = {}
    for arm in ("canary", "baseline"):
        every = log.latencies(model=model, arm=arm, rollout_id=rollout_id)
        seen = int(cursor["latencies_seen"].get(arm, 0))
        out[arm] = every[seen:]
        cursor["latencies_seen"][arm] = len(every)
    return out


def mark_recorded(decision: Decision, cursor: dict, now: float) -> bool:
    """Whether this decision becomes an event: every action, and ``continue`` when its kind changes or once a minute."""
    kind = "hold" if decision.reason.startswith("hold") else decision.action
    due = cursor.get("recorded_at") is None or now - float(cursor["recorded_at"]) >= RECORD_CONTINUE_EVERY_S
    if decision.action != "continue" or kind != cursor.get("recorded_kind") or due:
        cursor["recorded_at"], cursor["recorded_kind"] = now, kind
        return True
    return False


def decision_message(record: Rollout, decision: Decision) -> str:
    where = {
        "step_up": f"stepped up to {record.weight:.0%}",
        "promote": f"promoted to champion over {record.baseline}",
        "rollback": f"rolled back; {record.baseline} stays champion",
        "continue": f"holds at {record.weight:.0%}",
    }.get(decision.action, decision.action)
    if record.status == "aborted":
        where = f"aborted; {record.baseline} stays champion"
    return (
        f"{record.candidate} {where} after {decision.canary_requests} canary / {decision.baseline_requests} "
        f"baseline requests: {decision.reason}"
    )


def announce(notifier: Notifier | None, event: str, record: Rollout, decision: Decision | None, message: str) -> None:
    """Queue a notification; a broken notifier is logged, never raised (it must not block a decision)."""
    if notifier is None:
        return
    d = decision.to_dict() if decision is not None else None
    details = {
        "rollout_id": record.rollout_id,
        "model": record.model,
        "candidate": record.candidate,
        "baseline": record.baseline,
        "status": record.status,
        "weight": record.weight,
        "decision": d,
        "metrics": (d or {}).get("metrics"),
    }
    try:
        notifier.notify(event, subject=record.candidate, message=message, details=details)
    except Exception:  # noqa: BLE001 - notifications are best effort by design
        logger.exception("rollout %s: could not queue the %r notification", record.rollout_id, event)
