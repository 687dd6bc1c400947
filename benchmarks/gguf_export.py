"""GGUF export: does llama.cpp decode the exported file like transformers, how big is it, how fast is it?

Two models, each exported as f16 and q8_0 by tuneloop's converter (registry/gguf_export.py):

* **demo**: the shipped demo base (0.6M parameters) with a LoRA adapter trained here for 30 steps on the demo's
  ticket task, registered as ``router:1`` and exported with :func:`tuneloop.registry.gguf_export.export_gguf`
  (the adapter merged into its base, as ``tuneloop models export router:1 OUT --format gguf`` does);
* **real**: SmolLM2-135M-Instruct (``scripts/build_real_model.py``), converted with ``write_gguf`` (the same
  converter, without copying the 538 MB model into a registry).

For each prompt (chat-formatted, greedy, up to ``--tokens`` new tokens, stopping at EOS) it measures:

* ``exact``: prompts whose whole greedy continuation from llama.cpp equals transformers';
* ``token_agreement``: llama.cpp's argmax after each prefix of transformers' own greedy continuation (teacher
  forced), as a fraction of all continuation tokens: how often the two pick the same token from the same text;
* ``ms_per_token``: wall time of greedy generation (prompt included) per generated token, llama.cpp
  (llama-cpp-python, 2 threads) and transformers (PyTorch float32, ``generate``, 2 threads), same prompts, same
  machine, one after the other, each after a short untimed warm-up; ``speedup`` = transformers / llama.cpp.

Last line: one JSON object. Run it alone on the machine (it is CPU-bound):

    flock /tmp/tuneloop-cpu.lock python benchmarks/gguf_export.py [--tokens 32] [--skip-real]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tuneloop.demo.base_model import shipped_base_model
from tuneloop.demo.tickets import task_records
from tuneloop.modeling import load_causal_lm, load_tokenizer, save_tokenizer
from tuneloop.registry.gguf_export import export_gguf, write_gguf
from tuneloop.registry.ops import register_directory
from tuneloop.registry.sqlite import SqliteRegistry

REPO = Path(__file__).resolve().parents[1]
REAL_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a neural network is in one sentence.",
    "How many legs does a spider have?",
    "Give me a tip for learning a new language.",
    "What is 17 times 3?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
]


def train_adapter(base: Path, out: Path, steps: int = 30) -> Path:
    """A LoRA adapter on every projection, trained for a few steps on the demo's ticket task (as the test does)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tok = load_tokenizer(str(base))
    model = get_peft_model(
        load_causal_lm(str(base)),
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in task_records(240, seed=7, split="train")]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        batch = tok(
            texts[8 * step % len(texts) :][:8], return_tensors="pt", padding=True, truncation=True, max_length=128
        )
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def chat_ids(tok, conversations) -> list[list[int]]:
    return [
        tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        for c in conversations
    ]


