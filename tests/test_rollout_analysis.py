"""Canary analysis: the alpha guarantee, power, weights, holds, guards, limits, promotion and its state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tuneloop.errors import ConfigError
from tuneloop.rollout import ArmCounts, CanaryAnalysis, Guard, MetricPolicy, RolloutPolicy
from tuneloop.rollout.analysis import log_evalue_above, log_likelihoods

ERRORS_ONLY = dict(metrics=(MetricPolicy("errors"),), guards=())


def traffic(rng, n: int, weight: float, p_canary: float, p_base: float, neg=(0.0, 0.0), lat=(1.0, 1.0)):
    """``n`` requests split at ``weight``: (canary, baseline) increments with errors, feedback and latencies."""
    nc = int(rng.binomial(n, weight))
    nb = n - nc

    def arm(k, p, q, scale):
        return ArmCounts(
            requests=k,
            errors=int(rng.binomial(k, p)),
            negative_feedback=int(rng.binomial(k, q)),
            feedback=k,
            latencies=tuple(scale * rng.lognormal(0.0, 0.5, k)),
        )

    return arm(nc, p_canary, neg[0], lat[0]), arm(nb, p_base, neg[1], lat[1])


def run(analysis: CanaryAnalysis, rng, *, batches: int, n: int = 20, **rates):
    """Feed batches at the analysis's own weight until it ends; returns the last decision."""
    d = None
    for t in range(batches):
        d = analysis.observe(*traffic(rng, n, analysis.weight, **rates), now=float(t + 1))
        if d.action in ("rollback", "promote"):
            break
    return d


def h0_false_rollbacks(rng, rollouts: int, events: int, schedule, alpha: float) -> float:
    """Fraction of H0 rollouts whose e-value ever reaches 1/alpha, checked after every event (vectorised)."""
    crossed = np.zeros(rollouts, dtype=bool)
    offset = np.zeros((rollouts, 1, len(log_likelihoods(0, 0, 0.5))))
    per = events // len(schedule)
    for w in schedule:
        canary = rng.random((rollouts, per)) < w  # under H0 an event is in the canary arm with probability w
        c = np.cumsum(canary, axis=1)
        b = np.arange(1, per + 1)[None, :] - c
        ll = offset + log_likelihoods(c, b, w)
        crossed |= (log_evalue_above(ll) >= math.log(1 / alpha)).any(axis=1)
        offset = ll[:, -1:, :]
    return float(crossed.mean())


def test_false_rollback_rate_under_h0_is_at_most_alpha_checked_after_every_event_with_changing_weights():
    rng = np.random.default_rng(7)
    rate = h0_false_rollbacks(rng, rollouts=600, events=900, schedule=(0.05, 0.25, 0.5), alpha=0.05)
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 600), rate
    # and the same events judged against the wrong (constant 5 %) weight would roll back nearly always:
    wrong = CanaryAnalysis(RolloutPolicy(**ERRORS_ONLY))
    d = wrong.observe(ArmCounts(requests=500, errors=25), ArmCounts(requests=500, errors=25), now=1.0, weight=0.05)
    assert d.action == "rollback"
    right = CanaryAnalysis(RolloutPolicy(**ERRORS_ONLY))
    d = right.observe(ArmCounts(requests=500, errors=25), ArmCounts(requests=500, errors=25), now=1.0, weight=0.5)
    assert d.action != "rollback" and d.metrics["errors"].interval[0] < 1.0 < d.metrics["errors"].interval[1]


def test_the_class_matches_the_vectorised_statistics_across_weight_changes():
    rng = np.random.default_rng(3)
    a = CanaryAnalysis(RolloutPolicy(**ERRORS_ONLY))
    expected = np.zeros(len(log_likelihoods(0, 0, 0.5)))
    for w in (0.05, 0.25, 0.5):
        for _ in range(10):
            c, b = traffic(rng, 200, w, p_canary=0.02, p_base=0.02)
            a.observe(c, b, now=1.0, weight=w)
            expected = expected + log_likelihoods(c.errors, b.errors, w)
    assert np.allclose(a.state.metrics["errors"].loglik, expected)
    assert a.stats()["errors"].log_evalue == pytest.approx(float(log_evalue_above(expected)))


