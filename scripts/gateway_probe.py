"""Two low-noise views of the gateway's own cost per request, for before/after comparisons of the hot path.

    PYTHONPATH=src python scripts/gateway_probe.py [--requests 2000] [--root DIR]

1. ``app``: the gateway app (``build_gateway`` with ``serve.backend: openai``, request log and metrics on) driven
   in-process through its ASGI interface, no HTTP server, against the stub upstream of
   ``benchmarks/gateway_overhead.py``: process CPU per request, plain and streaming.
2. ``probe``: the stub and the gateway (uvicorn, as ``tuneloop serve`` runs it) as processes, one raw-socket
   client sending requests one at a time, alternating direct and through the gateway: p50/p99 of each, the
   added latency, and the gateway process's CPU per request.

``--root`` runs another checkout's ``src`` (e.g. a ``git worktree`` of an older commit) for an A/B; run the
two alternately, since this machine's speed drifts. Prints one JSON line last. Not a substitute for
``benchmarks/gateway_overhead.py`` (open-loop load, LiteLLM), which is the figure the docs compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def chat_body(stream: bool) -> bytes:
    import gateway_overhead as go

    return json.dumps(
        {"model": go.MODEL, "messages": go.MESSAGES, "max_tokens": 16, "temperature": 0, "stream": stream}
    ).encode()


async def app_cpu(app, stream: bool, n: int) -> float:
    """Process CPU ms per request of the app driven in-process (lifespan on, 200 warm-up requests)."""
    body = chat_body(stream)

    async def one() -> None:
        sent: list[dict] = []
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if pending:
                return pending.pop()
            await asyncio.sleep(3600)  # no disconnect while the request runs

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"x"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }
        await app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"the gateway answered {sent[0]['status']}")

    async with app.router.lifespan_context(app):
        for _ in range(200):
            await one()
        t0 = time.process_time()
        for _ in range(n):
            await one()
        return 1000 * (time.process_time() - t0) / n


def exchange(sock: socket.socket, data: bytes, stream: bool) -> float:
    """Seconds to the whole answer (plain) or to the first token (stream), on a keep-alive connection."""
    t0, buf, first = time.perf_counter(), b"", None
    sock.sendall(data)
    while True:
        buf += sock.recv(65536)
        if stream:
            if first is None and b"Your" in buf:
                first = time.perf_counter() - t0
            if buf.endswith(b"0\r\n\r\n"):
                return first
        elif b"\r\n\r\n" in buf:
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = next(
                int(v)
                for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                if k.strip().lower() == b"content-length"
            )
            if len(rest) >= length:
                return time.perf_counter() - t0


def probe(stub_port: int, gw_port: int, gw_pid: int, stream: bool, n: int) -> dict:
    import psutil

    def request(port: int) -> bytes:
        body = chat_body(stream)
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % (port, len(body))
        ) + body

    socks = {}
    for port in (stub_port, gw_port):
        socks[port] = socket.create_connection(("127.0.0.1", port))
        socks[port].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reqs = {port: request(port) for port in socks}
    for _ in range(200):
        for port in socks:
            exchange(socks[port], reqs[port], stream)
    gw = psutil.Process(gw_pid)
    direct, via, cpu = [], [], 0.0
    for _ in range(n):
        direct.append(exchange(socks[stub_port], reqs[stub_port], stream))
        before = sum(gw.cpu_times()[:2])
        via.append(exchange(socks[gw_port], reqs[gw_port], stream))
        time.sleep(0.002)  # the request log's thread and the metrics finish this request's work
        cpu += sum(gw.cpu_times()[:2]) - before
    for s in socks.values():
        s.close()
    direct.sort()
    via.sort()

    def q(values: list[float], p: float) -> float:
        return round(1000 * values[int(len(values) * p)], 3)

    return {
        "direct_p50_ms": q(direct, 0.5),
        "direct_p99_ms": q(direct, 0.99),
        "gateway_p50_ms": q(via, 0.5),
        "gateway_p99_ms": q(via, 0.99),
        "added_p50_ms": round(q(via, 0.5) - q(direct, 0.5), 3),
        "added_p99_ms": round(q(via, 0.99) - q(direct, 0.99), 3),
        "gateway_cpu_ms_per_request": round(1000 * cpu / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--root", type=Path, default=HERE, help="the checkout whose src/ is measured (default: this one)")
    args = ap.parse_args()
    sys.path[:0] = [str(args.root / "src"), str(HERE / "benchmarks")]
    import gateway_overhead as go
    import uvloop

    from tuneloop.config import PipelineConfig
    from tuneloop.serve.server import build_gateway

    go.ROOT = args.root  # its children import the measured checkout too
    out: dict = {"root": str(args.root)}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            stub_port, gw_port = go.free_port(), go.free_port()
            stub = f"http://127.0.0.1:{stub_port}/v1"
            procs.append(go.start_child("stub", str(stub_port)))
            go.wait_ready(procs[-1], f"{stub}/chat/completions", "the stub upstream")
            ws = Path(tmp) / "ws"
            go.make_workspace(ws)
            cfg = PipelineConfig(
                name="probe",
                base_model="stub",
                data={"train_data": "unused.jsonl"},
                serve={"backend": "openai", "upstream": stub},
            )
            for stream in (False, True):
                app = build_gateway(cfg, ws, preload=["bench:1"])
                out[f"app_cpu_ms_{'stream' if stream else 'plain'}"] = round(
                    uvloop.run(app_cpu(app, stream, args.requests)), 3
                )
            procs.append(go.start_child("gateway", str(ws), str(gw_port), stub, "auto"))
            go.wait_ready(procs[-1], f"http://127.0.0.1:{gw_port}/v1/chat/completions", "the gateway")
            for stream in (False, True):
                out["probe_stream" if stream else "probe_plain"] = probe(
                    stub_port, gw_port, procs[-1].pid, stream, args.requests
                )
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(20)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
