"""Canary analysis: anytime-valid comparison of a canary against its concurrent baseline, and the decision.

The analysis may be looked at after every request, for as long as the rollout lasts, and still rolls back a
canary that is as good as its baseline with probability at most ``alpha`` (default 0.05) over the whole
rollout. Fixed-size tests (a z-test every N requests) and fixed thresholds per time window (Flagger, Argo
Rollouts, Kayenta) do not have that property; ``benchmarks/canary_simulation.py`` measures all three on the
same simulated traffic.

Method
------
**Count metrics** (``errors``: 5xx, timeouts, empty outputs; ``negative_feedback``; ``harmful``: outputs the
harmful-output judge flagged on a sampled share of traffic, the same share in both arms). We condition on events,
as Lindon & Malek (2022, "Anytime-valid inference for multinomial count data", NeurIPS; the method behind
Netflix's sequential canary tests) do for counting processes. Each request goes to the canary with
probability ``w`` (the traffic weight), independently of whether it fails. If the canary's rate per request is
``rho`` times the baseline's, an event (an error, a negative rating) falls in the canary arm with probability

    q(rho, w) = w * rho / (w * rho + 1 - w),

whatever the baseline rate is. Under H0 (``rho = 1``) that probability is ``w`` itself, so the likelihood of
the events' arms is known without knowing any rate: this removes the nuisance parameter. For every ``rho`` on
a log grid (spacing ln 2 / 8, 9 %, from 1/64 to 64) we keep the log-likelihood
``l(rho) = sum_events [c log q(rho, w_t) + b log(1 - q(rho, w_t))]`` (``c``, ``b`` the events in each arm,
``w_t`` the weight in force when they happened, so steps of the weight schedule are handled exactly: the
likelihood is a product over events). The likelihood ratio ``exp(l(rho) - l(1))`` is a nonnegative martingale
with mean 1 under H0, and so is any fixed mixture of them. A mixture over the alternatives ``rho > 1`` with a
half-normal prior on ``log rho`` (scale ``MIXING_SCALE``; mixture SPRT, Robbins 1970) is an e-process for
"the canary is worse"; by Ville's inequality it exceeds ``1/alpha`` with probability at most ``alpha`` ever,
so "roll back when it does" keeps the false-rollback rate at ``alpha`` however often it is checked
(Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences",
Ann. Statist.). Inverting the same test at every grid point gives a confidence sequence for ``rho``
(Howard et al. 2021; the lower end uses alternatives above each point, the upper end alternatives below;
each end is one-sided at level ``1 - alpha / m``, so the lower end is at or above 1 exactly when the rollback
test rejects), reported with each decision; its bounds are rounded outwards to the grid.

**Latency.** Each canary request's latency is paired with a concurrent baseline request's latency (the next
unpaired one, newest first; the choice never looks at the values). Under H0 (both arms' latencies come from
the same distribution) the canary is the slower of a pair with probability 1/2 (ties are dropped), so the
same machinery with ``w = 1/2`` applies to "canary slower" vs "baseline slower" events: ``rho`` is then the
odds that a canary request is slower than a concurrent baseline one (a sign test, distribution-free, and
robust to the heavy tails of LLM latencies where a confidence sequence on the mean would need a bound on the
latency). Pairing needs per-request latencies (``ArmCounts.latencies``); aggregates alone leave the latency
metric without events.

**Several metrics.** Each of the ``m`` metrics gets ``alpha / m`` (Bonferroni), so the rollout as a whole keeps
``alpha`` whatever the dependence between metrics.

**Why this design and not a confidence sequence on the difference of two proportions.** Conditioning on
events needs no estimate of the baseline rate and no bound on the variance, its null is exact for any
baseline rate and any weight schedule, and its state is a fixed-size vector (the grid log-likelihoods), so it
is cheap to store in the registry and to update from aggregate counts (``RequestLog.arm_counts``) or request by
request. The price is a little power: it uses the nominal weight, not the realised split of requests.

Decision policy (``RolloutPolicy``)
----------------------------------
In this order, after every update:

1. a rollout that has ended repeats its final decision;
2. **guards**: the canary's own rate of a guarded metric above ``max_rate`` after ``min_requests`` canary
   requests rolls back at once (a crashing canary is not worth testing);
3. **harm**: any metric's e-value at or above ``m / alpha`` rolls back;
4. **no traffic means hold**: an update without requests is ``continue`` with the reason "hold"; it is not a
   failure and the time without traffic does not count towards ``max_active_s``;
5. **limits**: after ``max_canary_requests`` canary requests or ``max_active_s`` seconds with traffic and no
   decision, ``on_limit`` applies: ``rollback`` (the default: a canary that could not be shown non-inferior in
   the time it was given is not promoted) or ``hold`` (stay at the current weight and wait for a person:
   ``tuneloop rollout promote`` or ``abort``);
6. **promote** from the last step below 100 % once the step has seen ``min_requests_per_step`` canary requests
   and every metric is shown non-inferior: the upper end of its confidence sequence (level ``1 - alpha`` per
   metric) is below its ``max_ratio``. A metric with no events in either arm has nothing to compare and does
   not block (the reason says so);
7. **step up** to the next weight once the step has seen ``min_requests_per_step`` canary requests with no
   harm shown (and, with ``step_requires_non_inferiority``, non-inferiority too). Early steps are exposure
   budgets: at 5 % the harm test is already running, and a higher weight makes each event more informative;
8. otherwise ``continue``, with the canary requests still needed at the observed effect.

"Requests still needed" is an estimate: the expected growth of the log e-value per event at the observed
ratio (a Kullback-Leibler divergence) turned into canary requests at the observed event rate; it is not a
promise, because a new sample has a new estimate.

Known approximations: feedback that arrives after a step is counted at the new weight (it favours the canary
slightly at a step up, never the false-rollback side); sticky assignment by user key makes events of one
user's requests dependent, which the per-event model ignores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

from tuneloop.errors import ConfigError

Action = Literal["continue", "step_up", "promote", "rollback"]
METRIC_NAMES: tuple[str, ...] = ("errors", "negative_feedback", "harmful", "latency")
COUNT_METRICS: tuple[str, ...] = ("errors", "negative_feedback", "harmful")

GRID_STEP = math.log(2.0) / 8.0
GRID_HALF = 48
LOG_RHO = np.arange(-GRID_HALF, GRID_HALF + 1) * GRID_STEP
NULL_INDEX = GRID_HALF
MIXING_SCALE = 1.0
MAX_PENDING_LATENCIES = 256


# ------------------------------------------------------------------------------------------ the statistics


@lru_cache(maxsize=8)
def mixture_log_weights(scale: float = MIXING_SCALE) -> np.ndarray:
    """log prior weight of the alternative ``k`` grid steps away (k = 1 .. 2*GRID_HALF): half-normal in log rho.

    The weights sum to 1 over all offsets, so any truncated use (near the edges of the grid) sums to less: a
    supermartingale, still valid.
    """
    offsets = np.arange(1, 2 * GRID_HALF + 1) * GRID_STEP
    logw = -0.5 * (offsets / scale) ** 2
    logw = logw - np.logaddexp.reduce(logw)
    logw.flags.writeable = False
    return logw


def share_logs(weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(log q(rho, w), log(1 - q(rho, w))) over the grid: the chance an event falls in the canary arm."""
    if not 0.0 < weight < 1.0:
        raise ValueError(f"weight must be in (0, 1) for a comparison, got {weight}")
    log_w, log_1mw = math.log(weight), math.log1p(-weight)
    denom = np.logaddexp(log_w + LOG_RHO, log_1mw)
    return log_w + LOG_RHO - denom, log_1mw - denom


