"""The demo's base model: a byte-level BPE tokenizer and a tiny Llama, pretrained on the synthetic general corpus.

Entry points: :func:`build_base_model` (the recipe ``RECOMMENDED["model"]`` / ``RECOMMENDED["pretrain"]``, run by
``scripts/build_demo_base.py`` to write the copy the package ships) and :func:`shipped_base_model` (that copy, or
``None`` when it is missing or stale). :func:`make_tokenizer` and :func:`make_model` are the pieces, also used by
tests and benchmarks for small models. Nothing is downloaded. The base model is shipped prebuilt because
pretraining on another CPU gives other weights (floating-point order differs), and the demo's margins should not
depend on the machine's pretraining (docs/benchmarks.md, "The demo's recipe").
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tuneloop.demo.corpus import IM_END, IM_START, general_corpus
from tuneloop.demo.tables import RECOMMENDED
from tuneloop.modeling import CHATML_TEMPLATE, save_tokenizer  # one ChatML definition for the project

PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

#: The seed the demo's base model is built with (the shipped one and the fallback alike).
DEMO_BASE_SEED = 0

#: The package folder that holds the prebuilt demo base model (``scripts/build_demo_base.py`` writes it).
SHIPPED_BASE_DIR = Path(__file__).resolve().parents[1] / "resources" / "demo_base"


def make_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Special tokens ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>`` (ids 0, 1, 2); eos is ``<|im_end|>``,
    pad is ``<|pad|>``, no bos. A ChatML chat template is set, so ``apply_chat_template`` works and the
    tokenizer round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_model(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 8,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    seed: int = 0,
):
    """A randomly initialised float32 ``LlamaForCausalLM`` sized for ``tokenizer`` (tied embeddings)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def build_base_model(
    out_dir: Path,
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    steps: int | None = None,
    n_docs: int | None = None,
    num_threads: int | None = None,
) -> dict:
    """Train a tokenizer and a tiny Llama on the general corpus and save both into ``out_dir``.

    Plain causal-LM pretraining (AdamW, warmup + cosine, random 128-token windows of the packed corpus),
    seeded throughout. ``steps`` / ``n_docs`` default to ``RECOMMENDED["pretrain"]`` (tests pass small
    values). ``progress(step, total)`` is called after every optimiser step. ``num_threads`` sets torch's
    intra-op threads for the duration of the call (``None``: leave them as they are).

    The directory is written next to its final place and moved in when complete, so a killed build never
    leaves a half-saved model. Besides the model and tokenizer files it holds ``tuneloop_base.json``: the
    seed, settings and the returned stats. Returns ``{"params", "steps", "seconds", "final_loss", ...}``;
    ``final_loss`` is an exponential moving average of the training loss over the last steps.
    """
    import torch

    t0 = time.perf_counter()
    pre, size = RECOMMENDED["pretrain"], RECOMMENDED["model"]
    steps = pre["steps"] if steps is None else steps
    n_docs = pre["n_docs"] if n_docs is None else n_docs
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        docs = general_corpus(n_docs, seed)
        tokenizer = make_tokenizer(docs, vocab_size=size["vocab_size"])
        model = make_model(
            tokenizer,
            hidden_size=size["hidden_size"],
            num_layers=size["num_layers"],
            num_heads=size["num_heads"],
            intermediate_size=size["intermediate_size"],
            max_position_embeddings=size["max_position_embeddings"],
            seed=seed,
        )
        stream = _token_stream(tokenizer, docs)
        final_loss = _pretrain(model, stream, seed=seed, steps=steps, progress=progress, n_docs=n_docs)
    finally:
        torch.set_num_threads(old_threads)

    stats = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": round(final_loss, 4) if final_loss is not None else None,
        "corpus_docs": n_docs,
        "corpus_tokens": len(stream),
        "vocab_size": len(tokenizer),
    }
    meta = {"seed": seed, "model": size, "pretrain": {**pre, "steps": steps, "n_docs": n_docs}, "stats": stats}
    _save(model, tokenizer, Path(out_dir), meta)
    return stats


def _token_stream(tokenizer, docs: list[str]) -> list[int]:
    """One token stream, documents separated by eos (pretraining samples random windows from it)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if not ids or ids[-1] != eos:
            stream.append(eos)
    return stream


def _pretrain(
    model, stream: list[int], *, seed: int, steps: int, progress: Callable[[int, int], None] | None, n_docs: int
) -> float | None:
    """``steps`` AdamW steps on random windows of ``stream`` (warmup, then cosine decay to a tenth of the
    learning rate); returns the exponential moving average of the loss (``None`` after no steps)."""
    import torch

    pre = RECOMMENDED["pretrain"]
    bs, seq_len, lr = pre["batch_size"], pre["seq_len"], pre["learning_rate"]
    data = torch.tensor(stream, dtype=torch.long)
    if len(data) <= seq_len + 1:
        raise ValueError(f"corpus of {n_docs} documents is too small for {seq_len}-token windows")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    ema: float | None = None
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (bs,), generator=gen).tolist()
        x = torch.stack([data[i : i + seq_len] for i in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if progress is not None:
            progress(step + 1, steps)
    model.eval()
    return ema


def _save(model, tokenizer, out_dir: Path, meta: dict[str, Any]) -> None:
    """Model, tokenizer and ``tuneloop_base.json`` (``meta``) into ``out_dir``, written next to it and moved in."""
    import shutil

    from tuneloop.fsutil import atomic_write_json, replace_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tokenizer, tmp)  # loadable by transformers 4.x as well as 5.x
    atomic_write_json(tmp / "tuneloop_base.json", {"made_by": f"{__name__}.build_base_model", **meta})
    replace_dir(tmp, out_dir)


def base_recipe(seed: int = DEMO_BASE_SEED) -> dict[str, Any]:
    """What determines the demo base model: the model size, the pretraining settings and the seed."""
    return {"model": RECOMMENDED["model"], "pretrain": RECOMMENDED["pretrain"], "seed": seed}


def shipped_base_model(base_dir: Path = SHIPPED_BASE_DIR, *, seed: int = DEMO_BASE_SEED) -> Path | None:
    """The prebuilt base model shipped in the package, or ``None`` when it is missing or stale.

    Stale means its ``tuneloop_base.json`` records another recipe than :func:`base_recipe` (someone changed
    ``RECOMMENDED`` without running ``scripts/build_demo_base.py``); the demo then builds the base itself.
    """
    meta_path = Path(base_dir) / "tuneloop_base.json"
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not meta_path.is_file() or not all((Path(base_dir) / name).is_file() for name in needed):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    made = {"model": meta.get("model"), "pretrain": meta.get("pretrain"), "seed": meta.get("seed")}
    return Path(base_dir) if made == base_recipe(seed) else None
