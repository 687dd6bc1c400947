"""Dynamic batching in the gateway's local backend vs the same backend one request at a time.

    python benchmarks/gateway_batching.py [--base DIR] [--requests 256] [--clients 32] [--max-tokens 8]
                                          [--torch-threads N]

The model is the demo's architecture (``demo.tables.RECOMMENDED["model"]``: 2-layer Llama, hidden 128, vocab
2048): ``--base`` takes a built demo base model (``tuneloop demo`` makes ``base-model/``), else one is made
with random weights and a tokenizer trained locally (speed does not depend on the weights). It is registered
as a version in a scratch workspace and served by the real gateway (``create_app`` + ``LocalBackend``) in a
child process, once with ``max_batch_size=32`` (batched, ``--batch``) and once with ``max_batch_size=1`` (serial: the same
decode loop, one request at a time). The same ``--clients`` concurrent clients send the same
``--requests`` chat requests (demo support tickets, temperature 0, ``max_tokens`` 8) to each. Figures:
requests/s, p50/p99 latency (medians over ``--repeats`` alternating runs), and whether every answer is
identical across all runs of both. ``--torch-threads`` sets torch's threads in both servers, as
``serve.torch_threads`` does (default: torch's choice, one per core).

The clients are a lean keep-alive HTTP/1.1 client on raw asyncio (:class:`LeanClient`), in this process: on a
2-core machine the load generator's CPU is taken from the server, and httpx took ~2 ms per request (a third of
the whole machine's work per batched request); the JSON reports the load generator's CPU per request.

The last line printed is one JSON object with ``batched_rps``, ``serial_rps``, ``speedup``,
``identical_outputs``, ``batched_p50_s``, ``serial_p50_s`` (and p99s, the client's CPU, torch threads, machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


def make_base(out: Path) -> Path:
    from tuneloop.demo.base_model import make_model, make_tokenizer
    from tuneloop.demo.corpus import general_corpus
    from tuneloop.demo.tables import RECOMMENDED
    from tuneloop.demo.tickets import task_records

    m = RECOMMENDED["model"]
    texts = general_corpus(2000, seed=0) + [x["content"] for r in task_records(300, seed=0) for x in r["messages"]]
    tok = make_tokenizer(texts, vocab_size=m["vocab_size"])
    model = make_model(
        tok,
        hidden_size=m["hidden_size"],
        num_layers=m["num_layers"],
        num_heads=m["num_heads"],
        intermediate_size=m["intermediate_size"],
        max_position_embeddings=m["max_position_embeddings"],
        seed=0,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def serve_child(ws: str, port: int, batch: int, torch_threads: int) -> None:
    import torch
    import uvicorn

    from tuneloop.registry.sqlite import SqliteRegistry
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router

    if torch_threads > 0:  # what serve.torch_threads does
        torch.set_num_threads(torch_threads)
    reg = SqliteRegistry(Path(ws))
    backend = LocalBackend(reg, Path(ws), max_batch_size=batch, max_queue=4096, probes=False)
    app = create_app(backend, Router(reg), GatewaySettings(preload=["bench"]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LeanClient:
    """One keep-alive HTTP/1.1 connection for JSON POSTs, on raw asyncio streams. The load generator shares the
    machine's cores with the server; httpx spent ~2 ms of CPU per request here (as much as half the server's),
    this ~0.1 ms, so more of the machine measures the server. Answers must carry Content-Length (the gateway's do)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.reader = self.writer = None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(
            b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % (path.encode(), self.host.encode(), self.port, len(body))
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(v) for k, _, v in (line.partition(b":") for line in lines[1:]) if k.strip().lower() == b"content-length"
        )
        return int(lines[0].split(b" ")[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str, prompts: list[str], clients: int, max_tokens: int
) -> tuple[list[float], list[str], float, float]:
    """(latencies, answers, wall seconds, the load generator's CPU seconds): ``clients`` workers, each on its own
    connection, sending the next prompt as soon as its last answer arrived."""
    latencies: list[float] = [0.0] * len(prompts)
    answers: list[str] = [""] * len(prompts)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)

    async def worker(client: LeanClient):
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            status, body = await client.post(
                "/v1/chat/completions",
                {
                    "model": "bench",
                    "temperature": 0,
                    "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": prompts[i]}],
                },
            )
            if status != 200:
                raise RuntimeError(f"the gateway answered {status}: {body[:300]!r}")
            latencies[i] = time.perf_counter() - t0
            answers[i] = json.loads(body)["choices"][0]["message"]["content"]

    pool = [LeanClient(url) for _ in range(clients)]
    try:
        # warm-up: one request per connection, so connecting, model loading and first-call costs are not measured
        await asyncio.gather(
            *(
                c.post(
                    "/v1/chat/completions",
                    {"model": "bench", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                )
                for c in pool
            )
        )
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(c) for c in pool))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        for c in pool:
            c.close()
    return latencies, answers, wall, cpu


