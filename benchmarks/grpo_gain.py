"""GRPO with a verifiable reward: held-out accuracy of a mediocre starting model before -> after, on the CPU.

The task is the demo's ticket routing (ticket -> one of six labels). The starting model is the demo's tiny base
model (``resources/demo_base``) after a brief SFT run (``--sft-steps`` LoRA steps: it has learnt the labels but
routes many tickets wrongly), registered as ``router:1``. The GRPO run continues from that version
(``base_model: router@champion``) on the training tickets' prompts with one reward, the task metric
(``train.rewards: [{metric: exact}]``, the code the task gate scores with), and its evaluation stage measures both
models on the same 120 held-out tickets, which no training record repeats: ``before`` is the SFT version's
accuracy, ``after`` the GRPO candidate's. The capability gate (``max_capability_drop: 0.02``, next-token
accuracy on held-out general text, against the SFT version) is part of that evaluation.

    python benchmarks/grpo_gain.py [--workdir DIR] [--sft-steps N] [--grpo-steps N] [--seed S]

Prints a few lines and ends with one JSON line: ``before``, ``after``, ``gain``, ``seconds`` (the whole benchmark:
both runs, evaluations included), ``grpo_train_seconds``, ``reward_curve`` (the mean exact-match reward of each
GRPO step's completions) and ``capability_gate`` (the verdict with its figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml


def write_configs(root: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    """The SFT config (the starting point) and the GRPO config (continuing from its registered version)."""
    from tuneloop.demo.tables import RECOMMENDED

    lora = RECOMMENDED["lora"]
    common = {
        "seed": a.seed,
        "eval": {"max_new_tokens": 8, "general_text": "data/general.txt", "suites": ["task", "general_text"]},
    }
    sft = {
        "name": "router",
        "base_model": "./base-model",
        **common,
        "data": {"train_data": "data/train.jsonl", "eval_data": "data/eval.jsonl", "max_length": lora["max_length"]},
        "train": {
            "method": "lora",
            "lora_r": lora["lora_r"],
            "lora_alpha": lora["lora_alpha"],
            "lora_dropout": lora["lora_dropout"],
            "learning_rate": lora["learning_rate"],
            "batch_size": lora["batch_size"],
            "max_steps": a.sft_steps,
        },
        "gates": {"min_accuracy": 0.0, "max_capability_drop": 1.0},
        "deploy": {"auto_deploy": True},
    }
    grpo = {
        "name": "router-grpo",
        "base_model": "router@champion",
        **common,
        "data": {"train_data": "data/tickets.jsonl", "eval_data": "data/eval.jsonl", "max_length": lora["max_length"]},
        "train": {
            "objective": "grpo",
            "rewards": [{"metric": "exact"}],
            "method": "lora",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "learning_rate": a.grpo_lr,
            "batch_size": a.prompts,
            "num_generations": a.generations,
            "max_completion_length": 6,
            "temperature": 1.0,
            "grpo_beta": a.grpo_beta,
            "max_steps": a.grpo_steps,
            "save_steps": 1000,
        },
        "gates": {"min_accuracy": 0.0, "max_capability_drop": 0.02},
    }
    paths = root / "sft.yaml", root / "grpo.yaml"
    for path, cfg in zip(paths, (sft, grpo), strict=True):
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def run(path: Path) -> dict:
    from tuneloop import FineTunePipeline, load_config

    summary = FineTunePipeline(load_config(path)).run()
    failed = {k: v["error"] for k, v in summary["stages"].items() if v["status"] == "failed"}
    blocked_by_gate = set(failed) == {"evaluation"}
    if failed and not blocked_by_gate:
        sys.exit(f"{path.name}: {failed}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None, help="workspace (default: a fresh temp dir)")
    ap.add_argument("--sft-steps", type=int, default=80, help="LoRA SFT steps of the starting model (16 records each)")
    ap.add_argument("--grpo-steps", type=int, default=450)
    ap.add_argument("--grpo-lr", type=float, default=1e-3)
    ap.add_argument("--grpo-beta", type=float, default=0.04, help="KL coefficient against the SFT version (0: none)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    t0 = time.perf_counter()
    from rich.console import Console

    from tuneloop.demo.quick import build_base, write_demo_data
    from tuneloop.demo.tables import RECOMMENDED
    from tuneloop.demo.tickets import task_records

    root = a.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-grpo-"))
    if (root / ".tuneloop").exists():
        shutil.rmtree(root / ".tuneloop")
    root.mkdir(parents=True, exist_ok=True)
    build_base(root, Console(stderr=True))
    n_train, n_eval = RECOMMENDED["data"]["n_train"], RECOMMENDED["data"]["n_eval"]
    write_demo_data(root / "data", n_train=n_train, n_eval=n_eval, seed=a.seed)
    # GRPO's prompts: the training tickets alone (the general chat of the SFT mix has no verifiable answer).
    tickets = task_records(n_train, a.seed, split="train")
    (root / "data" / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tickets))
    sft_path, grpo_path = write_configs(root, a)

    t_sft = time.perf_counter()
    sft = run(sft_path)
    sft_s = time.perf_counter() - t_sft
    sft_ev = sft["stages"]["evaluation"]["metrics"]
    print(
        f"SFT {a.sft_steps} steps: held-out accuracy {sft_ev['accuracy']} (base model {sft_ev['base_accuracy']}), {sft_s:.0f} s",
        file=sys.stderr,
    )

    t_grpo = time.perf_counter()
    grpo = run(grpo_path)
    grpo_s = time.perf_counter() - t_grpo
    st = grpo["stages"]
    ev, tr = st["evaluation"]["metrics"], st["training"]["metrics"]
    run_dir = root / ".tuneloop" / "runs" / grpo["run_id"]
    rows = [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines() if x.strip()]
    cap = ev["gates"]["max_capability_drop"]
    seconds = time.perf_counter() - t0
    print(
        f"GRPO {a.grpo_steps} steps ({a.prompts} prompts x {a.generations} completions): accuracy {ev['base_accuracy']} -> "
        f"{ev['accuracy']}; capability gate {cap['verdict']} (drop {cap['value']}, interval {cap['interval']}); {grpo_s:.0f} s",
        file=sys.stderr,
    )
    print(
        f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, python {platform.python_version()}",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "before": ev["base_accuracy"],
                "after": ev["accuracy"],
                "gain": round(ev["accuracy"] - ev["base_accuracy"], 4),
                "eval_items": ev["eval_items"],
                "against": ev.get("against"),
                "sft_version_accuracy": sft_ev["accuracy"],
                "seconds": round(seconds, 1),
                "sft_run_seconds": round(sft_s, 1),
                "grpo_run_seconds": round(grpo_s, 1),
                "grpo_train_seconds": tr["seconds"],
                "grpo_steps": tr["steps"],
                "prompts_per_step": a.prompts,
                "num_generations": a.generations,
                "reward_curve": [round(r["rewards/exact/mean"], 3) for r in rows],
                "final_completion_length": tr.get("final_completion_length"),
                "capability_gate": {
                    "verdict": cap["verdict"],
                    "drop": cap["value"],
                    "interval": cap["interval"],
                    "threshold": cap["threshold"],
                },
                "overall": grpo["overall"],
                "version": st["model_registry"]["metrics"].get("version")
                if st["model_registry"]["status"] == "passed"
                else None,
                "workdir": str(root),
            }
        )
    )


if __name__ == "__main__":
    main()
