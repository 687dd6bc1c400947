"""How often does a gate block an unchanged model, and how often does it catch a real 5-point drop?

Simulates paired evaluations of a base model and a candidate on ``--n`` items and runs, on each simulated
eval set, tuneloop's paired accuracy-vs-base gate (``tuneloop.evaluate.gates.decide``: Agresti-Min interval +
exact McNemar, PASS / FAIL / INCONCLUSIVE, INCONCLUSIVE blocks by default) and a naive point-estimate gate
(blocks when the observed drop exceeds the threshold).

Both gates get the same user intent: "the candidate may not lose more than M accuracy points against its
base", M = ``--margin`` (default 0.05). So a true drop of 5 points is a drop the user does not accept (it is
at the tolerance), and a true change of 0 is one they do.

Data: item difficulty makes outcomes correlated the way real evals are. Item i has an easiness
u_i ~ N(0, 1); the base answers it correctly when u_i + e_b > t_b, the candidate when u_i + e_c > t_c, with
independent per-model noise e ~ N(0, sigma^2). t_b gives base accuracy 0.70; t_c gives 0.70 - drop. sigma
sets how often the two models disagree on an item (discordance); ``--sigma 0.3`` gives about 11 % of items
discordant at zero change. The script also prints how the rates move with n and discordance.

    python benchmarks/gate_simulation.py --n 500 --trials 2000 --seed 0

Ends with one JSON line: n, false_block_rate, power, naive_false_block_rate, naive_power and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from tuneloop.evaluate import stats
from tuneloop.evaluate.gates import GateInput, GateSpec, decide


def simulate(rng, n: int, drop: float, sigma: float, base_acc: float = 0.70) -> tuple[np.ndarray, np.ndarray]:
    s = math.sqrt(1.0 + sigma * sigma)
    t_b = -stats._norm_ppf(base_acc) * s
    t_c = -stats._norm_ppf(base_acc - drop) * s
    u = rng.standard_normal(n)
    base = (u + sigma * rng.standard_normal(n)) > t_b
    cand = (u + sigma * rng.standard_normal(n)) > t_c
    return base.astype(int), cand.astype(int)


def rates(
    n: int,
    trials: int,
    seed: int,
    margin: float,
    drop: float,
    sigma: float,
    confidence: float,
    policy: str,
    naive: float,
) -> dict:
    rng = np.random.default_rng(seed)
    spec = GateSpec("max_accuracy_drop", "accuracy_drop", "paired", margin)
    blocked = failed = naive_blocked = 0
    disc = 0.0
    for _ in range(trials):
        b, c = simulate(rng, n, drop, sigma)
        g = decide(spec, GateInput(c.tolist(), b.tolist()), confidence=confidence, policy=policy)
        blocked += g.blocks
        failed += g.verdict == "FAIL"
        naive_blocked += (b.mean() - c.mean()) > naive
        disc += float(np.mean(b != c))
    return {
        "block": blocked / trials,
        "fail": failed / trials,
        "naive_block": naive_blocked / trials,
        "discordance": disc / trials,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="items per simulated eval set")
    ap.add_argument("--trials", type=int, default=2000, help="simulated eval sets per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin", type=float, default=0.05, help="tolerated drop M (both gates)")
    ap.add_argument("--drop", type=float, default=0.05, help="true drop for the power scenario")
    ap.add_argument("--sigma", type=float, default=0.3, help="per-model noise on item easiness (sets discordance)")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--policy", default="block", choices=["block", "pass", "warn"], help="gates.on_inconclusive")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sensitivity tables")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    kw = dict(margin=a.margin, sigma=a.sigma, confidence=a.confidence, policy=a.policy, naive=a.margin)
    null = rates(a.n, a.trials, a.seed, drop=0.0, **kw)
    alt = rates(a.n, a.trials, a.seed + 1, drop=a.drop, **kw)
    print(
        f"n={a.n}, trials={a.trials}, base accuracy 0.70, discordance at zero change {null['discordance']:.3f}, "
        f"margin M={a.margin}, confidence {a.confidence}, on_inconclusive={a.policy}"
    )
    print(f"{'gate':<44}{'blocks unchanged':>18}{'blocks -' + format(a.drop, '.0%') + ' drop':>18}")
    print(f"{'tuneloop (interval vs M; FAIL or INCONCLUSIVE)':<44}{null['block']:>18.3f}{alt['block']:>18.3f}")
    print(f"{'  of which FAIL (interval wholly above M)':<44}{null['fail']:>18.3f}{alt['fail']:>18.3f}")
    print(f"{'naive (observed drop > M)':<44}{null['naive_block']:>18.3f}{alt['naive_block']:>18.3f}")

    if not a.no_sweep:
        sweep_trials = max(200, a.trials // 4)
        print(f"\nsensitivity ({sweep_trials} trials each): blocks unchanged / blocks a {a.drop:.0%} drop")
        print(f"{'n':>6}{'sigma':>7}{'discord.':>10}{'tuneloop':>16}{'naive M':>16}{'naive 0.02':>16}")
        for n in (100, 500, 2000):
            for sigma in (0.2, 0.3, 0.45):
                z = rates(n, sweep_trials, a.seed + 7, drop=0.0, **{**kw, "sigma": sigma})
                d = rates(n, sweep_trials, a.seed + 8, drop=a.drop, **{**kw, "sigma": sigma})
                z2 = rates(n, sweep_trials, a.seed + 7, drop=0.0, **{**kw, "sigma": sigma, "naive": 0.02})
                d2 = rates(n, sweep_trials, a.seed + 8, drop=a.drop, **{**kw, "sigma": sigma, "naive": 0.02})
                print(
                    f"{n:>6}{sigma:>7}{z['discordance']:>10.3f}{z['block']:>8.3f}/{d['block']:.3f}"
                    f"{z['naive_block']:>9.3f}/{d['naive_block']:.3f}{z2['naive_block']:>9.3f}/{d2['naive_block']:.3f}"
                )

    line = {
        "n": a.n,
        "false_block_rate": round(null["block"], 4),
        "power": round(alt["block"], 4),
        "naive_false_block_rate": round(null["naive_block"], 4),
        "naive_power": round(alt["naive_block"], 4),
        "false_fail_rate": round(null["fail"], 4),
        "fail_power": round(alt["fail"], 4),
        "trials": a.trials,
        "seed": a.seed,
        "margin": a.margin,
        "true_drop": a.drop,
        "base_accuracy": 0.70,
        "sigma": a.sigma,
        "discordance": round(null["discordance"], 4),
        "confidence": a.confidence,
        "on_inconclusive": a.policy,
        "naive_threshold": a.margin,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
