"""The demo's synthetic general text: what the base model is pretrained on and what its capability is checked on.

Entry points: :func:`general_corpus` (pretraining documents), :func:`general_text` (held-out text for the
capability check) and :func:`general_chat_records` (general chat mixed into the fine-tuning data). Templated
sentences on a dozen topics, generic ChatML Q&A and customer messages without routing labels, drawn from the
tables in ``demo/data/`` (:mod:`tuneloop.demo.tables`); deterministic given the seed. Why the corpus holds
customer messages and one-word chats, and why slots are Zipf-weighted: docs/benchmarks.md, "The demo's recipe".
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from tuneloop.demo.tables import (
    CITIES,
    COARSE,
    COLORS,
    COUNTRIES,
    DAYS,
    INTENTS,
    LABELS,
    MONTHS,
    NAMES,
    PRODUCTS,
    QA,
    REPLIES,
    SENTENCE_FRAMES,
    SHORT_QA,
    SUPPORT_WORDS,
    TOPICS,
)
from tuneloop.demo.tickets import ticket_frame, ticket_text

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: Shares of the pretraining documents: chats, customer messages; the rest are paragraphs.
_CHAT_FRACTION = 0.4
_SUPPORT_FRACTION = 0.15
#: Share of customer messages asked as "what is this message about?" with a coarse topic as the answer.
_COARSE_SHARE = 0.4
#: General chat records with a longer answer are left out of the fine-tuning mix: the loss is averaged per token,
#: and long answers would drown the one-token labels.
_MIX_MAX_ANSWER_CHARS = 120

_T = TypeVar("_T")
_ZIPF_CUM: dict[int, list[float]] = {}


def _zipf(rng: random.Random, seq: Sequence[_T]) -> _T:
    """Pick from ``seq`` with Zipf weights 1/rank, as word choice is in real text (and so that the most
    likely continuation has a clear margin, which keeps next-token accuracy a stable measure)."""
    n = len(seq)
    cum = _ZIPF_CUM.get(n)
    if cum is None:
        cum, total = [], 0.0
        for i in range(n):
            total += 1.0 / (i + 1)
            cum.append(total)
        _ZIPF_CUM[n] = cum
    return rng.choices(seq, cum_weights=cum)[0]


def _sentence(rng: random.Random, topic: str | None = None) -> str:
    topic = topic or rng.choice(list(TOPICS))
    subs, verbs, objs, adjs = TOPICS[topic]
    z = _zipf
    s, s2 = z(rng, subs), z(rng, subs)
    fill = {
        "s": s,
        "S": s[0].upper() + s[1:],
        "V": z(rng, verbs),
        "O": z(rng, objs),
        "s2": s2,
        "V2": z(rng, verbs),
        "O2": z(rng, objs),
        "adj": z(rng, adjs),
        "day": z(rng, DAYS),
        "month": z(rng, MONTHS),
        "name": z(rng, NAMES),
        "city": z(rng, CITIES),
    }
    out = z(rng, SENTENCE_FRAMES).format(**fill)
    return out[0].upper() + out[1:]


def _paragraph(rng: random.Random, topic: str | None = None) -> str:
    topic = topic or rng.choice(list(TOPICS))
    n = rng.randint(3, 7)
    # Mostly on one topic, sometimes drifting to another, like real text.
    return " ".join(_sentence(rng, topic if rng.random() < 0.8 else None) for _ in range(n))


# Word list for the "repeat the word" chats: topic words plus the support vocabulary, so the base model
# can emit any of these words on its own line (it never sees which ticket goes with which label).
_WORDS = tuple(
    sorted(
        {
            w
            for topic in TOPICS.values()
            for group in (topic[2], topic[3])
            for phrase in group
            for w in phrase.split()
            if w.isalpha() and w not in ("the", "a", "of", "some", "my", "pair")
        }
        | set(TOPICS)
        | {"refund", "shipping", "password", "cancel", "billing", "other", "order", "invoice"}
    )
)


def _qa_turn(rng: random.Random, short: bool) -> tuple[str, str]:
    q, a = rng.choice(SHORT_QA if short else QA)
    country, capital = rng.choice(COUNTRIES)
    mi, di = rng.randrange(12), rng.randrange(7)
    x, y = rng.randint(1, 20), rng.randint(1, 20)
    topic = rng.choice(list(TOPICS))
    fill = {
        "country": country,
        "capital": capital,
        "topic": topic,
        "sentence": _sentence(rng, topic),
        "month": MONTHS[mi],
        "next_month": MONTHS[(mi + 1) % 12],
        "day": DAYS[di],
        "next_day": DAYS[(di + 1) % 7],
        "next_day_lower": DAYS[(di + 1) % 7].lower(),
        "a": x,
        "b": y,
        "sum": x + y,
        "name": rng.choice(NAMES),
        "adj": rng.choice(TOPICS["weather"][3]),
        "color": rng.choice(COLORS),
        "product": rng.choice(PRODUCTS),
        "city": rng.choice(CITIES),
        "word": rng.choice(_WORDS),
        "support_word": rng.choice(SUPPORT_WORDS),
    }
    if "{paragraph}" in a:
        fill["paragraph"] = _paragraph(rng, topic)
    return q.format(**fill), a.format(**fill)


def _system_for(rng: random.Random, short: bool) -> str | None:
    if short and rng.random() < 0.5:
        return "Answer with one word."
    if not short and rng.random() < 0.3:
        return "You are a helpful assistant. Answer briefly."
    return None


def _chat(rng: random.Random) -> str:
    short = rng.random() < 0.6
    system = _system_for(rng, short)
    turns = [("system", system)] if system else []
    for _ in range(rng.randint(1, 2)):
        user, assistant = _qa_turn(rng, short)
        turns += [("user", user), ("assistant", assistant)]
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)


def general_chat_records(n: int, seed: int) -> list[dict]:
    """``n`` single-turn general chat records (messages format, unique user texts) from the same
    distribution as the chats in ``general_corpus``. Mixed into the demo training set so the fine-tune
    keeps the base model's general behaviour (the usual remedy for forgetting)."""
    rng = random.Random(f"general-chat-{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * max(n, 1):
            raise RuntimeError(f"could not generate {n} unique general chat records")
        short = rng.random() < 0.4
        system = _system_for(rng, short)
        user, assistant = _qa_turn(rng, short)
        if user in seen or len(assistant) > _MIX_MAX_ANSWER_CHARS:  # long answers outweigh one-word labels
            continue
        seen.add(user)
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"messages": msgs})
    return out


