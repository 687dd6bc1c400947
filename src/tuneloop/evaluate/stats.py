"""Statistics behind the gates: intervals, paired tests, verdicts, and the sample size a verdict needs.

Pure Python (+ NumPy for the bootstrap); no SciPy. Everything here is deterministic (the bootstrap is seeded).

Intervals here are two-sided at ``confidence``. The gates (:mod:`tuneloop.evaluate.gates`) make each verdict
a one-sided test at level ``1 - gates.confidence`` and therefore ask for the two-sided
``2 * gates.confidence - 1`` interval (90 % at the default 0.95, the TOST convention of equivalence testing):
its lower end is the one-sided 95 % lower bound and its upper end the one-sided 95 % upper bound.

Methods:

* one proportion: Wilson score interval (:func:`wilson`) or the exact Clopper-Pearson interval
  (:func:`clopper_pearson`, beta quantiles by bisection on the regularised incomplete beta function);
* paired proportions (base vs candidate on the same items): the Agresti-Min adjusted Wald interval for the
  difference (:func:`paired_difference_interval`; recommended by Fagerland, Lydersen & Laake 2013 for its
  coverage), and the exact McNemar test (:func:`mcnemar_exact`: a two-sided binomial test on the discordant
  pairs) for its p-value;
* continuous per-item scores (token F1, win scores): a seeded paired bootstrap of the mean difference
  (:func:`paired_bootstrap_interval`), and for a mean the wider of a bootstrap and the Wilson interval at that
  mean (:func:`estimate_mean`; conservative for scores in [0, 1]).

Verdict rules (:func:`verdict`), with ``[lo, hi]`` the interval of the gated quantity (so a PASS errs with
probability at most 1 - confidence when the truth is on the wrong side of the threshold, and so does a FAIL):

* floor ``value >= t`` (``min_accuracy``, ``min_win_rate``): PASS if ``lo >= t``; FAIL if ``hi < t``;
  otherwise INCONCLUSIVE;
* ceiling ``value <= t`` (``max_harmful_rate``): PASS if ``hi <= t``; FAIL if ``lo > t``; else INCONCLUSIVE;
* paired tolerance (``max_capability_drop`` and the other ``*_increase``/``*_drop`` gates): the gated
  quantity is the change in the bad direction (base minus candidate for a drop) and ``t`` is the tolerated
  change M >= 0; it is a ceiling on that change: PASS if the upper bound ``<= M`` (non-inferiority shown),
  FAIL if the lower bound ``> M`` (a change beyond the tolerance shown), else INCONCLUSIVE. A candidate
  identical to its base has an observed change of 0, so its lower bound is ``<= 0 <= M``: it never FAILs.

``needed_n`` is the number of items at which the observed effect (distance of the point estimate from the
threshold) would give a decisive verdict, by the normal approximation
``n = (z * sd / |estimate - threshold|)^2`` with ``sd`` the observed per-item standard deviation (for a
proportion at 0 or 1, the standard deviation at the threshold). It is an estimate, not a promise: a new
sample has a new estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]


# ------------------------------------------------------------------------------------------- normal, beta


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: z such that P(|Z| <= z) = confidence."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return _norm_ppf(1.0 - (1.0 - confidence) / 2.0)


def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _norm_ppf(p: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if _norm_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) by bisection on :func:`betainc` (monotone in x, so bisection is robust)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


# ------------------------------------------------------------------------------------------ proportions


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for k successes out of n: beta quantiles."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else beta_ppf(alpha / 2.0, k, n - k + 1)
    hi = 1.0 if k == n else beta_ppf(1.0 - alpha / 2.0, k + 1, n - k)
    return lo, hi


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), exactly (log-space sum)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return 1.0 - betainc(k + 1, n - k, p)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2.0 * binom_cdf(k, m, 0.5))


def paired_difference_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for (b - c) / n, the paired difference of two proportions (Agresti-Min adjusted Wald).

    ``b``: items only the first model gets right, ``c``: items only the second gets right, ``n``: items. Half an
    observation is added to each cell of the 2x2 table, so zero discordant pairs still give a non-empty
    interval that shrinks as 1/n.
    """
    if n <= 0:
        return -1.0, 1.0
    z = z_value(confidence)
    bt, ct, nt = b + 0.5, c + 0.5, n + 2.0
    diff = (bt - ct) / nt
    se = math.sqrt(max(bt + ct - (bt - ct) ** 2 / nt, 0.0)) / nt
    return max(-1.0, diff - z * se), min(1.0, diff + z * se)


# ------------------------------------------------------------------------------------------- bootstrap


