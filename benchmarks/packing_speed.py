"""Training throughput: tuneloop's packed, padding-free batches vs a plain transformers Trainer with dynamic
padding, on the same tiny model, the same variable-length data, the same samples per step.

    python benchmarks/packing_speed.py [--samples 320] [--epochs 2] [--batch-size 16] [--max-length 1024]

What is compared (both in their own subprocess, so peak RSS is each one's own):

* ``tuneloop``: ``tuneloop.train.sft.train_sft`` (the training stage itself) with ``train.packing: true`` —
  each batch's samples are packed best-fit-decreasing into rows of ``data.max_length`` tokens, position ids
  restart per sample, no attention across samples.
* ``baseline``: ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (pad each batch to its longest sample),
  the usual recipe.

Both train the same saved tiny Llama (full fine-tuning, so nothing but the batching differs) on the same
tokenized dataset (real lengths: ``../shared/datasets/alpaca_en_demo.json`` through tuneloop's own
preprocessing and a BPE tokenizer trained on it), with the same seed, learning rate, schedule, epochs and
``batch_size`` *samples* per step: the Trainer's seeded sampler gives both the same samples in each step, so
their losses must agree, and the only difference is the padding. ``tokens_per_s`` counts non-padding tokens
(sum of sample lengths x epochs / wall time of the training loop, timed by the same callback) for both;
``cpu_speedup`` is the ratio of the loops' CPU seconds, which a busy shared machine distorts less. ``final_loss`` is the mean training loss
over the last epoch's steps, for both.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"


def _records(n: int) -> list[dict]:
    recs = json.loads(ALPACA.read_text(encoding="utf-8"))[:n]
    out = []
    for r in recs:
        user = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
    return out


def build(work: Path, a: argparse.Namespace) -> dict:
    """Tokenizer, tiny model and the tokenized dataset, made once and shared by both workers."""
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.demo.base_model import make_model, make_tokenizer

    recs = _records(a.samples)
    texts = [m["content"] for r in _records(10_000) for m in r["messages"]]
    tok = make_tokenizer(texts, vocab_size=2048)
    model = make_model(
        tok,
        hidden_size=a.hidden,
        num_layers=a.layers,
        num_heads=4,
        intermediate_size=a.hidden * 4,
        max_position_embeddings=a.max_length,
        seed=0,
    )
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in recs))
    eval_file = work / "eval.jsonl"
    eval_file.write_text(json.dumps(recs[0]) + "\n")
    metrics = prepare_dataset(tok, train, eval_file, work / "prep", max_length=a.max_length, eval_split=0.1, seed=0)
    return metrics


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _timer():
    """A callback timing exactly the training loop (on_train_begin .. on_train_end): wall and CPU seconds."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        wall = cpu = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kw):
            self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0

    return Timer()


def _last_epoch_mean(losses: list[float], steps_per_epoch: int) -> float:
    tail = losses[-steps_per_epoch:]
    return round(sum(tail) / len(tail), 5)


def worker_tuneloop(work: Path, a: argparse.Namespace) -> dict:
    from datasets import load_from_disk

    from tuneloop.config import build_config
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.sft import train_sft

    cfg = build_config(
        {
            "name": "bench",
            "base_model": str(work / "model"),
            "seed": a.seed,
            "data": {"train_data": str(work / "train.jsonl"), "max_length": a.max_length},
            "train": {
                "method": "full",
                "learning_rate": a.lr,
                "num_epochs": a.epochs,
                "batch_size": a.batch_size,
                "save_steps": 100_000,
                "packing": True,
                "lr_scheduler": "linear",
            },
        }
    )
    tok = load_tokenizer(str(work / "model"))
    ds = load_from_disk(str(work / "prep" / "train"))
    timer = _timer()
    m = train_sft(cfg, work / "prep" / "train", work / "tuneloop-run", tokenizer=tok, callbacks=[timer])
    losses = [json.loads(x)["loss"] for x in (work / "tuneloop-run" / "train_metrics.jsonl").read_text().splitlines()]
    tokens = sum(len(x) for x in ds["input_ids"]) * a.epochs
    return {
        "tokens": tokens,
        "seconds": round(timer.wall, 2),
        "cpu_seconds": round(timer.cpu, 2),
        "steps": m["steps"],
        "losses": losses,
        "peak_rss_mb": _peak_rss_mb(),
    }


