"""Loading models and tokenizers, chat templates, and batched greedy generation.

Shared by preprocessing (templates), training (loading the base), evaluation and serving (generation), so
that every stage renders prompts and decodes answers the same way.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from tuneloop.errors import InputError, StageError

log = logging.getLogger("tuneloop")
# Our own Rich progress and logs replace the libraries' tqdm bars and advisory chatter.
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# Used when neither the config nor the tokenizer supplies a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_tokenizer(name: str, chat_template: str | None = None):
    """The base model's tokenizer, with a chat template and a pad token guaranteed."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot load a tokenizer from base_model {name!r}: {exc}. "
            "Point base_model at a local model directory or a Hugging Face id in the local cache."
        ) from None
    if chat_template:
        tok.chat_template = chat_template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_causal_lm(path: str, *, adapter: str | None = None, dtype: torch.dtype = torch.float32):
    """A causal LM from a directory (or cached hub id), optionally with a LoRA adapter applied on top.

    Safetensors only (``use_safetensors=True``): pickle checkpoints (``pytorch_model.bin``) are refused,
    because unpickling can run arbitrary code.
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {path!r}: {exc}") from None
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_model.safetensors").is_file():
            raise InputError(f"adapter {adapter} has no adapter_model.safetensors; tuneloop loads safetensors adapters only")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def stop_token_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for special in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(special) if special in tok.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(ids)


def render_prompt(tok, messages: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------ text cut at a token limit
# Byte-level tokenizers (GPT-2 style BPE: Llama 3, Qwen, SmolLM; SentencePiece with byte fallback) split a
# multi-byte character (CJK, emoji) over several tokens. Generation that stops between them (max_new_tokens,
# max_tokens) leaves an incomplete UTF-8 sequence at the end, which decode() turns into U+FFFD.


def decode_text(tok, ids: list[int]) -> str:
    """``tok.decode(ids, skip_special_tokens=True)`` without a broken character at the end: the U+FFFD an
    incomplete trailing UTF-8 sequence decodes to is dropped (see :func:`complete_text`)."""
    return complete_text(tok, ids, tok.decode(ids, skip_special_tokens=True))


def complete_text(tok, ids: list[int], text: str) -> str:
    """``text`` (the decoding of ``ids`` with special tokens skipped) without what an incomplete UTF-8
    sequence at the end of ``ids`` decodes to. Only that tail goes: a U+FFFD the model generated as a
    character of its own (the bytes EF BF BD, or invalid bytes) stays, wherever it is.

    The trailing tokens' bytes are read from the vocabulary (byte-level BPE; SentencePiece ``<0xNN>`` byte
    pieces). When the incomplete bytes are whole tokens, the text is decoded again without them (a byte-fallback
    decoder turns every byte of a broken group into U+FFFD, the complete characters before it included); when a
    token also holds bytes before them, the one U+FFFD a byte-level decoder made of them is dropped. For a
    tokenizer whose bytes cannot be read, a final U+FFFD is taken for a cut character."""
    if not text.endswith("\ufffd") or not ids:
        return text
    tail = _tail_tokens(tok, ids)
    if tail is None:
        return text[:-1]
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    dec.decode(b"".join(b for _, b in tail), final=False)
    cut = len(dec.getstate()[0])  # bytes that start a valid sequence and still wait for the rest of it
    if not cut:
        return text
    held = 0
    for pos, b in reversed(tail):
        held += len(b)
        if held == cut:
            return tok.decode(ids[:pos], skip_special_tokens=True)
        if held > cut:
            break
    return text[:-1]


def _tail_tokens(tok, ids: list[int], want: int = 4, max_tokens: int = 8) -> list[tuple[int, bytes]] | None:
    """(position in ``ids``, raw bytes) of the last tokens of ``ids``, in order, until they hold at least
    ``want`` bytes (special tokens skipped, as decode skips them); None when this tokenizer's token bytes
    cannot be read."""
    kind = _byte_kind(tok)
    if kind is None:
        return None
    special = set(getattr(tok, "all_special_ids", ()) or ())
    out: list[tuple[int, bytes]] = []
    n = 0
    for pos in range(len(ids) - 1, max(-1, len(ids) - 1 - max_tokens), -1):
        if ids[pos] in special:
            continue
        piece = tok.convert_ids_to_tokens(int(ids[pos]))
        if piece is None:
            return None
        b = _piece_bytes(piece, kind)
        out.append((pos, b))
        n += len(b)
        if n >= want:
            break
    return out[::-1]


def _byte_kind(tok) -> str | None:
    """'bytelevel' (GPT-2 byte-to-unicode alphabet), 'bytefallback' (``<0xNN>`` pieces) or None."""
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is not None:
        try:
            spec = json.loads(decoder.__getstate__())
        except Exception:  # a decoder that cannot describe itself
            return None
        kinds = {d.get("type") for d in spec.get("decoders", [spec])} if isinstance(spec, dict) else set()
        return "bytelevel" if "ByteLevel" in kinds else "bytefallback" if "ByteFallback" in kinds else None
    if getattr(tok, "byte_decoder", None) is not None:  # slow GPT-2 style tokenizers
        return "bytelevel"
    return None


def _piece_bytes(piece: str, kind: str) -> bytes:
    if kind == "bytelevel":
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")  # an added token: its text as it is
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


_U2B: dict[str, int] = {}


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable characters standing for the 256 bytes."""
    if not _U2B:
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        extra = 0
        for b in range(256):
            if b in keep:
                _U2B[chr(b)] = b
            else:
                _U2B[chr(256 + extra)] = b
                extra += 1
    return _U2B


