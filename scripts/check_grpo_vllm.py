"""GPU check: GRPO with vLLM generating the completions (``train.use_vllm: true``, colocated), against the same
run generating with transformers, on one CUDA GPU.

    python scripts/check_grpo_vllm.py --model PATH [--steps 10] [--workdir /tmp/grpo-vllm]

``PATH`` is a local chat model directory (the GPU machine has no hub access; e.g. SmolLM2-135M-Instruct built by
``scripts/build_real_model.py`` and copied over). The data are the demo's support tickets (their label is the
reference), the reward is ``{metric: exact}``, LoRA, ``--steps`` steps of 4 prompts x 4 completions. Each run goes
through ``tuneloop``'s pipeline (preflight, training, gates not required to pass: ``min_accuracy: 0``). Prints one
JSON line: per mode, the training stage's seconds, seconds per step, the first and last mean reward, and whether it
completed. Without CUDA or without the ``vllm`` package it exits with status 2 and says so. Not run in CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/grpo-vllm"))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("check_grpo_vllm: needs a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    if importlib.util.find_spec("vllm") is None:
        print("check_grpo_vllm: needs the vllm package (pip install vllm)", file=sys.stderr)
        return 2
    import yaml

    from tuneloop.demo.quick import write_demo_data
    from tuneloop.pipeline import FineTunePipeline

    out: dict = {"gpu": torch.cuda.get_device_name(0), "steps": args.steps}
    for mode, use_vllm in (("transformers", False), ("vllm", True)):
        work = args.workdir / mode
        work.mkdir(parents=True, exist_ok=True)
        write_demo_data(work / "data", n_train=200, n_eval=40, seed=0)
        cfg = {
            "name": f"grpo-{mode}",
            "base_model": args.model,
            "seed": 0,
            "data": {"train_data": "data/train.jsonl", "eval_data": "data/eval.jsonl", "max_length": 256},
            "train": {
                "objective": "grpo",
                "rewards": [{"metric": "exact"}],
                "method": "lora",
                "lora_r": 16,
                "lora_alpha": 32,
                "learning_rate": 1e-4,
                "max_steps": args.steps,
                "batch_size": 4,
                "num_generations": 4,
                "max_completion_length": 16,
                "use_vllm": use_vllm,
            },
            "eval": {"max_new_tokens": 8, "max_eval_samples": 40, "suites": ["task"]},
            "gates": {"min_accuracy": 0.0},
            "deploy": {"auto_deploy": False},
        }
        path = work / "tuneloop.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.perf_counter()
        try:
            pipe = FineTunePipeline(str(path))
            pipe.preflight()
            summary = pipe.run()
        except Exception as exc:  # noqa: BLE001 - a check reports what failed
            out[mode] = {"completed": False, "error": f"{type(exc).__name__}: {exc}"}
            continue
        train = summary["stages"].get("training", {})
        m = train.get("metrics", {})
        seconds = train.get("duration_s") or (time.perf_counter() - t0)
        out[mode] = {
            "completed": train.get("status") == "passed",
            "error": train.get("error") or None,
            "training_s": round(seconds, 1),
            "s_per_step": round(seconds / args.steps, 2),
            "first_reward": m.get("first_reward"),
            "final_reward": m.get("final_reward"),
        }
    print(json.dumps(out))
    return 0 if all(out[m].get("completed") for m in ("transformers", "vllm")) else 1


if __name__ == "__main__":
    sys.exit(main())
