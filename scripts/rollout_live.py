"""Canary rollouts live, end to end: a real gateway (local backend, a tiny model made here) serves simulated
users who send held-out support tickets with their user keys and post feedback; the gateway's own loop decides.

Three LoRA adapters on one tiny base are registered: ``support-bot:1`` (champion), ``:2`` (the bad candidate)
and ``:3`` (the good one). The tiny model's answers carry no meaning, so whether an answer was "right" is
simulated per answering version (the ``x-tuneloop-version`` header): users rate it -1 with probability
``NEGATIVE[version]`` and +1 otherwise. The bad candidate also crashes on ``CRASH_RATE`` of its requests (a
backend exception before the first byte), which the gateway retries on the baseline.

1. ``:2`` starts at 5 % through ``POST /admin/rollouts``: it must be rolled back automatically, the champion
   unchanged, no client request failed, and the rollback event must carry its statistics;
2. ``:3`` starts at 5 %: it must be promoted through every step of ``POLICY``.

Prints the requests and seconds to each decision, and one JSON line at the end. Run:
``PYTHONPATH=src python scripts/rollout_live.py`` (about a minute on a laptop CPU).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODEL = "support-bot"
ADMIN = "live-admin-token"
# Small steps so the demo takes about a minute; latency is left out: three same-size adapters on one base have
# the same latency, and showing non-inferiority within a 1.5x margin on it needs hundreds of paired requests.
# A step needs non-inferiority shown as well as no harm: a step is more exposure, so a canary that has not yet
# been shown worse (e.g. a bad one still at 11-25 canary requests) is not stepped up on luck.
POLICY = {
    "alpha": 0.05,
    "weights": [0.05, 0.5, 1.0],
    "min_requests_per_step": 20,
    "max_active_s": None,
    "step_requires_non_inferiority": True,
    "metrics": [{"name": "errors", "max_ratio": 3.0}, {"name": "negative_feedback", "max_ratio": 3.0}],
    "guards": [{"metric": "errors", "max_rate": 0.5, "min_requests": 20}],
}
NEGATIVE = {1: 0.25, 2: 0.9, 3: 0.05}
CRASH_RATE = {2: 0.3}
USERS = 300


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Llama with a locally trained tokenizer (what the tests' ``tiny_model`` fixture makes)."""
    from tuneloop.demo.base_model import make_model, make_tokenizer
    from tuneloop.demo.corpus import general_corpus
    from tuneloop.demo.tickets import task_records
    from tuneloop.modeling import save_tokenizer

    texts = general_corpus(300, seed=1) + [m["content"] for r in task_records(200, seed=1) for m in r["messages"]]
    tok = make_tokenizer(texts, vocab_size=600)
    model = make_model(
        tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0
    )
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def register_adapters(ws: Path, base_dir: Path, tmp: Path, n: int = 3):
    from tuneloop.registry.lineage import base_model_ref
    from tuneloop.registry.sqlite import SqliteRegistry

    reg = SqliteRegistry(ws)
    base = base_model_ref(str(base_dir))
    for i in range(n):
        art = make_adapter(base_dir, tmp / f"adapter{i + 1}", seed=200 + i)
        reg.register(
            MODEL,
            art,
            artifact_kind="adapter",
            base_model=str(base_dir),
            lineage={"base": base, "base_model_fingerprint": base["digest"]},
            metrics={},
            gates={},
        )
    reg.promote(MODEL, 1, actor="live")
    return reg


class CrashingCanary:
    """The local backend, but versions in ``CRASH_RATE`` raise before their first byte on that share of calls."""

    def __init__(self, inner, rng: random.Random):
        self.inner, self.rng, self.kind = inner, rng, inner.kind

    def crash(self, route) -> None:
        if self.rng.random() < CRASH_RATE.get(route.version.version, 0.0):
            raise RuntimeError(f"{route.model_id}: CUDA error: an illegal memory access was encountered")

    async def prepare(self, version):
        return await self.inner.prepare(version)

    async def chat(self, route, req, ctx):
        self.crash(route)
        return await self.inner.chat(route, req, ctx)

    async def completion(self, route, req, ctx):
        self.crash(route)
        return await self.inner.completion(route, req, ctx)

    def loaded(self):
        return self.inner.loaded()

    async def close(self):
        await self.inner.close()


class Collector:
    """A notifier that keeps what it was asked to send (the webhook delivery has its own tests)."""

    def __init__(self):
        self.sent: list[dict[str, Any]] = []

    def notify(self, event, *, subject, message, details=None, gate_results=None):
        self.sent.append({"event": event, "message": message})
        return 1

    def close(self, timeout=30.0):
        pass


def build_app(reg, ws: Path, seed: int, notifier, tick_s: float):
    from tuneloop.monitor.requestlog import AsyncRecorder, open_request_log
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router

    log = open_request_log(str(ws / "requests.db"))
    recorder = AsyncRecorder(log, flush_interval_s=0.05)
    backend = CrashingCanary(
        LocalBackend(reg, ws, max_batch_size=16, max_queue=256, default_max_tokens=8), random.Random(seed)
    )
    settings = GatewaySettings(admin_token=ADMIN, preload=[MODEL], rollout_tick_s=tick_s, rollout_policy=POLICY)
    return create_app(backend, Router(reg), settings, recorder=recorder, request_log=log, notifier=notifier), log


