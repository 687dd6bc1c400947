"""How a rollout's numbers read, in ``tuneloop rollout status`` and on the gateway's ``/dashboard`` alike: one
text for each number, so the terminal and the page show the same thing for the same decision.

Entry points: :func:`metric_cells` (one metric of a decision, one cell per :data:`METRIC_HEADERS`),
:func:`percent`, :func:`needed_text`, and ``fsutil.format_time`` for every timestamp (UTC).

- rates and weights: ``8.3%``, ``5%`` (:func:`percent`); an arm: ``8.3% (4/48)``;
- the canary/baseline ratio's anytime-valid interval: ``[0.00, 0.59]``, ``[0.00, ∞)`` when unbounded;
- the evidence that the canary is worse: the e-value against the level that rolls back, ``0.03 / 40``
  (``MetricStats.log_evalue`` and ``threshold`` are their logs);
- what is still needed: ``12 more for rollback``, ``enough for non-inferiority``, and ``–`` once the rollout
  has ended (its last decision's count is history, not a to-do).
"""

from __future__ import annotations

import math
from typing import Any

from tuneloop.fsutil import unsigned_zero

DASH = "–"
METRIC_HEADERS = (
    "metric",
    "canary rate",
    "baseline rate",
    "ratio",
    "anytime-valid interval",
    "e-value / rollback at",
    "non-inferior",
    "needed",
)
_GOALS = {"non_inferiority": "non-inferiority", "rollback": "rollback"}


def percent(x: float | None) -> str:
    """A share as a percentage: whole numbers without decimals (``5%``, ``100%``), others with one (``8.3%``)."""
    if x is None:
        return DASH
    v = 100.0 * float(x)
    return f"{round(v):.0f}%" if abs(v - round(v)) < 0.05 else unsigned_zero(f"{v:.1f}") + "%"


def number(x: float | None, digits: int = 2) -> str:
    """A ratio or bound: ``0.59``; ``None`` as a dash; never ``-0.00``."""
    return DASH if x is None else unsigned_zero(f"{float(x):.{digits}f}")


def arm_text(arm: dict[str, Any] | None) -> str:
    """One arm of a metric: ``8.3% (4/48)``."""
    if not arm:
        return DASH
    return f"{percent(arm.get('rate'))} ({arm.get('events', 0)}/{arm.get('requests', 0)})"


def interval_text(interval: Any) -> str:
    """``[0.00, 0.59]``; an unbounded upper end as ``[0.00, ∞)``."""
    lo, hi = (list(interval or []) + [None, None])[:2]
    if lo is None and hi is None:
        return DASH
    return f"[{number(lo or 0.0)}, {'∞)' if hi is None or math.isinf(hi) else number(hi) + ']'}"


def evalue_text(log_evalue: float | None, threshold: float | None) -> str:
    """The e-value for "the canary is worse" and the e-value that rolls back: ``0.03 / 40``."""
    if log_evalue is None or threshold is None:
        return DASH
    e, at = math.exp(min(float(log_evalue), 50.0)), math.exp(float(threshold))

    def short(v: float) -> str:
        return number(v) if v < 10 else (f"{v:.0f}" if v < 1e6 else f"{v:.3g}")

    return f"{short(e)} / {short(at)}"


def needed_text(requests_needed: int | None, needed_for: str | None, *, running: bool) -> str:
    """Canary requests still needed at the observed ratio; a dash once the rollout has ended."""
    if not running or requests_needed is None or not needed_for:
        return DASH
    goal = _GOALS.get(needed_for, needed_for)
    return f"enough for {goal}" if requests_needed <= 0 else f"{requests_needed} more for {goal}"


def metric_cells(name: str, m: dict[str, Any], *, running: bool) -> list[str]:
    """One metric of a decision (``MetricStats.to_dict()`` shape), one text per :data:`METRIC_HEADERS`."""
    non_inferior = "yes" if m.get("non_inferior") else ("not yet" if running else "no")
    return [
        name,
        arm_text(m.get("canary")),
        arm_text(m.get("baseline")),
        number(m.get("estimate")),
        interval_text(m.get("interval")),
        evalue_text(m.get("log_evalue"), m.get("threshold")),
        non_inferior,
        needed_text(m.get("requests_needed"), m.get("needed_for"), running=running),
    ]
