"""What the request log's spool costs and what it saves, on a real PostgreSQL store, in one run.

    PYTHONPATH=src python benchmarks/request_log_spool.py [--rate 50] [--requests 600] [--rounds 6]
                                                          [--outage-requests 3000] [--kills 5]

Needs the PostgreSQL server binaries (Debian package ``postgresql``) and psycopg; the server is started on
127.0.0.1 in a temporary directory, as the tests do (``tests/pg_server.py``), and stopped at the end. The
upstream is the stub OpenAI-compatible server of ``benchmarks/gateway_overhead.py`` (a fixed answer, its own
process), so the figures are the gateway's and its request log's, not a model's.

1. **Added latency with the store up**: open-loop load (request *i* due at t0 + *i*/rate, latency from then)
   on three targets in rotating rounds: the stub directly, the gateway as ``tuneloop serve`` builds it with the
   spool (``build_gateway``), and the same gateway with ``open_monitoring`` given no spool directory (the
   recorder as it was before the spool: 3 tries, then the batch is lost). Added = percentile(gateway) -
   percentile(direct), same run.
2. **Outage and replay**: the spooling gateway answers ``--outage-requests`` requests (32 concurrent
   clients) while PostgreSQL is stopped; then the server is started again and the replay is timed from the
   start until ``tuneloop_request_log_spooled_records`` is 0: replay rate = replayed / seconds. Every answered
   request id is then looked up in the store (lost = answered but absent). The same outage is then run
   against the gateway without a spool (the baseline).
3. **What ``kill -9`` loses**: with the store up and load at ``--kill-rate`` req/s, the gateway is killed
   (SIGKILL) at a random moment, ``--kills`` times; each time, the answered requests absent from the store are
   counted, with how long before the kill each was answered (the window the docs promise: the recorder's
   in-memory queue, about ``flush_interval_s`` = 50 ms plus one write).

The last line printed is one JSON object with every figure and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # pg_server: start a throw-away PostgreSQL on loopback

_spec = importlib.util.spec_from_file_location("gateway_overhead", ROOT / "benchmarks" / "gateway_overhead.py")
go = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(go)


# ------------------------------------------------------------------------------------------------ gateway child


def serve_gateway(ws: str, port: int, upstream: str, pg_url: str, spool: str) -> None:
    import logging

    import uvicorn

    from tuneloop.config import PipelineConfig
    from tuneloop.serve import server

    logging.basicConfig(level=logging.WARNING)
    if spool == "off":  # the recorder as it was before the spool
        real = server.open_monitoring
        server.open_monitoring = lambda url, **_kw: real(url)
    cfg = PipelineConfig(
        name="bench",
        base_model="stub",
        data={"train_data": "unused.jsonl"},
        serve={"backend": "openai", "upstream": upstream, "request_log": pg_url, "retention_days": None},
    )
    app = server.build_gateway(cfg, Path(ws), preload=["bench:1"])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=75,
        **server.http_stack(),
    )


def start_gateway(tmp: Path, name: str, upstream: str, pg_url: str, spool: str) -> tuple[subprocess.Popen, int, Path]:
    ws = tmp / name / "ws"
    go.make_workspace(ws)
    port = go.free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "gateway", str(ws), str(port), upstream, pg_url, spool], env=env
    )
    go.wait_ready(proc, f"http://127.0.0.1:{port}/v1/chat/completions", f"the gateway ({name})")
    return proc, port, ws


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------------ helpers


def gauge(port: int, name: str) -> float:
    import httpx

    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def stored_ids(pg_url: str) -> set[str]:
    import psycopg

    with psycopg.connect(pg_url.replace("postgresql://", "postgresql://", 1)) as conn:
        return {r[0] for r in conn.execute("SELECT request_id FROM requests")}


async def closed_loop(port: int, n: int, clients: int = 32) -> list[tuple[str, float]]:
    """``n`` requests from ``clients`` concurrent clients; (request id, answered at) of each answered one."""
    import httpx

    out: list[tuple[str, float]] = []
    todo = iter(range(n))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def client(c):
        for _ in todo:
            r = await c.post(url, json={"model": go.MODEL, "messages": go.MESSAGES, "max_tokens": 8})
            if r.status_code == 200:
                out.append((r.headers["x-request-id"], time.time()))

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return out


async def open_loop_until_killed(
    port: int, rate: float, proc: subprocess.Popen, kill_after: float
) -> tuple[list, float]:
    """Requests at ``rate``/s; SIGKILL the gateway after ``kill_after`` s; (answered (id, at), kill time)."""
    import httpx

    answered: list[tuple[str, float]] = []
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    killed_at = 0.0

    async def one(c, due):
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            r = await c.post(url, json={"model": go.MODEL, "messages": go.MESSAGES, "max_tokens": 8})
        except httpx.HTTPError:
            return
        if r.status_code == 200:
            answered.append((r.headers["x-request-id"], time.time()))

    async def killer():
        nonlocal killed_at
        await asyncio.sleep(kill_after)
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)

    t0 = time.perf_counter() + 0.05
    n = int((kill_after + 0.5) * rate)
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=256)) as c:
        await asyncio.gather(killer(), *(one(c, t0 + i / rate) for i in range(n)))
    return answered, killed_at


# ------------------------------------------------------------------------------------------------ the three parts


def part_latency(tmp: Path, stub: str, stub_pid: int, pg_url: str, args) -> dict:
    procs = []
    try:
        on, on_port, _ = start_gateway(tmp, "spool-on", stub, pg_url, "on")
        procs.append(on)
        off, off_port, _ = start_gateway(tmp, "spool-off", stub, pg_url, "off")
        procs.append(off)
        targets = {
            "direct": (f"{stub}/chat/completions", go.MODEL, stub_pid),
            "spool": (f"http://127.0.0.1:{on_port}/v1/chat/completions", go.MODEL, on.pid),
            "no_spool": (f"http://127.0.0.1:{off_port}/v1/chat/completions", go.MODEL, off.pid),
        }
        res = asyncio.run(go.measure(targets, False, args))
    finally:
        for p in procs:
            stop(p)
    d = res["direct"]
    out = {}
    for t in ("spool", "no_spool"):
        out[f"{t}_added_p50_ms"] = round(res[t]["p50_ms"] - d["p50_ms"], 3)
        out[f"{t}_added_p99_ms"] = round(res[t]["p99_ms"] - d["p99_ms"], 3)
        out[f"{t}_cpu_ms_per_request"] = round(res[t]["cpu_ms_per_request"], 3)
    out["direct_p50_ms"], out["direct_p99_ms"] = round(d["p50_ms"], 3), round(d["p99_ms"], 3)
    out["latency_errors"] = sum(r["errors"] for r in res.values())
    out["latency_requests_per_target"] = d["n"]
    return out


def part_outage_baseline(tmp: Path, stub: str, pg, pg_url: str, args) -> dict:
    """The same outage against the gateway without a spool: how many answered requests the store lacks after."""
    from pg_server import start_cluster, stop_cluster

    proc, port, _ = start_gateway(tmp, "outage-no-spool", stub, pg_url, "off")
    try:
        stop_cluster(pg)
        answered = asyncio.run(closed_loop(port, args.outage_requests))
        time.sleep(0.5)
        start_cluster(pg)
        time.sleep(3.0)  # past the recorder's last retry
        have = stored_ids(pg_url)
        return {
            "no_spool_outage_answered": len(answered),
            "no_spool_outage_lost": sum(1 for rid, _ in answered if rid not in have),
        }
    finally:
        stop(proc)


def part_outage(tmp: Path, stub: str, pg, pg_url: str, args) -> dict:
    from pg_server import start_cluster, stop_cluster

    proc, port, _ = start_gateway(tmp, "outage", stub, pg_url, "on")
    try:
        before = stored_ids(pg_url)
        stop_cluster(pg)
        t0 = time.perf_counter()
        answered = asyncio.run(closed_loop(port, args.outage_requests))
        outage_s = time.perf_counter() - t0
        time.sleep(0.5)
        spooled = gauge(port, "tuneloop_request_log_spooled_records")
        start_cluster(pg)
        t1 = time.perf_counter()
        while gauge(port, "tuneloop_request_log_spooled_records") > 0:
            time.sleep(0.02)
        replay_s = time.perf_counter() - t1  # includes up to retry_interval_s (1 s) before the first retry
        health = __import__("httpx").get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"]
        lost = [rid for rid, _ in answered if rid not in stored_ids(pg_url) - before]
        return {
            "outage_answered": len(answered),
            "outage_s": round(outage_s, 2),
            "outage_spooled": int(spooled),
            "replay_s": round(replay_s, 3),
            "replay_records_per_s": round(spooled / replay_s, 1),
            "outage_lost": len(lost),
            "health_after_replay": health,
        }
    finally:
        stop(proc)


def part_kill(tmp: Path, stub: str, pg_url: str, args) -> dict:
    rng = random.Random(0)
    lost_total, answered_total, max_age_ms, runs = 0, 0, 0.0, []
    for k in range(args.kills):
        proc, port, _ = start_gateway(tmp, f"kill{k}", stub, pg_url, "on")
        try:
            answered, killed_at = asyncio.run(open_loop_until_killed(port, args.kill_rate, proc, rng.uniform(2.0, 4.0)))
        finally:
            stop(proc)
        have = stored_ids(pg_url)
        lost = [(rid, at) for rid, at in answered if rid not in have]
        ages = [(killed_at - at) * 1000 for _, at in lost]
        runs.append(
            {"answered": len(answered), "lost": len(lost), "oldest_lost_ms": round(max(ages), 1) if ages else None}
        )
        lost_total += len(lost)
        answered_total += len(answered)
        max_age_ms = max([max_age_ms, *ages])
    return {
        "kill_runs": runs,
        "kill_answered": answered_total,
        "kill_lost": lost_total,
        "kill_oldest_lost_ms": round(max_age_ms, 1),
        "kill_rate_rps": args.kill_rate,
    }


def run_all(args) -> dict:
    from pg_server import create_database, find_bin_dir, start_server, stop_server

    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL server binaries not found: apt-get install postgresql")
    pg = start_server(bin_dir)
    stub_proc = None
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            stub_port = go.free_port()
            stub = f"http://127.0.0.1:{stub_port}/v1"
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            stub_proc = subprocess.Popen(
                [sys.executable, str(ROOT / "benchmarks" / "gateway_overhead.py"), "--role", "stub", str(stub_port)],
                env=env,
            )
            go.wait_ready(stub_proc, f"{stub}/chat/completions", "the stub upstream")
            out = part_latency(tmp, stub, stub_proc.pid, create_database(pg), args)
            print("latency:", json.dumps(out), flush=True)
            out.update(part_outage(tmp, stub, pg, create_database(pg), args))
            out.update(part_outage_baseline(tmp, stub, pg, create_database(pg), args))
            print("outage:", json.dumps(out), flush=True)
            out.update(part_kill(tmp, stub, create_database(pg), args))
    finally:
        if stub_proc is not None:
            stop(stub_proc)
        stop_server(pg)
    out["rate_rps"], out["rounds"] = args.rate, args.rounds
    out["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_implementation()} {platform.python_version()}"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--outage-requests", type=int, default=3000)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--kill-rate", type=float, default=200.0)
    args = ap.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "gateway":
            serve_gateway(rest[0], int(rest[1]), rest[2], rest[3], rest[4])
        return
    out = run_all(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
