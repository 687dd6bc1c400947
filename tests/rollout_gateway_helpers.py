"""Helpers for the gateway's rollout tests: a scriptable in-process backend, a registry of small versions, and
a gateway app over them (real FastAPI app, real SQLite registry and request log, real HTTP on loopback)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from tuneloop.registry.records import ModelVersion

MODEL = "support-bot"
ADMIN = "admin-secret"


class ScriptedBackend:
    """A backend whose answers name the version; versions in ``crash`` raise, ``fail_5xx`` answer 500, and
    ``refuse`` are refused at load (503)."""

    kind = "scripted"

    def __init__(self, *, crash=(), fail_5xx=(), refuse=()):
        self.crash, self.fail_5xx, self.refuse = set(crash), set(fail_5xx), set(refuse)
        self.prepared: list[str] = []
        self.calls: dict[str, int] = {}

    async def prepare(self, version: ModelVersion) -> dict[str, Any]:
        from tuneloop.serve.errors import APIError

        if version.version in self.refuse:
            raise APIError(503, f"{version.ref} failed its probes: empty answers", code="version_refused")
        self.prepared.append(version.ref)
        return {"status": "passed"}

    def answer(self, route) -> str:
        from tuneloop.serve.errors import APIError

        self.calls[route.version_ref] = self.calls.get(route.version_ref, 0) + 1
        n = route.version.version
        if n in self.crash:
            raise RuntimeError(f"{route.version_ref} crashed (CUDA error: device-side assert)")
        if n in self.fail_5xx:
            raise APIError(500, f"{route.version_ref} failed", code="internal_error")
        return f"answer from {route.version_ref}"

    async def chat(self, route, req, ctx):
        text = self.answer(route)
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        if not req.stream:
            await asyncio.sleep(0)
            return {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": route.version_ref,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }

        async def chunks():
            for piece in text.split(" "):
                yield {
                    "object": "chat.completion.chunk",
                    "model": route.version_ref,
                    "choices": [{"index": 0, "delta": {"content": piece + " "}, "finish_reason": None}],
                }
            yield {"object": "chat.completion.chunk", "model": route.version_ref, "choices": [], "usage": usage}

        return chunks()

    async def completion(self, route, req, ctx):
        raise NotImplementedError

    def loaded(self) -> list[dict[str, Any]]:
        return [{"version": ref} for ref in self.prepared]

    async def close(self) -> None:
        pass


class ListNotifier:
    def __init__(self):
        self.sent: list[tuple[str, str, dict]] = []

    def notify(self, event, *, subject, message, details=None, gate_results=None):
        self.sent.append((event, message, details or {}))
        return 1

    def close(self, timeout=30.0):
        pass


def make_registry(root: Path, n_versions: int = 3):
    """A SQLite registry with ``support-bot:1..n`` (small safetensors models) and champion -> 1."""
    from tuneloop.registry.sqlite import SqliteRegistry

    reg = SqliteRegistry(root / "ws")
    for i in range(1, n_versions + 1):
        d = root / f"m{i}"
        d.mkdir(parents=True)
        save_file({"w": np.full((2, 2), float(i), dtype=np.float32)}, str(d / "model.safetensors"))
        reg.register(MODEL, d, artifact_kind="model", base_model="tiny", lineage={}, metrics={}, gates={})
    reg.promote(MODEL, 1, actor="test")
    return reg


def make_app(
    reg,
    log_path: Path | str,
    backend,
    *,
    tick_s: float | None = None,
    notifier=None,
    policy=None,
    ttl_s: float = 0.5,
    api_keys: frozenset[str] = frozenset(),
):
    """(app, request log, recorder) for a gateway over ``reg`` and the request log at ``log_path`` (a SQLite
    path or a database URL)."""
    from tuneloop.monitor.requestlog import AsyncRecorder, open_request_log
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.router import Router

    log = open_request_log(str(log_path))
    recorder = AsyncRecorder(log, flush_interval_s=0.05)
    settings = GatewaySettings(admin_token=ADMIN, rollout_tick_s=tick_s, rollout_policy=policy, api_keys=api_keys)
    app = create_app(backend, Router(reg, ttl_s=ttl_s), settings, recorder=recorder, request_log=log, notifier=notifier)
    return app, log, recorder


def chat(client, url: str, user: str | None, model: str = MODEL, **kw):
    body = {"model": model, "messages": [{"role": "user", "content": "where is my order?"}], "max_tokens": 4, **kw}
    if user is not None:
        body["user"] = user
    return client.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def wait_for(cond, timeout: float = 20.0, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
