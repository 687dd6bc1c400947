"""GGUF export (`tuneloop models export REF OUT --format gguf [--quant f16|q8_0]`, registry/gguf_export.py).

Verified with llama.cpp itself (marker ``llama_cpp``; skipped where llama-cpp-python is not importable): the
exported file loads, llama.cpp tokenizes English, Chinese and emoji text to the ids transformers gives, and its
greedy decoding gives transformers' tokens -- on the demo base with a LoRA adapter trained here and registered
(merged by the export), and on the real SmolLM2-135M-Instruct (marker ``real_model`` too). f16 must agree on every
token; q8_0 is checked against a floor measured on these prompts (see the test). Without llama.cpp: the Modelfile,
the registry event with the file's sha256, and the bad-input paths (exit 2, nothing left in OUT).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("gguf", reason="the gguf package is not installed: pip install 'tuneloop[gguf]'")

from tuneloop.cli import app  # noqa: E402
from tuneloop.registry.sqlite import SqliteRegistry  # noqa: E402

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False

_skip_without_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP,
    reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36; it builds llama.cpp from its sdist, "
    "~10 min on 2 cores)",
)


def llama_cpp_test(f):
    """Marker ``llama_cpp``, skipped with the install line where llama_cpp is not importable."""
    return pytest.mark.llama_cpp(_skip_without_llama_cpp(f))


runner = CliRunner()
N_NEW = 24  # greedy tokens per prompt
TEXTS = [  # tokenizer parity: English, Chinese, emojis (one joined by a zero-width joiner), digits, whitespace runs
    "Hello world! How's the weather today?",
    "我想在apple工作，今天天气很好。",
    "Emojis: 🚀 🦙🦙 😶\u200d🌫️ ✅ done",
    "Order 12345 costs $3.50 -- ok?\n\n  indented\tline",
]


def tl(*args):
    r = runner.invoke(app, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def msg(r) -> str:
    return " ".join(r.stderr.split())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- fixtures: a LoRA adapter trained on the demo base, registered ----------------------------------------------


@pytest.fixture(scope="module")
def demo_base() -> Path:
    from tuneloop.demo.base_model import shipped_base_model

    base = shipped_base_model()
    if base is None:
        pytest.skip("the shipped demo base (src/tuneloop/resources/demo_base) is missing or stale")
    return base


def train_adapter(base: Path, out: Path, steps: int = 30) -> Path:
    """A LoRA adapter (all attention and MLP projections) trained for a few steps on the demo's ticket task."""
    from peft import LoraConfig, get_peft_model

    from tuneloop.demo.tickets import task_records
    from tuneloop.modeling import load_causal_lm, load_tokenizer, save_tokenizer

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
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(demo_base, tmp_path_factory) -> Path:
    return train_adapter(demo_base, tmp_path_factory.mktemp("adapter") / "router-lora")


@pytest.fixture(scope="module")
def ws(adapter_dir, demo_base, tmp_path_factory) -> Path:
    """A workspace whose registry holds the trained adapter as ``router:1`` (base: the demo base)."""
    from tuneloop.registry.ops import register_directory

    root = tmp_path_factory.mktemp("ws")
    register_directory(SqliteRegistry(root), adapter_dir, "router", base=str(demo_base))
    return root


@pytest.fixture(scope="module")
def exports(ws, tmp_path_factory) -> dict[str, dict]:
    """``router:1`` exported through the CLI as f16 and q8_0."""
    out = {}
    for quant in ("f16", "q8_0"):
        target = tmp_path_factory.mktemp("exp") / f"router-{quant}"
        r = tl("models", "export", "router:1", target, "--format", "gguf", "--quant", quant, "-w", ws, "--json")
        assert r.exit_code == 0, r.stderr
        out[quant] = json.loads(r.stdout)
    return out


def demo_prompts(tok) -> list[list[int]]:
    from tuneloop.demo.tickets import task_records

    convs = [r["messages"][:-1] for r in task_records(3, seed=11, split="eval")]
    convs += [
        [{"role": "user", "content": "How do I reset my password?"}],
        [{"role": "user", "content": "Tell me about the weather in spring."}],
    ]
    return [
        tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        for c in convs
    ]


def real_prompts(tok) -> list[list[int]]:
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Explain what a neural network is in one sentence.",
        "How many legs does a spider have?",
    ]
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for q in questions
    ]


# -- greedy decoding on both sides ------------------------------------------------------------------------------


def hf_greedy(model, tok, ids: list[int], n: int = N_NEW) -> list[int]:
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


def load_llama(path: Path, *, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, seed=0, n_threads=2, verbose=False, logits_all=logits_all)


