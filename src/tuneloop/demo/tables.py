"""The demo's data files (``tuneloop/demo/data/*.json``, shipped as package data) as Python values.

Entry point: the constants below, read once at import. ``recipe.json`` is :data:`RECOMMENDED` (the base model's
size and pretraining, the task data's size, the LoRA settings and the results measured with them);
``words.json``, ``corpus.json`` and ``tickets.json`` are the word tables and templates the generators in
:mod:`tuneloop.demo.corpus` and :mod:`tuneloop.demo.tickets` draw from. Lists become tuples (the tables are
read-only) and each file's ``about`` says what it holds. The order of every table is part of the recipe: the
generators draw by index from seeded generators, so reordering a table changes the data.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def read_table(name: str) -> dict[str, Any]:
    """``demo/data/<name>`` parsed, without its ``about`` note."""
    text = (resources.files("tuneloop.demo") / "data" / name).read_text(encoding="utf-8")
    table = json.loads(text)
    table.pop("about", None)
    return table


def _strings(items: list[str]) -> tuple[str, ...]:
    return tuple(items)


def _pairs(items: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((a, b) for a, b in items)


#: The settings that make the demo reliable and the results measured with them (``recipe.json``). ``lora`` is
#: what the pipeline's fine-tune uses: PEFT ``LoraConfig(r, lora_alpha, lora_dropout,
#: target_modules="all-linear")``, Trainer defaults otherwise, loss on the assistant answer + ``<|im_end|>`` only.
#: How it was chosen: docs/benchmarks.md, "The demo's recipe".
RECOMMENDED: dict[str, Any] = read_table("recipe.json")

_words = read_table("words.json")
NAMES = _strings(_words["names"])
CITIES = _strings(_words["cities"])
DAYS = _strings(_words["days"])
MONTHS = _strings(_words["months"])
COLORS = _strings(_words["colors"])
PRODUCTS = _strings(_words["products"])

_corpus = read_table("corpus.json")
#: topic -> (subjects, verbs/predicates, objects/places, adjectives)
TOPICS: dict[str, tuple[tuple[str, ...], ...]] = {
    name: tuple(_strings(t[part]) for part in ("subjects", "verbs", "objects", "adjectives"))
    for name, t in _corpus["topics"].items()
}
SENTENCE_FRAMES = _strings(_corpus["sentence_frames"])
QA = _pairs(_corpus["qa"])
SHORT_QA = _pairs(_corpus["short_qa"])
COUNTRIES = _pairs(_corpus["countries"])
#: Support and shop vocabulary for the "say only this word" chats, so the base model can emit these words (the
#: demo's labels among them) as a one-word answer. It never learns which ticket goes with which.
SUPPORT_WORDS = _strings(_corpus["support_words"])
REPLIES = _strings(_corpus["replies"])
#: What a customer message is about, in coarse everyday words. A real base model can say this much about a ticket;
#: it cannot know the shop's own routing labels (refund and billing are both "money" here).
COARSE: dict[str, str] = dict(_corpus["coarse"])

_tickets = read_table("tickets.json")
LABELS = _strings(_tickets["labels"])
SYSTEM_PROMPT: str = _tickets["system_prompt"]
GREETINGS = _strings(_tickets["greetings"])
INTROS = _strings(_tickets["intros"])
CONTEXT = _strings(_tickets["context"])
INTENTS: dict[str, tuple[str, ...]] = {label: _strings(s) for label, s in _tickets["intents"].items()}
CLOSINGS = _strings(_tickets["closings"])
#: Two-factor login codes: a feature the shop launched after iteration 1 was trained. The support team routes
#: these tickets to ``password``. Neither the base corpus nor iteration 1's training data holds one of these
#: sentences, so iteration 1 routes them wrongly (measured: docs/benchmarks.md, "The demo's recipe").
NEW_INTENT: dict[str, Any] = {**_tickets["new_intent"], "sentences": _strings(_tickets["new_intent"]["sentences"])}
