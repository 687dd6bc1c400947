"""The evaluation suites tuneloop ships (src/tuneloop/resources/): sizes per language, fields, unique ids and
prompts, and a general text with both English and Chinese. The sizes are what makes the starter gates decidable
(0 harmful answers out of 300+ red-team prompts has a one-sided 95 % upper bound below 0.01)."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest

RES = resources.files("tuneloop.resources")
LANGS = {"en", "zh"}
CJK = re.compile(r"[\u4e00-\u9fff]")


def _records(name: str) -> list[dict]:
    out = []
    for i, line in enumerate(RES.joinpath(name).read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{name}:{i}: blank line"
        rec = json.loads(line)
        assert isinstance(rec, dict), f"{name}:{i}: not a JSON object"
        out.append(rec)
    return out


@pytest.mark.parametrize(
    ("name", "prefix", "total", "per_lang"),
    [("redteam.jsonl", "rt-", 330, {"en": 200, "zh": 120}), ("benign.jsonl", "bn-", 300, {"en": 180, "zh": 120})],
)
def test_prompt_suites_size_fields_unique(name, prefix, total, per_lang):
    recs = _records(name)
    assert len(recs) >= total, f"{name}: {len(recs)} records, want >= {total}"
    for rec in recs:
        where = f"{name} {rec.get('id')}"
        assert isinstance(rec.get("id"), str) and rec["id"].startswith(prefix), where
        assert rec.get("lang") in LANGS, f"{where}: lang {rec.get('lang')!r}"
        assert isinstance(rec.get("prompt"), str) and rec["prompt"].strip(), f"{where}: empty prompt"
        # The language tag matches the text: Chinese prompts contain CJK characters, English ones none.
        assert bool(CJK.search(rec["prompt"])) == (rec["lang"] == "zh"), f"{where}: lang does not match the prompt"
        if name == "redteam.jsonl":
            ind = rec.get("indicators")
            assert isinstance(ind, list) and 4 <= len(ind) <= 8, f"{where}: needs 4-8 indicators"
            assert all(isinstance(w, str) and w and w == w.lower() for w in ind), (
                f"{where}: indicators must be lowercase strings"
            )
            assert isinstance(rec.get("category"), str) and rec["category"], f"{where}: no category"
    counts = Counter(r["lang"] for r in recs)
    for lang, want in per_lang.items():
        assert counts[lang] >= want, f"{name}: {counts[lang]} {lang} records, want >= {want}"
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == len(ids), f"{name}: duplicate ids {[k for k, v in Counter(ids).items() if v > 1]}"
    norm = [" ".join(r["prompt"].lower().split()) for r in recs]
    assert len(set(norm)) == len(norm), (
        f"{name}: duplicate prompts {[k for k, v in Counter(norm).items() if v > 1][:3]}"
    )


def test_redteam_keeps_original_forty_first():
    ids = [r["id"] for r in _records("redteam.jsonl")[:40]]
    assert ids == [f"rt-{i:02d}" for i in range(1, 41)]


def test_no_prompt_is_in_both_suites():
    red = {" ".join(r["prompt"].lower().split()) for r in _records("redteam.jsonl")}
    benign = {" ".join(r["prompt"].lower().split()) for r in _records("benign.jsonl")}
    assert not red & benign


def test_general_text_is_bilingual_and_long():
    text = RES.joinpath("general.txt").read_text(encoding="utf-8")
    assert len(text) >= 20_000, len(text)
    cjk = len(CJK.findall(text))
    latin = len(re.findall(r"[A-Za-z]", text))
    assert cjk >= 2_000 and latin >= 10_000, (cjk, latin)
    # English first, then Chinese.
    assert text.index(CJK.search(text).group()) > len(text) // 2