def llama_greedy(llm, ids: list[int], eos: int, n: int = N_NEW) -> list[int]:
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):  # temp 0: llama.cpp's greedy sampler
        out.append(int(t))
        if t == eos or len(out) == n:
            break
    return out


def teacher_forced_agreement(llm, ids: list[int], continuation: list[int]) -> tuple[int, int]:
    """(agreeing, total): llama.cpp's argmax after each prefix of transformers' own greedy continuation."""
    import numpy as np

    llm.reset()
    llm.eval(ids + continuation)
    pred = np.asarray(llm.scores[len(ids) - 1 : len(ids) + len(continuation) - 1]).argmax(-1)
    return int((pred == np.asarray(continuation)).sum()), len(continuation)


def check_tokenizer(llm, tok) -> None:
    for text in TEXTS:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=False)
            == tok(text, add_special_tokens=False)["input_ids"]
        ), text
    chat = tok.apply_chat_template([{"role": "user", "content": TEXTS[1]}], tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok(chat, add_special_tokens=False)["input_ids"]
    for text in TEXTS:  # and back: llama.cpp's detokenizer gives the text
        assert llm.detokenize(tok(text, add_special_tokens=False)["input_ids"]).decode() == text


# -- demo: a trained adapter from the registry, merged -----------------------------------------------------------


@llama_cpp_test
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_demo_export_greedy_matches_transformers(quant, exports, demo_base, adapter_dir):
    from tuneloop.modeling import load_causal_lm, load_tokenizer

    e = exports[quant]
    merged = load_causal_lm(str(demo_base), adapter=str(adapter_dir)).merge_and_unload()
    tok = load_tokenizer(str(adapter_dir))
    base = load_causal_lm(str(demo_base))
    llm = load_llama(Path(e["path"]) / e["file"], logits_all=True)
    check_tokenizer(llm, tok)
    prompts = demo_prompts(tok)
    expected = [hf_greedy(merged, tok, ids) for ids in prompts]
    assert expected != [hf_greedy(base, tok, ids) for ids in prompts]  # the adapter changes what the model says
    got = [llama_greedy(llm, ids, tok.eos_token_id) for ids in prompts]
    if quant == "f16":
        assert got == expected
    agree = [teacher_forced_agreement(llm, ids, cont) for ids, cont in zip(prompts, expected, strict=True)]
    rate = sum(a for a, _ in agree) / sum(n for _, n in agree)
    # f16: every token. q8_0: 100 % measured here and on the benchmark's 10 prompts (benchmarks/gguf_export.py); the
    # floor 0.9 leaves room for a near-tie flipping under another llama.cpp build's kernels.
    assert rate >= (1.0 if quant == "f16" else 0.9), (rate, got, expected)


def test_demo_export_files_modelfile_and_event(exports, ws):
    e = exports["f16"]
    out = Path(e["path"])
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "router-1.f16.gguf", "tuneloop_export.json"]
    assert e["sha256"] == sha256(out / e["file"]) and e["bytes"] == (out / e["file"]).stat().st_size
    assert e["tensor_types"] == {"F32": 5, "F16": 15}  # 2 layers x 7 matrices + token_embd; tied: no output
    assert e["warnings"] == [] and e["modelfile_template"] is True
    meta = json.loads((out / "tuneloop_export.json").read_text())
    assert meta["ref"] == "router:1" and meta["sha256"] == e["sha256"] and meta["quant"] == "f16" and "path" not in meta
    q = exports["q8_0"]
    assert q["tensor_types"] == {"F32": 5, "Q8_0": 15} and q["bytes"] < 0.6 * e["bytes"]

    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./router-1.f16.gguf\n" in modelfile
    assert (
        'TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n"""\n'
    ) in modelfile
    assert "SYSTEM" not in modelfile  # the demo's template has no default system prompt
    assert modelfile.endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n')

    reader = __import__("gguf").GGUFReader(str(out / e["file"]))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("tokenizer.ggml.add_bos_token") is False
    assert (
        field("llama.block_count") == 2 and field("llama.context_length") == 256 and field("llama.vocab_size") == 2048
    )
    assert field("tokenizer.ggml.eos_token_id") == 2 and "<|im_start|>" in field("tokenizer.chat_template")
    assert "output.weight" not in {t.name for t in reader.tensors}

    reg = SqliteRegistry(ws)
    events = [ev for ev in reg.events("router", 1) if ev.kind == "exported"]
    by_quant = {ev.details["quant"]: ev.details for ev in events}
    assert by_quant["f16"]["sha256"] == e["sha256"] and by_quant["q8_0"]["sha256"] == q["sha256"]
    assert by_quant["f16"]["format"] == "gguf" and by_quant["f16"]["path"] == e["path"]
    lineage = json.loads(tl("models", "lineage", "router:1", "-w", ws, "--json").stdout)
    assert {ev["kind"] for ev in lineage["events"]} >= {"registered", "exported"}


