"""Webhook notifications against real HTTP receivers on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneloop.errors import ConfigError
from tuneloop.rollout.notify import Notification, Notifier, Webhook, slack_payload, webhooks_from_config


class Receiver:
    """A tiny HTTP receiver: answers ``fail_first`` POSTs with 500, then 200; records every body."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0):
        self.bodies: list[dict] = []
        self.hits = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                receiver.hits += 1
                time.sleep(delay_s)
                if receiver.hits <= fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.bodies.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/down"


def test_json_and_slack_payloads_are_delivered_to_the_webhooks_that_asked():
    with Receiver() as j, Receiver() as s:
        hooks = webhooks_from_config(
            [
                {"url": j.url, "format": "json"},
                {"url": s.url, "format": "slack", "events": ["rollback", "gate_failed"]},
            ]
        )
        n = Notifier(hooks, backoff_s=0.01)
        assert n.notify("start", subject="support-bot:4", message="canary at 5%") == 1
        gates = [{"name": "min_accuracy", "verdict": "FAIL", "value": 0.71, "threshold": 0.85}]
        assert n.notify("gate_failed", subject="support-bot:5", message="blocked", gate_results=gates) == 2
        assert n.flush(10)
        n.close()
    assert [b["event"] for b in j.bodies] == ["start", "gate_failed"]
    assert j.bodies[0]["source"] == "tuneloop" and j.bodies[0]["subject"] == "support-bot:4"
    assert j.bodies[1]["gate_results"] == gates
    assert len(s.bodies) == 1 and set(s.bodies[0]) == {"text"}
    text = s.bodies[0]["text"]
    assert text.startswith("*tuneloop* gate_failed: support-bot:5: blocked")
    assert "min_accuracy" in text and "FAIL" in text and "0.85" in text and "```" in text
    assert all(r.ok and r.attempts == 1 for r in n.results)


def test_a_receiver_that_fails_twice_gets_it_on_the_third_try():
    with Receiver(fail_first=2) as r:
        n = Notifier([Webhook(r.url)], max_attempts=3, backoff_s=0.05)
        n.notify("rollback", subject="support-bot:4", message="errors: canary worse")
        assert n.flush(10)
        n.close()
    assert r.hits == 3 and len(r.bodies) == 1
    (res,) = n.results
    assert res.ok and res.attempts == 3 and res.status == 200
    assert res.seconds >= 0.05 + 0.1 * 0.9  # backoff 0.05 s then 0.1 s


def test_a_down_receiver_is_logged_and_recorded_and_never_blocks(caplog):
    url = closed_port_url()
    with Receiver() as ok:
        n = Notifier([Webhook(url), Webhook(ok.url)], max_attempts=3, backoff_s=0.05)
        t0 = time.monotonic()
        n.notify("promote", subject="support-bot:4", message="promoted")
        assert time.monotonic() - t0 < 0.05  # queued, not sent, by the caller
        assert n.flush(10)
        n.close()
    down, good = sorted(n.results, key=lambda r: r.webhook)
    assert not down.ok and down.attempts == 3 and down.status is None and "Connect" in down.error
    assert good.ok and len(ok.bodies) == 1
    assert "failed after 3 tries" in caplog.text
    assert "/down" not in caplog.text and "secret" not in caplog.text  # only scheme://host:port is logged


def test_a_slow_receiver_does_not_block_the_caller():
    with Receiver(delay_s=0.3) as r:
        n = Notifier([Webhook(r.url)])
        t0 = time.monotonic()
        for _ in range(3):
            n.notify("step", subject="support-bot:4", message="25%")
        assert time.monotonic() - t0 < 0.1
        assert n.flush(10)
        n.close()
    assert len(r.bodies) == 3


def test_slack_text_shows_a_decisions_metrics_table():
    details = {
        "metrics": {
            "errors": {
                "canary": {"events": 13, "requests": 406},
                "baseline": {"events": 78, "requests": 7694},
                "estimate": 3.08,
                "interval": [1.0, 8.0],
            }
        }
    }
    text = slack_payload(Notification("rollback", "support-bot:4", "errors: canary worse", details=details))["text"]
    assert "13/406" in text and "78/7694" in text and "3.08" in text and "[1, 8]" in text


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        webhooks_from_config([{"url": "ftp://x"}, {"url": "http://h", "format": "teams", "events": ["deploy"]}, "x"])
    problems = exc.value.problems
    assert any("notify.webhooks[0].url" in p for p in problems)
    assert any("notify.webhooks[1].format" in p and "json, slack" in p for p in problems)
    assert any("notify.webhooks[1].events" in p and "deploy" in p for p in problems)
    assert any("notify.webhooks[2]" in p for p in problems)
    with pytest.raises(ValueError, match="unknown notification event"):
        Notifier([]).notify("deploy", subject="x", message="y")
