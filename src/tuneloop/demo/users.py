"""The closed-loop demo's simulated users: support agents who send tickets through the gateway and rate the answers.

Entry point: :class:`SimulatedUsers` (``send`` a batch of tickets from ``USERS`` agents on ``CLIENT_THREADS``
threads, through the official ``openai`` client, rating through ``POST /v1/feedback``); :class:`TrafficStats` is what
a batch did. What is "right" is the ticket generator's label (:mod:`tuneloop.demo.tickets`): the users are a
simulation, deterministic in what they send and rate. Used by :mod:`tuneloop.demo.loop`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

#: Share of right answers the simulated users rate +1 (a wrong answer is always rated -1 and corrected: the agent
#: who reroutes a ticket leaves the right label). Most users do not rate an answer that was fine; rating every right
#: answer added records that taught nothing and pushed iteration 2 against the capability gate (docs/benchmarks.md,
#: "The demo's recipe").
RATE_RIGHT_SHARE = 0.2
#: Agents the tickets come from, in turn (the gateway's canary split is sticky per user).
USERS = 200
#: Requests in flight at once.
CLIENT_THREADS = 8


@dataclass
class TrafficStats:
    """What one batch of simulated traffic did."""

    sent: int = 0
    failed: int = 0
    by_intent: Counter = field(default_factory=Counter)
    right_by_intent: Counter = field(default_factory=Counter)
    by_version: Counter = field(default_factory=Counter)
    ratings: Counter = field(default_factory=Counter)
    corrections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_dict(self) -> dict[str, Any]:
        acc = {k: round(self.right_by_intent[k] / n, 4) for k, n in self.by_intent.items() if n}
        return {
            "requests": self.sent,
            "failed": self.failed,
            "by_intent": dict(self.by_intent),
            "accuracy_by_intent": acc,
            "by_version": dict(self.by_version),
            "ratings": {"+1": self.ratings[1], "-1": self.ratings[-1]},
            "corrections": self.corrections,
        }


class SimulatedUsers:
    """Support agents who send tickets through the ``openai`` client and rate the answers: a wrong one (not the
    ticket's label) always, -1 with the label as the correction; a right one +1, for ``RATE_RIGHT_SHARE`` of the
    tickets (chosen by a hash of the ticket, so the same tickets are rated on every run). ``USERS`` agents,
    ticket *i* from agent ``i % USERS`` (the gateway's canary split is sticky per user)."""

    def __init__(self, base_url: str):
        import httpx
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=base_url, timeout=60)
        self.next_user = 0

    def close(self) -> None:
        self.client.close()
        self.http.close()

    def ask(self, model: str, ticket: dict[str, Any], user: str) -> tuple[str, str, str]:
        """(answer, request id, answering version) of one chat completion."""
        raw = self.client.chat.completions.with_raw_response.create(
            model=model, messages=ticket["messages"], max_tokens=4, temperature=0, user=user
        )
        body = raw.parse()
        return (
            (body.choices[0].message.content or "").strip(),
            raw.headers["x-request-id"],
            raw.headers["x-tuneloop-version"],
        )

    def one(self, model: str, ticket: dict[str, Any], user: str, stats: TrafficStats, rate: bool) -> None:
        from tuneloop.evaluate.judges import normalise_answer

        try:
            answer, request_id, version = self.ask(model, ticket, user)
        except Exception:  # counted: the demo fails if any request fails
            with stats.lock:
                stats.sent, stats.failed = stats.sent + 1, stats.failed + 1
            return
        right = normalise_answer(answer) == normalise_answer(ticket["expected"])
        feedback: dict[str, Any] = {"request_id": request_id, "rating": 1 if right else -1, "source": "demo-users"}
        if not right:
            feedback["correction"] = ticket["expected"]
        rate = rate and (not right or rates_right_answer(ticket))
        ok = not rate or self.http.post("/v1/feedback", json=feedback).status_code in (200, 201)
        with stats.lock:
            stats.sent += 1
            stats.failed += not ok
            stats.by_intent[ticket["intent"]] += 1
            stats.right_by_intent[ticket["intent"]] += right
            stats.by_version[version] += 1
            if rate:
                stats.ratings[feedback["rating"]] += 1
                stats.corrections += not right

    def send(
        self, model: str, tickets: list[dict[str, Any]], *, rate: bool = True, stats: TrafficStats | None = None
    ) -> TrafficStats:
        stats = stats or TrafficStats()
        users = [f"agent-{(self.next_user + i) % USERS}" for i in range(len(tickets))]
        self.next_user += len(tickets)
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(lambda tu: self.one(model, tu[0], tu[1], stats, rate), zip(tickets, users, strict=True)))
        return stats


def rates_right_answer(ticket: dict[str, Any]) -> bool:
    """Whether a right answer to ``ticket`` is rated +1: ``RATE_RIGHT_SHARE`` of the tickets, by a hash of the
    ticket text (the same tickets on every run)."""
    digest = hashlib.sha256(ticket["messages"][-1]["content"].encode()).digest()
    return digest[0] < 256 * RATE_RIGHT_SHARE
