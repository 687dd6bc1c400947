"""Unsloth against tuneloop's transformers backend on one CUDA GPU: same model, data and config, LoRA and QLoRA.

    python benchmarks/gpu_unsloth.py --model PATH_OR_CACHED_HUB_ID [--steps 30] [--batch-size 8] [--max-length 1024]
    python benchmarks/gpu_unsloth.py --shape llama-1b            # randomly initialised weights of that shape

Each arm (``transformers-lora``, ``unsloth-lora``, ``transformers-qlora``, ``unsloth-qlora`` by default; ``--arms``
picks) trains SFT on the alpaca records of ``../shared/datasets/alpaca_en_demo.json`` (repeated to fill the steps),
prepared once, in a process of its own so that its peak memory is its own and no transformers arm runs after
``import unsloth``. Prints one JSON line: per arm ``tokens_per_s`` (non-padding tokens / seconds of ``trainer.train``),
``peak_gpu_mem_gb`` (``torch.cuda.max_memory_allocated`` in the process that trained), ``final_loss`` and
``seconds``, with the settings they share.

Differences that are the backends' own, not the benchmark's: the transformers arm packs each batch (tuneloop's
default ``train.packing``; ``--no-packing`` pads it too), the Unsloth arm pads; tuneloop's transformers backend
keeps the base weights in fp32 under bf16 autocast and, for ``method: qlora``, does not quantize the base (its
``modeling.load_causal_lm`` loads fp32 weights), where Unsloth loads a 4-bit NF4 base. ``lora_dropout`` is 0 by
default (Unsloth's fast LoRA path; ``--lora-dropout``).

Without CUDA, or with an Unsloth arm and no unsloth package, it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("transformers-lora", "unsloth-lora", "transformers-qlora", "unsloth-qlora")


def _gpu_train():
    """benchmarks/gpu_train.py (its model shapes, random-model builder and data path)."""
    spec = importlib.util.spec_from_file_location("gpu_train", HERE / "gpu_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(a, base: str, train_file: Path, arm: str):
    from tuneloop.config import build_config

    backend, method = arm.split("-")
    return build_config(
        {
            "name": "gpu-unsloth",
            "base_model": base,
            "seed": 0,
            "data": {"train_data": str(train_file), "max_length": a.max_length},
            "train": {
                "backend": backend,
                "method": method,
                "max_steps": a.steps,
                "batch_size": a.batch_size,
                "learning_rate": 1e-4,
                "lora_dropout": a.lora_dropout,
                "save_steps": 10**6,
                "packing": a.packing,
                "precision": "auto",
                "gradient_checkpointing": a.gradient_checkpointing,
            },
        }
    )


def run_arm(a) -> None:
    """One arm, in its own process: train, print its JSON line."""
    import torch

    from tuneloop.modeling import load_tokenizer

    work = Path(a.work)
    prep = json.loads((work / "prep" / "metrics.json").read_text())
    cfg = _config(a, a.base, work / "train.jsonl", a.arm)
    tok = load_tokenizer(a.base)
    if cfg.train.backend == "unsloth":
        from tuneloop.train.unsloth_backend import train_unsloth

        m = train_unsloth(cfg, work / "prep" / "train", work / a.arm, tokenizer=tok)
        peak = m["peak_gpu_mem_gb"]
    else:
        from tuneloop.train.sft import train_sft

        torch.cuda.reset_peak_memory_stats()
        m = train_sft(cfg, work / "prep" / "train", work / a.arm, tokenizer=tok)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    tokens = prep["train_tokens"] * (a.steps * a.batch_size) / prep["train_samples"]
    print(
        json.dumps(
            {
                "tokens_per_s": round(tokens / m["seconds"], 1),
                "peak_gpu_mem_gb": peak,
                "final_loss": m["final_loss"],
                "seconds": m["seconds"],
                "trainable_params": m["trainable_params"],
                "batches": "padded" if cfg.train.backend == "unsloth" or not a.packing else "packed",
                **({"unsloth_version": m["unsloth_version"]} if "unsloth_version" in m else {}),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="base model: local directory or a Hugging Face id already in the local cache")
    src.add_argument("--shape", help="random weights of a shape of benchmarks/gpu_train.py (qwen2.5-0.5b, llama-1b)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="samples per step")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True, help="the transformers arms")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        return run_arm(a)
    if not (a.model or a.shape):
        ap.error("give --model or --shape")
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if bad := [x for x in arms if x not in ARMS]:
        ap.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_unsloth.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); Unsloth trains "
            "on NVIDIA GPUs only",
            file=sys.stderr,
        )
        sys.exit(2)
    if any(x.startswith("unsloth") for x in arms) and importlib.util.find_spec("unsloth") is None:
        from tuneloop.train.unsloth_backend import INSTALL

        print(f"gpu_unsloth.py: the unsloth package is not installed: {INSTALL}", file=sys.stderr)
        sys.exit(2)

    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.modeling import load_tokenizer

    gt = _gpu_train()
    if a.shape and a.shape not in gt.SHAPES:
        ap.error(f"unknown shape {a.shape}; choose from {', '.join(sorted(gt.SHAPES))}")
    work = Path(tempfile.mkdtemp(prefix="tuneloop-unsloth-"))
    base = a.model or gt._random_model(a.shape, work / "model")
    tok = load_tokenizer(base)
    recs = json.loads(gt.ALPACA.read_text())
    lines = []
    for i in range(a.steps * a.batch_size):
        r = recs[i % len(recs)]
        user = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        lines.append(
            json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
        )
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    (work / "eval.jsonl").write_text(lines[0] + "\n")
    prep = prepare_dataset(
        tok,
        work / "train.jsonl",
        work / "eval.jsonl",
        work / "prep",
        max_length=a.max_length,
        eval_split=0.1,
        seed=0,
        train_on_inputs=False,
    )
    (work / "prep" / "metrics.json").write_text(json.dumps(prep))

    results = {}
    for arm in arms:
        cmd = [
            sys.executable,
            __file__,
            "--arm",
            arm,
            "--work",
            str(work),
            "--base",
            str(base),
            "--steps",
            str(a.steps),
            "--batch-size",
            str(a.batch_size),
            "--max-length",
            str(a.max_length),
            "--lora-dropout",
            str(a.lora_dropout),
            "--packing" if a.packing else "--no-packing",
            *(["--gradient-checkpointing"] if a.gradient_checkpointing else []),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            results[arm] = {"error": f"exit {r.returncode}", "stderr_tail": r.stderr[-2000:]}
            continue
        results[arm] = json.loads(r.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(0),
                "model": a.model or f"random:{a.shape}",
                "steps": a.steps,
                "batch_size": a.batch_size,
                "max_length": a.max_length,
                "mean_tokens": prep["mean_tokens"],
                "lora_dropout": a.lora_dropout,
                "gradient_checkpointing": a.gradient_checkpointing,
                "precision": "bf16" if torch.cuda.is_bf16_supported() else "fp32",
                "arms": results,
            }
        )
    )


if __name__ == "__main__":
    main()