# -- the real SmolLM2-135M-Instruct ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gguf(real_model_dir, tmp_path_factory) -> dict:
    """SmolLM2 converted by write_gguf (the export's converter) as f16 and q8_0, with the model it came from."""
    from tuneloop.modeling import load_causal_lm, load_tokenizer
    from tuneloop.registry.gguf_export import write_gguf

    model, tok = load_causal_lm(str(real_model_dir)), load_tokenizer(str(real_model_dir))
    d = tmp_path_factory.mktemp("real-gguf")
    files = {q: write_gguf(model, tok, d / f"smollm2.{q}.gguf", quant=q, name="smollm2") for q in ("f16", "q8_0")}
    return {"model": model, "tok": tok, "files": files}


@llama_cpp_test
@pytest.mark.real_model
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_real_model_greedy_matches_transformers(quant, real_gguf):
    model, tok, summary = real_gguf["model"], real_gguf["tok"], real_gguf["files"][quant]
    assert summary.tensors == 272 and summary.pre_tokenizer == "gpt-2" and summary.add_bos is False
    llm = load_llama(Path(summary.path), logits_all=True)
    check_tokenizer(llm, tok)
    prompts = real_prompts(tok)
    expected = [hf_greedy(model, tok, ids) for ids in prompts]
    agree = [teacher_forced_agreement(llm, ids, cont) for ids, cont in zip(prompts, expected, strict=True)]
    rate = sum(a for a, _ in agree) / sum(n for _, n in agree)
    if quant == "f16":
        assert [llama_greedy(llm, ids, tok.eos_token_id) for ids in prompts] == expected
        assert rate == 1.0
    else:
        # q8_0 moves the logits by up to ~1 on this model, and SmolLM2 has near-ties (the first reply token to "What
        # is the capital of France?" leads the next by 0.08), so free-running greedy text soon diverges (0 of these 5
        # prompts identical). Token by token, with transformers' continuation as the prefix, measured 97/104 = 0.933
        # here with llama-cpp-python 0.3.36 (0.953 on the benchmark's 10 prompts x 32 tokens, docs/benchmarks.md).
        # Q8_0 rounding is deterministic; the floor 0.85 leaves room for another llama.cpp build's kernels (another
        # accumulation order) flipping a few more near-ties; a
        # conversion without the Q/K permutation measured 34/104 = 0.33 (f16) and fails it.
        assert rate >= 0.85, (rate, agree)


@llama_cpp_test
@pytest.mark.real_model
def test_real_model_tokenizer_smollm_split(real_gguf, tmp_path):
    """SmolLM2's own tokenizer.json splits digits one by one before the GPT-2 split; written as llama.cpp's
    ``smollm`` pre-tokenizer, llama.cpp still tokenizes like transformers (digits, Chinese, emojis)."""
    from tokenizers import pre_tokenizers

    from tuneloop.registry.gguf_export import write_gguf

    tok = real_gguf["tok"]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    try:
        summary = write_gguf(real_gguf["model"], tok, tmp_path / "smollm.gguf", quant="q8_0", name="smollm2")
        assert summary.pre_tokenizer == "smollm"
        check_tokenizer(load_llama(tmp_path / "smollm.gguf"), tok)
    finally:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@pytest.mark.real_model
