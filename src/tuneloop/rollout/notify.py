"""Webhook notifications for rollouts and the loop: generic JSON or Slack-compatible text.

Config (``notify.webhooks``): a list of ``{url, format: json | slack, events: [...]}``; ``events`` defaults to
all of ``EVENTS``. ``Notifier.notify`` only queues: a background thread POSTs each notification to every
webhook that asked for its event, with up to ``max_attempts`` tries and exponential backoff
(``backoff_s``, ``2 * backoff_s``, ...). A failed notification never blocks or fails the caller: it is
logged (with the webhook's URL reduced to scheme, host and port, since Slack URLs carry a secret in the path)
and recorded in ``Notifier.results``.

Payloads:

* ``json``: ``{"source": "tuneloop", "event", "subject", "message", "at", "details", "gate_results"}``;
* ``slack``: ``{"text": ...}``: one line ``*tuneloop* <event>: <subject>: <message>``, then, when given, a
  small fixed-width table of gate results (gate, verdict, value, threshold) or of a decision's metrics.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import httpx

from tuneloop.errors import ConfigError
from tuneloop.fsutil import format_number

log = logging.getLogger(__name__)

EVENTS: tuple[str, ...] = ("start", "step", "promote", "rollback", "abort", "gate_failed", "drift", "registered")
FORMATS: tuple[str, ...] = ("json", "slack")


@dataclass(frozen=True)
class Webhook:
    url: str
    format: Literal["json", "slack"] = "json"
    events: tuple[str, ...] = EVENTS


@dataclass
class Notification:
    event: str
    subject: str  # what it is about, e.g. "support-bot:4" or a rollout id
    message: str  # one line: what happened and why
    at: float = field(default_factory=time.time)
    details: dict = field(default_factory=dict)
    gate_results: list[dict] | None = None  # [{"name", "verdict", "value", "threshold"}]


@dataclass
class DeliveryResult:
    webhook: int  # index in the configured list
    url: str  # scheme://host:port only
    event: str
    ok: bool
    attempts: int
    status: int | None
    error: str
    seconds: float


def webhooks_from_config(items: Sequence[Mapping] | None, key: str = "notify.webhooks") -> list[Webhook]:
    """Validate ``notify.webhooks``; raises ConfigError listing every problem with its dotted key."""
    hooks, problems = [], []
    for i, item in enumerate(items or []):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: {item!r} must be a mapping with url, format, events")
            continue
        unknown = set(item) - {"url", "format", "events"}
        if unknown:
            problems.append(f"{where}: unknown key(s) {sorted(unknown)}; allowed: url, format, events")
        url = item.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            problems.append(f"{where}.url: {url!r} must be an http(s) URL")
        fmt = item.get("format", "json")
        if fmt not in FORMATS:
            problems.append(f"{where}.format: {fmt!r}; allowed: {', '.join(FORMATS)}")
        events = item.get("events", list(EVENTS))
        bad = [e for e in events if e not in EVENTS] if isinstance(events, (list, tuple)) else [events]
        if bad:
            problems.append(f"{where}.events: {bad!r} not allowed; allowed: {', '.join(EVENTS)}")
        hooks.append(Webhook(url=str(url), format=fmt, events=tuple(events) if not bad else EVENTS))
    if problems:
        raise ConfigError(problems)
    return hooks


def safe_url(url: str) -> str:
    """scheme://host:port: what may appear in logs (webhook paths and queries often hold secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


# --------------------------------------------------------------------------------------------- payloads


def json_payload(n: Notification) -> dict:
    return {"source": "tuneloop", **asdict(n)}


def slack_payload(n: Notification) -> dict:
    text = f"*tuneloop* {n.event}: {n.subject}: {n.message}"
    table = gate_table(n.gate_results) if n.gate_results else metric_table(n.details.get("metrics"))
    return {"text": text + (f"\n```\n{table}\n```" if table else "")}