def log_likelihoods(canary_events, baseline_events, weight: float) -> np.ndarray:
    """Grid log-likelihoods of events split ``canary_events`` / ``baseline_events`` at one weight.

    Broadcasts: arrays of counts of shape S give shape S + (grid,). Sum the results of several weights.
    """
    log_q, log_1mq = share_logs(weight)
    c = np.asarray(canary_events, dtype=float)[..., None]
    b = np.asarray(baseline_events, dtype=float)[..., None]
    return c * log_q + b * log_1mq


def mixture_log_mean(diffs: np.ndarray, scale: float) -> np.ndarray:
    """log sum_k w_k exp(diffs[..., k]) for the first ``diffs.shape[-1]`` prior weights (max-shifted, stable)."""
    if diffs.shape[-1] == 0:
        return np.full(diffs.shape[:-1], -np.inf)
    weights = np.exp(mixture_log_weights(scale)[: diffs.shape[-1]])
    top = diffs.max(axis=-1, keepdims=True)
    return np.log(np.exp(diffs - top) @ weights) + top[..., 0]


def log_evalue_above(loglik: np.ndarray, index: int = NULL_INDEX, scale: float = MIXING_SCALE) -> np.ndarray:
    """log of the mixture e-value against ``rho = grid[index]`` with alternatives above it (evidence of more).

    ``loglik`` has the grid on its last axis; leading axes are kept (the simulation passes many at once).
    """
    return mixture_log_mean(loglik[..., index + 1 :] - loglik[..., index : index + 1], scale)