def _support_doc(rng: random.Random) -> str:
    """Customer messages of the kind the demo task routes, never with a routing label."""
    label = rng.choice(LABELS)
    frame = ticket_frame(rng, INTENTS[label])
    text = ticket_text(rng, INTENTS[label], frame)
    r = rng.random()
    if r < _COARSE_SHARE:
        system = f"{IM_START}system\nAnswer with one word.{IM_END}\n" if rng.random() < 0.5 else ""
        return (
            f"{system}{IM_START}user\nWhat is this message about? {text}{IM_END}\n"
            f"{IM_START}assistant\n{COARSE[label]}{IM_END}\n"
        )
    if r < (1 + _COARSE_SHARE) / 2:
        return f"Message from a customer: {text}"
    reply = rng.choice(REPLIES).format(name=rng.choice(NAMES))
    return f"{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n{reply}{IM_END}\n"


def _doc(rng: random.Random) -> str:
    r = rng.random()
    if r < _CHAT_FRACTION:
        return _chat(rng)
    if r < _CHAT_FRACTION + _SUPPORT_FRACTION:
        return _support_doc(rng)
    return _paragraph(rng)


def general_corpus(n: int, seed: int) -> list[str]:
    """``n`` synthetic documents: English-like paragraphs on a dozen topics (~45%), generic ChatML Q&A
    (~40%) and customer messages without routing labels (~15%)."""
    rng = random.Random(f"general-{seed}")
    return [_doc(rng) for _ in range(n)]


def general_text(seed: int, n_docs: int = 200) -> str:
    """A held-out general-text sample (~45 KB, ~9,500 tokens) for the capability check: paragraphs and
    generic chats from a generator stream disjoint from ``general_corpus`` (no customer-support text: that
    is the task's domain, which the eval set measures). 200 documents rather than 80 narrow the capability
    gate's interval by ~1.6x (half-width ~0.0035 instead of ~0.006 of next-token accuracy)."""
    rng = random.Random(f"general-heldout-{seed}")
    docs = [_chat(rng) if rng.random() < 0.4 else _paragraph(rng) for _ in range(n_docs)]
    return "\n\n".join(docs) + "\n"
