"""Canary analysis on simulated traffic: tuneloop's anytime-valid test vs a Flagger-style rule vs a peeked z-test.

A 5 % canary is checked continuously on simulated traffic (20 requests/s in total). Each trial is one rollout
of ``--horizon`` total requests (default 100,000: 83 minutes at 20 req/s, about 5,000 canary requests). Every
request goes to the canary with probability 5 % (as a hash split does) and fails / gets negative feedback with
its arm's rate. The same traces go through three rules:

* **tuneloop**: :mod:`tuneloop.rollout.analysis` (the library's grid, mixture and thresholds; the harm test of
  one metric at ``alpha``, and, in ``*_3_metrics`` keys, at ``alpha / 3`` as under the default policy that
  watches errors, negative feedback and latency). Its e-value rises only when a canary event arrives, so it
  is evaluated right after every canary event: that is checking after every request. Traffic is drawn in
  blocks of 5 requests; a block's baseline events are counted after its canary events (this can only
  raise the e-value at the check, so a measured false-rollback rate is not flattered by it);
* **flagger**: success rate >= 99 % per 1-minute window (1,200 requests, about 60 on the canary), rolled back
  at the 5th failed window (Flagger's ``threshold``; failed windows need not be consecutive). Error scenarios
  only: the rule is about a success rate;
* **fixed_peek**: a one-sided two-proportion z-test at ``alpha`` on the cumulative counts, looked at every
  1,000 requests (about 50 canary requests), rolled back at the first rejection.

"Requests to rollback" are canary requests until the rollback; trials without one within the horizon count
as infinite in medians and percentiles (a percentile that lands there prints null). Rollback rates are
also given within the first 10 and 30 minutes of each trace (``rollback_rate_10min``, ``_30min``), since a
rule without a time-uniform guarantee rolls back more healthy canaries the longer it watches. The last line
is one JSON object.

    python benchmarks/canary_simulation.py [--trials 2000] [--horizon 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from tuneloop.rollout import ArmCounts, CanaryAnalysis, MetricPolicy, RolloutPolicy
from tuneloop.rollout.analysis import MIXING_SCALE, log_evalue_above, log_likelihoods

WEIGHT = 0.05
BLOCK = 5  # requests per simulated block
FLAGGER_WINDOW = 1200  # requests per minute at 20 req/s
FLAGGER_MIN_SUCCESS = 0.99
FLAGGER_FAILED_WINDOWS = 5
PEEK_EVERY = 1000  # requests between looks of the fixed-horizon test
SHORTER_HORIZONS_MIN = (10, 30)  # also report rollback rates within these many minutes (at 20 req/s)
Z_ONE_SIDED_95 = 1.6448536269514722
SCENARIOS = {  # name: (metric, baseline rate, canary rate)
    "healthy_errors": ("errors", 0.008, 0.008),
    "healthy_feedback": ("negative_feedback", 0.05, 0.05),
    "err_1_to_3": ("errors", 0.01, 0.03),
    "err_1_to_2": ("errors", 0.01, 0.02),
    "feedback_5_to_10": ("negative_feedback", 0.05, 0.10),
}


def simulate_blocks(rng: np.random.Generator, trials: int, blocks: int, p_base: float, p_canary: float):
    """Per block: canary requests, canary events, baseline events (arrays of shape trials x blocks)."""
    n_c = rng.binomial(BLOCK, WEIGHT, size=(trials, blocks)).astype(np.int32)
    e_c = rng.binomial(n_c, p_canary).astype(np.int32)
    e_b = rng.binomial(BLOCK - n_c, p_base).astype(np.int32)
    return n_c, e_c, e_b


def first_index(mask: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis, -1 where none."""
    hit = mask.any(axis=-1)
    return np.where(hit, mask.argmax(axis=-1), -1)