def test_a_clearly_worse_canary_is_rolled_back_with_its_statistics():
    policy = RolloutPolicy(**ERRORS_ONLY, min_requests_per_step=10**6)
    rolled, requests = 0, []
    for seed in range(10):
        d = run(CanaryAnalysis(policy), np.random.default_rng(seed), batches=3000, p_canary=0.03, p_base=0.01)
        if d.action == "rollback":
            rolled += 1
            requests.append(d.canary_requests)
            s = d.metrics["errors"]
            assert s.log_evalue >= s.threshold == pytest.approx(math.log(20))
            assert s.interval[0] >= 1.0 and s.estimate > 1.0 and "errors: canary worse" in d.reason
            assert s.canary.events > 0 and s.baseline.requests > s.canary.requests
    assert rolled >= 9 and float(np.median(requests)) < 1000, requests


def test_no_traffic_means_hold_and_does_not_count_towards_the_time_limit():
    policy = RolloutPolicy(**ERRORS_ONLY, max_active_s=100.0)
    a = CanaryAnalysis(policy, now=0.0)
    d = a.observe(ArmCounts(), ArmCounts(), now=10_000.0)
    assert d.action == "continue" and d.reason.startswith("hold: no traffic")
    assert a.state.active_s == 0.0
    d = a.observe(ArmCounts(requests=5), ArmCounts(requests=95), now=10_050.0)
    assert d.action == "continue" and a.state.active_s == 50.0
    d = a.observe(ArmCounts(requests=5), ArmCounts(requests=95), now=10_101.0)
    assert d.action == "rollback" and "limit of 100 s" in d.reason


def test_on_limit_hold_waits_for_a_person():
    policy = RolloutPolicy(**ERRORS_ONLY, max_canary_requests=50, on_limit="hold")
    a = CanaryAnalysis(policy)
    d = a.observe(ArmCounts(requests=60, errors=1), ArmCounts(requests=1140, errors=12), now=1.0)
    assert d.action == "continue" and d.reason.startswith("hold: limit of 50 canary requests")


def test_a_guard_rolls_back_at_once():
    a = CanaryAnalysis(RolloutPolicy(guards=(Guard("errors", max_rate=0.5, min_requests=20),)))
    # the baseline fails as often, so only the guard (on the canary's own rate) can act
    d = a.observe(ArmCounts(requests=10, errors=10), ArmCounts(requests=190, errors=150), now=1.0)
    assert d.action == "continue"  # fewer than min_requests canary requests: not yet
    d = a.observe(ArmCounts(requests=10, errors=6), ArmCounts(requests=190, errors=120), now=2.0)
    assert d.action == "rollback" and d.reason.startswith("guard errors: canary rate 80.0% (16/20)")
    assert a.weight == 0.0
    again = a.observe(ArmCounts(requests=1), ArmCounts(requests=1), now=3.0)
    assert again.action == "rollback" and again.reason == d.reason and "errors" in again.metrics


def test_a_harmful_output_guard_rolls_back_on_the_first_flagged_canary_output():
    a = CanaryAnalysis(RolloutPolicy(**{**ERRORS_ONLY, "guards": (Guard("harmful", max_count=0),)}))
    d = a.observe(ArmCounts(requests=30), ArmCounts(requests=570, harmful=2), now=1.0)
    assert d.action == "continue" and "harmful" not in d.metrics  # a guard, not a compared metric
    d = a.observe(ArmCounts(requests=1, harmful=1), ArmCounts(requests=19), now=2.0)
    assert d.action == "rollback" and d.reason == "guard harmful: 1 canary events, more than 0"


