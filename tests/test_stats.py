"""The gate statistics against closed forms, exact sums and simulation (no SciPy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneloop.evaluate import stats


def _binom_cdf_sum(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.3), (3, 10, 0.3), (17, 40, 0.5), (95, 120, 0.8), (499, 500, 0.99)])
def test_betainc_matches_exact_binomial_sums(k, n, p):
    assert stats.binom_cdf(k, n, p) == pytest.approx(_binom_cdf_sum(k, n, p), rel=1e-9, abs=1e-12)


def test_clopper_pearson_closed_forms_and_coverage_definition():
    lo, hi = stats.clopper_pearson(0, 40, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 40), rel=1e-9)
    lo, hi = stats.clopper_pearson(40, 40, 0.95)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 40), rel=1e-9)
    # The bounds are where the binomial tails equal alpha/2.
    lo, hi = stats.clopper_pearson(7, 30, 0.9)
    assert 1 - _binom_cdf_sum(6, 30, lo) == pytest.approx(0.05, abs=1e-9)
    assert _binom_cdf_sum(7, 30, hi) == pytest.approx(0.05, abs=1e-9)


def test_wilson_reference_value():
    # Newcombe (1998) example: 81/263 -> 0.2553 to 0.3662
    lo, hi = stats.wilson(81, 263, 0.95)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert stats.z_value(0.95) == pytest.approx(1.959964, abs=1e-6)


def test_mcnemar_exact():
    assert stats.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(5, 5) == 1.0


def test_paired_interval_identical_models_and_coverage():
    same = [1] * 80 + [0] * 40
    e = stats.estimate_paired_binary(same, same)
    assert e.value == 0.0 and e.lo < 0 < e.hi and e.hi < 0.02 and e.p_value == 1.0
    # Coverage of the paired interval by simulation (true difference from a 2M-item Monte Carlo sample).
    rng = np.random.default_rng(0)
    n, hits = 200, 0
    for _ in range(400):
        u = rng.random(n)
        a = u < 0.7
        b = (u + rng.normal(0, 0.15, n)) < 0.65
        lo, hi = stats.paired_difference_interval(int(np.sum(a & ~b)), int(np.sum(b & ~a)), n)
        hits += lo <= _TRUE_DIFF <= hi
    assert hits / 400 >= 0.93


def _true_diff():
    rng = np.random.default_rng(123)
    u = rng.random(2_000_000)
    return float(np.mean(u < 0.7) - np.mean((u + rng.normal(0, 0.15, u.size)) < 0.65))


_TRUE_DIFF = _true_diff()


def test_verdict_rules_and_needed_n():
    assert stats.verdict(0.90, 0.99, 0.85, ">=") == "PASS"
    assert stats.verdict(0.70, 0.84, 0.85, ">=") == "FAIL"
    assert stats.verdict(0.80, 0.90, 0.85, ">=") == "INCONCLUSIVE"
    assert stats.verdict(0.0, 0.005, 0.01, "<=") == "PASS"
    assert stats.verdict(0.02, 0.05, 0.01, "<=") == "FAIL"
    # 0 harmful out of n: exact CP needs n >= ln(0.025)/ln(0.99) = 367 for an upper bound <= 1 %.
    n = stats.needed_n(0.0, 0.01, stats.proportion_sd(0.0, 0.01))
    assert 330 <= n <= 420
    assert stats.needed_n(0.5, 0.5, 0.5) is None


def test_bootstrap_is_seeded_and_sane():
    x = np.random.default_rng(1).random(300)
    y = x - 0.1
    a = stats.paired_bootstrap_interval(x, y, seed=3)
    assert a == stats.paired_bootstrap_interval(x, y, seed=3)
    assert a[0] == pytest.approx(0.1) and a[1] == pytest.approx(0.1)
    lo, hi = stats.bootstrap_mean_interval(x, seed=0)
    assert lo < x.mean() < hi and hi - lo < 0.1