def worker_baseline(work: Path, a: argparse.Namespace) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    ds = load_from_disk(str(work / "prep" / "train"))
    tok = AutoTokenizer.from_pretrained(work / "model")
    set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model.config.use_cache = False
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    steps = math.ceil(len(ds) / a.batch_size) * a.epochs
    args = TrainingArguments(
        output_dir=str(work / "baseline-run"),
        per_device_train_batch_size=a.batch_size,
        max_steps=steps,
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        seed=a.seed,
        data_seed=a.seed,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    timer = _timer()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        callbacks=[Losses(), timer],
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    tokens = sum(len(x) for x in ds["input_ids"]) * a.epochs
    return {
        "tokens": tokens,
        "seconds": round(timer.wall, 2),
        "cpu_seconds": round(timer.cpu, 2),
        "steps": steps,
        "losses": losses,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=320, help="alpaca records to train on")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="samples per step, both ways")
    ap.add_argument("--max-length", type=int, default=1024, help="data.max_length = packed row length")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["tuneloop", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        fn = worker_tuneloop if a.worker == "tuneloop" else worker_baseline
        print(json.dumps(fn(a.work, a)))
        return

    if not ALPACA.is_file():
        sys.exit(f"dataset not found: {ALPACA}")
    work = Path(tempfile.mkdtemp(prefix="tuneloop-packing-"))
    prep = build(work, a)
    print(
        f"data: {prep['train_samples']} samples, {prep['train_tokens']} tokens (mean {prep['mean_tokens']}, "
        f"{prep['truncated']} truncated at {a.max_length}); batch {a.batch_size} samples/step, {a.epochs} epochs",
        flush=True,
    )
    results = {}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("worker", "work")]
    for name in ("tuneloop", "baseline"):
        r = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--work", str(work), *passthrough],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            sys.exit(f"{name} worker failed:\n{r.stderr[-4000:]}")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        res = results[name]
        print(
            f"{name:9s} {res['tokens'] / res['seconds']:9.0f} tokens/s  {res['seconds']:7.1f} s ({res['cpu_seconds']:.1f} s CPU)  {res['steps']} steps  "
            f"peak RSS {res['peak_rss_mb']} MB",
            flush=True,
        )
    steps_per_epoch = math.ceil(prep["train_samples"] / a.batch_size)
    t, b = results["tuneloop"], results["baseline"]
    out = {
        "tokens_per_s": round(t["tokens"] / t["seconds"], 1),
        "baseline_tokens_per_s": round(b["tokens"] / b["seconds"], 1),
        "speedup": round((t["tokens"] / t["seconds"]) / (b["tokens"] / b["seconds"]), 2),
        # CPU seconds of the training loop: the same comparison, less distorted when the machine is shared.
        "cpu_speedup": round(b["cpu_seconds"] / t["cpu_seconds"], 2),
        "final_loss": _last_epoch_mean(t["losses"], steps_per_epoch),
        "baseline_final_loss": _last_epoch_mean(b["losses"], steps_per_epoch),
        "max_step_loss_diff": round(max(abs(x - y) for x, y in zip(t["losses"], b["losses"], strict=True)), 6),
        "peak_rss_mb": t["peak_rss_mb"],
        "baseline_peak_rss_mb": b["peak_rss_mb"],
        "samples": prep["train_samples"],
        "tokens_per_epoch": prep["train_tokens"],
        "batch_size": a.batch_size,
        "epochs": a.epochs,
        "max_length": a.max_length,
    }
    out["loss_rel_diff"] = round(abs(out["final_loss"] - out["baseline_final_loss"]) / out["baseline_final_loss"], 5)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
