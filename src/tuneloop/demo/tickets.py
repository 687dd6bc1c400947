"""The demo's fine-tuning task: a customer-support ticket router (ticket text -> one of ``LABELS``).

Entry points: :func:`task_records` (the routing task, split into train/eval template spaces),
:func:`new_intent_records` and :func:`production_tickets` (the intent the loop demo's production brings, and
what its simulated users send). Tickets are built from the templates in ``demo/data/tickets.json``
(:mod:`tuneloop.demo.tables`); every generator is deterministic given its seed. The base model reads tickets but
has never seen the routing labels, so it scores ~0; a LoRA fine-tune learns the routing in about a minute of CPU.
Ticket variety, not repetition, is what lifts accuracy without costing general capability (the measurements:
docs/benchmarks.md, "The demo's recipe").
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from tuneloop.demo.tables import (
    CITIES,
    CLOSINGS,
    COLORS,
    CONTEXT,
    DAYS,
    GREETINGS,
    INTENTS,
    INTROS,
    LABELS,
    MONTHS,
    NAMES,
    NEW_INTENT,
    PRODUCTS,
    SYSTEM_PROMPT,
)

__all__ = [
    "LABELS",
    "NEW_INTENT",
    "SYSTEM_PROMPT",
    "Frame",
    "new_intent_records",
    "production_tickets",
    "task_records",
    "ticket_frame",
    "ticket_text",
]

#: Template indices of one ticket: (greeting, intro, context, intent sentence, closing).
Frame = tuple[int, int, int, int, int]

#: Chance that each filler part (greeting, intro, context, closing) of a ticket is left out.
_FILLER_ABSENT = 0.5


def ticket_frame(rng: random.Random, sentences: tuple[str, ...]) -> Frame:
    """Template indices (greeting, intro, context, intent sentence, closing); each filler part is absent
    (index 0, the empty string) about half the time, so tickets range from one sentence to five."""

    def part(options: tuple[str, ...]) -> int:
        return 0 if rng.random() < _FILLER_ABSENT else rng.randrange(1, len(options))

    return (part(GREETINGS), part(INTROS), part(CONTEXT), rng.randrange(len(sentences)), part(CLOSINGS))


def ticket_text(rng: random.Random, sentences: tuple[str, ...], frame: Frame) -> str:
    """The ticket ``frame`` picks, its slots ({name}, {product}, ...) filled from ``rng``, with some noise."""
    gi, ii, ci, ti, cli = frame
    fill = {
        "name": rng.choice(NAMES),
        "name2": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "color": rng.choice(COLORS),
        "product": rng.choice(PRODUCTS),
        "day": rng.choice(DAYS),
        "month": rng.choice(MONTHS),
        "order": f"#{rng.randint(10000, 99999)}",
        "years": rng.randint(2, 15),
        "days": rng.randint(2, 14),
        "amount": f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
    }
    parts = [
        GREETINGS[gi],
        INTROS[ii].format(**fill),
        CONTEXT[ci].format(**fill),
        sentences[ti].format(**fill),
        CLOSINGS[cli].format(**fill),
    ]
    # The intent sentence sometimes comes before the context, as people write.
    if rng.random() < 0.3:
        parts[2], parts[3] = parts[3], parts[2]
    text = " ".join(p for p in parts if p)
    # Noise: lower-casing, extra punctuation, doubled spaces.
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.25:
        text = text.rstrip(".!?") + "!!"
    return text


def _frame_split(label: str, frame: Frame) -> str:
    """Deterministic split of the (label, template combination) space: ~20% of combinations are eval-only."""
    h = hashlib.sha256(f"{label}|{frame[0]}|{frame[2]}|{frame[3]}".encode()).digest()
    return "eval" if h[0] % 5 == 0 else "train"


def task_records(n: int, seed: int, *, split: str | None = None, system_prompt: bool = True) -> list[dict]:
    """``n`` ticket-routing records in OpenAI messages format, deterministic given ``seed``.

    Labels are balanced (round robin over ``LABELS``, then shuffled); user texts are unique within the
    result. ``split="train"`` / ``"eval"`` draws only from that part of the template-combination space
    (greeting x context x intent sentence), so eval tickets combine sentences in ways training never shows;
    ``None`` draws from the whole space.
    """
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    rng = random.Random(f"task-{seed}-{split}")
    records: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 200 * max(n, 1):
            raise RuntimeError(f"could not generate {n} unique tickets")
        label = LABELS[len(records) % len(LABELS)]
        frame = ticket_frame(rng, INTENTS[label])
        if split is not None and _frame_split(label, frame) != split:
            continue
        text = ticket_text(rng, INTENTS[label], frame)
        if text in seen:
            continue
        seen.add(text)
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}] if system_prompt else []
        msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
        records.append({"messages": msgs})
    rng.shuffle(records)
    return records


def new_intent_records(n: int, seed: int, *, split: str | None = None) -> list[dict]:
    """``n`` tickets of :data:`NEW_INTENT` in messages format (system prompt, ticket, label), deterministic
    given ``seed``. ``split`` draws from a disjoint part of the template space, as in :func:`task_records`:
    the demo's simulated users send ``"train"`` tickets and the new-intent accuracy is measured on ``"eval"``."""
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    sentences, label = NEW_INTENT["sentences"], NEW_INTENT["label"]
    rng = random.Random(f"new-intent-{seed}-{split}")
    records: list[dict] = []
    seen: set[str] = set()
    for _ in range(200 * max(n, 1)):
        if len(records) == n:
            return records
        frame = ticket_frame(rng, sentences)
        if split is not None and _frame_split("new-intent", frame) != split:
            continue
        text = ticket_text(rng, sentences, frame)
        if text not in seen:
            seen.add(text)
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": label},
                    ]
                }
            )
    raise RuntimeError(f"could not generate {n} unique new-intent tickets")


def production_tickets(n: int, seed: int, *, new_share: float) -> list[dict[str, Any]]:
    """What the demo's simulated users send: ``n`` tickets, about ``new_share`` of them of :data:`NEW_INTENT`
    (from its ``"train"`` split), the rest of the original intents (fresh tickets from the whole template
    space, so some resemble eval items), in a seeded order. Each is ``{"messages": [system, user],
    "expected": label, "intent": "new" | "original"}``."""
    n_new = round(n * new_share)
    new = [(r, "new") for r in new_intent_records(n_new, seed, split="train")]
    old = [(r, "original") for r in task_records(n - n_new, seed=1000 + seed)]
    tickets = [
        {"messages": r["messages"][:-1], "expected": r["messages"][-1]["content"], "intent": kind}
        for r, kind in new + old
    ]
    random.Random(f"production-{seed}").shuffle(tickets)
    return tickets
