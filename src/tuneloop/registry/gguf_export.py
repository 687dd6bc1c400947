"""GGUF export: a registered version as ONE llama.cpp GGUF file plus an Ollama ``Modelfile`` beside it.

Entry point: :func:`export_gguf` (``tuneloop models export REF OUT --format gguf [--quant f16|q8_0]``), in steps:

1. :func:`plan_export` checks everything before any work (exit 2, nothing written): the ``gguf`` package, the
   quant, OUT (absent or empty), the version, an adapter's base (there and unchanged), the architecture, the
   tokenizer and the chat template's shape;
2. :func:`load_merged`: the version in transformers, an adapter merged into its base (``merge_and_unload``);
3. :func:`write_gguf`: llama metadata, the tensors under llama.cpp's names (Q/K rows permuted from the HF rotary
   layout to GGML's), the byte-level BPE tokenizer, special ids, the add-BOS flag and the chat template;
4. :func:`modelfile`: ``FROM``, ``TEMPLATE`` in Go template syntax where the chat template has the role-tagged
   shape (:func:`chat_format`), ``SYSTEM`` for its default system prompt, ``PARAMETER stop``;
5. all of it is written into a temporary directory beside OUT and renamed into place; then the version gets an
   ``exported`` event with the file's sha256 (both registry backends, ``record_event``).

Supported: ``LlamaForCausalLM`` (model_type ``llama``: no biases, SiLU, default RoPE, head_dim = hidden/heads)
with a byte-level BPE tokenizer whose pre-tokenizer llama.cpp reproduces: GPT-2's split (``gpt-2``), or that
with digits split one by one (``smollm``). Tested (tests/test_gguf_export.py): the demo base with a trained
adapter, and SmolLM2-135M-Instruct: llama.cpp's greedy tokens equal transformers'. Mistral and Qwen2 have other
settings (sliding window; q/k/v biases and the ``qwen2`` architecture) and are refused rather than guessed.

``--quant f16`` (default) writes F16 for 2-D weights and F32 for norms; ``q8_0`` quantizes the 2-D weights whose
rows are a multiple of 32 long (the Q8_0 block) with ``gguf.quants.quantize``, the others stay F16.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError
from tuneloop.fsutil import sha256_file
from tuneloop.registry.card import portable_base_name
from tuneloop.registry.lineage import check_base
from tuneloop.registry.ops import normal_modes, resolve
from tuneloop.version import __version__

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
QUANTS = ("f16", "q8_0")
INSTALL = "pip install 'tuneloop[gguf]'"
Q8_0_BLOCK = 32  # values per Q8_0 block: a row must be a multiple of it
PRE_TOKENIZERS = ("gpt-2", "smollm")  # llama.cpp's names of the byte-level splits this export recognises


# -- the plan: everything checked before any work ------------------------------------------------------------


@dataclass(frozen=True)
class ExportPlan:
    """What :func:`export_gguf` will write, found before any work is done."""

    ref: str
    model: str
    version: int
    artifact_digest: str
    artifact: Path  # the stored, verified artifact
    base: str | None  # an adapter's base (path or hub id); None for a full model
    base_name: str | None  # the base as a hub id or as the config gave it (card.portable_base_name), for the files
    out_dir: Path
    quant: str
    tokenizer: Any  # the transformers tokenizer the GGUF carries
    chat: ChatFormat | None  # the chat template's role-tagged shape; None: no TEMPLATE in the Modelfile
    chat_problem: str  # why ``chat`` is None

    @property
    def file_name(self) -> str:
        return f"{self.model}-{self.version}.{self.quant}.gguf"


def require_gguf() -> None:
    """The ``gguf`` package (the writer and Q8_0 quantizer llama.cpp publishes), or exit 2 with the install line."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError(f"GGUF export needs the gguf package, which is not installed: {INSTALL}") from None