def start_server(ws: Path, batch: int, torch_threads: int = 0):
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(ws), str(port), str(batch), str(torch_threads)], env=env
    )
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.HTTPError as exc:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("gateway did not start") from exc
            time.sleep(0.3)


def engine_stats(url: str) -> dict[str, int]:
    import httpx

    return httpx.get(f"{url}/health", timeout=10).json()["loaded"][0]["batching"]


def measure(url: str, prompts: list[str], args) -> dict:
    before = engine_stats(url)
    lat, answers, wall, cpu = asyncio.run(load(url, prompts, args.clients, args.max_tokens))
    after = engine_stats(url)
    d = {k: after[k] - before[k] for k in after}
    lat_sorted = sorted(lat)
    return {
        "rps": len(prompts) / wall,
        "p50": statistics.median(lat),
        "p99": lat_sorted[int(0.99 * (len(lat) - 1))],
        "client_cpu_ms": 1000 * cpu / len(prompts),
        "answers": answers,
        "rows_per_prefill": d["rows"] / max(d["prefills"], 1),
        "rows_per_step": d["decoded_rows"] / max(d["decode_steps"], 1),
    }


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="serve.max_batch_size of the batched run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per mode; medians are reported")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads in both servers, as serve.torch_threads sets them (default: torch's choice)",
    )
    ap.add_argument("--serve", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_child(args.serve[0], int(args.serve[1]), int(args.serve[2]), int(args.serve[3]))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from tuneloop.demo.tickets import task_records
    from tuneloop.registry.sqlite import SqliteRegistry

    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or make_base(Path(tmp) / "base")
        ws = Path(tmp) / "ws"
        SqliteRegistry(ws).register(
            "bench", Path(base), artifact_kind="model", base_model=str(base), lineage={}, metrics={}, gates={}
        )
        tickets = [r["messages"][1]["content"] for r in task_records(args.requests, seed=7)]
        servers = {
            "batched": start_server(ws, args.batch, args.torch_threads),
            "serial": start_server(ws, 1, args.torch_threads),
        }
        runs: dict[str, list[dict]] = {"batched": [], "serial": []}
        try:
            for rep in range(args.repeats):  # alternate, so a busy moment on a shared machine hits both
                for mode in ("batched", "serial"):
                    r = measure(servers[mode][1], tickets, args)
                    runs[mode].append(r)
                    print(
                        f"{mode:8s} run {rep + 1}: {r['rps']:.1f} req/s, p50 {r['p50']:.3f} s, {r['rows_per_prefill']:.1f} "
                        f"requests per prefill, {r['rows_per_step']:.1f} per decode step",
                        flush=True,
                    )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    answers = [r["answers"] for rs in runs.values() for r in rs]
    batched = {k: median_of(runs["batched"], k) for k in ("rps", "p50", "p99")}
    serial = {k: median_of(runs["serial"], k) for k in ("rps", "p50", "p99")}
    out = {
        "batched_rps": round(batched["rps"], 2),
        "serial_rps": round(serial["rps"], 2),
        "speedup": round(batched["rps"] / serial["rps"], 2),
        "identical_outputs": all(a == answers[0] for a in answers),
        "batched_p50_s": round(batched["p50"], 4),
        "serial_p50_s": round(serial["p50"], 4),
        "batched_p99_s": round(batched["p99"], 4),
        "serial_p99_s": round(serial["p99"], 4),
        "client_cpu_ms_per_request": round(median_of(runs["batched"] + runs["serial"], "client_cpu_ms"), 3),
        "batched_requests_per_prefill": round(median_of(runs["batched"], "rows_per_prefill"), 1),
        "batched_mean_decode_batch": round(median_of(runs["batched"], "rows_per_step"), 1),
        "requests": args.requests,
        "clients": args.clients,
        "max_batch_size": args.batch,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "model": "demo architecture" + (" (built demo base)" if args.base else " (random weights)"),
        "torch_threads": args.torch_threads or __import__("torch").get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_implementation()} {platform.python_version()}",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
