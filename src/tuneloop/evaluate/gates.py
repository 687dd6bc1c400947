"""Gates: turn per-item suite results into PASS / FAIL / INCONCLUSIVE verdicts, and apply the policy.

Entry points: :func:`check_gates` (verdicts on per-item results, as :class:`GateResult` records; ``to_dict()`` /
:func:`as_dicts` give the stored and printed JSON shape, pinned by ``tests/test_json_shapes.py``) and
:func:`decidability` (before any work:
whether a perfect model could PASS each applied gate at its suite's size, and what PASS needs; the suite sizes
come from :func:`tuneloop.preflight.suite_sizes`). The statistics (intervals, tests, verdict rules, ``needed_n``) are in
:mod:`tuneloop.evaluate.stats`; this module says which statistic each gate uses:

| gate | quantity | kind | statistic |
|---|---|---|---|
| ``min_accuracy`` | task accuracy of the candidate per the suite's metric (``auto``: exact, or chrF >= threshold) | floor | Wilson / Clopper-Pearson (0/1 metrics), bootstrap (token F1) |
| ``max_accuracy_drop`` | base minus candidate task accuracy | paired tolerance | Agresti-Min + exact McNemar / paired bootstrap |
| ``max_harmful_rate`` | harmful share of red-team answers | ceiling | Wilson / Clopper-Pearson |
| ``max_harmful_increase`` | candidate minus base harmful share | paired tolerance | Agresti-Min + exact McNemar |
| ``max_over_refusal_increase`` | candidate minus base refusals of benign prompts | paired tolerance | Agresti-Min + exact McNemar |
| ``max_capability_drop`` | base minus candidate next-token accuracy on general text | paired tolerance | Agresti-Min + exact McNemar (tokens as items) |
| ``max_mc_capability_drop`` | base minus candidate accuracy on general multiple choice (``capability_mc``, ``lmeval``) | paired tolerance | Agresti-Min + exact McNemar |
| ``min_win_rate`` | candidate's pairwise win rate (ties count 1/2) | floor | seeded bootstrap |
| ``min_preference_accuracy`` | share of held-out pairs where the candidate's summed log-likelihood of the chosen answer beats the rejected one (DPO) | floor | Wilson / Clopper-Pearson |
| ``max_preference_accuracy_drop`` | base minus candidate preference accuracy on the same pairs (DPO) | paired tolerance | Agresti-Min + exact McNemar |
| ``min_reward_accuracy`` | share of held-out pairs a reward model scores chosen above rejected (``train.objective: reward``) | floor | Wilson / Clopper-Pearson |

For ``train.objective: dpo`` the task suite read from the run's eval items (whose reference is the chosen
answer) is reported with ``NOT_APPLIED``: the preference gates decide. A task suite with its own ``path`` is
gated as usual. A reward model (``train.objective: reward``) generates nothing: it is gated by
``min_reward_accuracy`` alone, and every other gate with a threshold is reported ``NOT_APPLIED`` with the reason
(:func:`not_applicable`), never passed.

Decidability (:func:`check_decidable`), with the gates' own one-sided bounds at ``gates.confidence``: a floor
is judged on the lower bound at n/n, a ceiling on the upper bound at 0/n, a paired gate on the Agresti-Min upper
bound with no discordant pair, ``z / (n + 2)``. A gate no model could PASS is a problem (the run stops with exit 2
before training, naming the gate, the suite size and the items or threshold it needs); one whose PASS needs an
observed value in the better half of the room the threshold leaves (floor: above ``t + (1 - t) / 2``; ceiling
and paired: below ``t / 2``) is a warning naming what PASS needs. For a task suite scored by chrF, items whose
reference a verbatim answer cut at ``eval.max_new_tokens`` cannot reach the threshold count as misses of the
perfect model.

Policy: a FAIL always blocks; an INCONCLUSIVE blocks under ``gates.on_inconclusive: block`` (default), is let
through under ``pass``, and let through with a warning under ``warn``. ``passed`` in a gate record keeps its
old meaning for the registry and the report: ``True`` lets the model through, ``False`` blocks it, ``None``
means the gate is not applied (threshold ``null``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import chain
from typing import Any

from tuneloop.evaluate import stats
from tuneloop.fsutil import format_number


@dataclass
class GateSpec:
    """One gate: which metric, which way, which threshold (``None``: reported, not applied)."""

    name: str
    metric: str
    kind: str  # floor | ceiling | paired
    threshold: float | None
    suite: str = ""
    description: str = ""


@dataclass
class GateInput:
    """Per-item outcomes a gate decides on. ``candidate`` always; ``base`` for paired gates.

    ``binary``: 0/1 outcomes (proportion statistics); otherwise continuous scores in [0, 1] (bootstrap).
    For a paired gate the gated quantity is ``sign * (mean(base) - mean(candidate))``: sign = +1 for a
    drop (higher is better), -1 for an increase (higher is worse).
    """

    candidate: Sequence[float]
    base: Sequence[float] | None = None
    binary: bool = True
    sign: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class _Absent(enum.Enum):
    ABSENT = "absent"


#: The value of a :class:`GateResult` field the record does not carry (its key is left out of ``to_dict()``).
ABSENT = _Absent.ABSENT

#: The order of the keys in a gate record (today's JSON: the run record, the registry, ``--json``). A record
#: carries a subset: ``confidence``/``interval_level`` are absent from :func:`not_applicable` records, the
#: estimate's details from a gate without items, the check_gates additions from the other gates.
_KEY_ORDER = (
    "metric",
    "suite",
    "kind",
    "op",
    "threshold",
    "confidence",
    "interval_level",
    "n",
    "base_value",
    "candidate_value",
    "value",
    "interval",
    "method",
    "p_value",
    "counts",
    "verdict",
    "passed",
    "blocks",
    "needed_n",
    "not_applicable",
    "reason",
    "warning",
    "task_metric",
    "task_metric_threshold",
    "base_margin",
    "candidate_margin",
    "loglik",
)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: PASS / FAIL / INCONCLUSIVE (or NOT_APPLIED), its estimate, interval and threshold.

    ``passed`` keeps its meaning for the registry and the report: ``True`` lets the model through, ``False``
    blocks it, ``None`` means not applied; ``blocks`` says whether the verdict blocks under the policy.
    Fields set to :data:`ABSENT` are not part of the record. :meth:`to_dict` gives the stored JSON record (keys in
    ``_KEY_ORDER``); :meth:`from_dict` reads one back (keys it does not know are kept in ``extra``, after the
    others). The renderers (``evaluate/reports.py``) take the stored form, so fresh and stored records (data gates,
    the registry) are shown alike: pass them ``as_dicts(...)``.
    """

    metric: str
    suite: str
    kind: str  # floor | ceiling | paired
    op: str  # >= | <=
    threshold: float | None
    n: int
    value: float | None
    interval: tuple[float, float] | None
    verdict: str  # PASS | FAIL | INCONCLUSIVE | NOT_APPLIED
    passed: bool | None
    blocks: bool
    needed_n: int | None
    reason: str
    confidence: float | _Absent = ABSENT
    interval_level: float | _Absent = ABSENT
    base_value: float | None | _Absent = ABSENT
    candidate_value: float | _Absent = ABSENT
    method: str | _Absent = ABSENT
    p_value: float | _Absent = ABSENT
    counts: dict[str, Any] | _Absent = ABSENT
    not_applicable: bool | _Absent = ABSENT
    warning: str | _Absent = ABSENT
    task_metric: str | _Absent = ABSENT
    task_metric_threshold: float | _Absent = ABSENT
    base_margin: float | None | _Absent = ABSENT
    candidate_margin: float | None | _Absent = ABSENT
    loglik: Any = ABSENT
    extra: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The record as stored and printed (``--json``): today's keys, in today's order."""
        out: dict[str, Any] = {}
        for key in _KEY_ORDER:
            value = getattr(self, key)
            if value is ABSENT:
                continue
            if key == "interval" and value is not None:
                value = list(value)
            elif key == "counts":
                value = dict(value)
            out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> GateResult:
        """A stored gate record (run record, registry, stage cache) as a :class:`GateResult`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {k: v for k, v in record.items() if k in known}
        missing = [k for k in _KEY_ORDER if k in _REQUIRED and k not in kwargs]
        if missing:
            raise ValueError(f"gate record {dict(record)!r} lacks {', '.join(missing)}: not a gate result")
        if kwargs.get("interval") is not None:
            lo, hi = kwargs["interval"]
            kwargs["interval"] = (lo, hi)
        extra = tuple((k, v) for k, v in record.items() if k not in known)
        return cls(**kwargs, extra=extra)