def bootstrap_mean_interval(
    x: Sequence[float] | np.ndarray, confidence: float = 0.95, *, seed: int = 0, n_boot: int = 2000
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item scores (seeded)."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    means = a[idx].mean(axis=1)
    alpha = 1.0 - confidence
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_bootstrap_interval(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    *,
    seed: int = 0,
    n_boot: int = 2000,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(x - y), resampling items (pairs stay together; seeded)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape:
        raise ValueError("paired samples must have the same length")
    return bootstrap_mean_interval(xa - ya, confidence, seed=seed, n_boot=n_boot)


# --------------------------------------------------------------------------------------------- verdicts


def verdict(lo: float, hi: float, threshold: float, op: str) -> Verdict:
    """PASS / FAIL / INCONCLUSIVE for ``value >= threshold`` (op ``>=``) or ``value <= threshold`` (``<=``)."""
    if op == ">=":
        return "PASS" if lo >= threshold else "FAIL" if hi < threshold else "INCONCLUSIVE"
    if op == "<=":
        return "PASS" if hi <= threshold else "FAIL" if lo > threshold else "INCONCLUSIVE"
    raise ValueError(f"op must be >= or <=, got {op!r}")


def needed_n(estimate: float, threshold: float, sd: float, confidence: float = 0.95) -> int | None:
    """Items at which the observed effect would give a decisive verdict (normal approximation).

    ``None`` when the estimate sits exactly on the threshold (no sample size decides a zero effect).
    """
    gap = abs(estimate - threshold)
    if gap < 1e-12:
        return None
    z = z_value(confidence)
    return max(1, math.ceil((z * sd / gap) ** 2))


def proportion_sd(p: float, threshold: float) -> float:
    """Per-item standard deviation of a 0/1 outcome; at p in {0, 1} the one at the threshold is used."""
    sd = math.sqrt(p * (1 - p))
    if sd == 0.0:
        t = min(max(threshold, 1e-6), 1 - 1e-6)
        sd = math.sqrt(t * (1 - t))
    return sd


@dataclass
class Estimate:
    """A point estimate with its interval and what produced it."""

    value: float
    lo: float
    hi: float
    n: int
    sd: float
    method: str
    p_value: float | None = None
    extra: dict | None = None


def estimate_proportion(successes: Sequence[float], confidence: float = 0.95, method: str = "wilson") -> Estimate:
    """One proportion from per-item 0/1 outcomes, with a Wilson or Clopper-Pearson interval."""
    n = len(successes)
    k = int(sum(bool(s) for s in successes))
    p = k / n if n else 0.0
    lo, hi = (clopper_pearson if method == "clopper-pearson" else wilson)(k, n, confidence)
    return Estimate(p, lo, hi, n, math.sqrt(p * (1 - p)), method, extra={"k": k})


def estimate_paired_binary(first: Sequence[float], second: Sequence[float], confidence: float = 0.95) -> Estimate:
    """mean(first) - mean(second) for paired 0/1 outcomes: Agresti-Min interval, exact McNemar p-value."""
    if len(first) != len(second):
        raise ValueError("paired samples must have the same length")
    n = len(first)
    b = sum(1 for f, s in zip(first, second, strict=True) if f and not s)
    c = sum(1 for f, s in zip(first, second, strict=True) if s and not f)
    diff = (b - c) / n if n else 0.0
    lo, hi = paired_difference_interval(b, c, n, confidence)
    disc = (b + c) / n if n else 0.0
    sd = math.sqrt(max(disc - diff * diff, 0.0))
    return Estimate(
        diff,
        lo,
        hi,
        n,
        sd,
        "agresti-min paired + exact McNemar",
        p_value=mcnemar_exact(b, c),
        extra={"b": b, "c": c, "discordant": b + c},
    )


def estimate_paired_continuous(
    first: Sequence[float], second: Sequence[float], confidence: float = 0.95, *, seed: int = 0
) -> Estimate:
    """mean(first - second) for paired continuous per-item scores: seeded paired bootstrap."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    d = a - b
    lo, hi = paired_bootstrap_interval(a, b, confidence, seed=seed)
    return Estimate(
        float(d.mean()) if d.size else 0.0,
        lo,
        hi,
        int(d.size),
        float(d.std()) if d.size else 0.0,
        "paired bootstrap (2000, seeded)",
    )


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean of ``values``; ``None`` when there are none (nothing measured is not a 0: a metric left
    out, never invented). The one mean of the package (issue 25: two private ``_mean``s disagreed on this)."""
    return sum(values) / len(values) if values else None


def estimate_mean(x: Sequence[float], confidence: float = 0.95, *, seed: int = 0) -> Estimate:
    """Mean of per-item scores in [0, 1] (token F1, win scores with ties as 1/2).

    The interval is the wider of a seeded percentile bootstrap and the Wilson interval at the same mean
    (a score in [0, 1] with mean p has variance at most p(1 - p), so Wilson is conservative; it also keeps a
    handful of identical scores from giving a zero-width interval, which the bootstrap alone would).
    """
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        return Estimate(0.0, 0.0, 1.0, 0, 0.0, "none")
    blo, bhi = bootstrap_mean_interval(a, confidence, seed=seed)
    wlo, whi = wilson(float(a.sum()), int(a.size), confidence)  # type: ignore[arg-type]
    return Estimate(
        float(a.mean()),
        min(blo, wlo),
        max(bhi, whi),
        int(a.size),
        float(a.std()),
        "bootstrap (2000, seeded) widened to Wilson",
    )
