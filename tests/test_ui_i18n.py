"""The web UI's two catalogs (src/tuneloop/ui/static/i18n/en.json and zh-CN.json) say the same things: the same
keys, the same {placeholders}, no empty text, and the Chinese is Chinese (not an English string left behind),
apart from names that are the same in every language (tuneloop, LoRA, JSON, ...)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

I18N = Path(__file__).resolve().parents[1] / "src" / "tuneloop" / "ui" / "static" / "i18n"
#: Names that stay as they are in Chinese text; a zh value made only of these (and placeholders, punctuation,
#: digits) may equal the English one.
SAME_IN_EVERY_LANGUAGE = {
    "tuneloop",
    "LoRA",
    "QLoRA",
    "JSON",
    "YAML",
    "SFT",
    "DPO",
    "KTO",
    "PII",
    "API",
    "UTC",
    "report.html",
    "GGUF",
    "MLflow",
    "CPU",
    "GPU",
    "n",
}
PLACEHOLDER = re.compile(r"\{(\w+)\}")
CJK = re.compile(r"[\u4e00-\u9fff]")


def load(name: str) -> dict[str, str]:
    path = I18N / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the UI's catalogs are en.json and zh-CN.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()), (
        f"{path}: a flat JSON object of string keys and string values"
    )
    return data


def only_names(value: str) -> bool:
    """The text has nothing to translate: placeholders, `code`, names of SAME_IN_EVERY_LANGUAGE, punctuation."""
    rest = PLACEHOLDER.sub(" ", value)
    rest = re.sub(r"`[^`]*`", " ", rest)
    words = re.findall(r"[A-Za-z][A-Za-z.]*[A-Za-z]|[A-Za-z]", rest)
    return all(w in SAME_IN_EVERY_LANGUAGE for w in words)


def test_both_catalogs_have_the_same_keys():
    en, zh = load("en.json"), load("zh-CN.json")
    assert sorted(set(en) - set(zh)) == [], "keys in en.json that zh-CN.json lacks (add their Chinese)"
    assert sorted(set(zh) - set(en)) == [], "keys in zh-CN.json that en.json no longer has (remove them)"


def test_placeholders_match_and_nothing_is_empty():
    en, zh = load("en.json"), load("zh-CN.json")
    problems = []
    for key, text in en.items():
        if not text.strip():
            problems.append(f"en.json {key}: empty")
        if key in zh:
            if not zh[key].strip():
                problems.append(f"zh-CN.json {key}: empty")
            if sorted(PLACEHOLDER.findall(text)) != sorted(PLACEHOLDER.findall(zh[key])):
                problems.append(
                    f"{key}: placeholders {sorted(PLACEHOLDER.findall(text))} in en, "
                    f"{sorted(PLACEHOLDER.findall(zh[key]))} in zh-CN"
                )
    assert not problems, "\n".join(problems)


def test_chinese_values_are_chinese_not_english_left_behind():
    en, zh = load("en.json"), load("zh-CN.json")
    problems = []
    for key, text in zh.items():
        if only_names(en.get(key, "")) and only_names(text):
            continue  # e.g. app.title "tuneloop": a name, the same in every language
        if text == en.get(key):
            problems.append(f"{key}: {text!r} is the English text")
        elif not CJK.search(text):
            problems.append(f"{key}: {text!r} has no Chinese in it")
    assert not problems, "zh-CN.json values to translate:\n" + "\n".join(problems)


def test_the_checks_catch_what_they_are_for():
    """The rules above, on made-up catalogs: a copied English value, a lost placeholder, a name."""
    assert only_names("tuneloop") and only_names("{ref}") and only_names("`tuneloop run CONFIG`")
    assert not only_names("Open report.html") and not only_names("Runs")
    assert PLACEHOLDER.findall("{shown} of {total} items") == ["shown", "total"]
    assert not CJK.search("Runs") and CJK.search("运行")