_REQUIRED = frozenset(f.name for f in fields(GateResult) if f.default is not ABSENT and f.name != "extra")


def as_dicts(gates: Mapping[str, GateResult | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Gate name -> stored record (``to_dict()``), for JSON, the stage cache and the registry."""
    return {name: g.to_dict() if isinstance(g, GateResult) else dict(g) for name, g in gates.items()}


def decide(
    spec: GateSpec,
    data: GateInput,
    *,
    confidence: float = 0.95,
    interval: str = "wilson",
    policy: str = "block",
    seed: int = 0,
) -> GateResult:
    """Evaluate one gate: the estimate, its interval, the verdict, and whether it blocks under ``policy``."""
    cand = list(data.candidate)
    # Each verdict is a one-sided test at level 1 - confidence, so the interval whose two ends are those
    # one-sided bounds is the two-sided (2 * confidence - 1) interval (the TOST convention: 90 % for 0.95).
    level = 2.0 * confidence - 1.0
    rec: dict[str, Any] = {
        "metric": spec.metric,
        "suite": spec.suite,
        "kind": spec.kind,
        "op": ">=" if spec.kind == "floor" else "<=",
        "threshold": spec.threshold,
        "confidence": confidence,
        "interval_level": round(level, 6),
        "n": len(cand),
    }
    if not cand:
        rec.update(
            value=None,
            interval=None,
            verdict="NOT_APPLIED",
            passed=None,
            blocks=False,
            needed_n=None,
            reason="no items",
        )
        return GateResult.from_dict(rec)
    if spec.kind == "paired":
        base = list(data.base or [])
        if data.binary:
            est = stats.estimate_paired_binary(base, cand, level)
        else:
            est = stats.estimate_paired_continuous(base, cand, level, seed=seed)
        if data.sign < 0:
            est.value, est.lo, est.hi = -est.value, -est.hi, -est.lo
            if est.extra:
                est.extra = {**est.extra, "b": est.extra["c"], "c": est.extra["b"]}
        rec["base_value"] = round(sum(base) / len(base), 6) if base else None
        rec["candidate_value"] = round(sum(cand) / len(cand), 6)
        sd = est.sd if est.sd > 0 else math.sqrt(max(abs(spec.threshold or 0.0), 1.0 / max(len(cand), 1)))
    elif data.binary:
        est = stats.estimate_proportion(cand, level, "clopper-pearson" if interval == "clopper-pearson" else "wilson")
        sd = stats.proportion_sd(est.value, spec.threshold if spec.threshold is not None else 0.5)
    else:
        est = stats.estimate_mean(cand, level, seed=seed)
        sd = est.sd if est.sd > 0 else 0.5
    rec.update(
        value=round(est.value, 6) + 0.0, interval=[round(est.lo, 6) + 0.0, round(est.hi, 6) + 0.0], method=est.method
    )  # + 0.0: no -0.0
    if est.p_value is not None:
        rec["p_value"] = round(est.p_value, 6)
    if est.extra:
        rec["counts"] = est.extra
    if spec.threshold is None:
        rec.update(
            verdict="NOT_APPLIED",
            passed=None,
            blocks=False,
            needed_n=None,
            reason="threshold is null: reported, not applied",
        )
        return GateResult.from_dict(rec)
    v = stats.verdict(est.lo, est.hi, spec.threshold, rec["op"])
    blocks = v == "FAIL" or (v == "INCONCLUSIVE" and policy == "block")
    rec.update(verdict=v, passed=not blocks, blocks=blocks, needed_n=None)
    lohi = f"[{format_number(est.lo)}, {format_number(est.hi)}]"  # format_number: never "-0"
    what = f"{spec.metric} {format_number(est.value)} ({level:.0%} interval {lohi}, n={len(cand)})"
    if v == "PASS":
        rec["reason"] = f"{what}: the whole interval is {rec['op']} {spec.threshold}"
    elif v == "FAIL":
        side = "below" if rec["op"] == ">=" else "above"
        rec["reason"] = (
            f"{what}: the whole interval is {side} the threshold, so {spec.metric} is not {rec['op']} {spec.threshold}"
        )
    else:
        n_need = stats.needed_n(est.value, spec.threshold, sd, level)
        if spec.kind == "paired" and est.sd == 0 and abs(est.value - spec.threshold) > 1e-12:
            # No discordant pairs: the Agresti-Min half-width is z / (n + 2), so n = z / gap - 2 decides.
            n_need = max(1, math.ceil(stats.z_value(level) / abs(est.value - spec.threshold)) - 2)
        rec["needed_n"] = n_need
        more = (
            f"about {n_need} items would decide at the observed effect (normal approximation)"
            if n_need
            else "the estimate sits on the threshold: no sample size decides it"
        )
        rec["reason"] = f"{what}: the interval contains {spec.threshold}; {more}; on_inconclusive={policy}"
        if policy == "warn":
            rec["warning"] = rec["reason"]
    return GateResult.from_dict(rec)


def overall(gates: Mapping[str, GateResult | Mapping[str, Any]]) -> str:
    """``passed`` when no applied gate blocks, else ``failed`` (fresh records or stored ones)."""
    return "failed" if any(is_blocking(g) for g in gates.values()) else "passed"


def is_blocking(g: GateResult | Mapping[str, Any]) -> bool:
    """Whether a gate blocks, for a fresh record (``GateResult``) or a stored one (its JSON dict)."""
    return bool(g.blocks if isinstance(g, GateResult) else g.get("blocks"))


def check_gates(cfg: Any, results: dict[str, Any], *, seed: int = 0) -> dict[str, GateResult]:
    """All gates of ``cfg.gates`` on the suite results of :func:`tuneloop.evaluate.suites.run_suites`.

    ``results`` maps suite name -> a dict with ``kind`` and per-item ``base``/``candidate`` outcome lists.
    The gates of the task suites come first (:func:`_task_gates`), then those of the other suites in ``results``'
    order (:func:`_suite_gates`); each is decided as it is named, with the details its suite adds.
    """
    g = cfg.gates
    out: dict[str, GateResult] = {}
    for name, spec, data, details in chain(_task_gates(g, results), _suite_gates(g, results)):
        decided = decide(spec, data, confidence=g.confidence, interval=g.interval, policy=g.on_inconclusive, seed=seed)
        out[name] = replace(decided, **details) if details else decided
    return out


#: A gate to decide: (its name in the record, its spec, its data, the fields its suite adds to the decided record).
_Planned = tuple[str, GateSpec, GateInput, dict[str, Any]]


def _task_gates(g: Any, results: dict[str, Any]) -> Iterator[_Planned]:
    """``min_accuracy`` and ``max_accuracy_drop`` of each task suite (the second and later ones suffixed with
    ``[suite]``), with the task metric as chosen (e.g. ``auto -> chrf``, with its chrF pass mark); a suite marked
    ``not_gated`` (a DPO run's eval items) is reported with that reason and no threshold."""
    task = [(n, r) for n, r in results.items() if r["kind"] == "task"]
    for i, (name, r) in enumerate(task):
        suffix = "" if i == 0 else f"[{name}]"
        binary = r.get("binary", True)
        off = bool(r.get("not_gated"))
        details: dict[str, Any] = {}
        if r.get("metric"):
            details["task_metric"] = r["metric"]
            if r.get("threshold") is not None:
                details["task_metric_threshold"] = r["threshold"]
        if off:
            details["reason"] = r["not_gated"]
        yield (
            f"min_accuracy{suffix}",
            GateSpec("min_accuracy", r.get("metric_name", "accuracy"), "floor", None if off else g.min_accuracy, name),
            GateInput(r["candidate"], binary=binary),
            details,
        )
        yield (
            f"max_accuracy_drop{suffix}",
            GateSpec("max_accuracy_drop", "accuracy_drop", "paired", None if off else g.max_accuracy_drop, name),
            GateInput(r["candidate"], r["base"], binary=binary),
            details,
        )


def _suite_gates(g: Any, results: dict[str, Any]) -> Iterator[_Planned]:
    """The gates of the other suite kinds, in ``results``' order (a later suite of a kind replaces an earlier one's
    record); task suites and kinds without gates add none."""
    for name, r in results.items():
        k = r["kind"]
        if k == "harmful":
            yield (
                "max_harmful_rate",
                GateSpec("max_harmful_rate", "harmful_rate", "ceiling", g.max_harmful_rate, name),
                GateInput(r["candidate"]),
                {},
            )
            yield (
                "max_harmful_increase",
                GateSpec("max_harmful_increase", "harmful_increase", "paired", g.max_harmful_increase, name),
                GateInput(r["candidate"], r["base"], sign=-1),
                {},
            )
        elif k == "over_refusal":
            yield (
                "max_over_refusal_increase",
                GateSpec(
                    "max_over_refusal_increase", "over_refusal_increase", "paired", g.max_over_refusal_increase, name
                ),
                GateInput(r["candidate"], r["base"], sign=-1),
                {},
            )
        elif k == "general_text":
            yield (
                "max_capability_drop",
                GateSpec("max_capability_drop", "capability_drop", "paired", g.max_capability_drop, name),
                GateInput(r["candidate"], r["base"]),
                {},
            )
        elif k in ("capability_mc", "lmeval"):
            yield (
                f"max_mc_capability_drop[{name}]",
                GateSpec("max_mc_capability_drop", "mc_capability_drop", "paired", g.max_mc_capability_drop, name),
                GateInput(r["candidate"], r["base"], binary=r.get("binary", True)),
                {},
            )
        elif k == "win_rate":
            yield (
                "min_win_rate",
                GateSpec("min_win_rate", "win_rate", "floor", g.min_win_rate, name),
                GateInput(r["candidate"], binary=False),
                {},
            )
        elif k == "preference":
            margins = {
                "base_margin": r.get("base_margin"),
                "candidate_margin": r.get("candidate_margin"),
                "loglik": r.get("loglik"),
            }
            yield (
                "min_preference_accuracy",
                GateSpec("min_preference_accuracy", "preference_accuracy", "floor", g.min_preference_accuracy, name),
                GateInput(r["candidate"]),
                margins,
            )
            yield (
                "max_preference_accuracy_drop",
                GateSpec(
                    "max_preference_accuracy_drop",
                    "preference_accuracy_drop",
                    "paired",
                    g.max_preference_accuracy_drop,
                    name,
                ),
                GateInput(r["candidate"], r["base"]),
                margins,
            )
        elif k == "reward":
            yield (
                "min_reward_accuracy",
                GateSpec("min_reward_accuracy", "reward_accuracy", "floor", g.min_reward_accuracy, name),
                GateInput(r["candidate"]),
                {"candidate_margin": r.get("candidate_margin")},
            )


def not_applicable(cfg: Any, reason: str, *, kinds: tuple[str, ...] = ("reward",)) -> dict[str, GateResult]:
    """A ``NOT_APPLIED`` record (with ``reason``) for every gate of ``cfg.gates`` with a threshold that is fed by no
    suite kind in ``kinds``: e.g. the generation gates of a reward model, which answers no suite. Reported, so a
    threshold the run could not check is never taken for a PASS."""
    g = cfg.gates
    out: dict[str, GateResult] = {}
    for kind, gates in GATES_BY_KIND.items():
        for field_name, gate_kind in gates:
            threshold = getattr(g, field_name)
            if kind in kinds or threshold is None or field_name in out:
                continue
            out[field_name] = GateResult(
                metric=field_name,
                suite="",
                kind=gate_kind,
                op=">=" if gate_kind == "floor" else "<=",
                threshold=threshold,
                n=0,
                value=None,
                interval=None,
                verdict="NOT_APPLIED",
                passed=None,
                blocks=False,
                needed_n=None,
                not_applicable=True,
                reason=reason,
            )
    return out


# ------------------------------------------------------------------------------------------ decidability

#: The gates each suite kind feeds (``gates.<field>``, gate kind), as :func:`check_gates` applies them.
GATES_BY_KIND: dict[str, tuple[tuple[str, str], ...]] = {
    "task": (("min_accuracy", "floor"), ("max_accuracy_drop", "paired")),
    "harmful": (("max_harmful_rate", "ceiling"), ("max_harmful_increase", "paired")),
    "over_refusal": (("max_over_refusal_increase", "paired"),),
    "general_text": (("max_capability_drop", "paired"),),
    "capability_mc": (("max_mc_capability_drop", "paired"),),
    "lmeval": (("max_mc_capability_drop", "paired"),),
    "win_rate": (("min_win_rate", "floor"),),
    "preference": (("min_preference_accuracy", "floor"), ("max_preference_accuracy_drop", "paired")),
    "reward": (("min_reward_accuracy", "floor"),),
}

# What a perfect outcome is, per gate, for the messages.
_PERFECT = {
    "min_accuracy": "every answer right",
    "min_win_rate": "every comparison won",
    "min_preference_accuracy": "every pair ranked right",
    "min_reward_accuracy": "every pair scored right",
    "max_harmful_rate": "no harmful answer",
    "max_accuracy_drop": "the candidate right wherever the base is",
    "max_harmful_increase": "no harmful answer the base did not give",
    "max_over_refusal_increase": "no refusal the base did not make",
    "max_capability_drop": "every token the base predicts predicted too",
    "max_mc_capability_drop": "every question the base gets right answered right",
    "max_preference_accuracy_drop": "every pair the base ranks right ranked right",
}
_MAX_SEARCH_N = 10**9


@dataclass(frozen=True)
class SuiteSize:
    """How many items a suite will have, known before any work (:func:`tuneloop.preflight.suite_sizes`).

    ``n`` is ``None`` when it cannot be known cheaply (``note`` says why; its gates are not checked).
    ``grow``: the config keys that change the suite's size (named in the messages). ``binary``: 0/1 per item
    (``False`` for ``token_f1`` task suites). ``gated``: ``False`` for a suite that is reported only (a DPO run's
    eval-items task suite). ``unit``: what an item is (``items``, ``tokens``, ``pairs``).
    """

    kind: str
    n: int | None
    grow: str = ""
    note: str = ""
    binary: bool = True
    gated: bool = True
    unit: str = "items"
    unreachable: int = 0  # task items even a verbatim answer fails (cut at eval.max_new_tokens, chrF below threshold)
    unreachable_why: str = ""  # why, and what to change


@dataclass(frozen=True)
class GateDecidability:
    """Whether a PERFECT model could PASS one applied gate at its suite's size, and what PASS needs.

    ``status``: ``ok``; ``warn`` (a perfect model passes, but PASS needs an observed value in the better half of
    the room the threshold leaves: only large effects decide); ``undecidable`` (no model can PASS: a problem);
    ``skipped`` (the suite's size is unknown; ``message`` says why).
    """

    gate: str
    key: str
    suite: str
    kind: str
    threshold: float
    n: int | None
    status: str
    message: str
    perfect_bound: float | None = None  # the bound at the perfect outcome
    needed_n: int | None = None  # smallest size at which a perfect model passes (None: none does)
    pass_needs: int | None = None  # floor: least successes; ceiling: most events; paired: most one-way changes


def _passes(kind: str, k: int, n: int, threshold: float, level: float, interval: str) -> tuple[bool, float]:
    """(PASS?, the deciding bound) for ``k`` successes (floor), events (ceiling) or one-way changes (paired) of ``n``."""
    if kind == "floor":
        lo = (stats.clopper_pearson if interval == "clopper-pearson" else stats.wilson)(k, n, level)[0]
        return lo >= threshold, lo
    if kind == "ceiling":
        hi = (stats.clopper_pearson if interval == "clopper-pearson" else stats.wilson)(k, n, level)[1]
        return hi <= threshold, hi
    hi = stats.paired_difference_interval(k, 0, n, level)[1]
    return hi <= threshold, hi


def _perfect(kind: str, n: int) -> int:
    return n if kind == "floor" else 0


def _needed_n(kind: str, threshold: float, level: float, interval: str) -> int | None:
    """Smallest n at which the perfect outcome passes (bounds at the perfect outcome tighten as n grows)."""
    ok = lambda n: _passes(kind, _perfect(kind, n), n, threshold, level, interval)[0]  # noqa: E731
    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > _MAX_SEARCH_N:
            return None
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _pass_needs(kind: str, n: int, threshold: float, level: float, interval: str) -> int:
    """Floor: the least successes that pass; ceiling / paired: the most events (one-way changes) that pass.

    Bounds are monotone in the count, so a binary search finds the edge; the perfect outcome must pass.
    """
    if kind == "floor":
        lo, hi = 0, n  # passes(hi); find the least passing k
        while lo < hi:
            mid = (lo + hi) // 2
            if _passes(kind, mid, n, threshold, level, interval)[0]:
                hi = mid
            else:
                lo = mid + 1
        return hi
    lo, hi = 0, n  # passes(lo); find the most passing k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _passes(kind, mid, n, threshold, level, interval)[0]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_decidable(
    gate: str,
    kind: str,
    threshold: float,
    size: SuiteSize,
    suite: str,
    *,
    confidence: float = 0.95,
    interval: str = "wilson",
) -> GateDecidability:
    """Could a perfect model PASS ``gate`` (floor / ceiling / paired) on ``size.n`` items, and what does PASS need?

    The bounds are the gates' own (:func:`decide`): the one-sided bound at ``confidence`` is the end of the
    two-sided ``2 * confidence - 1`` interval; floors and ceilings use ``interval`` (Wilson or Clopper-Pearson;
    a continuous floor, ``token_f1`` or win rate, is widened to Wilson at its mean, so Wilson), paired gates
    the Agresti-Min interval with zero discordant pairs, whose upper end is ``z / (n + 2)``.
    """
    field_name = gate.split("[")[0]
    key = f"gates.{field_name}"
    base: dict[str, Any] = dict(gate=gate, key=key, suite=suite, kind=kind, threshold=threshold, n=size.n)
    if size.n is None:
        return GateDecidability(
            **base,
            status="skipped",
            message=f"{key}: not checked for decidability on the {suite} suite: {size.note or 'its size is unknown before the run'}",
        )
    n = size.n
    if kind == "paired" and not size.binary:
        # A paired bootstrap of identical scores has a zero-width interval at 0: a perfect candidate passes.
        return GateDecidability(**base, status="ok", message="")
    if kind == "floor" and not size.binary:
        interval = "wilson"
    level = 2.0 * confidence - 1.0
    unit = size.unit
    where = f"the {suite} suite of {n} {unit}"
    grow = f" ({size.grow})" if size.grow else ""
    if n == 0:
        return GateDecidability(
            **base, status="undecidable", message=f"{key}: {threshold} cannot PASS on {where}: it has no {unit}{grow}"
        )
    lost = size.unreachable if field_name == "min_accuracy" else 0
    perfect = _perfect(kind, n) - lost
    ok, bound = _passes(kind, perfect, n, threshold, level, interval)
    need_n = _needed_n(kind, threshold, level, interval)
    bound_s = f"{'lower' if kind == 'floor' else 'upper'} bound {bound:.3g}"
    at = f"at {perfect}/{n}" if kind != "paired" else f"with 0 discordant pairs of {n}"
    if not ok and lost:
        msg = (
            f"{key}: {threshold} cannot PASS on {where} even with every answer right: {size.unreachable_why} "
            f"({bound_s} {at}, confidence {confidence})"
        )
        return GateDecidability(**base, status="undecidable", message=msg, perfect_bound=bound, needed_n=None)
    if not ok:
        more = f"it needs at least {need_n} {unit}{grow}" if need_n else f"no number of {unit} lets it PASS"
        limit = f"a threshold of at most {bound:.3g}" if kind == "floor" else f"a threshold of at least {bound:.3g}"
        msg = (
            f"{key}: {threshold} cannot PASS on {where} even with {_PERFECT.get(field_name, 'a perfect outcome')} "
            f"({bound_s} {at}, confidence {confidence}); {more} or {limit}"
        )
        return GateDecidability(**base, status="undecidable", message=msg, perfect_bound=bound, needed_n=need_n)
    k = _pass_needs(kind, n, threshold, level, interval)
    if kind == "floor":
        narrow = k / n - threshold > (1.0 - threshold) / 2.0
        what = "right" if field_name == "min_accuracy" else "won" if field_name == "min_win_rate" else "ranked right"
        needs = f"a mean score of at least {k / n:.3g}" if not size.binary else f"at least {k}/{n} {what} ({k / n:.3g})"
        needs += f", {k / n - threshold:.3g} above the threshold: only a model far above {threshold} passes"
    elif kind == "ceiling":
        narrow = k / n < threshold / 2.0
        needs = f"at most {k}/{n} harmful ({k / n:.3g}), {threshold - k / n:.3g} below the threshold: only a model far below {threshold} passes"
    else:
        narrow = k / n < threshold / 2.0
        needs = (
            f"at most {k} of {n} {unit} changed the bad way and none the other ({k / n:.3g}), {threshold - k / n:.3g} inside the "
            f"tolerance: only a candidate that barely changes passes"
        )
    if lost:
        msg = f"{key} {threshold} on {where}: {size.unreachable_why}; PASS needs at least {k}/{n} right, so at most {perfect - k} other misses"
        return GateDecidability(**base, status="warn", message=msg, perfect_bound=bound, needed_n=need_n, pass_needs=k)
    if not narrow:
        return GateDecidability(**base, status="ok", message="", perfect_bound=bound, needed_n=need_n, pass_needs=k)
    msg = f"{key} {threshold} on {where}: PASS needs {needs} at this size (confidence {confidence}); more {unit}{grow} narrow it"
    return GateDecidability(**base, status="warn", message=msg, perfect_bound=bound, needed_n=need_n, pass_needs=k)


def decidability(cfg, suite_sizes: dict[str, SuiteSize]) -> list[GateDecidability]:
    """Every applied gate of ``cfg.gates`` on the suites of ``suite_sizes`` (suite name -> :class:`SuiteSize`,
    in the order :func:`check_gates` sees them), checked by :func:`check_decidable`. Pure: no file is read."""
    g = cfg.gates
    out: list[GateDecidability] = []
    task_index = 0
    for suite, size in suite_sizes.items():
        if size.kind == "task":
            suffix = "" if task_index == 0 else f"[{suite}]"
            task_index += 1
        for field_name, kind in GATES_BY_KIND.get(size.kind, ()):
            threshold = getattr(g, field_name)
            if threshold is None or (size.kind == "task" and not size.gated):
                continue
            if size.kind == "task":
                gate = f"{field_name}{suffix}"
            elif size.kind in ("capability_mc", "lmeval"):
                gate = f"{field_name}[{suite}]"
            else:
                gate = field_name
            out.append(
                check_decidable(gate, kind, float(threshold), size, suite, confidence=g.confidence, interval=g.interval)
            )
    return out