@torch.inference_mode()
def generate(
    model, tok, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 32, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Greedy completions for chat conversations (each ends with a user turn).

    Returns one dict per conversation: ``text``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason``.
    """
    stops = stop_token_ids(tok)
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [render_prompt(tok, c) for c in conversations[start : start + batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=tok.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, row in enumerate(new.tolist()):
                n = len(row)
                finish = "length"
                for j, t in enumerate(row):
                    if t in stops:
                        n, finish = j, "stop"
                        break
                text = decode_text(tok, row[:n]).strip()
                out.append(
                    {
                        "text": text,
                        "prompt_tokens": int(enc["attention_mask"][i].sum()),
                        "completion_tokens": n,
                        "finish_reason": finish,
                    }
                )
    finally:
        tok.padding_side = old_side
    return out


def require_cuda_for_qlora() -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; say so before any work is done."""
    if not torch.cuda.is_available():
        raise StageError(
            "train.method=qlora needs a CUDA GPU (4-bit quantisation via bitsandbytes), and none is available here. "
            "Use method: lora (same adapter, full-precision base) on this machine, or run on a GPU host."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise StageError(
            "train.method=qlora needs bitsandbytes: pip install bitsandbytes (on a CUDA machine)."
        ) from None


def model_files_exist(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def save_tokenizer(tok, out_dir: str | os.PathLike[str]) -> None:
    """``save_pretrained`` that transformers 4.45+ loads as well as 5.x.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (a ValueError in 4.x ``AutoTokenizer``),
    ``extra_special_tokens`` as a list (4.x expects a mapping), the flags ``is_local``/``local_files_only``
    (facts about this machine, wrong on the next one) and the chat template only as ``chat_template.jinja``
    (unknown to early 4.x). The written config names the class both understand, keeps the special tokens as
    ``additional_special_tokens`` and carries the chat template inline too.
    """
    out = Path(out_dir)
    tok.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend") and (out / "tokenizer.json").is_file():
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        del cfg["extra_special_tokens"]
        known = list(cfg.get("additional_special_tokens") or [])
        cfg["additional_special_tokens"] = known + [t for t in extra if t not in known]
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and "chat_template" not in cfg:
        cfg["chat_template"] = template
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
def attach_adapter(model, adapter: str, name: str):
    """Load a LoRA adapter under ``name`` onto ``model`` (wrapping it in a PeftModel on the first one).

    Several adapters on one base: the gateway serves many registered versions from one loaded base model and
    picks the active adapter per batch. Safetensors only, like :func:`load_causal_lm`.
    """
    from peft import PeftModel

    if not (Path(adapter) / "adapter_model.safetensors").is_file():
        raise InputError(f"adapter {Path(adapter).name} has no adapter_model.safetensors; tuneloop loads safetensors adapters only")
    if isinstance(model, PeftModel):
        model.load_adapter(adapter, adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
    model.eval()
    return model


def context_length(model) -> int:
    """The longest sequence (prompt + completion) the model takes."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