def log_evalue_below(loglik: np.ndarray, index: int, scale: float = MIXING_SCALE) -> np.ndarray:
    """log of the mixture e-value against ``rho = grid[index]`` with alternatives below it (evidence of less)."""
    return mixture_log_mean(loglik[..., :index][..., ::-1] - loglik[..., index : index + 1], scale)


@lru_cache(maxsize=8)
def mixture_matrices(scale: float = MIXING_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Prior weights as grid x grid matrices: [j, i] = weight of alternative i against null j, above / below."""
    size = len(LOG_RHO)
    offset = np.arange(size)[None, :] - np.arange(size)[:, None]  # [j, i] = i - j
    w = np.concatenate([np.exp(mixture_log_weights(scale)), [0.0]])
    above = np.where(offset > 0, w[np.clip(offset - 1, 0, size - 1)], 0.0)
    below = np.where(offset < 0, w[np.clip(-offset - 1, 0, size - 1)], 0.0)
    above.flags.writeable = below.flags.writeable = False
    return above, below


def confidence_sequence(loglik: np.ndarray, alpha: float, scale: float = MIXING_SCALE) -> tuple[float, float]:
    """Anytime-valid bounds for ``rho``, each one-sided at level ``1 - alpha``, rounded outwards to the grid.

    The lower end is the rollback test's (it is at or above 1 exactly when ``rho = 1`` is rejected in favour
    of a worse canary), the upper end the promotion test's. A grid value is excluded from below when the
    mixture over the alternatives above it reaches ``1/alpha``, and from above likewise; the bounds are the
    nearest excluded grid values outside the kept ones.
    """
    above, below = mixture_matrices(scale)
    ll = np.asarray(loglik, dtype=float)
    top = float(ll.max())
    lik = np.exp(ll - top)
    with np.errstate(divide="ignore"):
        up = np.log(above @ lik) + top - ll
        down = np.log(below @ lik) + top - ll
    threshold = math.log(1.0 / alpha)
    kept_low, kept_high = np.nonzero(up < threshold)[0], np.nonzero(down < threshold)[0]
    if kept_low.size == 0 or kept_high.size == 0:
        return 0.0, math.inf
    size = len(ll)
    lo_i, hi_i = int(kept_low[0]) - 1, int(kept_high[-1]) + 1
    lower = 0.0 if lo_i < 0 else float(math.exp(LOG_RHO[lo_i]))
    upper = math.inf if hi_i >= size else float(math.exp(LOG_RHO[hi_i]))
    return lower, upper


def event_kl(rho: float, rho0: float, weight: float) -> float:
    """Expected log-likelihood ratio per event for ``rho`` against ``rho0`` when ``rho`` is true."""
    q = weight * rho / (weight * rho + 1.0 - weight)
    q0 = weight * rho0 / (weight * rho0 + 1.0 - weight)
    terms = 0.0
    if q > 0:
        terms += q * math.log(q / q0)
    if q < 1:
        terms += (1.0 - q) * math.log((1.0 - q) / (1.0 - q0))
    return terms


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class ArmCounts:
    """One arm's counts: totals from ``RequestLog.arm_counts`` or the increment since the last update.

    ``latencies`` are per-request latencies in seconds (new ones only, in arrival order); the aggregates of
    the request log do not carry them, which leaves the latency metric without events. ``harmful`` counts
    outputs flagged by the harmful-output judge on a sampled share of traffic (the same share in both arms,
    so the events' split still follows the weight under H0).
    """

    requests: int = 0
    errors: int = 0
    negative_feedback: int = 0
    feedback: int = 0
    harmful: int = 0
    latency_sum: float = 0.0
    latencies: tuple[float, ...] = ()

    @classmethod
    def from_log(cls, row: Mapping | None) -> ArmCounts:
        """From one arm of ``RequestLog.arm_counts(...)`` (missing keys count as 0)."""
        row = row or {}
        return cls(
            requests=int(row.get("requests", 0) or 0),
            errors=int(row.get("errors", 0) or 0),
            negative_feedback=int(row.get("negative_feedback", 0) or 0),
            feedback=int(row.get("feedback", 0) or 0),
            harmful=int(row.get("harmful", 0) or 0),
            latency_sum=float(row.get("latency_sum", 0.0) or 0.0),
        )

    def minus(self, earlier: ArmCounts) -> ArmCounts:
        """The increment from cumulative ``earlier`` to these cumulative counts (never negative)."""
        return ArmCounts(
            requests=max(0, self.requests - earlier.requests),
            errors=max(0, self.errors - earlier.errors),
            negative_feedback=max(0, self.negative_feedback - earlier.negative_feedback),
            feedback=max(0, self.feedback - earlier.feedback),
            harmful=max(0, self.harmful - earlier.harmful),
            latency_sum=max(0.0, self.latency_sum - earlier.latency_sum),
        )

    def count(self, metric: str) -> int:
        """Events of a count metric (``COUNT_METRICS``)."""
        return {"errors": self.errors, "negative_feedback": self.negative_feedback, "harmful": self.harmful}[metric]


# ------------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class MetricPolicy:
    """A compared metric. ``max_ratio``: the non-inferiority margin on the canary/baseline rate ratio (for
    latency: on the odds that a canary request is slower than a concurrent baseline one)."""

    name: str
    max_ratio: float = 1.5


@dataclass(frozen=True)
class Guard:
    """Roll back at once when the canary's own rate of ``metric`` exceeds ``max_rate`` after ``min_requests``
    canary requests, or its count exceeds ``max_count`` (e.g. ``Guard("harmful", max_count=0)``)."""

    metric: str
    max_rate: float | None = None
    min_requests: int = 20
    max_count: int | None = None


DEFAULT_METRICS = (MetricPolicy("errors"), MetricPolicy("negative_feedback"), MetricPolicy("latency"))


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout is analysed and decided (``deploy.canary`` in the config)."""

    alpha: float = 0.05
    weights: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0)
    metrics: tuple[MetricPolicy, ...] = DEFAULT_METRICS
    guards: tuple[Guard, ...] = (Guard("errors", max_rate=0.5, min_requests=20),)
    min_requests_per_step: int = 500
    step_requires_non_inferiority: bool = False
    max_canary_requests: int | None = None
    max_active_s: float | None = 24 * 3600.0
    on_limit: Literal["rollback", "hold"] = "rollback"
    mixing_scale: float = MIXING_SCALE

    def __post_init__(self) -> None:
        problems = policy_problems(self)
        if problems:
            raise ConfigError(problems, source="deploy.canary")

    @property
    def metric_alpha(self) -> float:
        return self.alpha / max(1, len(self.metrics))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> RolloutPolicy:
        data = dict(data)
        if "weights" in data:
            data["weights"] = tuple(float(w) for w in data["weights"])
        if "metrics" in data:
            data["metrics"] = tuple(m if isinstance(m, MetricPolicy) else MetricPolicy(**m) for m in data["metrics"])
        if "guards" in data:
            data["guards"] = tuple(g if isinstance(g, Guard) else Guard(**g) for g in data["guards"])
        return cls(**data)


