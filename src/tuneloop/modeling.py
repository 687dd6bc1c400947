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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import transformers

from tuneloop.errors import InputError, StageError

log = logging.getLogger(__name__)
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


def load_tokenizer(name: str, chat_template: str | None = None, *, local_files_only: bool = False):
    """The base model's tokenizer, with a chat template and a pad token guaranteed. ``local_files_only``: a hub id
    is read from the local cache only, never looked up online (the checks before a run: without a network the hub
    client retries each file for ~23 s before it gives up)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
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


def qlora_quantization_config():
    """The 4-bit base of ``train.method: qlora`` (the QLoRA paper's recipe: NF4 weights, double quantisation,
    bf16 compute where the GPU has it, else fp16). Needs CUDA and bitsandbytes (:func:`require_cuda_for_qlora`)."""
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_training_base(cfg: Any):
    """The base model a trainer starts from: full precision, or for ``method: qlora`` quantised to 4 bits as it
    loads and made ready for k-bit training (PEFT's ``prepare_model_for_kbit_training``: norms in fp32, input
    gradients on for checkpointing); the LoRA adapter is then added on top as for ``lora``."""
    t = cfg.train
    if t.method != "qlora":
        return load_causal_lm(cfg.base_model)
    require_cuda_for_qlora()
    from peft import prepare_model_for_kbit_training

    model = load_causal_lm(cfg.base_model, quantization_config=qlora_quantization_config())
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)


def load_causal_lm(
    path: str, *, adapter: str | None = None, dtype: torch.dtype = torch.float32, quantization_config: Any = None
):
    """A causal LM from a directory (or cached hub id), optionally with a LoRA adapter applied on top.

    Safetensors only (``use_safetensors=True``): pickle checkpoints (``pytorch_model.bin``) are refused,
    because unpickling can run arbitrary code. ``quantization_config``: a 4-bit base for QLoRA
    (:func:`qlora_quantization_config`), placed on the GPU.
    """
    from transformers import AutoModelForCausalLM

    extra: dict[str, Any] = {}
    if quantization_config is not None:
        extra = {"quantization_config": quantization_config, "device_map": {"": torch.cuda.current_device()}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {path!r}: {exc}") from None
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_model.safetensors").is_file():
            raise InputError(
                f"adapter {adapter} has no adapter_model.safetensors; tuneloop loads safetensors adapters only"
            )
        peft_model = PeftModel.from_pretrained(model, adapter)
        peft_model.eval()
        return peft_model
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
        keep = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1))
        )
        extra = 0
        for b in range(256):
            if b in keep:
                _U2B[chr(b)] = b
            else:
                _U2B[chr(256 + extra)] = b
                extra += 1
    return _U2B


# --------------------------------------------------------------------------------------------- generation
# A batch decodes at most GEN_MAX_ROWS rows and holds at most GEN_TOKEN_BUDGET tokens in its KV cache (rows x
# (widest prompt + max_new_tokens)). Measured on SmolLM2-135M-Instruct, fp32, 2 CPU threads (one decode step, 40 /
# 300 tokens of context): 1 row 58 / 62 ms; 16 rows 6.3 / 7.1 ms a row; 32 rows 5.0 / 6.0; 64 rows 3.7 / 5.0;
# prefill ~1.45 ms a token at any size. Whole runs (247 red-team, benign and identity prompts, 32 new tokens):
# 32 rows 4.14 items/s, 64 rows 4.52-4.60, 128 rows 4.67-4.77 (+3 %, twice the cache). The budget keeps long
# prompts from filling memory (~46 KB a token on that model; the cache is copied at every step by DynamicCache).
GEN_MAX_ROWS = 64
GEN_TOKEN_BUDGET = 16384


@dataclass
class _GenBatch:
    """The rows decoding together: conversation index, tokens produced; the next-token logits, KV cache,
    attention mask (left padding is 0) and each row's last position."""

    index: list[int]
    produced: list[list[int]]
    logits: torch.Tensor
    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor
    can_join: bool

    def select(self, keep: list[int]) -> None:
        """Keep these rows, then drop the leading columns that are padding in every row left."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.logits = self.mask[idx], self.pos[idx], self.logits[idx]
        self.index = [self.index[i] for i in keep]
        self.produced = [self.produced[i] for i in keep]
        if self.can_join:
            first = int(self.mask.any(dim=0).to(torch.int8).argmax())
            if first > 0:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def merge(self, other: _GenBatch) -> None:
        """Append ``other``'s rows: caches and masks left-padded to the wider one, then concatenated."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):  # same model: same layers
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.index += other.index
        self.produced += other.produced


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class _Decoder:
    """One model's forward for greedy decoding with a KV cache (keyword names differ across transformers)."""

    model: Any
    pad_id: int
    device: Any
    cache_kw: str
    keep_logits: bool

    @classmethod
    def of(cls, model, pad_id: int) -> _Decoder:
        import inspect

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        return cls(
            model,
            pad_id,
            next(model.parameters()).device,
            "cache" if "cache" in params else "past_key_values",
            "logits_to_keep" in params,
        )

    def prefill(self, index: list[int], prompts: list[list[int]]) -> _GenBatch:
        """Prompts left-padded into one forward; positions count each row's own tokens (0 at its first)."""
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        extra = {"logits_to_keep": 1} if self.keep_logits else {}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self.cache_kw: cache}, **extra
        )
        layers = getattr(cache, "layers", None) or []
        can_join = bool(layers) and all(
            type(layer).__name__ == "DynamicLayer"
            and getattr(layer, "keys", None) is not None
            and layer.keys.dim() == 4
            for layer in layers
        )
        return _GenBatch(list(index), [[] for _ in prompts], out.logits[:, -1, :], cache, mask, pos[:, -1:], can_join)

    def step(self, batch: _GenBatch, last: list[int]) -> None:
        """One token for every row: feed each row's last token, keep the next-token logits."""
        ids = torch.tensor([[t] for t in last], dtype=torch.long, device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(last), 1)], dim=1)
        batch.pos = batch.pos + 1
        out = self.model(
            input_ids=ids,
            attention_mask=batch.mask,
            position_ids=batch.pos,
            use_cache=True,
            **{self.cache_kw: batch.cache},
        )
        batch.logits = out.logits[:, -1, :]