def fmt_value(v) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{fmt_value(v[0])}, {fmt_value(v[1])}]"
    return format_number(v, "-")


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def gate_table(gates: list[dict]) -> str:
    rows = [
        [str(g.get("name", "?")), str(g.get("verdict", "?")), fmt_value(g.get("value")), fmt_value(g.get("threshold"))]
        for g in gates
    ]
    return text_table(["gate", "verdict", "value", "threshold"], rows)


def metric_table(metrics: Mapping | None) -> str:
    """A decision's metrics (``Decision.to_dict()["metrics"]``) as rows: canary and baseline rates, ratio, interval."""
    if not metrics:
        return ""
    rows = []
    for name, s in metrics.items():
        c, b = s.get("canary", {}), s.get("baseline", {})
        rows.append(
            [
                name,
                f"{c.get('events', 0)}/{c.get('requests', 0)}",
                f"{b.get('events', 0)}/{b.get('requests', 0)}",
                fmt_value(s.get("estimate")),
                fmt_value(s.get("interval")),
            ]
        )
    return text_table(["metric", "canary", "baseline", "ratio", "interval"], rows)


# --------------------------------------------------------------------------------------------- delivery


class Notifier:
    """Queues notifications and delivers them from one background thread; never raises on delivery."""

    def __init__(
        self, webhooks: Sequence[Webhook], *, max_attempts: int = 3, backoff_s: float = 0.5, timeout_s: float = 5.0
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.webhooks = list(webhooks)
        self.max_attempts, self.backoff_s, self.timeout_s = max_attempts, backoff_s, timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._results: list[DeliveryResult] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def results(self) -> list[DeliveryResult]:
        with self._lock:
            return list(self._results)

    def notify(
        self,
        event: str,
        *,
        subject: str,
        message: str,
        details: dict | None = None,
        gate_results: list[dict] | None = None,
    ) -> int:
        """Queue ``event`` for every webhook that asked for it; returns how many deliveries were queued."""
        if event not in EVENTS:
            raise ValueError(f"unknown notification event {event!r}; allowed: {', '.join(EVENTS)}")
        n = Notification(
            event=event, subject=subject, message=message, details=details or {}, gate_results=gate_results
        )
        targets = [i for i, h in enumerate(self.webhooks) if event in h.events]
        for i in targets:
            self._queue.put((i, n))
        if targets:
            self._ensure_thread()
        return len(targets)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued delivery is done (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop the thread."""
        self.flush(timeout)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=1.0)
            self._thread = None

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tuneloop-notify", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                item = self._queue.get()
                try:
                    if item is None:
                        return
                    index, n = item
                    result = deliver(client, index, self.webhooks[index], n, self.max_attempts, self.backoff_s)
                    with self._lock:
                        self._results.append(result)
                except Exception:  # a bug here must not kill the thread and strand the queue
                    log.exception("notification delivery crashed")
                finally:
                    self._queue.task_done()


def deliver(
    client: httpx.Client, index: int, hook: Webhook, n: Notification, max_attempts: int, backoff_s: float
) -> DeliveryResult:
    """POST one notification with retries and exponential backoff; log a final failure."""
    payload = slack_payload(n) if hook.format == "slack" else json_payload(n)
    start, status, error = time.monotonic(), None, ""
    for attempt in range(1, max_attempts + 1):
        try:
            response = client.post(hook.url, json=payload)
            status = response.status_code
            if 200 <= status < 300:
                return DeliveryResult(
                    index, safe_url(hook.url), n.event, True, attempt, status, "", time.monotonic() - start
                )
            error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"
        if attempt < max_attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    log.warning(
        "notification %r to webhook %d (%s) failed after %d tries: %s; the rollout goes on without it",
        n.event,
        index,
        safe_url(hook.url),
        max_attempts,
        error,
    )
    return DeliveryResult(
        index, safe_url(hook.url), n.event, False, max_attempts, status, error, time.monotonic() - start
    )


def notifier_for(cfg) -> Notifier:
    """A notifier for a pipeline config's ``notify.webhooks`` (none configured: one that sends nothing)."""
    hooks = getattr(getattr(cfg, "notify", None), "webhooks", None) or []
    return Notifier(webhooks_from_config([w.model_dump() if hasattr(w, "model_dump") else w for w in hooks]))