def policy_problems(p: RolloutPolicy) -> list[str]:
    """Every problem with a policy, each naming its key under ``deploy.canary``."""
    problems = []
    if not 0.0 < p.alpha < 1.0:
        problems.append(f"deploy.canary.alpha: {p.alpha!r} must be in (0, 1), e.g. 0.05")
    w = list(p.weights)
    if (
        not w
        or w[-1] != 1.0
        or any(not 0.0 < x <= 1.0 for x in w)
        or any(a >= b for a, b in zip(w, w[1:], strict=False))
    ):
        problems.append(f"deploy.canary.weights: {w!r} must increase strictly within (0, 1] and end at 1.0")
    if len(w) < 2:
        problems.append("deploy.canary.weights: needs at least one canary weight before 1.0, e.g. [0.05, 1.0]")
    names = [m.name for m in p.metrics]
    for name in names:
        if name not in METRIC_NAMES:
            problems.append(f"deploy.canary.metrics: unknown metric {name!r}; allowed: {', '.join(METRIC_NAMES)}")
    if len(set(names)) != len(names) or not names:
        problems.append(f"deploy.canary.metrics: {names!r} must name each metric once and at least one")
    problems += [
        f"deploy.canary.metrics.{m.name}.max_ratio: {m.max_ratio!r} must be > 1" for m in p.metrics if m.max_ratio <= 1
    ]
    for g in p.guards:
        rate_ok = g.max_rate is None or 0.0 < g.max_rate <= 1.0
        count_ok = g.max_count is None or g.max_count >= 0
        if (
            g.metric not in COUNT_METRICS
            or not rate_ok
            or not count_ok
            or g.min_requests < 1
            or (g.max_rate is None and g.max_count is None)
        ):
            problems.append(
                f"deploy.canary.guards: {g!r} needs metric in {COUNT_METRICS}, max_rate in (0, 1] "
                "and/or max_count >= 0, min_requests >= 1"
            )
    if p.min_requests_per_step < 1:
        problems.append(f"deploy.canary.min_requests_per_step: {p.min_requests_per_step!r} must be >= 1")
    if p.on_limit not in ("rollback", "hold"):
        problems.append(f"deploy.canary.on_limit: {p.on_limit!r}; allowed: rollback, hold")
    if p.mixing_scale <= 0:
        problems.append(f"deploy.canary.mixing_scale: {p.mixing_scale!r} must be > 0")
    return problems


