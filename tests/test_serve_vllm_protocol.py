"""The ``openai`` backend's vLLM path against a stub that speaks vLLM's runtime-LoRA protocol (not vLLM: no GPU
here; ``scripts/check_vllm_gateway.py`` is the check against a real vLLM on a GPU).

The stub answers like vLLM 0.6+: ``GET /version``; ``GET /v1/models`` lists the base and the loaded adapters;
``POST /v1/load_lora_adapter {lora_name, lora_path}``; chat for a known name; and for an unknown name the 404
that vLLM sends, in its older bare shape ``{"object": "error", "message": ..., "type": "NotFoundError",
"code": 404}``. A "restart" forgets the adapters loaded at run time, as vLLM does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import Request

from serve_helpers import install_monitor_standin, register_versions

install_monitor_standin()

BASE = "stub-base"


def vllm_stub():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.loaded = {}  # lora_name -> lora_path
    app.state.load_calls = []

    @app.get("/version")
    async def version():
        return {"version": "0.6.3-stub"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in [BASE, *app.state.loaded]]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        app.state.load_calls.append(body)
        if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
            return JSONResponse(
                {"object": "error", "message": "no adapter_config.json", "type": "BadRequestError", "code": 400}, 400
            )
        if body["lora_name"] in app.state.loaded:
            return JSONResponse(
                {
                    "object": "error",
                    "message": f"The lora adapter '{body['lora_name']}' has already been loaded.",
                    "type": "InvalidUserInput",
                    "code": 400,
                },
                400,
            )
        app.state.loaded[body["lora_name"]] = body["lora_path"]
        return JSONResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body["model"] not in [BASE, *app.state.loaded]:
            return JSONResponse(
                {
                    "object": "error",
                    "message": f"The model `{body['model']}` does not exist.",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                },
                404,
            )
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"answered by {body['model']}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }

    return app


@pytest.fixture()
def served(tiny_model, tmp_path):
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.upstream import UpstreamBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    reg = register_versions(tmp_path / "ws", tiny_model, tmp_path / "arts", n_adapters=1, full=False)
    stub = vllm_stub()
    with BackgroundServer(stub) as up:
        backend = UpstreamBackend(f"{up.url}/v1", reg, timeout_s=30, retries=0)
        with BackgroundServer(create_app(backend, Router(reg), GatewaySettings(preload=["tiny-bot:1"]))) as gw:
            yield reg, stub, gw


def test_adapter_loaded_into_vllm_under_its_digest_and_reloaded_after_a_restart(served):
    from openai import OpenAI

    reg, stub, gw = served
    name = f"tiny-bot-{reg.get('tiny-bot', 1).artifact_digest[:12]}"
    # preloading loaded the adapter once, under the digest-pinned name, from the verified artifact directory
    assert [c["lora_name"] for c in stub.state.load_calls] == [name]
    assert Path(stub.state.load_calls[0]["lora_path"]) == Path(reg.open_artifact("tiny-bot", 1))
    client = OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-bot:1", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == f"answered by {name}"  # vLLM ran the adapter, not the base
    assert raw.parse().model == "tiny-bot:1" and raw.headers["x-tuneloop-version"] == "tiny-bot:1"
    stub.state.loaded.clear()  # vLLM restarted: adapters loaded at run time are gone
    again = client.chat.completions.create(model="tiny-bot:1", messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.content == f"answered by {name}"  # the gateway loaded it again and retried
    assert [c["lora_name"] for c in stub.state.load_calls] == [name, name]
    assert json.dumps(again.model_dump()).count("/") == 0  # no path in what the client sees
