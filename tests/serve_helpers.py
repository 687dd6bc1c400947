"""Test helpers for the gateway: a workspace with registered versions of a tiny model, and (until the monitor
branch is merged) an in-memory stand-in of the request-log/metrics interface in REQUESTLOG_API.md.

The stand-in is installed into ``sys.modules`` only when the real ``tuneloop.monitor.requestlog`` cannot be
imported; with the real module present the tests use it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
import uuid
from dataclasses import dataclass
from pathlib import Path


def install_monitor_standin() -> bool:
    """Make ``tuneloop.monitor.requestlog`` importable (stand-in) if it is not; True when the stand-in is used."""
    try:
        import tuneloop.monitor.metrics  # noqa: F401
        import tuneloop.monitor.requestlog  # noqa: F401

        return False
    except ImportError:
        pass
    pkg = sys.modules.get("tuneloop.monitor") or types.ModuleType("tuneloop.monitor")
    pkg.__path__ = []  # type: ignore[attr-defined]
    mod = types.ModuleType("tuneloop.monitor.requestlog")

    @dataclass
    class RequestRecord:
        request_id: str
        created_at: float
        endpoint: str
        model: str
        ref: str
        version: int | None
        artifact_sha256: str | None
        arm: str
        user_hash: str | None
        prompt: str
        response: str
        status: int
        error: str | None = None
        latency_s: float = 0.0
        ttft_s: float | None = None
        prompt_tokens: int = 0
        completion_tokens: int = 0
        rollout_id: str | None = None

    @dataclass
    class FeedbackRecord:
        feedback_id: str
        request_id: str
        source: str
        created_at: float
        rating: int | None = None
        score: float | None = None
        correction: str | None = None
        comment: str | None = None

    class UnknownRequest(KeyError):
        pass

    class RequestLog:
        def __init__(self):
            self.recs: dict[str, RequestRecord] = {}
            self.fb: dict[tuple[str, str], FeedbackRecord] = {}
            self.lock = threading.Lock()

        def record(self, rec):
            with self.lock:
                self.recs[rec.request_id] = rec

        def record_many(self, recs):
            for r in recs:
                self.record(r)

        def get(self, request_id):
            return self.recs.get(request_id)

        def requests(self, *, since=None, model=None, limit=None):
            return list(self.recs.values())[:limit]

        def add_feedback(self, request_id, *, source="api", rating=None, score=None, correction=None, comment=None):
            with self.lock:
                if request_id not in self.recs:
                    raise UnknownRequest(request_id)
                key = (request_id, source)
                if key in self.fb:
                    return self.fb[key], False
                self.fb[key] = FeedbackRecord(
                    uuid.uuid4().hex, request_id, source, time.time(), rating, score, correction, comment
                )
                return self.fb[key], True

        def purge(self, older_than):
            return 0

        def close(self):
            pass

    class AsyncRecorder:
        def __init__(self, log, *, max_queue=10000, flush_interval_s=0.2):
            self.log, self.dropped, self.pending = log, 0, []

        def submit(self, rec):
            self.pending.append(rec)

        def flush(self, timeout=5.0):
            pending, self.pending = self.pending, []
            self.log.record_many(pending)

        def close(self):
            self.flush()

    for name, obj in dict(
        RequestRecord=RequestRecord,
        FeedbackRecord=FeedbackRecord,
        UnknownRequest=UnknownRequest,
        RequestLog=RequestLog,
        AsyncRecorder=AsyncRecorder,
    ).items():
        setattr(mod, name, obj)
    mod.open_request_log = lambda url: RequestLog()
    metrics = types.ModuleType("tuneloop.monitor.metrics")

    class GatewayMetrics:
        def __init__(self, registry=None):
            self.observed = []

        def observe(self, **kw):
            self.observed.append(kw)

        def render(self):
            lines = [f'tuneloop_requests_total{{model="{o["model"]}",status="{o["status"]}"}} 1' for o in self.observed]
            return ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4"

    class _Gauge:
        def labels(self, **kw):
            return self

        def set(self, value):
            pass

    GatewayMetrics.queue_depth = _Gauge()
    metrics.GatewayMetrics = GatewayMetrics
    sys.modules["tuneloop.monitor"] = pkg
    sys.modules["tuneloop.monitor.requestlog"] = mod
    sys.modules["tuneloop.monitor.metrics"] = metrics
    return True


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny base, saved with the tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def register_versions(
    workspace: Path, base_dir: Path, tmp: Path, *, n_adapters: int = 2, full: bool = True, name: str = "tiny-bot"
):
    """A SQLite registry in ``workspace`` with ``n_adapters`` adapter versions (v1..) and optionally one full model."""
    from tuneloop.registry.lineage import base_model_ref
    from tuneloop.registry.sqlite import SqliteRegistry

    reg = SqliteRegistry(workspace)
    base = base_model_ref(str(base_dir))
    for i in range(n_adapters):
        art = make_adapter(base_dir, tmp / f"adapter{i}", seed=100 + i)
        reg.register(
            name,
            art,
            artifact_kind="adapter",
            base_model=str(base_dir),
            lineage={"base": base, "base_model_fingerprint": base["digest"]},
            metrics={},
            gates={},
        )
    if full:
        reg.register(name, base_dir, artifact_kind="model", base_model=str(base_dir), lineage={}, metrics={}, gates={})
    return reg


def sse_events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


GATEWAY_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from serve_helpers import install_monitor_standin
install_monitor_standin()
from tuneloop.serve.server import serve
sys.exit(serve({target!r}, port={port}))
"""


def start_gateway_process(target: Path, port: int, env: dict | None = None):
    """``serve(target, port=port)`` in a child process (a real second gateway); returns the Popen once /health answers."""
    import os
    import subprocess

    import httpx

    code = GATEWAY_SCRIPT.format(tests=str(Path(__file__).parent), target=str(target), port=port)
    src = str(Path(__file__).resolve().parents[1] / "src")
    full_env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    import tempfile

    log = tempfile.NamedTemporaryFile(
        "w+", prefix="gateway-", suffix=".log", delete=False
    )  # a pipe nobody reads could fill up
    proc = subprocess.Popen([sys.executable, "-c", code], env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start within 120 s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
