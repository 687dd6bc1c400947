"""An OpenAI-compatible endpoint serving a registered model version.

Entry points: :func:`load_served_model` (registry version -> model + tokenizer, integrity-checked) and
:func:`create_app` (the FastAPI app: ``GET /v1/models``, ``POST /v1/chat/completions``, ``GET /health``).
Non-streaming, greedy or sampled generation on one model; requests are serialised on a lock.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from tuneloop.modeling import load_causal_lm, load_tokenizer, render_prompt, stop_token_ids


@dataclass
class ServedModel:
    model: Any
    tokenizer: Any
    model_id: str  # e.g. "support-bot:3"
    version: dict[str, Any]


def load_served_model(registry, model_name: str, ref: str = "champion") -> ServedModel:
    """Load a version (number, alias or ``latest``) after verifying its artifact's sha256."""
    from tuneloop.registry.lineage import check_base

    v = registry.get(model_name, ref)
    path = registry.open_artifact(model_name, v["version"])  # verifies every file's sha256
    if v["artifact_kind"] == "adapter":
        lin = v["lineage"]
        base = check_base(lin.get("base") or v["base_model"], (lin.get("base") or {}).get("digest") or lin.get("base_model_fingerprint"))
        model = load_causal_lm(base, adapter=str(path))
    else:
        model = load_causal_lm(str(path))
    tok = load_tokenizer(str(path))
    return ServedModel(model=model, tokenizer=tok, model_id=v["ref"], version=v)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    seed: int | None = None


def create_app(served: ServedModel, *, default_max_tokens: int = 64):
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="tuneloop", version="1")
    lock = threading.Lock()
    created = int(time.time())

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.model_id}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        v = served.version
        return {
            "object": "list",
            "data": [
                {
                    "id": served.model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "tuneloop",
                    "root": v["base_model"],
                    "aliases": v.get("aliases", []),
                }
            ],
        }

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict[str, Any]:
        if req.stream:
            raise HTTPException(400, detail="stream=true is not supported yet; send stream=false")
        if req.model and req.model not in (served.model_id, served.version["model"]):
            raise HTTPException(404, detail=f"model {req.model!r} is not served here; this endpoint serves {served.model_id!r}")
        tok, model = served.tokenizer, served.model
        msgs = [m.model_dump() for m in req.messages]
        prompt = render_prompt(tok, msgs)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        max_new = req.max_completion_tokens or req.max_tokens or default_max_tokens
        stops = stop_token_ids(tok)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new, "eos_token_id": stops or None, "pad_token_id": tok.pad_token_id}
        if req.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            gen_kwargs.update(do_sample=False)
        with lock, torch.inference_mode():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = model.generate(**enc, **gen_kwargs)[0, enc["input_ids"].shape[1] :].tolist()
        n, finish = len(out), "length"
        for j, t in enumerate(out):
            if t in stops:
                n, finish = j, "stop"
                break
        text = tok.decode(out[:n], skip_special_tokens=True).strip()
        prompt_tokens = int(enc["input_ids"].shape[1])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n},
        }

    return app


class BackgroundServer:
    """Runs uvicorn in a thread on a free loopback port (used by the demo and tests)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
