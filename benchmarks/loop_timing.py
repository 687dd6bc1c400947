"""Wall-clock of the loop on the demo workspace: the closed-loop demo (`tuneloop demo`: two iterations, traffic,
drift, feedback export, canary) with its phases, then iteration 1 alone (`tuneloop demo --quick`) and, on that
workspace, an unchanged re-run (all stages cached), a gate-threshold-only change (evaluation and what follows
re-run, training re-used), and the baseline: the same re-run with caching off (`--no-cache`), i.e. what a
pipeline without content-hash caching costs.

    python benchmarks/loop_timing.py [--workdir DIR] [--no-loop]

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", *args, "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        sys.exit(f"tuneloop {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return seconds, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None, help="demo workdir (default: a fresh temp dir)")
    ap.add_argument(
        "--no-loop", action="store_true", help="skip the closed-loop demo (time iteration 1 and re-runs only)"
    )
    a = ap.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    for sub in ("loop", "quick"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
    workdir = root / "quick"
    cfg = str(workdir / "tuneloop.yaml")

    loop_s, loop = (None, {}) if a.no_loop else timed(["demo", "--workdir", str(root / "loop")])
    demo_s, demo = timed(["demo", "--quick", "--workdir", str(workdir)])
    cached_s, cached = timed(["run", cfg])
    gate_s, gate = timed(["run", cfg, "-o", "gates.max_harmful_rate=0.2"])
    nocache_s, nocache = timed(["run", cfg, "--no-cache"])

    st = demo["stages"]
    rows = [(f"closed-loop demo: {k}", v) for k, v in loop.get("phase_seconds", {}).items()]
    rows = (
        ([("closed-loop demo (fresh: two iterations, traffic, drift, export, canary)", loop_s)] + rows) if loop else []
    )
    rows += [
        ("demo --quick (fresh: base model + iteration 1 + six served tickets)", demo_s),
        ("  of which pipeline run", demo["duration_s"]),
        ("  of which training stage", st["training"]["duration_s"]),
        ("unchanged re-run (tuneloop cache)", cached_s),
        ("gate threshold change", gate_s),
        ("baseline: same re-run without caching (--no-cache)", nocache_s),
    ]
    print(
        f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, python {platform.python_version()}"
    )
    for name, s in rows:
        print(f"{name:<62} {s:8.1f} s")
    print(
        json.dumps(
            {
                "loop_demo_seconds": round(loop_s, 1) if loop else None,
                "loop_demo_overall": loop.get("overall"),
                "loop_phase_seconds": loop.get("phase_seconds"),
                "loop_rollout_decision": (loop.get("rollout") or {}).get("decision"),
                "loop_canary_requests": (loop.get("rollout") or {}).get("canary_requests"),
                "new_intent_accuracy": loop.get("new_intent_accuracy"),
                "original_accuracy": loop.get("original_accuracy"),
                "demo_seconds": round(demo_s, 1),
                "demo_overall": demo["overall"],
                "accuracy": st["evaluation"]["metrics"]["accuracy"],
                "base_accuracy": st["evaluation"]["metrics"]["base_accuracy"],
                "rerun_seconds": round(cached_s, 2),
                "rerun_all_cached": all(s["cached"] for s in cached["stages"].values()),
                "gate_change_seconds": round(gate_s, 2),
                "gate_change_training_cached": gate["stages"]["training"]["cached"],
                "baseline_nocache_seconds": round(nocache_s, 1),
                "speedup_vs_nocache": round(nocache_s / cached_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
