"""``train.backend: mlx`` against tuneloop's transformers backend on the demo's task, on this machine, in one run.

    PYTHONPATH=src python benchmarks/mlx_backend.py [--workdir /tmp/mlx-bench] [--max-steps N] [--lock /tmp/tuneloop-cpu.lock]

The task is ``tuneloop demo``'s first iteration: the shipped demo base model (Llama, hidden 128, 2 layers, vocabulary
2048), its ticket-routing data (1920 tickets + 960 general chats, 120 held-out tickets) and its config (LoRA r 16 on
every linear layer, 2 epochs at batch 16, learning rate 3e-3, the demo's gates: accuracy >= 0.85, harmful rate,
capability drop <= 0.02). The whole pipeline runs (``use_cache=False``: data checks, preprocessing, training,
evaluation gates, registry; no deployment) three times, all with the same seed:

* ``transformers``: the default backend as users get it (packed, padding-free batches);
* ``transformers_padded``: the same with ``train.packing: false`` (right-padded batches, as MLX trains);
* ``mlx``: ``train.backend: mlx`` (mlx-lm's model and LoRA layers; on Linux ``mlx[cpu]``).

All three train on the same samples per step; the transformers runs and MLX start from different LoRA A matrices
(PEFT's and mlx-lm's init, same distribution), so their losses agree at step 1 and then differ by what the init
and the dropout masks do. Per run: pipeline and training seconds, first / final loss (the last step's, and the mean
over the last 20 steps), the evaluation's accuracy and capability drop, and each gate's verdict. ``--lock``: take
this file lock around each run (the shared-machine convention), not around the whole script. The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import time
from pathlib import Path


@contextlib.contextmanager
def locked(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def machine() -> str:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} vCPU {cpu}, no GPU used"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "mlx", "mlx-lm"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def run(config: Path, overrides: list[str]) -> dict:
    from tuneloop.config import load_config
    from tuneloop.pipeline import FineTunePipeline

    t0 = time.perf_counter()
    summary = FineTunePipeline(load_config(config, overrides), use_cache=False).run()
    seconds = time.perf_counter() - t0
    st = summary["stages"]
    train = st["training"]["metrics"]
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "train_metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    ev = st["evaluation"]["metrics"]
    gates = ev.get("gates", {})
    return {
        "overall": summary["overall"],
        "pipeline_seconds": round(seconds, 1),
        "training_seconds": round(st["training"]["duration_s"], 1),
        "steps": train.get("steps"),
        "first_loss": round(losses[0], 6),
        "final_loss": round(losses[-1], 6),
        "final_loss_mean_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 6),
        "accuracy": ev.get("accuracy"),
        "capability_drop": ev.get("capability_drop"),
        "gates": {name: g.get("verdict") for name, g in gates.items()},
        "losses": losses,
    }


def main() -> None:
    from rich.console import Console

    from tuneloop.demo.quick import DEMO_SEED, build_base, write_config, write_demo_data
    from tuneloop.demo.tables import RECOMMENDED

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-bench"))
    ap.add_argument("--max-steps", type=int, default=None, help="cut training short (the demo recipe: 350 steps)")
    ap.add_argument("--lock", default=None, help="take this file lock around each run")
    args = ap.parse_args()
    t0 = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    build_base(workdir, Console(stderr=True))
    write_demo_data(
        workdir / "data", n_train=RECOMMENDED["data"]["n_train"], n_eval=RECOMMENDED["data"]["n_eval"], seed=DEMO_SEED
    )
    config = write_config(workdir)
    common = ["deploy.auto_deploy=false"] + ([f"train.max_steps={args.max_steps}"] if args.max_steps else [])
    runs = {"transformers": [], "transformers_padded": ["train.packing=false"], "mlx": ["train.backend=mlx"]}
    result: dict = {"machine": machine(), "versions": versions(), "task": "tuneloop demo, iteration 1"}
    for name, extra in runs.items():
        with locked(args.lock):
            result[name] = run(config, common + extra)
    ref, mlx = result["transformers_padded"].pop("losses"), result["mlx"].pop("losses")
    result["transformers"].pop("losses")
    diffs = [abs(a - b) / a for a, b in zip(ref, mlx, strict=True)]
    result["mlx_vs_padded_loss"] = {
        "step_1_abs_diff": abs(ref[0] - mlx[0]),
        "mean_rel_diff": round(sum(diffs) / len(diffs), 4),
        "mean_last_20_rel_diff": round(abs(sum(ref[-20:]) - sum(mlx[-20:])) / sum(ref[-20:]), 4),
    }
    result["mlx_training_slowdown_vs_transformers"] = round(
        result["mlx"]["training_seconds"] / result["transformers"]["training_seconds"], 2
    )
    result["mlx_training_slowdown_vs_padded"] = round(
        result["mlx"]["training_seconds"] / result["transformers_padded"]["training_seconds"], 2
    )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
