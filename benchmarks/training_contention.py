"""The demo's training under a fixed competing CPU load, before and after the OpenMP wait-policy fix.

CI runners and laptops are shared. torch's OpenMP threads, by default, spin while they wait at the end of
each parallel region; when other processes hold the cores, a spinning thread burns the time slice its
partner needs, and a 2-core machine with two other busy processes ran the demo 9x slower instead of ~2x.
`import tuneloop` sets `OMP_WAIT_POLICY=PASSIVE` (unless the user set it), so waiting threads sleep.

This script trains the demo's LoRA (the real `train_sft` on the demo's prepared data, a fixed number of
steps) in child processes, interleaved, with and without `--load` busy processes next to it:

* before: `OMP_WAIT_POLICY` set to the empty string, which OpenMP ignores (its default spin-then-sleep)
  and `import tuneloop` leaves alone; i.e. the behaviour before the fix;
* after: the variable unset, so `import tuneloop` sets `PASSIVE`.

    python benchmarks/training_contention.py [--workdir DIR] [--steps 20] [--load 2] [--repeats 2]

Prints a table and ends with one JSON line: seconds per variant (median of repeats) and the slowdown
under load relative to idle for each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import tuneloop  # sets the wait policy (after) or leaves the empty value (before)
from tuneloop.config import load_config
from tuneloop.modeling import load_tokenizer
from tuneloop.train.sft import train_sft
spec = json.loads(sys.argv[1])
cfg = load_config(spec["config"], [f"train.max_steps={spec['steps']}", f"train.save_steps={spec['steps']}"])
tok = load_tokenizer(spec["tokenizer"])
t0 = time.perf_counter()
train_sft(cfg, Path(spec["dataset"]), Path(spec["out"]), tokenizer=tok)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

SPIN = "while True: pass"


def prepare(workdir: Path) -> tuple[Path, Path, Path]:
    """Demo base model, data and config, and the preprocessing stage's outputs (one cached pipeline run)."""
    from rich.console import Console

    from tuneloop.demo.quick import DEMO_SEED, build_base, write_config, write_demo_data
    from tuneloop.demo.tables import RECOMMENDED

    console = Console(stderr=True)
    workdir.mkdir(parents=True, exist_ok=True)
    build_base(workdir, console)
    write_demo_data(
        workdir / "data", n_train=RECOMMENDED["data"]["n_train"], n_eval=RECOMMENDED["data"]["n_eval"], seed=DEMO_SEED
    )
    config = write_config(workdir)
    prep = sorted((workdir / ".tuneloop" / "cache" / "preprocessing").glob("*/result.json"))
    if not prep:  # run the data stages once (the whole pipeline, with 1 training step and no deployment)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tuneloop.cli",
                "run",
                str(config),
                "--json",
                "-o",
                "train.max_steps=1",
                "-o",
                "deploy.auto_deploy=false",
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode not in (0, 1):
            sys.exit(f"preparing the demo workspace failed:\n{r.stderr[-3000:]}")
        prep = sorted((workdir / ".tuneloop" / "cache" / "preprocessing").glob("*/result.json"))
    outputs = json.loads(prep[-1].read_text())["outputs"]
    return config, Path(outputs["train_dataset"]), Path(outputs["tokenizer"])


def train_once(spec: dict, policy: str, load: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy == "before":
        env["OMP_WAIT_POLICY"] = ""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
    try:
        time.sleep(0.5 if load else 0)
        with tempfile.TemporaryDirectory() as out:
            r = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps({**spec, "out": out})], env=env, capture_output=True, text=True
            )
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if r.returncode != 0:
        sys.exit(f"training child failed ({policy}, load {load}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tuneloop-contention")
    ap.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    ap.add_argument("--load", type=int, default=2, help="busy processes next to the training")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    config, dataset, tokenizer = prepare(a.workdir)
    spec = {"config": str(config), "dataset": str(dataset), "tokenizer": str(tokenizer), "steps": a.steps}
    runs: dict[str, list[float]] = {}
    for _ in range(a.repeats):  # interleaved, so drift in the machine's state hits every variant alike
        for policy in ("before", "after"):
            for load in (0, a.load):
                runs.setdefault(f"{policy}_load{load}", []).append(train_once(spec, policy, load))
    med = {k: statistics.median(v) for k, v in runs.items()}
    for policy in ("before", "after"):
        idle, busy = med[f"{policy}_load0"], med[f"{policy}_load{a.load}"]
        print(
            f"{policy:6s}  idle {idle:7.1f} s   with {a.load} busy processes {busy:7.1f} s   slowdown {busy / idle:5.1f}x"
        )
    result = {
        "benchmark": "training_contention",
        "steps": a.steps,
        "load_processes": a.load,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "seconds": {k: round(v, 2) for k, v in med.items()},
        "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "before_slowdown": round(med[f"before_load{a.load}"] / med["before_load0"], 2),
        "after_slowdown": round(med[f"after_load{a.load}"] / med["after_load0"], 2),
        "after_vs_before_loaded_speedup": round(med[f"before_load{a.load}"] / med[f"after_load{a.load}"], 2),
        "after_vs_before_idle_ratio": round(med["after_load0"] / med["before_load0"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
