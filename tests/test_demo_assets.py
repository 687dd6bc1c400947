"""Tests for the demo's pieces (``tuneloop.demo``): tokenizer, model, corpus, task data, the data files and a
few-step base-model build.

Everything is made here, nothing is downloaded; the pretraining test runs 3 steps on a small corpus.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneloop.demo.base_model import (
    DEMO_BASE_SEED,
    SPECIAL_TOKENS,
    build_base_model,
    make_model,
    make_tokenizer,
    shipped_base_model,
)
from tuneloop.demo.corpus import general_corpus, general_text
from tuneloop.demo.quick import write_demo_data
from tuneloop.demo.tables import RECOMMENDED
from tuneloop.demo.tickets import LABELS, SYSTEM_PROMPT, task_records
from tuneloop.modeling import CHATML_TEMPLATE


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(general_corpus(300, seed=0), vocab_size=512)


def _conv():
    return [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "shipping"},
    ]


def test_tokenizer_special_tokens_and_chat_template_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for t in (tokenizer, tok):
        assert t.eos_token == "<|im_end|>" and t.pad_token == "<|pad|>" and t.bos_token is None
        assert t.pad_token_id != t.eos_token_id
        assert [t.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2]
        assert t.chat_template == CHATML_TEMPLATE

    text = tok.apply_chat_template(_conv(), tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer with one word.<|im_end|>\n"
        "<|im_start|>user\nWhere is my parcel?<|im_end|>\n"
        "<|im_start|>assistant\nshipping<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(_conv()[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhere is my parcel?<|im_end|>\n<|im_start|>assistant\n")

    # Special tokens are single ids, text round-trips, and the prompt's ids are a prefix of the full
    # conversation's ids (what prompt masking relies on).
    ids = tok(text, add_special_tokens=False)["input_ids"]
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    assert ids.count(tok.eos_token_id) == 3 and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    # Same ids before and after the round trip, unseen characters included (byte level: no unknowns).
    odd = "Grüße, naïve café! 💡 #12345"
    assert tok(odd)["input_ids"] == tokenizer(odd)["input_ids"]
    assert tok.decode(tok(odd)["input_ids"]) == odd


def test_make_model_forward_and_generate(tokenizer):
    model = make_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id
    enc = tokenizer(["hello there", "the fox"], return_tensors="pt", padding=True)
    out = model(**enc, labels=enc["input_ids"])
    assert out.logits.shape == (*enc["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(out.loss)
    gen = model.generate(**tokenizer(["the fox"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] <= enc["input_ids"].shape[1] + 3
    # Same seed, same weights.
    again = make_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_general_corpus_and_held_out_text():
    docs = general_corpus(200, seed=3)
    assert docs == general_corpus(200, seed=3) and docs != general_corpus(200, seed=4)
    chats = [d for d in docs if d.startswith("<|im_start|>")]
    assert 0.3 * len(docs) < len(chats) < 0.8 * len(docs)
    assert all(d.endswith("<|im_end|>\n") and "<|im_start|>assistant\n" in d for d in chats)
    # The corpus never pairs a ticket with a routing label.
    assert not any(
        f"<|im_start|>assistant\n{label}<|im_end|>" in d and "What is this message" in d
        for d in docs
        for label in LABELS
    )
    text = general_text(3)
    assert text == general_text(3) and 5_000 < len(text) < 50_000
    assert text != "\n\n".join(docs[:80]) + "\n"


def test_task_records_deterministic_balanced_and_well_formed():
    recs = task_records(120, seed=7)
    assert recs == task_records(120, seed=7)
    assert recs != task_records(120, seed=8)
    for r in recs:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == SYSTEM_PROMPT
        assert r["messages"][2]["content"] in LABELS
        assert r["messages"][1]["content"].strip()
    counts = Counter(r["messages"][-1]["content"] for r in recs)
    assert set(counts) == set(LABELS) and max(counts.values()) - min(counts.values()) <= 1
    assert len({r["messages"][1]["content"] for r in recs}) == len(recs)
    assert all(len(r["messages"]) == 2 for r in task_records(6, seed=7, system_prompt=False))
    with pytest.raises(ValueError, match="split"):
        task_records(1, seed=0, split="test")


def test_train_and_eval_splits_are_disjoint():
    train = task_records(600, seed=0, split="train")
    evals = task_records(200, seed=0, split="eval")
    train_texts = {r["messages"][1]["content"] for r in train}
    assert not train_texts & {r["messages"][1]["content"] for r in evals}
    # Eval tickets use intent sentences that training also has, in combinations it never shows.
    assert Counter(r["messages"][-1]["content"] for r in evals).keys() == set(LABELS)


def test_write_demo_data(tmp_path):
    train_path, eval_path = write_demo_data(tmp_path, n_train=60, n_eval=24, seed=5, general_mix=0.5)
    assert train_path == tmp_path / "train.jsonl" and eval_path == tmp_path / "eval.jsonl"
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    evals = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert len(train) == 90 and len(evals) == 24
    tickets = [r for r in train if r["messages"][0]["content"] == SYSTEM_PROMPT]
    general = [r for r in train if r["messages"][0]["content"] != SYSTEM_PROMPT]
    assert len(tickets) == 60 and len(general) == 30
    assert all(r["messages"][-1]["role"] == "assistant" for r in train + evals)
    assert all(r["messages"][-1]["content"] in LABELS for r in tickets + evals)
    users = [r["messages"][-2]["content"] for r in train]
    assert len(set(users)) == len(users)
    assert not set(users) & {r["messages"][-2]["content"] for r in evals}
    assert (tmp_path / "general.txt").read_text() == general_text(5)
    # Deterministic: a second write gives the same bytes.
    before = train_path.read_bytes()
    write_demo_data(tmp_path, n_train=60, n_eval=24, seed=5, general_mix=0.5)
    assert train_path.read_bytes() == before


def test_build_base_model_few_steps(tmp_path):
    calls = []
    out = tmp_path / "base"
    stats = build_base_model(out, seed=0, steps=3, n_docs=300, progress=lambda s, n: calls.append((s, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert stats["steps"] == 3 and stats["params"] > 0 and stats["final_loss"] > 0 and stats["seconds"] >= 0
    assert (out / "model.safetensors").exists() and not (tmp_path / ".base.tmp").exists()
    meta = json.loads((out / "tuneloop_base.json").read_text())
    assert meta["seed"] == 0 and meta["stats"] == stats
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == RECOMMENDED["model"]["num_layers"]
    prompt = tok.apply_chat_template(
        task_records(1, seed=0)[0]["messages"][:-1], tokenize=False, add_generation_prompt=True
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] <= enc["input_ids"].shape[1] + 4


def test_saved_tokenizer_config_is_loadable_by_transformers_4(tokenizer, tmp_path):
    """What we write must load in transformers 4.45+ too (checked once by hand in a 4.46 virtualenv, see
    the issue 14 note): the class 4.x knows, special tokens as a list, no machine-local flags, inline template."""
    import json

    from tuneloop.modeling import save_tokenizer

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_tokenizer(tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in cfg or isinstance(cfg["extra_special_tokens"], dict)
    assert "<|im_start|>" in cfg["additional_special_tokens"]
    assert not {"is_local", "local_files_only"} & set(cfg)
    assert cfg["chat_template"] == tokenizer.chat_template
    again = AutoTokenizer.from_pretrained(tmp_path)  # and 5.x still reads it the same
    text = "<|im_start|>user\nWhere is my parcel?<|im_end|>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.all_special_tokens == tokenizer.all_special_tokens


def test_shipped_base_model_is_the_current_recipe_and_loads():
    """The package ships the demo's base model (scripts/build_demo_base.py); it must match RECOMMENDED,
    or every demo silently falls back to pretraining for minutes."""
    base = shipped_base_model()
    assert base is not None, "run `python scripts/build_demo_base.py` after changing RECOMMENDED['model'/'pretrain']"
    meta = json.loads((base / "tuneloop_base.json").read_text())
    assert meta["seed"] == DEMO_BASE_SEED and meta["pretrain"] == RECOMMENDED["pretrain"]
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    assert sum(p.numel() for p in model.parameters()) == meta["stats"]["params"]
    assert model.config.hidden_size == RECOMMENDED["model"]["hidden_size"]
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"


def test_shipped_base_model_missing_or_stale_is_none(tmp_path):
    assert shipped_base_model(tmp_path / "nothing") is None
    out = tmp_path / "base"
    build_base_model(out, seed=0, steps=2, n_docs=200)
    assert shipped_base_model(out) is None  # 2 steps on 200 docs is not the recipe
    meta = json.loads((out / "tuneloop_base.json").read_text())
    meta["pretrain"] = RECOMMENDED["pretrain"]
    (out / "tuneloop_base.json").write_text(json.dumps(meta))
    assert shipped_base_model(out) == out
    assert shipped_base_model(out, seed=1) is None
    (out / "model.safetensors").unlink()
    assert shipped_base_model(out) is None


def test_data_files_are_package_data_and_read_through_importlib_resources():
    """The word tables and the recipe are data files (``src/tuneloop/demo/data/``): read through
    ``importlib.resources`` (as from an installed wheel) and matched by pyproject's package-data globs, so
    ``pip install`` ships them."""
    import fnmatch
    import re
    from importlib import resources
    from pathlib import Path

    from tuneloop.demo.tables import read_table

    data = resources.files("tuneloop.demo").joinpath("data")
    names = sorted(p.name for p in data.iterdir() if p.name.endswith(".json"))
    assert names == ["corpus.json", "recipe.json", "tickets.json", "words.json"], names
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    line = re.search(r"^tuneloop = \[(.*)\]$", pyproject.split("[tool.setuptools.package-data]")[1], re.M)
    assert line, "pyproject.toml: no `tuneloop = [...]` under [tool.setuptools.package-data]"
    globs = re.findall(r'"([^"]+)"', line.group(1))
    for name in names:
        assert any(fnmatch.fnmatch(f"demo/data/{name}", g) for g in globs), f"demo/data/{name} is not in {globs}"
        assert "about" not in read_table(name)  # the note is for readers, not a value
    assert read_table("recipe.json") == RECOMMENDED


def test_the_shipped_base_was_pretrained_on_these_tables():
    """The shipped base model (resources/demo_base) was pretrained on ``general_corpus(12000, seed=0)``. Its
    staleness check compares the recipe (model, pretrain, seed), which does not see the word tables: this digest
    does. Changed the tables in demo/data/ on purpose? Run ``python scripts/build_demo_base.py`` and put the new
    digest here; otherwise restore the tables (their order matters too)."""
    import hashlib

    docs = general_corpus(RECOMMENDED["pretrain"]["n_docs"], seed=DEMO_BASE_SEED)
    digest = hashlib.sha256(json.dumps(docs).encode()).hexdigest()
    assert digest == "b11b43f28b68c6fe2fa5f64b730176f650d9134780494db578a2f8f4454e1e5e", digest