def hf_greedy(model, tok, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return out[0, len(ids) :].tolist()


def llama_greedy(llm, ids: list[int], eos: int, n: int) -> list[int]:
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if t == eos or len(out) == n:
            break
    return out


def compare(model, tok, gguf_path: Path, prompts: list[list[int]], n: int, hf: dict | None) -> tuple[dict, dict]:
    """Agreement and speed of one GGUF file against transformers (whose runs are done once and passed back in)."""
    from llama_cpp import Llama

    if hf is None:
        hf_greedy(model, tok, prompts[0], 2)  # warm-up, not timed
        hf_model_t0 = time.perf_counter()
        conts = [hf_greedy(model, tok, ids, n) for ids in prompts]
        hf = {"conts": conts, "seconds": time.perf_counter() - hf_model_t0, "tokens": sum(map(len, conts))}
    timed = Llama(model_path=str(gguf_path), n_ctx=256, seed=0, n_threads=2, verbose=False)
    llama_greedy(timed, prompts[0], tok.eos_token_id, 2)  # warm-up, not timed
    t0 = time.perf_counter()
    got = [llama_greedy(timed, ids, tok.eos_token_id, n) for ids in prompts]
    llama_s = time.perf_counter() - t0
    del timed
    scorer = Llama(model_path=str(gguf_path), n_ctx=256, seed=0, n_threads=2, verbose=False, logits_all=True)
    agree = total = 0
    for ids, cont in zip(prompts, hf["conts"], strict=True):
        scorer.reset()
        scorer.eval(ids + cont)
        pred = np.asarray(scorer.scores[len(ids) - 1 : len(ids) + len(cont) - 1]).argmax(-1)
        agree += int((pred == np.asarray(cont)).sum())
        total += len(cont)
    del scorer
    llama_tokens = sum(map(len, got))
    row = {
        "bytes": gguf_path.stat().st_size,
        "exact": f"{sum(g == c for g, c in zip(got, hf['conts'], strict=True))}/{len(prompts)}",
        "token_agreement": round(agree / total, 4),
        "tokens_compared": total,
        "ms_per_token_llama_cpp": round(1000 * llama_s / llama_tokens, 3),
        "ms_per_token_transformers": round(1000 * hf["seconds"] / hf["tokens"], 3),
    }
    row["speedup"] = round(row["ms_per_token_transformers"] / row["ms_per_token_llama_cpp"], 2)
    return row, hf


def demo_figures(work: Path, n: int) -> dict:
    base = shipped_base_model()
    if base is None:
        raise SystemExit("the shipped demo base is missing or stale (scripts/build_demo_base.py)")
    adapter = train_adapter(base, work / "router-lora")
    reg = SqliteRegistry(work / "ws")
    register_directory(reg, adapter, "router", base=str(base))
    tok = load_tokenizer(str(adapter))
    merged = load_causal_lm(str(base), adapter=str(adapter)).merge_and_unload()
    convs = [r["messages"][:-1] for r in task_records(8, seed=11, split="eval")]
    convs += [
        [{"role": "user", "content": q}]
        for q in ("How do I reset my password?", "Tell me about the weather in spring.")
    ]
    prompts = chat_ids(tok, convs)
    out, hf = {"params": sum(p.numel() for p in merged.parameters()), "prompts": len(prompts)}, None
    for quant in ("f16", "q8_0"):
        t0 = time.perf_counter()
        res = export_gguf(reg, "router:1", work / f"demo-{quant}", quant=quant)
        export_s = time.perf_counter() - t0
        out[quant], hf = compare(merged, tok, Path(res["path"]) / res["file"], prompts, n, hf)
        out[quant]["export_seconds"] = round(export_s, 2)
    return out


def real_figures(work: Path, n: int) -> dict:
    spec = importlib.util.spec_from_file_location("build_real_model", REPO / "scripts" / "build_real_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = mod.real_model_dir()
    model, tok = load_causal_lm(str(d)), load_tokenizer(str(d))
    prompts = chat_ids(tok, [[{"role": "user", "content": q}] for q in REAL_QUESTIONS])
    out, hf = (
        {
            "params": sum(p.numel() for p in model.parameters()),
            "prompts": len(prompts),
            "source_bytes": (d / "model.safetensors").stat().st_size,
        },
        None,
    )
    for quant in ("f16", "q8_0"):
        t0 = time.perf_counter()
        write_gguf(model, tok, work / f"smollm2.{quant}.gguf", quant=quant, name="smollm2")
        convert_s = time.perf_counter() - t0
        out[quant], hf = compare(model, tok, work / f"smollm2.{quant}.gguf", prompts, n, hf)
        out[quant]["convert_seconds"] = round(convert_s, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    ap.add_argument("--skip-real", action="store_true", help="only the demo model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import llama_cpp

    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        work = Path(tmp)
        result = {
            "benchmark": "gguf_export",
            "tokens": args.tokens,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "llama_cpp_python": llama_cpp.__version__,
            "torch": torch.__version__,
            "demo": demo_figures(work, args.tokens),
        }
        if not args.skip_real:
            result["real"] = real_figures(work, args.tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