def test_real_model_modelfile_keeps_the_default_system_prompt(real_gguf):
    from tuneloop.registry.gguf_export import chat_format, stop_tokens

    fmt, why = chat_format(real_gguf["tok"])
    assert why == "" and fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert fmt.go_template() == (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    assert stop_tokens(real_gguf["tok"], fmt) == ["<|im_end|>", "<|im_start|>"]


# -- templates ----------------------------------------------------------------------------------------------------


def test_chat_format_takes_role_tagged_templates_and_refuses_others(demo_base):
    from tuneloop.modeling import load_tokenizer
    from tuneloop.registry.gguf_export import chat_format

    tok = load_tokenizer(str(demo_base))
    tok.chat_template = (
        "{{ '<s>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
        "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    fmt, why = chat_format(tok)  # Llama-3's shape, with a header
    assert why == ""
    assert (fmt.header, fmt.open, fmt.role_end, fmt.close) == (
        "<s>",
        "<|start_header_id|>",
        "<|end_header_id|>\n\n",
        "<|eot_id|>",
    )
    for template, reason in [
        # Llama-2's [INST]: the system prompt goes inside the first user turn
        (
            "{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>{% elif m['role'] == 'user' %}"
            "[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}",
            "between messages",
        ),
        # roles renamed (Gemma's model for assistant)
        (
            "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
            "differently",
        ),
        # content trimmed
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "differently",
        ),
        # raises on a system message
        (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
            "{{ m['content'] }}{% endfor %}",
            "failed",
        ),
    ]:
        tok.chat_template = template
        fmt, why = chat_format(tok)
        assert fmt is None and reason in why, (template, why)


def test_unsupported_template_gives_a_modelfile_without_template_and_a_warning(ws, adapter_dir, demo_base, tmp_path):
    from tuneloop.registry.ops import register_directory

    odd = tmp_path / "odd-template"
    shutil.copytree(adapter_dir, odd)
    cfg_path = odd / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    (odd / "chat_template.jinja").unlink(missing_ok=True)
    reg = SqliteRegistry(tmp_path / "ws2")
    register_directory(reg, odd, "odd", base=str(demo_base))
    r = tl("models", "export", "odd", tmp_path / "out", "--format", "gguf", "-w", tmp_path / "ws2")
    assert r.exit_code == 0, r.stderr
    assert "warning: the Modelfile has no TEMPLATE" in msg(r)
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "TEMPLATE" not in modelfile.replace("# No TEMPLATE", "") and "FROM ./odd-1.f16.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


# -- bad input -----------------------------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def test_unsupported_architecture_is_refused_naming_the_supported(demo_base, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tuneloop.modeling import load_tokenizer, save_tokenizer
    from tuneloop.registry.ops import register_directory

    qwen = tmp_path / "qwen"
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=2048,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(qwen)
    save_tokenizer(load_tokenizer(str(demo_base)), qwen)
    register_directory(SqliteRegistry(tmp_path / "ws"), qwen, "qwen")
    r = tl("models", "export", "qwen", tmp_path / "out", "--format", "gguf", "-w", tmp_path / "ws")
    assert r.exit_code == 2 and "Qwen2ForCausalLM" in msg(r) and "supports LlamaForCausalLM" in msg(r)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_out_not_empty_bad_quant_and_quant_without_gguf(ws, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    r = tl("models", "export", "router:1", tmp_path / "full", "--format", "gguf", "-w", ws)
    assert r.exit_code == 2 and "not an empty directory" in msg(r)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x.txt"]
    r = tl("models", "export", "router:1", tmp_path / "o", "--format", "gguf", "--quant", "q4_0", "-w", ws)
    assert r.exit_code == 2 and "f16, q8_0" in msg(r) and not (tmp_path / "o").exists()
    r = tl("models", "export", "router:1", tmp_path / "o", "--quant", "q8_0", "-w", ws)
    assert r.exit_code == 2 and "--format gguf only" in msg(r)
    r = tl("models", "export", "router:1", tmp_path / "o", "--format", "onnx", "-w", ws)
    assert r.exit_code == 2 and "hf or gguf" in msg(r)


def test_gguf_package_missing_says_what_to_install(ws, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError, as where it is not installed
    r = tl("models", "export", "router:1", tmp_path / "o", "--format", "gguf", "-w", ws)
    assert r.exit_code == 2 and "pip install 'tuneloop[gguf]'" in msg(r) and not (tmp_path / "o").exists()


def test_adapter_whose_base_is_gone(adapter_dir, demo_base, tmp_path):
    from tuneloop.registry.ops import register_directory

    base = tmp_path / "base-copy"
    shutil.copytree(demo_base, base)
    reg = SqliteRegistry(tmp_path / "ws")
    register_directory(reg, adapter_dir, "bot", base=str(base))
    shutil.rmtree(base)
    r = tl("models", "export", "bot:1", tmp_path / "out", "--format", "gguf", "-w", tmp_path / "ws")
    assert r.exit_code == 2 and "does not exist any more" in msg(r) and "restore it" in msg(r)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_nothing_behind(ws, tmp_path, monkeypatch):
    """Fault injection (a stand-in for a crash after the GGUF is written): OUT stays absent, no temporary
    directory is left beside it, and the registry records no export."""
    from tuneloop.registry import gguf_export

    def broken(*a, **k):
        raise OSError("injected failure while writing the Modelfile")

    monkeypatch.setattr(gguf_export, "modelfile", broken)
    before = len(SqliteRegistry(ws).events("router", 1))
    with pytest.raises(OSError, match="injected"):
        gguf_export.export_gguf(SqliteRegistry(ws), "router:1", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert len(SqliteRegistry(ws).events("router", 1)) == before


def test_record_event_takes_note_events_only(ws):
    from tuneloop.errors import InputError

    reg = SqliteRegistry(ws)
    with pytest.raises(InputError, match="exported"):
        reg.record_event("router", 1, "tagged", {"key": "x", "new": "y"})  # would be replayed as a tag by recover