def held_out_tickets(n: int = 200) -> list[list[dict]]:
    """Support tickets from the demo task's held-out (eval) split, as chat messages without the answer."""
    from tuneloop.demo.tickets import task_records

    return [r["messages"][:-1] for r in task_records(n, seed=7, split="eval")]


def one_user_request(client, url: str, rng: random.Random, lock: threading.Lock, tickets) -> tuple[int, str]:
    """A user sends a ticket, reads the answer and rates it; returns (status, answering version)."""
    with lock:
        user, messages, draw = f"user-{rng.randrange(USERS)}", rng.choice(tickets), rng.random()
    r = client.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "user": user, "max_tokens": 4, "temperature": 0, "messages": messages},
        timeout=60,
    )
    if r.status_code != 200:
        return r.status_code, ""
    version = r.headers["x-tuneloop-version"]
    rating = -1 if draw < NEGATIVE[int(version.rsplit(":", 1)[1])] else 1
    fb = client.post(f"{url}/v1/feedback", json={"request_id": r.headers["x-request-id"], "rating": rating}, timeout=60)
    return (200 if fb.status_code in (200, 201) else fb.status_code), version


def drive(reg, url: str, rollout_id: str, rng: random.Random, *, timeout_s: float, say) -> dict[str, Any]:
    """Simulated users until the rollout ends; the requests and seconds at each change of weight or status."""
    import httpx

    lock, t0, sent, failed, tickets = threading.Lock(), time.time(), 0, 0, held_out_tickets()
    milestones, seen = [], (None, None)
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        while True:
            record = reg.get_rollout(MODEL, rollout_id)
            now = (record.status, record.weight)
            if now != seen:
                last = record.last_decision or {}
                reason, canary = last.get("reason", ""), last.get("canary_requests", 0)
                milestones.append(
                    {
                        "status": now[0],
                        "weight": now[1],
                        "requests": sent,
                        "canary_requests": canary,
                        "seconds": round(time.time() - t0, 2),
                        "reason": reason,
                    }
                )
                say(
                    f"  {sent:5d} requests ({canary:4d} canary) {time.time() - t0:6.1f} s  {now[0]:<11} weight {now[1]:.0%}  "
                    f"{reason[:110]}"
                )
                seen = now
            if record.status != "running":
                break
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"{rollout_id} still running after {timeout_s} s and {sent} requests")
            results = list(pool.map(lambda _: one_user_request(client, url, rng, lock, tickets), range(16)))
            sent += len(results)
            failed += sum(1 for status, _ in results if status != 200)
    return {
        "rollout_id": rollout_id,
        "status": record.status,
        "requests": sent,
        "failed": failed,
        "seconds": round(time.time() - t0, 2),
        "milestones": milestones,
    }


def start_rollout(url: str, ref: str) -> str:
    import httpx

    r = httpx.post(
        f"{url}/admin/rollouts",
        json={"ref": ref, "reason": "live demo"},
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=60,
    )
    if r.status_code != 201:
        raise RuntimeError(f"starting a rollout of {ref} failed: {r.status_code} {r.text}")
    return r.json()["rollout_id"]


def run_live(
    base_dir: Path, work: Path, *, seed: int = 0, tick_s: float = 0.25, timeout_s: float = 90.0, say=print
) -> dict[str, Any]:
    """Both rollouts on one gateway; returns their results (see the module docstring)."""
    from tuneloop.serve.server import BackgroundServer

    ws = work / "ws"
    reg = register_adapters(ws, base_dir, work)
    notifier = Collector()
    app, log = build_app(reg, ws, seed, notifier, tick_s)
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    with BackgroundServer(app) as server:
        for label, ref in (("bad", f"{MODEL}:2"), ("good", f"{MODEL}:3")):
            say(f"{label} candidate {ref} against champion {reg.get(MODEL, 'champion').ref}:")
            out[label] = drive(reg, server.url, start_rollout(server.url, ref), rng, timeout_s=timeout_s, say=say)
            out[label]["champion_after"] = reg.get(MODEL, "champion").ref
            out[label]["ended_event"] = next(
                e.to_dict()
                for e in reg.events(MODEL)
                if e.kind == "rollout_ended" and e.details.get("rollout_id") == out[label]["rollout_id"]
            )
    out["notifications"] = [n["event"] for n in notifier.sent]
    out["policy"] = POLICY
    log.close()
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tuneloop-rollout-live-") as tmp:
        work = Path(tmp)
        base = build_tiny_model(work / "base")
        result = run_live(base, work)
    summary = {
        label: {k: result[label][k] for k in ("status", "requests", "failed", "seconds", "champion_after")}
        | {
            "to_each_decision": [
                {k: m[k] for k in ("status", "weight", "requests", "canary_requests", "seconds")}
                for m in result[label]["milestones"]
            ]
        }
        for label in ("bad", "good")
    }
    print(json.dumps({**summary, "notifications": result["notifications"]}))
    ok = (
        result["bad"]["status"] == "rolled_back"
        and result["good"]["status"] == "promoted"
        and result["bad"]["failed"] == result["good"]["failed"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
