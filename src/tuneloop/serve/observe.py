"""What the gateway records about each request: the request log (through ``AsyncRecorder``) and Prometheus
metrics (``GatewayMetrics``), both from :mod:`tuneloop.monitor`. One :class:`Observation` per request."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tuneloop.serve.backends import Route
from tuneloop.serve.router import user_hash

log = logging.getLogger(__name__)


@dataclass
class Observation:
    request_id: str
    endpoint: str  # "chat.completions" | "completions"
    ref: str = ""
    route: Route | None = None
    user_key: str | None = None
    prompt: str = ""
    response: str = ""
    status: int = 200
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    started: float = field(default_factory=time.perf_counter)
    created_at: float = field(default_factory=time.time)

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started

    def take_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def take_body(self, body: dict[str, Any]) -> None:
        """Response text (first choice) and usage from a non-streaming response body."""
        self.take_usage(body.get("usage"))
        choices = body.get("choices") or []
        if choices:
            c = choices[0]
            self.response = (c.get("message") or {}).get("content") or c.get("text") or ""

    def take_chunk(self, chunk: dict[str, Any]) -> None:
        self.take_usage(chunk.get("usage"))
        for c in chunk.get("choices") or []:
            if c.get("index", 0) != 0:
                continue
            piece = (c.get("delta") or {}).get("content") or c.get("text") or ""
            if piece:
                self.first_token()
                self.response += piece


def prompt_text(endpoint: str, body: Any) -> str:
    if endpoint == "chat.completions":
        return json.dumps([{"role": m.role, "content": m.text()} for m in body.messages], ensure_ascii=False)
    prompts = body.prompts()
    first = prompts[0] if prompts else ""
    return first if isinstance(first, str) else json.dumps(first)


class Recorder:
    """Submits each finished observation to the request log and the metrics; either may be absent."""

    def __init__(self, recorder=None, metrics=None):
        self.recorder = recorder
        self.metrics = metrics

    def finish(self, obs: Observation) -> None:
        latency = time.perf_counter() - obs.started
        route = obs.route
        version = route.version if route else None
        if self.metrics is not None:
            try:
                self.metrics.observe(
                    model=route.model if route else (obs.ref.split(":")[0].split("@")[0] or "unknown"),
                    version=str(version.version) if version is not None else "none",
                    arm=route.arm if route else "none",
                    endpoint=obs.endpoint,
                    status=obs.status,
                    latency_s=latency,
                    ttft_s=obs.ttft_s,
                    prompt_tokens=obs.prompt_tokens,
                    completion_tokens=obs.completion_tokens,
                )
            except Exception:
                log.exception("metrics observe failed")
        if self.recorder is None:
            return
        from tuneloop.monitor.requestlog import RequestRecord

        rec = RequestRecord(
            request_id=obs.request_id,
            created_at=obs.created_at,
            endpoint=obs.endpoint,
            model=route.model if route else obs.ref.split(":")[0].split("@")[0],
            ref=obs.ref,
            version=version.version if version is not None else None,
            artifact_sha256=route.artifact_digest if route else None,
            arm=route.arm if route else "direct",
            user_hash=user_hash(obs.user_key),
            prompt=obs.prompt,
            response=obs.response,
            status=obs.status,
            error=obs.error
            if obs.error
            else (None if obs.status < 400 and obs.response else ("empty output" if obs.status < 400 else None)),
            latency_s=latency,
            ttft_s=obs.ttft_s,
            prompt_tokens=obs.prompt_tokens,
            completion_tokens=obs.completion_tokens,
            rollout_id=route.rollout_id if route else None,
        )
        try:
            self.recorder.submit(rec)
        except Exception:
            log.exception("request log submit failed")