def test_a_healthy_canary_steps_up_and_is_promoted_when_non_inferior():
    policy = RolloutPolicy(
        metrics=(MetricPolicy("errors", max_ratio=1.5), MetricPolicy("latency", max_ratio=1.5)),
        weights=(0.05, 0.25, 0.5, 1.0),
        min_requests_per_step=200,
    )
    a = CanaryAnalysis(policy)
    rng = np.random.default_rng(11)
    actions = []
    for t in range(2000):
        d = a.observe(*traffic(rng, 100, a.weight, p_canary=0.05, p_base=0.05), now=float(t + 1))
        if d.action != "continue":
            actions.append((d.action, d.weight))
        if d.action in ("promote", "rollback"):
            break
    assert actions == [("step_up", 0.25), ("step_up", 0.5), ("promote", 1.0)], actions
    assert all(s.non_inferior and s.interval[1] <= 1.5 for s in d.metrics.values())
    assert "non-inferior on every metric" in d.reason


def test_while_waiting_the_decision_says_how_many_requests_are_still_needed():
    policy = RolloutPolicy(**ERRORS_ONLY, weights=(0.5, 1.0), min_requests_per_step=10)
    a = CanaryAnalysis(policy)
    d = a.observe(ArmCounts(requests=500, errors=25), ArmCounts(requests=500, errors=25), now=1.0)
    s = d.metrics["errors"]
    assert d.action == "continue" and d.reason.startswith("waiting for non-inferiority")
    assert s.needed_for == "non_inferiority" and s.requests_needed > 0 and "more canary requests" in d.reason


def test_latency_is_compared_in_concurrent_pairs():
    policy = RolloutPolicy(metrics=(MetricPolicy("latency"),), guards=(), min_requests_per_step=10**6)
    slow = run(CanaryAnalysis(policy), np.random.default_rng(5), batches=2000, p_canary=0.0, p_base=0.0, lat=(1.5, 1.0))
    assert slow.action == "rollback" and slow.reason.startswith("latency: canary worse")
    same = run(CanaryAnalysis(policy), np.random.default_rng(5), batches=400, p_canary=0.0, p_base=0.0)
    assert same.action == "continue" and same.metrics["latency"].canary.requests > 300


def test_state_round_trips_through_json_and_decisions_are_strict_json():
    rng = np.random.default_rng(2)
    a = CanaryAnalysis(RolloutPolicy(min_requests_per_step=100))
    for t in range(30):
        a.observe(*traffic(rng, 50, a.weight, p_canary=0.01, p_base=0.01, neg=(0.05, 0.05)), now=float(t))
    b = CanaryAnalysis.from_json(a.to_json())
    assert b.state == a.state and b.policy == a.policy
    inc = traffic(np.random.default_rng(9), 50, a.weight, p_canary=0.01, p_base=0.01)
    da, db = a.observe(*inc, now=31.0), b.observe(*inc, now=31.0)
    assert da == db
    text = json.dumps(da.to_dict(), allow_nan=False)
    m = json.loads(text)["metrics"]["negative_feedback"]
    assert set(m) >= {"canary", "baseline", "estimate", "interval", "log_evalue", "requests_seen", "requests_needed"}


def test_log_totals_feed_the_same_statistics_as_increments():
    totals = [
        {"canary": {"requests": 50, "errors": 2}, "baseline": {"requests": 950, "errors": 9, "negative_feedback": 3}},
        {
            "canary": {"requests": 120, "errors": 5, "negative_feedback": 1},
            "baseline": {"requests": 2300, "errors": 20, "negative_feedback": 7},
        },
    ]
    a = CanaryAnalysis(RolloutPolicy())
    for i, t in enumerate(totals):
        d1 = a.observe_totals(t, now=float(i))
    b = CanaryAnalysis(RolloutPolicy())
    b.observe(ArmCounts(requests=50, errors=2), ArmCounts(requests=950, errors=9, negative_feedback=3), now=0.0)
    d2 = b.observe(
        ArmCounts(requests=70, errors=3, negative_feedback=1),
        ArmCounts(requests=1350, errors=11, negative_feedback=4),
        now=1.0,
    )
    assert d1.metrics == d2.metrics
    assert CanaryAnalysis.from_json(a.to_json()).state.last_totals == a.state.last_totals


def test_policy_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        RolloutPolicy(alpha=1.5, weights=(0.5, 0.25), metrics=(MetricPolicy("speed"),), on_limit="promote")
    text = str(exc.value)
    for key in ("deploy.canary.alpha", "deploy.canary.weights", "unknown metric 'speed'", "deploy.canary.on_limit"):
        assert key in text
