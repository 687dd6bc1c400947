"""GPU check of the gateway's vLLM path (``serve.backend: openai`` in front of vLLM with runtime LoRA loading).

    python scripts/check_vllm_gateway.py --base BASE_MODEL_DIR --adapter ADAPTER_DIR [--port 8011] [--timeout 600]

Needs a CUDA GPU and ``pip install vllm``. It:

1. registers the adapter in a scratch workspace (the registry copies and hashes it);
2. starts ``vllm serve BASE --enable-lora --max-lora-rank 64`` with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
   on loopback and waits for ``/health``;
3. builds the gateway with ``UpstreamBackend`` pointing at vLLM; preparing the version must load the adapter
   through ``POST /v1/load_lora_adapter`` under ``<name>-<sha256[:12]>`` (checked in vLLM's ``/v1/models``);
4. sends a chat request and a streaming one through the gateway with the official ``openai`` client and
   checks the identity headers and that the answer equals vLLM's own answer for that adapter name
   (temperature 0);
5. stops vLLM and checks the gateway answers 503 ``upstream_unavailable`` in OpenAI's shape.

The last line printed is one JSON object (``ok``, the steps' results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def wait_health(url: str, proc, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"vLLM did not answer {url} within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    import httpx
    from openai import OpenAI

    from tuneloop.registry.lineage import base_model_ref
    from tuneloop.registry.sqlite import SqliteRegistry
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.upstream import UpstreamBackend, lora_name
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        reg = SqliteRegistry(Path(tmp))
        base = base_model_ref(args.base)
        v = reg.register(
            "gpu-check",
            Path(args.adapter),
            artifact_kind="adapter",
            base_model=args.base,
            lineage={"base": base, "base_model_fingerprint": base["digest"]},
            metrics={},
            gates={},
        )
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        vllm = subprocess.Popen(
            [
                "vllm",
                "serve",
                args.base,
                "--enable-lora",
                "--max-lora-rank",
                "64",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.port),
                "--max-model-len",
                "2048",
                "--gpu-memory-utilization",
                "0.5",
            ],
            env=env,
        )
        upstream = f"http://127.0.0.1:{args.port}/v1"
        try:
            wait_health(f"http://127.0.0.1:{args.port}/health", vllm, args.timeout)
            backend = UpstreamBackend(upstream, reg, timeout_s=120)
            app = create_app(backend, Router(reg), GatewaySettings(preload=["gpu-check:1"]))
            with BackgroundServer(app) as gw:
                served = [m["id"] for m in httpx.get(f"{upstream}/models", timeout=10).json()["data"]]
                result["lora_loaded"] = lora_name(v) in served
                msgs = [{"role": "user", "content": "Say hello in three words."}]
                raw = OpenAI(
                    base_url=f"{gw.url}/v1", api_key="x", max_retries=0
                ).chat.completions.with_raw_response.create(
                    model="gpu-check:1", messages=msgs, max_tokens=16, temperature=0
                )
                via = raw.parse().choices[0].message.content
                direct = (
                    OpenAI(base_url=upstream, api_key="x")
                    .chat.completions.create(model=lora_name(v), messages=msgs, max_tokens=16, temperature=0)
                    .choices[0]
                    .message.content
                )
                result["same_answer"] = via == direct
                result["headers"] = (
                    raw.headers.get("x-tuneloop-version") == "gpu-check:1"
                    and raw.headers.get("x-tuneloop-artifact") == v.artifact_digest.split(":")[-1]
                )
                chunks = list(
                    OpenAI(base_url=f"{gw.url}/v1", api_key="x").chat.completions.create(
                        model="gpu-check:1", messages=msgs, max_tokens=16, temperature=0, stream=True
                    )
                )
                result["stream_text_matches"] = (
                    "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == via
                )
                vllm.terminate()
                vllm.wait(120)
                down = httpx.post(
                    f"{gw.url}/v1/chat/completions", json={"model": "gpu-check:1", "messages": msgs}, timeout=60
                )
                result["down_is_503"] = (
                    down.status_code == 503 and down.json()["error"]["code"] == "upstream_unavailable"
                )
        finally:
            if vllm.poll() is None:
                vllm.terminate()
                vllm.wait(120)
    result["ok"] = all(v for k, v in result.items() if isinstance(v, bool))
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
