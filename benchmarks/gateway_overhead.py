"""Latency the gateway adds in front of an upstream, against that upstream called directly and against a LiteLLM
proxy in front of the same upstream, in the same run.

    python benchmarks/gateway_overhead.py [--rate 50] [--requests 600] [--rounds 6]
                                          [--litellm PATH | --no-litellm] [--http-stack auto|h11] [--floor]

The upstream is a stub OpenAI-compatible server written here on raw asyncio (its own process): it answers
``POST /v1/chat/completions`` with a fixed completion, or with a fixed SSE stream (role and first token at once,
the rest 5 ms later) when ``stream`` is set, and ``GET /v1/models`` with ``bench:1``. So the difference between
the paths is the proxies' own cost, not model time. Three targets (four with ``--floor``), each its own process:

- ``direct``: the stub itself;
- ``gateway``: ``tuneloop serve`` with ``serve.backend: openai`` pointing at the stub (``build_gateway``: the same
  app, registry, request log with PII redaction, and Prometheus metrics as the CLI; uvicorn as ``serve`` runs it);
- ``litellm``: ``litellm --config`` with one ``openai/bench:1`` model whose ``api_base`` is the stub. LiteLLM's
  proxy extra pins versions (``rich<14``, ``huggingface_hub<2``) that the project venv must not downgrade, so
  it lives in its own venv: ``--litellm`` names its ``litellm`` executable (default: ``litellm`` on PATH, then
  ``/tmp/litellm-venv/bin/litellm``); install with ``pip install 'tuneloop[bench-litellm]'`` in a separate venv;
- ``floor`` (``--floor``): a proxy that only relays bytes (asyncio on uvloop, one upstream connection per client
  connection, no HTTP parsing): what one more process and loopback hop costs on this machine, the least any
  proxy in Python can add.

The load generator (this process, one httpx client per target) is open-loop: request ``i`` is due at
``t0 + i / rate`` whatever earlier requests do, and its latency counts from that due time (no coordinated
omission). Each mode (non-streaming, streaming) runs ``--rounds`` (20) rounds of ``requests / rounds`` per target,
the targets in rotating order, so a busy moment on a shared machine falls on all of them. Streaming latency is
time to first token (the first SSE event with non-empty content). Added latency = percentile(target) -
percentile(direct). Each target gets 50 warm-up requests first. ``cpu ms/req`` is the CPU time (user + system,
children included) each server process spent per measured request: on a machine shared with other jobs, where
waiting for a core inflates every latency, it is the figure that does not depend on the neighbours.

The last line printed is one JSON object: ``added_p50_ms``, ``added_p99_ms``, ``litellm_added_p50_ms``,
``litellm_added_p99_ms``, ``stream_ttft_added_p50_ms`` (and p99, LiteLLM's streaming figures, the floor's
when measured, the direct baselines, CPU per request, the rate, the counts and the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench:1"
STREAM_GAP_S = 0.005
LITELLM_KEY = "sk-bench-" + os.urandom(16).hex()
MESSAGES = [
    {"role": "system", "content": "You are a support assistant."},
    {"role": "user", "content": "My parcel 4417 is late, where is it? It was due on Monday."},
]

# ------------------------------------------------------------------------------------------------ stub upstream

CHAT_BODY = json.dumps(
    {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Your parcel is on its way and arrives tomorrow."},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 24, "completion_tokens": 10, "total_tokens": 34},
    }
).encode()
MODELS_BODY = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}]}
).encode()


def sse_event(delta: dict | None, *, finish: str | None = None, usage: dict | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)  # one HTTP chunk per event


STREAM_FIRST = sse_event({"role": "assistant", "content": ""}) + sse_event({"content": "Your"})
STREAM_REST = (
    sse_event({"content": " parcel is"}) + sse_event({"content": " on its way."}) + sse_event({}, finish="stop")
)
STREAM_USAGE = sse_event(None, usage={"prompt_tokens": 24, "completion_tokens": 5, "total_tokens": 29})
STREAM_END = b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n") + b"0\r\n\r\n"


def http_head(status: str, ctype: bytes, length: int | None) -> bytes:
    framing = b"content-length: %d" % length if length is not None else b"transfer-encoding: chunked"
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\n%s\r\nconnection: keep-alive\r\n\r\n" % (
        status.encode(),
        ctype,
        framing,
    )


async def stub_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive, just enough for httpx, the openai client and aiohttp."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path = lines[0].split(b" ")[:2]
            length = 0
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            if method == b"GET" and path.endswith(b"/models"):
                writer.write(http_head("200 OK", b"application/json", len(MODELS_BODY)) + MODELS_BODY)
            elif method == b"POST" and path.endswith(b"/chat/completions"):
                req = json.loads(body)
                if not req.get("stream"):
                    writer.write(http_head("200 OK", b"application/json", len(CHAT_BODY)) + CHAT_BODY)
                else:
                    writer.write(http_head("200 OK", b"text/event-stream", None) + STREAM_FIRST)
                    await writer.drain()
                    await asyncio.sleep(STREAM_GAP_S)
                    usage = (req.get("stream_options") or {}).get("include_usage")
                    writer.write(STREAM_REST + (STREAM_USAGE if usage else b"") + STREAM_END)
            else:
                msg = b'{"error": {"message": "not found", "type": "invalid_request_error", "code": null}}'
                writer.write(http_head("404 Not Found", b"application/json", len(msg)) + msg)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def serve_floor(port: int, upstream_port: int) -> None:
    """The ``floor`` target: relays bytes both ways, nothing else."""
    import uvloop

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        for sock in (writer, up_writer):
            sock.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

    async def main() -> None:
        server = await asyncio.start_server(client, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def serve_stub(port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(stub_connection, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------ gateway child


def serve_gateway(ws: str, port: int, upstream: str, stack: str = "auto") -> None:
    """The gateway as ``tuneloop serve`` builds it (``build_gateway``), with ``serve.backend: openai``, on the
    HTTP stack ``serve`` picks (``http_stack()``), or on h11 + asyncio with ``stack="h11"``."""
    import logging

    import uvicorn

    from tuneloop.config import PipelineConfig
    from tuneloop.serve.server import build_gateway, http_stack

    logging.basicConfig(level=logging.WARNING)
    cfg = PipelineConfig(
        name="bench",
        base_model="stub",
        data={"train_data": "unused.jsonl"},  # only serve: is used
        serve={"backend": "openai", "upstream": upstream},
    )
    app = build_gateway(cfg, Path(ws), preload=["bench:1"])
    chosen = http_stack() if stack == "auto" else {"http": "h11", "loop": "asyncio"}
    print(f"gateway HTTP stack: {chosen['http']} + {chosen['loop']}", flush=True)
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_keep_alive=75, **chosen
    )


def make_workspace(ws: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from tuneloop.registry.sqlite import SqliteRegistry

    art = ws.parent / "artifact"
    art.mkdir(parents=True, exist_ok=True)
    (art / "config.json").write_text('{"note": "served by the stub upstream; never loaded here"}')
    save_file({"unused": np.zeros(1, dtype=np.float32)}, str(art / "model.safetensors"))  # the registry wants weights
    SqliteRegistry(ws).register(
        "bench", art, artifact_kind="model", base_model="stub", lineage={}, metrics={}, gates={}
    )


# ------------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, what: str, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            r = httpx.post(
                url,
                json={"model": "bench", "messages": MESSAGES, "max_tokens": 8},
                timeout=10,
                headers={"authorization": f"Bearer {LITELLM_KEY}"},
            )
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(
                f"{what} did not answer {url} within {timeout_s:.0f} s (exit code {proc.poll()}); "
                "run it by hand to see why"
            )
        time.sleep(0.5)


def start_child(*role: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, __file__, "--role", *role], env=env)


def find_litellm(given: str | None) -> str:
    for candidate in [given] if given else [shutil.which("litellm"), "/tmp/litellm-venv/bin/litellm"]:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(
        "LiteLLM not found: install it in its own venv (python -m venv /tmp/litellm-venv && "
        "/tmp/litellm-venv/bin/pip install 'litellm[proxy]') and pass --litellm /tmp/litellm-venv/bin/litellm, "
        "or run with --no-litellm"
    )


def start_litellm(exe: str, stub_url: str, port: int, tmp: Path) -> subprocess.Popen:
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        json.dumps(
            {  # JSON is YAML
                "model_list": [
                    {
                        "model_name": "bench",
                        "litellm_params": {"model": f"openai/{MODEL}", "api_base": stub_url, "api_key": "sk-stub"},
                    }
                ],
                "litellm_settings": {"telemetry": False, "drop_params": True},
                "general_settings": {
                    "master_key": LITELLM_KEY
                },  # it refuses to start without one; no database behind it
            }
        )
    )
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCKER": "1",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    env.pop("PYTHONPATH", None)
    log = open(tmp / "litellm.log", "w")
    return subprocess.Popen(
        [exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


# ------------------------------------------------------------------------------------------------ load


EXPECTED = {False: "Your parcel is on its way and arrives tomorrow.", True: "Your parcel is on its way."}


async def one_call(client, url: str, model: str, stream: bool, due: float) -> tuple[float, bool]:
    """(latency from the due time: whole response, or first token when streaming; answer as expected)."""
    import httpx

    await asyncio.sleep(max(0.0, due - time.perf_counter()))
    try:
        return await exchange(client, url, model, stream, due)
    except httpx.HTTPError:  # counted as an error, at the time it failed
        return time.perf_counter() - due, False


async def exchange(client, url: str, model: str, stream: bool, due: float) -> tuple[float, bool]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "stream": stream}
    if not stream:
        r = await client.post(url, json=body)
        latency = time.perf_counter() - due
        return latency, r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == EXPECTED[False]
    ttft, text = None, ""
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - due
                text += piece
        ok = r.status_code == 200 and text == EXPECTED[True]
    return (ttft if ttft is not None else time.perf_counter() - due), ok


async def run_round(client, url: str, model: str, stream: bool, n: int, rate: float) -> list[tuple[float, bool]]:
    t0 = time.perf_counter() + 0.05
    return list(await asyncio.gather(*(one_call(client, url, model, stream, t0 + i / rate) for i in range(n))))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children so far."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def measure(targets: dict[str, tuple[str, str, int]], stream: bool, args) -> dict[str, dict]:
    import httpx

    per_round = max(1, args.requests // args.rounds)
    names = list(targets)
    samples: dict[str, list[tuple[float, bool]]] = {t: [] for t in names}
    cpu = {t: 0.0 for t in names}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    auth = {"authorization": f"Bearer {LITELLM_KEY}"}  # LiteLLM's master key; the others ignore it
    clients = {t: httpx.AsyncClient(timeout=30, headers=auth, limits=limits) for t in names}
    try:
        for t in names:  # warm-up: connections, caches, first-call costs
            await run_round(clients[t], targets[t][0], targets[t][1], stream, 50, args.rate)
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for t in order:
                before = cpu_seconds(targets[t][2])
                samples[t] += await run_round(clients[t], targets[t][0], targets[t][1], stream, per_round, args.rate)
                await asyncio.sleep(0.3)  # the gateway's request log writes its batch (0.2 s) on its own thread
                cpu[t] += cpu_seconds(targets[t][2]) - before
    finally:
        for c in clients.values():
            await c.aclose()
    return {t: {**summarize(s), "cpu_ms_per_request": 1000 * cpu[t] / len(s)} for t, s in samples.items()}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * q // 100) - 1))
    return sorted_values[int(k)]


def summarize(samples: list[tuple[float, bool]]) -> dict:
    lat = sorted(s[0] * 1000 for s in samples)
    return {
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "n": len(lat),
        "errors": sum(not s[1] for s in samples),
    }


# ------------------------------------------------------------------------------------------------ main


def report(results: dict[str, dict[str, dict]], args) -> dict:
    print(
        f"\n{'mode':14s} {'target':8s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'added p50':>10s} {'added p99':>10s} {'errors':>7s}"
        f" {'cpu ms/req':>10s}"
    )
    for mode, res in results.items():
        base = res["direct"]
        for t, r in res.items():
            added = (
                "" if t == "direct" else f"{r['p50_ms'] - base['p50_ms']:10.2f} {r['p99_ms'] - base['p99_ms']:10.2f}"
            )
            print(
                f"{mode:14s} {t:8s} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {added:21s} {r['errors']:7d} {r['cpu_ms_per_request']:10.3f}"
            )
    ns, st = results["non-streaming"], results["streaming-ttft"]

    def added(res: dict, target: str, q: str) -> float | None:
        return round(res[target][q] - res["direct"][q], 3) if target in res else None

    out = {
        "added_p50_ms": added(ns, "gateway", "p50_ms"),
        "added_p99_ms": added(ns, "gateway", "p99_ms"),
        "litellm_added_p50_ms": added(ns, "litellm", "p50_ms"),
        "litellm_added_p99_ms": added(ns, "litellm", "p99_ms"),
        "added_p90_ms": added(ns, "gateway", "p90_ms"),
        "litellm_added_p90_ms": added(ns, "litellm", "p90_ms"),
        "stream_ttft_added_p50_ms": added(st, "gateway", "p50_ms"),
        "stream_ttft_added_p99_ms": added(st, "gateway", "p99_ms"),
        "litellm_stream_ttft_added_p50_ms": added(st, "litellm", "p50_ms"),
        "litellm_stream_ttft_added_p99_ms": added(st, "litellm", "p99_ms"),
        "floor_added_p50_ms": added(ns, "floor", "p50_ms"),
        "floor_added_p99_ms": added(ns, "floor", "p99_ms"),
        "floor_stream_ttft_added_p50_ms": added(st, "floor", "p50_ms"),
        "direct_p50_ms": round(ns["direct"]["p50_ms"], 3),
        "direct_p99_ms": round(ns["direct"]["p99_ms"], 3),
        "direct_ttft_p50_ms": round(st["direct"]["p50_ms"], 3),
        "direct_ttft_p99_ms": round(st["direct"]["p99_ms"], 3),
        "gateway_p50_ms": round(ns["gateway"]["p50_ms"], 3),
        "gateway_p99_ms": round(ns["gateway"]["p99_ms"], 3),
        "gateway_cpu_ms_per_request": round(ns["gateway"]["cpu_ms_per_request"], 3),
        "gateway_stream_cpu_ms_per_request": round(st["gateway"]["cpu_ms_per_request"], 3),
        "litellm_cpu_ms_per_request": round(ns["litellm"]["cpu_ms_per_request"], 3) if "litellm" in ns else None,
        "litellm_stream_cpu_ms_per_request": round(st["litellm"]["cpu_ms_per_request"], 3) if "litellm" in st else None,
        "errors": sum(r["errors"] for res in results.values() for r in res.values()),
        "gateway_http_stack": args.http_stack,
        "rate_rps": args.rate,
        "requests_per_target_and_mode": results["non-streaming"]["direct"]["n"],
        "rounds": args.rounds,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_implementation()} {platform.python_version()}",
    }
    if out["added_p50_ms"] is not None and out["litellm_added_p50_ms"]:
        out["litellm_over_gateway_p50"] = round(out["litellm_added_p50_ms"] / max(out["added_p50_ms"], 0.01), 1)
    return out


def run_all(args) -> dict:
    import httpx  # noqa: F401  (fail early if missing)

    exe = None if args.no_litellm else find_litellm(args.litellm)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            stub_port, gw_port = free_port(), free_port()
            stub = f"http://127.0.0.1:{stub_port}/v1"
            procs.append(start_child("stub", str(stub_port)))
            wait_ready(procs[-1], f"{stub}/chat/completions", "the stub upstream")
            ws = Path(tmp) / "ws"
            make_workspace(ws)
            procs.append(start_child("gateway", str(ws), str(gw_port), stub, args.http_stack))
            wait_ready(procs[-1], f"http://127.0.0.1:{gw_port}/v1/chat/completions", "the gateway")
            targets = {
                "direct": (f"{stub}/chat/completions", MODEL, procs[0].pid),
                "gateway": (f"http://127.0.0.1:{gw_port}/v1/chat/completions", MODEL, procs[1].pid),
            }
            if exe:
                ll_port = free_port()
                procs.append(start_litellm(exe, stub, ll_port, Path(tmp)))
                wait_ready(
                    procs[-1], f"http://127.0.0.1:{ll_port}/v1/chat/completions", f"LiteLLM (log: {tmp}/litellm.log)"
                )
                targets["litellm"] = (f"http://127.0.0.1:{ll_port}/v1/chat/completions", "bench", procs[-1].pid)
            if args.floor:
                floor_port = free_port()
                procs.append(start_child("floor", str(floor_port), str(stub_port)))
                wait_ready(procs[-1], f"http://127.0.0.1:{floor_port}/v1/chat/completions", "the byte relay")
                targets["floor"] = (f"http://127.0.0.1:{floor_port}/v1/chat/completions", MODEL, procs[-1].pid)
            print(
                f"targets up: {', '.join(targets)}; {args.requests} requests per target and mode at {args.rate}/s",
                flush=True,
            )
            results = {
                "non-streaming": asyncio.run(measure(targets, False, args)),
                "streaming-ttft": asyncio.run(measure(targets, True, args)),
            }
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    return report(results, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second (open loop)")
    ap.add_argument("--requests", type=int, default=600, help="measured requests per target and mode")
    ap.add_argument("--rounds", type=int, default=20, help="rounds per mode, targets in rotating order")
    ap.add_argument("--litellm", default=None, help="the litellm executable (its own venv)")
    ap.add_argument("--no-litellm", action="store_true", help="measure only direct and gateway")
    ap.add_argument("--floor", action="store_true", help="also measure a proxy that only relays bytes (the floor)")
    ap.add_argument(
        "--http-stack",
        choices=("auto", "h11"),
        default="auto",
        help="the gateway's HTTP parser and loop: auto (as tuneloop serve: httptools + uvloop when "
        "installed) or h11 (pure-Python h11 + asyncio, the stack before httptools and uvloop became dependencies)",
    )
    ap.add_argument("--role", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        if args.role[0] == "stub":
            serve_stub(int(args.role[1]))
        elif args.role[0] == "floor":
            serve_floor(int(args.role[1]), int(args.role[2]))
        else:
            serve_gateway(args.role[1], int(args.role[2]), args.role[3], args.role[4])
        return
    sys.path.insert(0, str(ROOT / "src"))
    print(json.dumps(run_all(args)))


if __name__ == "__main__":
    main()
