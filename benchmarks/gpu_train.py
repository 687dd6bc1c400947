"""Training throughput and MFU of tuneloop's training stage on a CUDA GPU, with a realistic config.

    python benchmarks/gpu_train.py --model PATH_OR_CACHED_HUB_ID [--method lora|full] [--steps 30]
    python benchmarks/gpu_train.py --shape qwen2.5-0.5b   # randomly initialised weights of that shape

Trains with ``tuneloop.train.sft.train_sft`` (bf16 where supported, packing on, data.max_length 2048) on the
alpaca records of ``../shared/datasets/alpaca_en_demo.json`` (repeated to fill the steps), and prints one JSON
line: ``tokens_per_s`` (non-padding tokens / wall time of the training loop), ``mfu`` and how it was counted.

MFU = achieved FLOP/s / peak dense bf16 FLOP/s of the GPU (``--peak-tflops``; default from a small table of
known GPUs). Achieved FLOPs per token: ``6 N`` for full fine-tuning, ``4 N`` for LoRA (no weight gradients for
the frozen base; the adapter's own FLOPs are negligible), plus causal attention ``6 * layers * hidden * L``
(full) or ``4 * ...`` (LoRA) per token for samples of mean length ``L``; N excludes the embedding matrix.
Without CUDA it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"

# Peak dense bf16 tensor-core TFLOP/s (vendor figures, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}

SHAPES = {
    # Qwen2.5-0.5B-like: 24 layers, hidden 896, 14 heads (2 KV), MLP 4864, vocab 151936.
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
    ),
}


def _peak(name: str, given: float | None) -> float | None:
    if given:
        return given
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def _random_model(shape: str, out: Path) -> str:
    """A randomly initialised Llama of a known shape with a locally trained tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneloop.demo.base_model import make_tokenizer

    recs = json.loads(ALPACA.read_text())
    tok = make_tokenizer([r["instruction"] + " " + r["output"] for r in recs], vocab_size=4096)
    cfg = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="base model: local directory or a Hugging Face id already in the local cache")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16, help="samples per step")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of this GPU (default: known table)")
    a = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_train.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
            "on the CPU use benchmarks/packing_speed.py",
            file=sys.stderr,
        )
        sys.exit(2)

    from transformers import TrainerCallback

    from tuneloop.config import build_config
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.sft import train_sft

    work = Path(tempfile.mkdtemp(prefix="tuneloop-gpu-"))
    base = a.model or _random_model(a.shape, work / "model")
    tok = load_tokenizer(base)
    recs = json.loads(ALPACA.read_text())
    need = a.steps * a.batch_size
    lines = []
    for i in range(need):
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

    class Timer(TrainerCallback):
        t0 = wall = 0.0

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.t0

    cfg = build_config(
        {
            "name": "gpu-bench",
            "base_model": base,
            "seed": 0,
            "data": {"train_data": str(work / "train.jsonl"), "max_length": a.max_length},
            "train": {
                "method": a.method,
                "max_steps": a.steps,
                "batch_size": a.batch_size,
                "learning_rate": 1e-4,
                "save_steps": 10**6,
                "packing": a.packing,
                "precision": "auto",
                "gradient_checkpointing": a.gradient_checkpointing,
            },
        }
    )
    timer = Timer()
    m = train_sft(cfg, work / "prep" / "train", work / "run", tokenizer=tok, callbacks=[timer])

    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(base)
    h, layers = mc.hidden_size, mc.num_hidden_layers
    n_params = m["total_params"] - mc.vocab_size * h * (1 if getattr(mc, "tie_word_embeddings", False) else 2)
    n_params += mc.vocab_size * h  # the LM head matmul is real work; the embedding lookup is not
    tokens = prep["train_tokens"] * (a.steps * a.batch_size) / prep["train_samples"]
    mean_len = prep["mean_tokens"]
    k = 6 if a.method == "full" else 4
    flops_per_token = k * n_params + k * layers * h * mean_len  # causal attention: half of 2 * 2 * L * h, fwd+bwd
    tps = tokens / timer.wall
    gpu = torch.cuda.get_device_name(0)
    peak = _peak(gpu, a.peak_tflops)
    out = {
        "gpu": gpu,
        "model": a.model or f"random:{a.shape}",
        "method": a.method,
        "packing": a.packing,
        "precision": "bf16" if torch.cuda.is_bf16_supported() else "fp32",
        "steps": a.steps,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "mean_tokens": mean_len,
        "tokens_per_s": round(tps, 1),
        "seconds": round(timer.wall, 2),
        "tflops": round(tps * flops_per_token / 1e12, 2),
        "peak_tflops": peak,
        "mfu": round(tps * flops_per_token / (peak * 1e12), 4) if peak else None,
        "flops_per_token": flops_per_token,
        "final_loss": m["final_loss"],
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
