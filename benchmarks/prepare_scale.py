"""Preprocessing at scale: peak memory and time of the streaming preparation beside the old in-memory one.

    python benchmarks/prepare_scale.py --records N [N2 ...] [--model DIR] [--max-length L] [--eval-split F]
                                       [--seed S] [--workdir DIR] [--train-steps K] [--objective sft|dpo]

For each N:
1. Writes N short synthetic chat records (a user question of 4-12 words and an answer of 2-8 words, drawn from
   a seeded word list; ``_line`` and ``_source`` as the data stage writes them; two sources, weights 1 and 1.5, so
   the weighting runs) to DIR/clean.jsonl, streamed.
2. Prepares them twice, each in a fresh process, one after the other: the old in-memory
   ``prepare_dataset`` (tests/prepare_in_memory.py, the code before streaming) and the streaming
   ``tuneloop.data.prepare.prepare_dataset``, with the tokenizer of ``--model`` (default: SmolLM2-135M-Instruct from
   scripts/build_real_model.py). Each process reports its seconds, its RSS once the libraries are imported and the
   tokenizer has rendered and encoded one conversation (``setup_rss_mb``), and its peak RSS (``VmHWM``: the most
   it ever held, pages of memory-mapped files included) and its peak anonymous memory (``RssAnon`` sampled every
   20 ms: the heap, without the page cache that memory-mapped Arrow files add to RSS and the kernel can drop);
   ``data_rss_mb`` = peak RSS - setup RSS.
3. Checks the two outputs are identical: the token columns (Arrow contents), and every file's sha256.

With ``--train-steps K``, then trains (``train_sft``, LoRA, ``train.max_steps`` K, batch 4) the model on each
run's streamed dataset, each in a fresh process, and reports seconds and memory (setup = tokenizer loaded, before
the model): training reads the prepared set memory-mapped, by step count, so its memory should not depend on N.

``--objective dpo`` measures the preference preparation instead (``prepare_preferences``, no tokenizer: TRL
tokenizes later): N synthetic pairs (the question, a chosen and a rejected answer from the same word list), the old
in-memory code (tests/prepare_in_memory.py ``prepare_preferences_in_memory``) beside the streaming one.

Prints one JSON line. With two or more sizes, ``extrapolated_10m`` projects each path to 10 M records from the
smallest and largest runs: peak RSS along the straight line through the two peaks, time at the largest run's
seconds per record. Labelled as such: an extrapolation, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("train_records.jsonl", "eval_records.jsonl", "eval.jsonl", "dropped.jsonl", "metrics.json")
WORDS = (
    "parcel order refund invoice account password delivery address card charge late broken missing "
    "label return exchange size colour price discount coupon shipping tracking warehouse courier box "
    "store online app login email phone billing receipt subscription cancel renew upgrade plan"
).split()


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/self/status has no {field}")


def build(n: int, seed: int, path: Path, objective: str = "sft") -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {i}?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
            if objective == "dpo":
                b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
                rec = {
                    "messages": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": a}],
                    "rejected": [{"role": "assistant", "content": b + " no"}],
                    "_line": i + 1,
                    "_source": i % 2,
                }
            else:
                rec = {
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "_line": i + 1,
                    "_source": i % 2,
                }
            f.write(json.dumps(rec) + "\n")


def run_one(
    path: str, clean: Path, out: Path, model: str, max_length: int, eval_split: float, seed: int, objective: str = "sft"
) -> dict:
    """One preparation in this process (the child): its seconds, setup RSS and peak RSS."""
    sys.path.insert(0, str(ROOT / "tests"))
    from prepare_in_memory import prepare_dataset_in_memory, prepare_preferences_in_memory

    from tuneloop.config import TrainSource
    from tuneloop.data.prepare import prepare_dataset, prepare_preferences
    from tuneloop.modeling import load_tokenizer

    import datasets  # noqa: F401  (imported before the setup figure, as the tokenizer's first rendering)
    import pyarrow  # noqa: F401

    if objective == "dpo":  # no tokenizer: TRL tokenizes the pairs when it trains
        pairs = prepare_preferences_in_memory if path == "in_memory" else prepare_preferences

        def fn(tok, clean, eval_path, out, *, max_length, **kw):
            return pairs(clean, eval_path, out, **kw)

        tok = None
    else:
        tok = load_tokenizer(model)
        tok.apply_chat_template(
            [{"role": "user", "content": "warm up"}, {"role": "assistant", "content": "ok"}], tokenize=True
        )
        fn = prepare_dataset_in_memory if path == "in_memory" else prepare_dataset
    sources = [TrainSource(path="a.jsonl"), TrainSource(path="b.jsonl", weight=1.5)]
    setup, setup_anon = _rss_mb("VmRSS"), _rss_mb("RssAnon")
    peak_anon, done = [setup_anon], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _rss_mb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    metrics = fn(tok, clean, None, out, max_length=max_length, eval_split=eval_split, seed=seed, sources=sources)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {
        "seconds": round(seconds, 1),
        "setup_rss_mb": setup,
        "peak_rss_mb": _rss_mb("VmHWM"),
        "setup_anon_mb": setup_anon,
        "peak_anon_mb": max(peak_anon[0], _rss_mb("RssAnon")),
        "train_samples": metrics["train_samples"],
        "eval_samples": metrics["eval_samples"],
    }


def train_one(dataset: Path, work: Path, model: str, steps: int) -> dict:
    """``steps`` LoRA steps on a prepared dataset in this process (the child): seconds and memory."""
    import yaml

    from tuneloop.config import load_config
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.sft import train_sft

    work.mkdir(parents=True, exist_ok=True)
    (work / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    (work / "tuneloop.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "prepare-scale",
                "base_model": model,
                "method": "lora",
                "train_data": "train.jsonl",
                "batch_size": 4,
                "train": {"max_steps": steps, "save_steps": 10**6},
            }
        )
    )
    cfg = load_config(work / "tuneloop.yaml")
    tok = load_tokenizer(model)
    setup, setup_anon = _rss_mb("VmRSS"), _rss_mb("RssAnon")
    t0 = time.perf_counter()
    metrics = train_sft(cfg, dataset, work / "run", tokenizer=tok)
    return {
        "steps": metrics["steps"],
        "train_samples": metrics["train_samples"],
        "seconds": round(time.perf_counter() - t0, 1),
        "setup_rss_mb": setup,
        "setup_anon_mb": setup_anon,
        "peak_rss_mb": _rss_mb("VmHWM"),
        "anon_at_end_mb": _rss_mb("RssAnon"),
    }


def identical(a: Path, b: Path) -> dict:
    from datasets import load_from_disk

    from tuneloop.fsutil import sha256_file

    da, db = load_from_disk(str(a / "train")), load_from_disk(str(b / "train"))
    return {
        "tokens": da.features == db.features and da.data.table.equals(db.data.table),
        **{name: sha256_file(a / name) == sha256_file(b / name) for name in FILES},
    }


def default_model() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_real_model", ROOT / "scripts" / "build_real_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.real_model_dir())


def measure(n: int, args: argparse.Namespace, model: str, work: Path) -> dict:
    """Both preparations of ``n`` records, each in a fresh process; whether their outputs are identical."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build(n, args.seed, work / "clean.jsonl", args.objective)
    result = {
        "records": n,
        "clean_jsonl_mb": round((work / "clean.jsonl").stat().st_size / 2**20, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    for path in ("in_memory", "streaming"):
        cmd = [
            sys.executable,
            __file__,
            "--records",
            str(n),
            "--model",
            model,
            "--max-length",
            str(args.max_length),
            "--eval-split",
            str(args.eval_split),
            "--seed",
            str(args.seed),
            "--workdir",
            str(work),
            "--objective",
            args.objective,
            "--_path",
            path,
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        if done.returncode != 0:
            sys.exit(f"{path} preparation of {n} records failed:\n{done.stderr[-3000:]}")
        result[path] = json.loads(done.stdout.strip().splitlines()[-1])
        result[path]["data_rss_mb"] = round(result[path]["peak_rss_mb"] - result[path]["setup_rss_mb"], 1)
    same = identical(work / "in_memory", work / "streaming")
    result["identical"] = all(same.values())
    if not result["identical"]:
        result["differs"] = [k for k, v in same.items() if not v]
    return result


def extrapolate(runs: list[dict], target: int = 10_000_000) -> dict:
    small, large = runs[0], runs[-1]
    out: dict = {
        "label": f"extrapolation to {target:,} records from the {small['records']:,}- and {large['records']:,}-record runs, "
        "not a measurement"
    }
    for p in ("in_memory", "streaming"):
        for key in ("peak_rss_mb", "peak_anon_mb"):
            per_record = (large[p][key] - small[p][key]) / (large["records"] - small["records"])
            out[f"{p}_{key}_per_million_records"] = round(per_record * 1e6, 1)
            out[f"{p}_{key}"] = round(large[p][key] + per_record * (target - large["records"]))
        out[f"{p}_minutes"] = round(large[p]["seconds"] / large["records"] * target / 60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, nargs="+", required=True, help="one or more sizes, smallest first")
    ap.add_argument(
        "--model",
        default=None,
        help="tokenizer directory (default: SmolLM2-135M-Instruct, scripts/build_real_model.py)",
    )
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--eval-split", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--train-steps", type=int, default=0, help="then train this many LoRA steps on the largest streamed set"
    )
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft", help="sft (tokenised) or dpo (pairs)")
    ap.add_argument("--_path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_train", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prepare-scale-"))
    if args._train:  # the child: training on a prepared dataset
        print(json.dumps(train_one(args._train, work / "train-run", args.model, args.train_steps)))
        return
    if args._path:  # the child: one preparation
        print(
            json.dumps(
                run_one(
                    args._path,
                    work / "clean.jsonl",
                    work / args._path,
                    args.model,
                    args.max_length,
                    args.eval_split,
                    args.seed,
                    args.objective,
                )
            )
        )
        return
    import platform

    model = args.model or ("-" if args.objective == "dpo" else default_model())
    runs = [measure(n, args, model, work / str(n)) for n in sorted(args.records)]
    result = {
        "benchmark": "prepare_scale",
        "objective": args.objective,
        "model": Path(model).name,
        "max_length": args.max_length,
        "eval_split": args.eval_split,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "runs": runs,
        "identical": all(r["identical"] for r in runs),
    }
    if len(runs) > 1:
        result["extrapolated_10m"] = extrapolate(runs)
    for run in runs if args.train_steps else ():
        where = work / str(run["records"])
        cmd = [
            sys.executable,
            __file__,
            "--records",
            "0",
            "--model",
            model,
            "--train-steps",
            str(args.train_steps),
            "--workdir",
            str(where),
            "--_train",
            str(where / "streaming" / "train"),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"training on {where} failed:\n{done.stderr[-3000:]}")
        run["training"] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