# -------------------------------------------------------------------------------------------------- state


@dataclass
class MetricState:
    """The sufficient statistics of one metric: grid log-likelihoods and the counts behind them."""

    loglik: list[float] = field(default_factory=lambda: [0.0] * len(LOG_RHO))
    canary_events: int = 0
    baseline_events: int = 0
    canary_exposure: int = 0
    baseline_exposure: int = 0

    def add(
        self, canary_events: int, baseline_events: int, weight: float, canary_exposure: int, baseline_exposure: int
    ) -> None:
        if canary_events or baseline_events:
            inc = log_likelihoods(canary_events, baseline_events, weight)
            self.loglik = (np.asarray(self.loglik) + inc).tolist()
        self.canary_events += int(canary_events)
        self.baseline_events += int(baseline_events)
        self.canary_exposure += int(canary_exposure)
        self.baseline_exposure += int(baseline_exposure)


@dataclass
class AnalysisState:
    """Everything the analysis remembers; JSON-serialisable (stored with the rollout in the registry)."""

    started_at: float
    step: int = 0
    step_started_at: float = 0.0
    step_canary_requests: int = 0
    canary_requests: int = 0
    baseline_requests: int = 0
    active_s: float = 0.0
    last_update_at: float = 0.0
    status: Literal["running", "promoted", "rolled_back"] = "running"
    final: dict | None = None
    metrics: dict[str, MetricState] = field(default_factory=dict)
    pending_canary_latencies: list[float] = field(default_factory=list)
    pending_baseline_latencies: list[float] = field(default_factory=list)
    last_totals: dict[str, dict] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> AnalysisState:
        data = dict(data)
        data["metrics"] = {k: MetricState(**v) for k, v in data.get("metrics", {}).items()}
        return cls(**data)


# ---------------------------------------------------------------------------------------------- decisions


@dataclass
class ArmStats:
    requests: int
    events: int
    rate: float | None


@dataclass
class MetricStats:
    """One metric's statistics at a decision."""

    metric: str
    canary: ArmStats
    baseline: ArmStats
    estimate: float | None  # rate ratio canary/baseline (latency: odds canary slower), grid MLE
    interval: tuple[float, float]  # anytime-valid bounds on the ratio, each end one-sided at level 1 - alpha/m
    log_evalue: float  # log e-value for "canary worse" (mixture log likelihood ratio vs rho = 1)
    threshold: float  # rollback when log_evalue >= this (log(m / alpha))
    max_ratio: float
    non_inferior: bool
    requests_seen: int  # canary requests in the rollout
    requests_needed: int | None  # canary requests still needed at the observed effect (estimate)
    needed_for: str  # "rollback" | "non_inferiority" | ""