def plan_export(reg, ref: str, out_dir: Path, quant: str = "f16") -> ExportPlan:
    """Check everything an export needs; raise InputError (exit 2) with what to do, before anything is written."""
    require_gguf()
    if quant not in QUANTS:
        raise InputError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"export target {out_dir} exists and is not an empty directory; choose a new directory")
    v = resolve(reg, ref)
    src = reg.open_artifact(v.model, v.version)  # verifies every file's sha256
    base = None
    if v.artifact_kind == "adapter":
        lin = v.lineage
        digest = (lin.get("base") or {}).get("digest") or lin.get("base_model_fingerprint")
        base = check_base(lin.get("base") or v.base_model, digest)
    config = _load_config(base or str(src), v.ref, is_base=base is not None)
    check_architecture(config, v.ref)
    tok = _load_tokenizer(src, base)
    tokenizer_spec(
        tok, llama_params(config).vocab_size, v.ref
    )  # raises on a tokenizer llama.cpp would split differently
    chat, problem = chat_format(tok)
    return ExportPlan(
        ref=v.ref,
        model=v.model,
        version=v.version,
        artifact_digest=v.artifact_digest,
        artifact=Path(src),
        base=base,
        base_name=portable_base_name(v) if base else None,
        out_dir=out_dir,
        quant=quant,
        tokenizer=tok,
        chat=chat,
        chat_problem=problem,
    )