@torch.inference_mode()
def generate(
    model,
    tok,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Greedy completions for chat conversations (each ends with a user turn), in input order.

    Returns one dict per conversation: ``text``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason``.

    Batched as the CPU allows, with the answers of one at a time: prompts are sorted by length (a batch pads
    little) and decoded together with a KV cache, left-padded, the attention mask and position ids following each
    row's own tokens; a row leaves the batch at a stop token or ``max_new_tokens`` (no work on finished rows),
    and waiting prompts join the running batch once half of it is free. ``batch_size``: rows at most (default
    :data:`GEN_MAX_ROWS`, within :data:`GEN_TOKEN_BUDGET` tokens); 1 decodes one conversation at a time, the
    reference the batched answers are checked against (benchmarks/eval_speed.py). Decoding is the argmax of each
    step's logits (the gateway's greedy decoding too): a ``generation_config``'s penalties or forced tokens are not
    applied. ``progress(done, total)`` is called as conversations finish.
    """
    stops = frozenset(stop_token_ids(tok))
    prompts = [tok(render_prompt(tok, c), add_special_tokens=False)["input_ids"] for c in conversations]
    total = len(prompts)
    out: list[dict[str, Any] | None] = [None] * total
    if not total:
        return []
    dec = _Decoder.of(model, tok.pad_token_id if tok.pad_token_id is not None else 0)
    max_rows = max(1, batch_size or GEN_MAX_ROWS)
    waiting = sorted(range(total), key=lambda i: len(prompts[i]))  # stable: equal lengths keep input order
    batch: _GenBatch | None = None
    done = 0
    while waiting or batch is not None:
        rows = len(batch.index) if batch is not None else 0
        if waiting and (
            rows == 0 or (batch is not None and batch.can_join and max_rows - rows >= max(1, max_rows // 2))
        ):
            width = batch.mask.shape[1] if batch is not None and rows else 0
            joiners = _joiners(waiting, prompts, rows, width, max_rows, max_new_tokens)
            if joiners:
                new = dec.prefill(joiners, [prompts[i] for i in joiners])
                if batch is not None and rows:
                    batch.merge(new)
                else:
                    batch = new
        if batch is None:  # cannot happen: _joiners takes at least one waiting prompt into an empty batch
            raise RuntimeError("generate: nothing to decode although prompts are waiting (a bug in _joiners)")
        picks = batch.logits.argmax(dim=-1).tolist()
        keep, last = [], []
        for r, (i, tok_id) in enumerate(zip(batch.index, picks, strict=True)):  # one pick per row
            produced = batch.produced[r]
            if tok_id in stops or len(produced) + 1 >= max_new_tokens:
                finish = "stop" if tok_id in stops else "length"
                ids = produced if finish == "stop" else produced + [tok_id]
                out[i] = {
                    "text": decode_text(tok, ids).strip(),
                    "prompt_tokens": len(prompts[i]),
                    "completion_tokens": len(ids),
                    "finish_reason": finish,
                }
                done += 1
            else:
                produced.append(tok_id)
                keep.append(r)
                last.append(tok_id)
        if len(keep) < len(batch.index):
            if progress is not None:
                progress(done, total)
            if not keep:
                batch = None
                continue
            batch.select(keep)
        dec.step(batch, last)
    return cast("list[dict[str, Any]]", out)  # every slot is filled: each prompt finishes exactly once


def _joiners(
    waiting: list[int], prompts: list[list[int]], rows: int, width: int, max_rows: int, max_new_tokens: int
) -> list[int]:
    """The next waiting conversations (shortest prompts first) that fit the batch: at most ``max_rows`` rows and
    :data:`GEN_TOKEN_BUDGET` tokens (rows x (widest prompt + ``max_new_tokens``)); at least one when it is empty.
    Taken off ``waiting``."""
    take = 0
    while take < len(waiting) and rows + take < max_rows:
        w = max(width, len(prompts[waiting[take]]))
        if (rows + take + 1) * (w + max_new_tokens) > GEN_TOKEN_BUDGET and rows + take > 0:
            break
        take += 1
    joiners = waiting[:take]
    del waiting[:take]
    return joiners


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
        raise InputError(
            f"adapter {Path(adapter).name} has no adapter_model.safetensors; tuneloop loads safetensors adapters only"
        )
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