@dataclass
class Decision:
    action: Action
    reason: str
    step: int
    weight: float  # the canary weight in force after this decision
    canary_requests: int
    baseline_requests: int
    at: float
    metrics: dict[str, MetricStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON types; an infinite interval end becomes None (strict JSON has no Infinity)."""
        return finite_json(asdict(self))


def finite_json(value):
    """``value`` with every non-finite float replaced by None and tuples by lists."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metric_stats(
    name: str, ms: MetricState, mp: MetricPolicy, policy: RolloutPolicy, weight: float, canary_requests: int
) -> MetricStats:
    """Estimate, confidence sequence, e-value and requests still needed for one metric."""
    ll = np.asarray(ms.loglik)
    alpha_m = policy.metric_alpha
    threshold = math.log(1.0 / alpha_m)
    log_e = float(log_evalue_above(ll, NULL_INDEX, policy.mixing_scale))
    events = ms.canary_events + ms.baseline_events
    lower, upper = confidence_sequence(ll, alpha_m, policy.mixing_scale) if events else (0.0, math.inf)
    estimate = float(math.exp(LOG_RHO[int(np.argmax(ll))])) if events else None
    non_inferior = events == 0 or upper <= mp.max_ratio
    needed, needed_for = requests_needed(
        ms, mp, policy, weight if name != "latency" else 0.5, estimate, log_e, canary_requests
    )

    def arm(events_: int, exposure: int) -> ArmStats:
        return ArmStats(requests=exposure, events=events_, rate=(events_ / exposure) if exposure else None)

    return MetricStats(
        metric=name,
        canary=arm(ms.canary_events, ms.canary_exposure),
        baseline=arm(ms.baseline_events, ms.baseline_exposure),
        estimate=estimate,
        interval=(lower, upper),
        log_evalue=log_e,
        threshold=threshold,
        max_ratio=mp.max_ratio,
        non_inferior=bool(non_inferior),
        requests_seen=canary_requests,
        requests_needed=needed,
        needed_for=needed_for,
    )


def requests_needed(
    ms: MetricState,
    mp: MetricPolicy,
    policy: RolloutPolicy,
    weight: float,
    estimate: float | None,
    log_e: float,
    canary_requests: int,
) -> tuple[int | None, str]:
    """Canary requests still needed, at the observed ratio, to roll back (ratio > 1) or to show non-inferiority."""
    events = ms.canary_events + ms.baseline_events
    if estimate is None or canary_requests == 0 or not 0.0 < weight < 1.0:
        return None, ""
    events_per_request = events / canary_requests
    ll = np.asarray(ms.loglik)
    alpha_m = policy.metric_alpha
    if estimate > 1.0:
        remaining, kl = math.log(1.0 / alpha_m) - log_e, event_kl(estimate, 1.0, weight)
        target = "rollback"
    elif estimate < mp.max_ratio:
        j = int(np.searchsorted(LOG_RHO, math.log(mp.max_ratio)))
        if j >= len(LOG_RHO):
            return None, ""
        current = float(log_evalue_below(ll, j, policy.mixing_scale))
        remaining, kl = math.log(1.0 / alpha_m) - current, event_kl(estimate, float(math.exp(LOG_RHO[j])), weight)
        target = "non_inferiority"
    else:
        return None, ""
    if remaining <= 0:
        return 0, target
    if kl <= 0 or events_per_request <= 0:
        return None, target
    return int(math.ceil(remaining / kl / events_per_request)), target


# ---------------------------------------------------------------------------------------------- analysis