def _load_config(path: str, ref: str, *, is_base: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        if is_base:
            raise InputError(
                f"the base model {path!r} of adapter {ref} is not available on this machine ({exc}); put it there (a "
                f"local directory, or `huggingface-cli download {path}` into the Hugging Face cache) and export again, "
                "or register the adapter again with --base pointing at a copy of the base"
            ) from None
        raise InputError(f"cannot read config.json of {ref} ({path}): {exc}") from None


def _load_tokenizer(src: Path, base: str | None):
    from tuneloop.modeling import load_tokenizer

    tok_src = src if (src / "tokenizer_config.json").is_file() or base is None else Path(base)
    return load_tokenizer(str(tok_src))


# -- the architecture -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaParams:
    """The llama.* metadata llama.cpp reads, from a transformers LlamaConfig."""

    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_freq_base: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool


def _rope(config) -> tuple[float | None, str]:
    """(theta, rope type) from transformers 5's ``rope_parameters`` or 4.x's ``rope_theta``/``rope_scaling``."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, kind


def check_architecture(config, ref: str) -> None:
    """Refuse (InputError, exit 2) what this export does not write, naming the architectures it supports."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES or getattr(config, "model_type", None) != "llama":
        raise InputError(
            f"{ref} is a {arch or getattr(config, 'model_type', 'unknown')} model; GGUF export supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama.cpp's 'llama' architecture). Export it as a Hugging Face "
            "directory instead (`tuneloop models export REF OUT --merged`) and convert that with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    problems = []
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias is true (q/k/v/o biases)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias is true")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config.hidden_act!r}, not 'silu'")
    theta, kind = _rope(config)
    if kind != "default":
        problems.append(f"RoPE scaling {kind!r} (only the default RoPE is written)")
    if theta is None:
        problems.append("no rope_theta")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {head_dim} x {config.num_attention_heads} heads != hidden_size {config.hidden_size}")
    if problems:
        raise InputError(
            f"{ref} is a LlamaForCausalLM with settings this GGUF export does not write: {'; '.join(problems)}. "
            "Export it as a Hugging Face directory (`tuneloop models export REF OUT --merged`) and convert that with "
            "llama.cpp's convert_hf_to_gguf.py"
        )


def llama_params(config) -> LlamaParams:
    theta, _ = _rope(config)
    if theta is None:  # check_architecture refuses this first; here for a direct caller
        raise InputError("the model's config has no rope_theta: this export cannot write it")
    heads = config.num_attention_heads
    return LlamaParams(
        context_length=int(config.max_position_embeddings),
        embedding_length=int(config.hidden_size),
        block_count=int(config.num_hidden_layers),
        feed_forward_length=int(config.intermediate_size),
        head_count=int(heads),
        head_count_kv=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        rope_freq_base=float(theta),
        rms_eps=float(config.rms_norm_eps),
        vocab_size=int(config.vocab_size),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def permute_rotary(w, n_head: int):
    """HF's rotary layout of q_proj/k_proj rows (each head: first halves, then second halves of the rotated pairs)
    to GGML's (pairs adjacent), as llama.cpp's converter does for llama: per head, rows (2, d/2) -> (d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(state: dict[str, Any], p: LlamaParams) -> Iterator[tuple[str, Any]]:
    """``(llama.cpp name, float32 array)`` for every weight; refuses a tensor it has no name for."""
    left = dict(state)

    def take(name: str):
        if name not in left:
            raise InputError(f"the model has no tensor {name}; it is not laid out as LlamaForCausalLM")
        return left.pop(name)

    embed = take("model.embed_tokens.weight")
    yield "token_embd.weight", embed
    for i in range(p.block_count):
        hf = f"model.layers.{i}."
        yield f"blk.{i}.attn_norm.weight", take(hf + "input_layernorm.weight")
        yield f"blk.{i}.attn_q.weight", permute_rotary(take(hf + "self_attn.q_proj.weight"), p.head_count)
        yield f"blk.{i}.attn_k.weight", permute_rotary(take(hf + "self_attn.k_proj.weight"), p.head_count_kv)
        yield f"blk.{i}.attn_v.weight", take(hf + "self_attn.v_proj.weight")
        yield f"blk.{i}.attn_output.weight", take(hf + "self_attn.o_proj.weight")
        yield f"blk.{i}.ffn_norm.weight", take(hf + "post_attention_layernorm.weight")
        yield f"blk.{i}.ffn_gate.weight", take(hf + "mlp.gate_proj.weight")
        yield f"blk.{i}.ffn_up.weight", take(hf + "mlp.up_proj.weight")
        yield f"blk.{i}.ffn_down.weight", take(hf + "mlp.down_proj.weight")
    yield "output_norm.weight", take("model.norm.weight")
    head = left.pop("lm_head.weight", None)
    if head is None and not p.tied_embeddings:
        raise InputError("the model has no lm_head.weight and its embeddings are not tied")
    if head is not None and not (p.tied_embeddings and (head is embed or (head == embed).all())):
        yield "output.weight", head  # tied embeddings: llama.cpp uses token_embd for the output
    if left:
        raise InputError(f"tensors this GGUF export has no llama.cpp name for: {', '.join(sorted(left)[:8])}")


# -- the tokenizer ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer.ggml.* metadata: a byte-level BPE as llama.cpp's ``gpt2`` tokenizer model."""

    pre: str  # llama.cpp's pre-tokenizer name (PRE_TOKENIZERS)
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType: NORMAL, CONTROL (special added), USER_DEFINED, UNUSED (padding ids)
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _is_gpt2_split(p: Any) -> bool:
    return (
        isinstance(p, dict)
        and p.get("type") == "ByteLevel"
        and p.get("use_regex", True)
        and not p.get("add_prefix_space", False)
    )


def pre_tokenizer_name(pre: Any, ref: str) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: ByteLevel with GPT-2's regex -> ``gpt-2``; Digits
    (one by one) then that -> ``smollm`` (SmolLM/SmolLM2's). Anything else is refused: llama.cpp would split
    text differently from transformers and the model would see other tokens."""
    if _is_gpt2_split(pre):
        return "gpt-2"
    parts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if (
        parts
        and len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and _is_gpt2_split(parts[1])
    ):
        return "smollm"
    shown = json.dumps(pre)[:200]
    raise InputError(
        f"{ref}: its tokenizer's pre-tokenizer {shown} is not one this GGUF export maps to llama.cpp (byte-level BPE "
        f"with GPT-2's split, optionally digits one by one: {', '.join(PRE_TOKENIZERS)}); export it as a Hugging Face "
        "directory (`--merged`) and convert that with llama.cpp's convert_hf_to_gguf.py"
    )


def tokenizer_spec(tok, vocab_size: int, ref: str) -> TokenizerSpec:
    """Read a transformers fast tokenizer into GGUF metadata; InputError if it is not a byte-level BPE."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            f"{ref}: the tokenizer has no tokenizer.json (a slow or SentencePiece tokenizer); "
            "GGUF export writes byte-level BPE tokenizers only"
        )
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or spec.get("normalizer")
        or decoder.get("type") != "ByteLevel"
    ):
        raise InputError(
            f"{ref}: the tokenizer is not a byte-level BPE (model {model.get('type')}, byte_fallback "
            f"{model.get('byte_fallback')}, normalizer {(spec.get('normalizer') or {}).get('type')}, decoder "
            f"{decoder.get('type')}); GGUF export writes byte-level BPE tokenizers only"
        )
    if model.get("ignore_merges"):
        raise InputError(
            f"{ref}: the BPE has ignore_merges set, which llama.cpp's {'/'.join(PRE_TOKENIZERS)} do not do"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), ref)
    vocab: dict[str, int] = model["vocab"]
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    by_id = {i: t for t, i in vocab.items()}
    if max([*by_id, *added]) >= vocab_size:
        raise InputError(f"{ref}: the tokenizer has ids beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows no token uses (vocab padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    add_bos, add_eos = _special_flags(tok, ref)
    template = tok.chat_template.get("default") if isinstance(tok.chat_template, dict) else tok.chat_template
    return TokenizerSpec(
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        unk_id=tok.unk_token_id,
        pad_id=tok.pad_token_id,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template or None,
    )


def _special_flags(tok, ref: str) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS to an encoded text, from what it does (its post-processor)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    if full != [tok.bos_token_id] * add_bos + plain + [tok.eos_token_id] * add_eos:
        raise InputError(
            f"{ref}: the tokenizer adds tokens other than BOS/EOS to a text ({plain} -> {full}); "
            "llama.cpp cannot reproduce that"
        )
    return add_bos, add_eos


# -- the GGUF file ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufSummary:
    """What :func:`write_gguf` wrote."""

    path: str
    bytes: int
    tensors: int
    tensor_types: dict[str, int]  # e.g. {"F16": 14, "F32": 5}
    pre_tokenizer: str
    add_bos: bool


def write_gguf(model, tok, path: Path, *, quant: str = "f16", name: str = "model") -> GgufSummary:
    """Write a loaded transformers LlamaForCausalLM (float32, merged) and its tokenizer as one GGUF file."""
    import gguf
    import numpy as np

    if quant not in QUANTS:
        raise InputError(f"quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    check_architecture(model.config, name)
    p = llama_params(model.config)
    spec = tokenizer_spec(tok, p.vocab_size, name)
    state = {k: t.detach().float().cpu().numpy() for k, t in model.state_dict().items()}
    tensors = []
    for tname, array in llama_tensors(state, p):
        tensors.append((tname, *_encode(tname, np.ascontiguousarray(array, dtype=np.float32), quant)))
    del state

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(p.context_length)
    w.add_embedding_length(p.embedding_length)
    w.add_block_count(p.block_count)
    w.add_feed_forward_length(p.feed_forward_length)
    w.add_head_count(p.head_count)
    w.add_head_count_kv(p.head_count_kv)
    w.add_rope_dimension_count(p.head_dim)
    w.add_rope_freq_base(p.rope_freq_base)
    w.add_layer_norm_rms_eps(p.rms_eps)
    w.add_vocab_size(p.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, spec)
    types: dict[str, int] = {}
    for tname, data, qtype in tensors:
        w.add_tensor(tname, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GgufSummary(
        path=str(path),
        bytes=Path(path).stat().st_size,
        tensors=len(tensors),
        tensor_types=types,
        pre_tokenizer=spec.pre,
        add_bos=spec.add_bos,
    )


def _encode(name: str, a, quant: str):
    """(data, GGML type): norms and 1-D tensors F32; 2-D weights F16, or Q8_0 where the row fits whole blocks."""
    import gguf
    import numpy as np

    if a.ndim <= 1 or name.endswith("_norm.weight"):
        return a, gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and a.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), gguf.GGMLQuantizationType.F16


def _add_tokenizer(w, spec: TokenizerSpec) -> None:
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(spec.tokens)
    w.add_token_types(spec.token_types)
    w.add_token_merges(spec.merges)
    for add, value in (
        (w.add_bos_token_id, spec.bos_id),
        (w.add_eos_token_id, spec.eos_id),
        (w.add_unk_token_id, spec.unk_id),
        (w.add_pad_token_id, spec.pad_id),
    ):
        if value is not None:
            add(value)
    w.add_add_bos_token(spec.add_bos)
    w.add_add_eos_token(spec.add_eos)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)


# -- the chat template and the Modelfile ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """A role-tagged chat template (ChatML and its kin): ``header`` + for each message ``open + role + role_end +
    content + close`` + (for a reply) ``open + "assistant" + role_end``; ``default_system`` is the system prompt the
    template puts first when the conversation has none."""

    header: str
    open: str
    role_end: str
    close: str
    default_system: str | None = None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(f"{self.open}{m['role']}{self.role_end}{m['content']}{self.close}" for m in messages)
        return self.header + body + (f"{self.open}assistant{self.role_end}" if add_generation_prompt else "")

    def go_template(self, *, header: bool = True) -> str:
        """The same shape as an Ollama (Go text/template) TEMPLATE over ``.Messages``."""
        return (
            (self.header if header else "")
            + "{{ range .Messages }}"
            + self.open
            + "{{ .Role }}"
            + self.role_end
            + "{{ .Content }}"
            + self.close
            + "{{ end }}"
            + self.open
            + "assistant"
            + self.role_end
        )


_SYS, _U1, _A1, _U2, _A2 = "SYSxq7", "USRxk2", "ASTxm5", "USRxw9", "ASTxz4"


def chat_format(tok) -> tuple[ChatFormat | None, str]:
    """The role-tagged shape of the tokenizer's chat template, found by rendering it with marker contents and
    checked on several conversations (with and without a system message, multi-turn, contents with spaces and
    newlines); ``(None, why)`` where the template has another shape or renders differently."""
    if not getattr(tok, "chat_template", None):
        return None, "the tokenizer has no chat template"

    def render(messages, gen: bool) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    try:
        full = render([msg("system", _SYS), msg("user", _U1), msg("assistant", _A1), msg("user", _U2)], True)
        ended = render([msg("system", _SYS), msg("user", _U1), msg("assistant", _A1)], False)
        if any(full.count(m) != 1 for m in (_SYS, _U1, _A1, _U2)) or ended.count(_A1) != 1:
            return None, "the template does not put each message's content into the text once"
        close = ended.split(_A1, 1)[1]
        between = full[full.index(_SYS) + len(_SYS) : full.index(_U1)]  # close + open + "user" + role_end
        if not between.startswith(close) or "user" not in between[len(close) :]:
            return None, "the text between messages is not <end of message><role tag>"
        tag = between[len(close) :]
        k = tag.rfind("user")
        fmt = ChatFormat(header="", open=tag[:k], role_end=tag[k + len("user") :], close=close)
        lead = full[: full.index(_SYS)]
        system_tag = fmt.open + "system" + fmt.role_end
        if not lead.endswith(system_tag):
            return None, "the system message is not tagged like the others"
        fmt = replace(fmt, header=lead[: -len(system_tag)])
        alone = render([msg("user", _U1)], True)
        if alone != fmt.render([msg("user", _U1)], True):  # a default system prompt?
            start, user_tag = fmt.header + system_tag, fmt.close + fmt.open + "user" + fmt.role_end + _U1
            if alone.startswith(start) and user_tag in alone:
                fmt = replace(fmt, default_system=alone[len(start) : alone.index(user_tag)])
        cases = [
            ([msg("user", _U1)], True),
            ([msg("user", _U1), msg("assistant", _A1)], False),
            ([msg("system", _SYS), msg("user", _U1)], True),
            ([msg("system", _SYS), msg("user", _U1), msg("assistant", _A1), msg("user", _U2)], True),
            ([msg("user", _U1), msg("assistant", _A1), msg("user", _U2), msg("assistant", _A2)], False),
            ([msg("user", "  two\nlines, spaces  ")], True),
        ]
        for messages, gen in cases:
            if render(messages, gen) != fmt.render(messages, gen):
                roles = "/".join(m["role"] for m in messages)
                return None, f"the template renders a {roles} conversation differently from the role-tagged shape"
    except Exception as exc:  # a template may raise on a conversation shape it does not accept
        return None, f"the template failed on a plain conversation: {type(exc).__name__}: {exc}"
    parts = (fmt.header, fmt.open, fmt.role_end, fmt.close, fmt.default_system or "")
    if any("{{" in p or '"""' in p for p in parts):
        return None, "the template's tags contain '{{' or '\"\"\"', which a Modelfile TEMPLATE cannot carry literally"
    return fmt, ""


def stop_tokens(tok, chat: ChatFormat | None) -> list[str]:
    """The Modelfile's stop strings: the EOS token and the special tokens that end or open a turn."""
    stops = [tok.eos_token] if tok.eos_token else []
    if chat is not None:
        for t in tok.all_special_tokens:
            if t and (t in chat.close or t in chat.open) and t not in stops:
                stops.append(t)
    return stops


def modelfile(plan: ExportPlan, add_bos: bool) -> tuple[str, list[str]]:
    """The Ollama Modelfile's text and the warnings to show.

    A chat template of the role-tagged shape becomes TEMPLATE (and SYSTEM for its default system prompt); a header
    equal to the BOS token is left to llama.cpp, which adds BOS itself when ``add_bos``. Another shape: no TEMPLATE,
    a comment and a warning (Ollama then handles the chat template in the GGUF by itself; check it, or write a
    TEMPLATE by hand).
    """
    tok, chat = plan.tokenizer, plan.chat
    lines = [
        f"# Ollama Modelfile for {plan.ref} (artifact sha256 {plan.artifact_digest}), written by tuneloop {__version__}.",
        f"# ollama create {plan.model} -f Modelfile",
        f"FROM ./{plan.file_name}",
    ]
    warnings = []
    if chat is not None:
        drop_header = add_bos and tok.bos_token is not None and chat.header == tok.bos_token
        lines.append(f'TEMPLATE """{chat.go_template(header=not drop_header)}"""')
        if chat.default_system is not None:
            lines.append(f'SYSTEM """{chat.default_system}"""')
    else:
        warnings.append(
            f"the Modelfile has no TEMPLATE: {plan.chat_problem}; tuneloop converts role-tagged (ChatML-like) "
            "chat templates only. Ollama will handle the chat template stored in the GGUF by itself: check "
            "its prompts, or add a TEMPLATE to the Modelfile by hand"
        )
        lines.append(f"# No TEMPLATE: {plan.chat_problem} (tuneloop converts role-tagged, ChatML-like templates only).")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens(tok, chat)]
    return "\n".join(lines) + "\n", warnings