def requests_at(cum_req: np.ndarray, idx: np.ndarray, per_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(canary requests, total requests) at index ``idx`` per trial (``per_index`` requests each); inf where none."""
    out, total = np.full(idx.shape, np.inf), np.full(idx.shape, np.inf)
    ok = idx >= 0
    out[ok] = cum_req[np.nonzero(ok)[0], idx[ok]]
    total[ok] = (idx[ok] + 1) * per_index
    return out, total


def tuneloop_rule(n_c, e_c, e_b, thresholds: dict[str, float], scale: float) -> dict[str, tuple]:
    """(canary, total) requests to rollback under each threshold (log e-value), checked after every canary event."""
    cum_req, cum_c = np.cumsum(n_c, axis=1), np.cumsum(e_c, axis=1)
    base_before = np.cumsum(e_b, axis=1) - e_b
    trial_i, block_i = np.nonzero(e_c > 0)
    log_e = log_evalue_above(
        log_likelihoods(cum_c[trial_i, block_i], base_before[trial_i, block_i], WEIGHT), scale=scale
    )
    result = {}
    for name, thr in thresholds.items():
        first = np.full(n_c.shape[0], np.iinfo(np.int64).max)
        hit = log_e >= thr
        np.minimum.at(first, trial_i[hit], block_i[hit])  # the first crossing block per trial
        result[name] = requests_at(cum_req, np.where(first == np.iinfo(np.int64).max, -1, first), BLOCK)
    return result


def flagger_rule(n_c, e_c) -> np.ndarray:
    per = FLAGGER_WINDOW // BLOCK
    trials, blocks = n_c.shape
    w = blocks // per
    req = n_c[:, : w * per].reshape(trials, w, per).sum(axis=2)
    err = e_c[:, : w * per].reshape(trials, w, per).sum(axis=2)
    failed = (req > 0) & (err > (1.0 - FLAGGER_MIN_SUCCESS) * req)
    idx = first_index(np.cumsum(failed, axis=1) >= FLAGGER_FAILED_WINDOWS)
    return requests_at(np.cumsum(req, axis=1), idx, FLAGGER_WINDOW)


def fixed_peek_rule(n_c, e_c, e_b) -> np.ndarray:
    per = PEEK_EVERY // BLOCK
    trials, blocks = n_c.shape
    looks = blocks // per

    def cut(a: np.ndarray) -> np.ndarray:  # cumulative counts at each look
        return np.cumsum(a[:, : looks * per].reshape(trials, looks, per).sum(axis=2), axis=1).astype(float)

    nc, ec, eb = cut(n_c), cut(e_c), cut(e_b)
    nb = np.arange(1, looks + 1) * PEEK_EVERY - nc
    pooled = (ec + eb) / (nc + nb)
    se = np.sqrt(pooled * (1.0 - pooled) * (1.0 / np.maximum(nc, 1) + 1.0 / nb))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where((se > 0) & (nc > 0), (ec / np.maximum(nc, 1) - eb / nb) / se, 0.0)
    return requests_at(nc, first_index(z > Z_ONE_SIDED_95), PEEK_EVERY)


def summary(req: np.ndarray, total: np.ndarray) -> dict:
    def pct(q):
        v = float(np.percentile(req, q, method="inverted_cdf"))
        return None if math.isinf(v) else v

    out = {"rollback_rate": float(np.isfinite(req).mean()), "median": pct(50), "p90": pct(90)}
    for minutes in SHORTER_HORIZONS_MIN:
        out[f"rollback_rate_{minutes}min"] = float((total <= minutes * 60 * 20).mean())
    return out


def run_scenario(rng, metric, p_base, p_canary, trials, horizon, alpha, scale, chunk=250) -> dict:
    blocks = horizon // BLOCK
    thresholds = {"tuneloop": math.log(1.0 / alpha), "tuneloop_3_metrics": math.log(3.0 / alpha)}
    parts: dict[str, list] = {k: [] for k in [*thresholds, "flagger", "fixed_peek"]}
    for start in range(0, trials, chunk):
        n_c, e_c, e_b = simulate_blocks(rng, min(chunk, trials - start), blocks, p_base, p_canary)
        for name, req in tuneloop_rule(n_c, e_c, e_b, thresholds, scale).items():
            parts[name].append(req)
        if metric == "errors":
            parts["flagger"].append(flagger_rule(n_c, e_c))
        parts["fixed_peek"].append(fixed_peek_rule(n_c, e_c, e_b))
    return {
        name: summary(np.concatenate([a for a, _ in p]), np.concatenate([b for _, b in p]))
        for name, p in parts.items()
        if p
    }


def library_cross_check(rng, p_base, p_canary, horizon, alpha, scale, trials=3) -> bool:
    """Feed a few traces through CanaryAnalysis itself; its rollback point must match the vectorised rule."""
    policy = RolloutPolicy(
        alpha=alpha,
        metrics=(MetricPolicy("errors"),),
        guards=(),
        min_requests_per_step=10**9,
        max_active_s=None,
        mixing_scale=scale,
    )
    n_c, e_c, e_b = simulate_blocks(rng, trials, horizon // BLOCK, p_base, p_canary)
    expected = tuneloop_rule(n_c, e_c, e_b, {"t": math.log(1.0 / alpha)}, scale)["t"][0]
    for t in range(trials):
        analysis, got, last, base_pending = CanaryAnalysis(policy), math.inf, 0, 0
        for b in np.nonzero(e_c[t] > 0)[0]:
            req = int(n_c[t, last : b + 1].sum())
            errs = int(e_c[t, last : b + 1].sum())
            base_errs = base_pending + int(e_b[t, last:b].sum())
            base_pending = int(e_b[t, b])
            d = analysis.observe(
                ArmCounts(requests=req, errors=errs), ArmCounts(requests=BLOCK, errors=base_errs), now=float(b)
            )
            last = b + 1
            if d.action == "rollback":
                got = float(d.canary_requests)
                break
        if got != expected[t]:
            print(f"cross-check mismatch in trial {t}: library {got}, vectorised {expected[t]}")
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--horizon", type=int, default=100_000, help="total requests per trial (5 %% on the canary)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--mixing-scale", type=float, default=MIXING_SCALE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="run only these scenarios")
    args = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    results = {}
    for name, (metric, p_base, p_canary) in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        results[name] = run_scenario(
            rng, metric, p_base, p_canary, args.trials, args.horizon, args.alpha, args.mixing_scale
        )
        print(f"{name:18s} ({metric} {p_base:.1%} -> {p_canary:.1%}): " + json.dumps(results[name]), flush=True)
    checked = library_cross_check(rng, 0.01, 0.03, 20_000, args.alpha, args.mixing_scale)
    print(f"library cross-check (CanaryAnalysis vs the vectorised rule, 3 traces): {'ok' if checked else 'MISMATCH'}")
    print(json.dumps(headline(results, args, checked, time.time() - t0)))


def headline(r: dict, args, checked: bool, seconds: float) -> dict:
    def get(s, rule, key):
        return r.get(s, {}).get(rule, {}).get(key)

    out = {
        "alpha": args.alpha,
        "trials": args.trials,
        "horizon_requests": args.horizon,
        "horizon_canary_requests": int(args.horizon * WEIGHT),
        "canary_weight": WEIGHT,
        "requests_per_s": 20,
        "mixing_scale": args.mixing_scale,
        "false_rollback_rate": get("healthy_errors", "tuneloop", "rollback_rate"),
        "false_rollback_rate_feedback": get("healthy_feedback", "tuneloop", "rollback_rate"),
        "median_requests_err_1_to_3": get("err_1_to_3", "tuneloop", "median"),
        "median_requests_err_1_to_2": get("err_1_to_2", "tuneloop", "median"),
        "p90_requests_err_1_to_2": get("err_1_to_2", "tuneloop", "p90"),
        "median_requests_feedback_5_to_10": get("feedback_5_to_10", "tuneloop", "median"),
    }
    for rule in ("tuneloop", "tuneloop_3_metrics", "flagger", "fixed_peek"):
        for minutes in SHORTER_HORIZONS_MIN:
            out[f"{rule}_false_rollback_rate_{minutes}min"] = get("healthy_errors", rule, f"rollback_rate_{minutes}min")
    for rule in ("tuneloop_3_metrics", "flagger", "fixed_peek"):
        out[f"{rule}_false_rollback_rate"] = get("healthy_errors", rule, "rollback_rate")
        for s in ("err_1_to_3", "err_1_to_2", "feedback_5_to_10"):
            out[f"{rule}_power_{s}"] = get(s, rule, "rollback_rate")
            out[f"{rule}_median_requests_{s}"] = get(s, rule, "median")
    out["fixed_peek_false_rollback_rate_feedback"] = get("healthy_feedback", "fixed_peek", "rollback_rate")
    out["library_cross_check"] = checked
    out["seconds"] = round(seconds, 1)
    return {k: v for k, v in out.items() if v is not None or k.startswith(("median", "p90", "false"))}


if __name__ == "__main__":
    main()