class CanaryAnalysis:
    """The running analysis of one rollout. Feed it increments (``observe``) or log totals (``observe_totals``)."""

    def __init__(self, policy: RolloutPolicy | None = None, state: AnalysisState | None = None, *, now: float = 0.0):
        self.policy = policy or RolloutPolicy()
        self.state = state or AnalysisState(started_at=now, step_started_at=now, last_update_at=now)
        for name in [m.name for m in self.policy.metrics] + [g.metric for g in self.policy.guards]:
            self.state.metrics.setdefault(name, MetricState())  # guard-only metrics are counted, not compared

    @property
    def weight(self) -> float:
        """The canary weight in force now (0 after a rollback)."""
        if self.state.status == "rolled_back":
            return 0.0
        return self.policy.weights[self.state.step]

    def to_json(self) -> str:
        return json.dumps({"policy": self.policy.to_dict(), "state": self.state.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> CanaryAnalysis:
        data = json.loads(text)
        return cls(RolloutPolicy.from_dict(data["policy"]), AnalysisState.from_dict(data["state"]))

    def observe_totals(
        self, totals: Mapping[str, Mapping], *, now: float, latencies: Mapping[str, Sequence[float]] | None = None
    ) -> Decision:
        """Update from cumulative per-arm counts (``RequestLog.arm_counts(model=..., rollout_id=...)``).

        ``latencies``: each arm's per-request latencies that are new since the last update (the aggregates do
        not carry them; without them the latency metric gets no events).
        """
        current = {arm: ArmCounts.from_log(totals.get(arm)) for arm in ("canary", "baseline")}
        last = self.state.last_totals or {}
        canary = current["canary"].minus(ArmCounts.from_log(last.get("canary")))
        baseline = current["baseline"].minus(ArmCounts.from_log(last.get("baseline")))
        canary.latencies = tuple((latencies or {}).get("canary", ()))
        baseline.latencies = tuple((latencies or {}).get("baseline", ()))
        self.state.last_totals = {arm: asdict(c) for arm, c in current.items()}
        for arm in self.state.last_totals.values():
            arm.pop("latencies")
        return self.observe(canary, baseline, now=now)

    def _final_decision(self) -> Decision:
        """The decision a finished analysis ended with, with the statistics as they stand."""
        if self.state.final is None:
            raise ValueError(f"the analysis is {self.state.status} but records no final decision")
        return Decision(**{**self.state.final, "metrics": self.stats()})

    def observe(self, canary: ArmCounts, baseline: ArmCounts, *, now: float, weight: float | None = None) -> Decision:
        """Add an increment observed at ``weight`` (default: the current step's weight) and decide."""
        st = self.state
        if st.status != "running":
            return self._final_decision()
        w = self.weight if weight is None else weight
        had_traffic = canary.requests + baseline.requests > 0
        if had_traffic:
            st.active_s += max(0.0, now - st.last_update_at)
        st.last_update_at = now
        st.canary_requests += canary.requests
        st.baseline_requests += baseline.requests
        st.step_canary_requests += canary.requests
        if 0.0 < w < 1.0:
            self.add_counts(canary, baseline, w)
        return self.decide(now=now, had_traffic=had_traffic)

    def add_counts(self, canary: ArmCounts, baseline: ArmCounts, weight: float) -> None:
        for name in COUNT_METRICS:
            if name in self.state.metrics:
                self.state.metrics[name].add(
                    canary.count(name), baseline.count(name), weight, canary.requests, baseline.requests
                )
        if "latency" in self.state.metrics:
            self.add_latency_pairs(canary.latencies, baseline.latencies)

    def add_latency_pairs(self, canary_latencies, baseline_latencies) -> None:
        """Pair new canary latencies with concurrent baseline ones (newest first); add the sign events."""
        st = self.state
        pc = st.pending_canary_latencies + [float(x) for x in canary_latencies]
        pb = (st.pending_baseline_latencies + [float(x) for x in baseline_latencies])[-MAX_PENDING_LATENCIES:]
        n = min(len(pc), len(pb))
        pairs_c, pairs_b = pc[:n], pb[len(pb) - n :][::-1]
        slower = sum(1 for c, b in zip(pairs_c, pairs_b, strict=True) if c > b)
        faster = sum(1 for c, b in zip(pairs_c, pairs_b, strict=True) if c < b)
        st.metrics["latency"].add(slower, faster, 0.5, n, n)
        st.pending_canary_latencies = pc[n:][-MAX_PENDING_LATENCIES:]
        st.pending_baseline_latencies = pb[: len(pb) - n]

    def stats(self) -> dict[str, MetricStats]:
        return {
            mp.name: metric_stats(
                mp.name, self.state.metrics[mp.name], mp, self.policy, self.weight, self.state.canary_requests
            )
            for mp in self.policy.metrics
        }

    def hold(self, reason: str, *, now: float) -> Decision:
        """``continue`` with ``reason`` and the statistics as they stand, nothing observed (the evidence is not
        whole yet); a finished analysis returns its final decision."""
        st = self.state
        if st.status != "running":
            return self._final_decision()
        return Decision(
            action="continue",
            reason=reason,
            step=st.step,
            weight=self.weight,
            canary_requests=st.canary_requests,
            baseline_requests=st.baseline_requests,
            at=now,
            metrics=self.stats(),
        )

    def decide(self, *, now: float, had_traffic: bool = True) -> Decision:
        """The decision for the current state (see the module docstring for the order of the rules)."""
        stats = self.stats()
        action, reason = self.choose(stats, had_traffic)
        st = self.state
        if action == "rollback":
            st.status = "rolled_back"
        elif action == "promote":
            st.status, st.step = "promoted", len(self.policy.weights) - 1
        elif action == "step_up":
            st.step += 1
            st.step_started_at, st.step_canary_requests = now, 0
        decision = Decision(
            action=action,
            reason=reason,
            step=st.step,
            weight=self.weight,
            canary_requests=st.canary_requests,
            baseline_requests=st.baseline_requests,
            at=now,
            metrics=stats,
        )
        if st.status != "running":
            st.final = {k: v for k, v in decision.to_dict().items() if k != "metrics"}
        return decision

    def choose(self, stats: dict[str, MetricStats], had_traffic: bool) -> tuple[Action, str]:
        p, st = self.policy, self.state
        guard = failed_guard(p.guards, st.metrics)
        if guard:
            return "rollback", guard
        harmed = [s for s in stats.values() if s.log_evalue >= s.threshold]
        if harmed:
            return "rollback", "; ".join(harm_reason(s) for s in harmed)
        if not had_traffic:
            return "continue", "hold: no traffic since the last check"
        limit = limit_reached(p, st)
        if limit:
            if p.on_limit == "rollback":
                return "rollback", f"{limit} without showing non-inferiority (on_limit: rollback)"
            return "continue", f"hold: {limit}; waiting for `tuneloop rollout promote` or `abort` (on_limit: hold)"
        step_left = p.min_requests_per_step - st.step_canary_requests
        pending = [s for s in stats.values() if not s.non_inferior]
        last = st.step == len(p.weights) - 2
        if step_left <= 0 and last and not pending:
            return "promote", "non-inferior on every metric: " + ", ".join(ni_reason(s) for s in stats.values())
        if step_left <= 0 and not last and not (p.step_requires_non_inferiority and pending):
            return (
                "step_up",
                f"{st.step_canary_requests} canary requests at {p.weights[st.step]:.0%} with no harm shown",
            )
        if step_left > 0:
            return "continue", f"{step_left} more canary requests at this step before it can move on"
        return "continue", "waiting for non-inferiority: " + "; ".join(wait_reason(s) for s in pending)


def failed_guard(guards: tuple[Guard, ...], metrics: dict[str, MetricState]) -> str:
    for g in guards:
        ms = metrics.get(g.metric)
        if ms is None:
            continue
        if g.max_count is not None and ms.canary_events > g.max_count:
            return f"guard {g.metric}: {ms.canary_events} canary events, more than {g.max_count}"
        if g.max_rate is None or ms.canary_exposure < g.min_requests:
            continue
        rate = ms.canary_events / ms.canary_exposure
        if rate > g.max_rate:
            return (
                f"guard {g.metric}: canary rate {rate:.1%} ({ms.canary_events}/{ms.canary_exposure}) "
                f"above {g.max_rate:.1%}"
            )
    return ""


def limit_reached(p: RolloutPolicy, st: AnalysisState) -> str:
    if p.max_canary_requests is not None and st.canary_requests >= p.max_canary_requests:
        return f"limit of {p.max_canary_requests} canary requests reached"
    if p.max_active_s is not None and st.active_s >= p.max_active_s:
        return f"limit of {p.max_active_s:.0f} s with traffic reached"
    return ""


def harm_reason(s: MetricStats) -> str:
    return (
        f"{s.metric}: canary worse (ratio {s.estimate:.2f}, interval {s.interval[0]:.2f}-{s.interval[1]:.2f}, "
        f"e-value {math.exp(min(s.log_evalue, 700)):.3g} >= {math.exp(s.threshold):.3g}; "
        f"canary {s.canary.events}/{s.canary.requests}, baseline {s.baseline.events}/{s.baseline.requests})"
    )


def ni_reason(s: MetricStats) -> str:
    if s.canary.events + s.baseline.events == 0:
        return f"{s.metric} (no events in either arm)"
    return f"{s.metric} ratio <= {s.interval[1]:.2f} (margin {s.max_ratio})"


def wait_reason(s: MetricStats) -> str:
    need = f", about {s.requests_needed} more canary requests at the observed ratio" if s.requests_needed else ""
    est = f"{s.estimate:.2f}" if s.estimate is not None else "n/a"
    return f"{s.metric} ratio {est}, upper bound {s.interval[1]:.2f} > margin {s.max_ratio}{need}"