# -- the export -------------------------------------------------------------------------------------------------


def load_merged(plan: ExportPlan):
    """The version as a float32 transformers model; an adapter merged into its base."""
    from tuneloop.modeling import load_causal_lm

    if plan.base is None:
        return load_causal_lm(str(plan.artifact))
    return load_causal_lm(plan.base, adapter=str(plan.artifact)).merge_and_unload()


def export_gguf(reg, ref: str, out_dir: Path, *, quant: str = "f16", actor: str | None = None) -> dict:
    """Write ``ref`` as ``OUT/<model>-<version>.<quant>.gguf`` + ``OUT/Modelfile`` + ``OUT/tuneloop_export.json``.

    OUT appears complete or not at all; an ``exported`` event with the file's sha256 is recorded on the version
    (if recording fails, OUT is removed again and the error raised). Returns what was written, with warnings.
    """
    plan = plan_export(reg, ref, out_dir, quant)
    out_dir = plan.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model = load_merged(plan)
        summary = write_gguf(model, plan.tokenizer, tmp / plan.file_name, quant=quant, name=plan.ref)
        del model
        sha = sha256_file(tmp / plan.file_name)
        text, warnings = modelfile(plan, summary.add_bos)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        written = {
            "format": "gguf",
            "quant": quant,
            "file": plan.file_name,
            "sha256": sha,
            "bytes": summary.bytes,
            "modelfile_template": plan.chat is not None,
            "tuneloop_version": __version__,
        }
        (tmp / "tuneloop_export.json").write_text(  # the base named as the HF export names it (no OUT path)
            json.dumps(
                {
                    "ref": plan.ref,
                    "artifact_sha256": plan.artifact_digest,
                    "base_model": plan.base_name,
                    **written,
                    "tensor_types": summary.tensor_types,
                    "pre_tokenizer": summary.pre_tokenizer,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        normal_modes(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    details = {**written, "path": str(out_dir.resolve())}
    try:
        event = reg.record_event(plan.model, plan.version, "exported", details, actor=actor).to_dict()
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # an export the registry does not know about is not left behind
        raise
    return {
        "ref": plan.ref,
        "path": str(out_dir.resolve()),
        "format": "gguf",
        "quant": quant,
        "file": plan.file_name,
        "sha256": sha,
        "bytes": summary.bytes,
        "tensor_types": summary.tensor_types,
        "base_model": plan.base,
        "modelfile_template": plan.chat is not None,
        "warnings": warnings,
        "event": event,
        "files": sorted(p.name for p in out_dir.iterdir()),
    }
