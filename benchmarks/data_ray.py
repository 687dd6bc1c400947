"""data.engine: ray vs local on the same records: identical answers, wall times, and a labelled projection.

    python benchmarks/data_ray.py --records N [--seed S] [--workdir DIR] [--workers 1,2]
                                  [--phase all|build|local|ray] [--object-store-mb M]

1. Builds N records with benchmarks/data_scale.py's generator (planted exact and near copies, PII, eval records
   pasted into train), unless DIR already holds them for the same N and seed.
2. local: the full data pass with the local engine (the out-of-core default) in a fresh process, exactly as
   data_scale.py runs it (`run_pass_child`: eval file, then the train file against the eval texts).
3. ray: for each W in --workers, a Ray head started here on 127.0.0.1 with W CPUs (so at most W worker
   processes run tasks at once; the driver is this process), the same pass with `validate_dataset_ray`,
   then the head and every process it started are killed by id. Per stage seconds; peak RSS of the head's
   process tree (raylet, workers; polled from /proc, an upper bound: shared pages count in each process).
4. Equality: digest, sha256 of the clean and quarantine files, the report's counts and the near-duplicate
   groups (read from the quarantine reasons) must equal the local engine's.
5. Projection (LABELLED AS SUCH, not measured): 100 M records on K nodes of C cores, from the measured
   per-record costs of the W=1 run: the parallel stages' seconds per record divided over K*C task slots,
   plus the driver's sequential part (the digest and the clean/quarantine files in input order) per record,
   which does not shrink with nodes.

--phase runs one part (results kept in DIR/data_ray.json), so each can be run under its own lock hold; the
LAST line printed is one JSON object with everything measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# A single-machine cluster stays on loopback: without this switch Ray registers the node under the machine's
# outward address even with --node-ip-address=127.0.0.1 (read at `import ray` and by `ray start`).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import data_scale  # noqa: E402  (the generator and the local pass, one implementation)

PROJECT_RECORDS = 100_000_000
PROJECT_NODES = (1, 4, 16, 64)
PROJECT_CORES = 16


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """A Ray head on loopback with ``cpus`` CPUs in its own temp dir; ``stop`` kills what it started, by id."""

    def __init__(self, cpus: int, object_store_mb: int, temp: Path):
        from tuneloop.data import ray_engine

        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_bin = Path(sys.executable).with_name("ray")
        self.proc = subprocess.Popen(
            [
                str(ray_bin),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--num-cpus={cpus}",
                f"--object-store-memory={object_store_mb << 20}",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 90
        while ray_engine.unreachable(self.address, timeout=1.0) is not None:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit(f"could not start a Ray head on {self.address}")
            time.sleep(0.5)
        self.peak_kb = 0
        self._done = threading.Event()
        self._poll = threading.Thread(target=self._watch, daemon=True)
        self._poll.start()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            self.peak_kb = max(self.peak_kb, data_scale._tree_rss_kb(self.proc.pid))

    def stop(self) -> None:
        import psutil
        import ray

        if ray.is_initialized():
            ray.shutdown()
        from tuneloop.data import ray_engine

        ray_engine._CONNECTED.clear()
        if hasattr(self, "_done"):
            self._done.set()
        try:
            head = psutil.Process(self.proc.pid)
            procs = [head, *head.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        psutil.wait_procs(procs, timeout=30)


def _groups(quarantine: Path) -> list[list[int]]:
    heads: dict[int, list[int]] = {}
    with open(quarantine, encoding="utf-8") as f:
        for row in f:
            if "near_duplicate" not in row:
                continue
            q = json.loads(row)
            for reason in q["reasons"]:
                m = data_scale._NEAR.match(reason)
                if m:
                    heads.setdefault(int(m.group(1)), []).append(q["line"])
    return [sorted([h, *members]) for h, members in sorted(heads.items())]


REPORT_KEYS = (
    "format",
    "records",
    "valid",
    "invalid",
    "duplicates",
    "near_duplicates",
    "contaminated",
    "near_duplicate_groups",
    "pii",
    "pii_records",
    "digest",
)


def run_ray(workdir: Path, cpus: int, object_store_mb: int) -> dict:
    from tuneloop.data import ray_engine
    from tuneloop.data.validate import Checks, clean_texts

    temp = workdir / f"ray-tmp-{cpus}"
    temp.mkdir(exist_ok=True)
    head = Head(cpus, object_store_mb, temp)
    try:
        data = type("D", (), {"ray_address": head.address})()
        checks = Checks(
            near_dup_threshold=data_scale.THRESHOLD,
            near_dup_shingle=data_scale.SHINGLE,
            near_dup_action="drop",
            contamination_action="drop",
            pii="report",
        )
        out = workdir / f"out-ray{cpus}"
        t0 = time.perf_counter()
        ev = ray_engine.validate_dataset_ray(workdir / "eval.jsonl", out, data=data, name="eval", checks=checks)
        eval_stages = dict(ray_engine.LAST_TIMES.stages)
        eval_texts = clean_texts(Path(ev["clean_path"]))
        t1 = time.perf_counter()
        rep = ray_engine.validate_dataset_ray(
            workdir / "train.jsonl", out, data=data, checks=checks, eval_texts=eval_texts
        )
        seconds = time.perf_counter() - t0
        stages = dict(ray_engine.LAST_TIMES.stages)
        train_seconds = time.perf_counter() - t1
    finally:
        head.stop()
    return {
        "engine": "ray",
        "worker_cpus": cpus,
        "seconds": round(seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(sum(eval_stages.values()), 2),
        "stages": {k: round(v, 2) for k, v in stages.items()},
        "report": {k: rep.get(k) for k in REPORT_KEYS},
        "clean_sha256": data_scale._sha256(Path(rep["clean_path"])),
        "quarantine_sha256": data_scale._sha256(Path(rep["quarantine_path"])),
        "groups": _groups(Path(rep["quarantine_path"])),
        "peak_rss_ray_tree_mb": round(head.peak_kb / 1024, 1),
    }


def _same(a: dict, b: dict) -> dict:
    return {
        "digest": a["report"]["digest"] == b["report"]["digest"],
        "clean_file": a["clean_sha256"] == b["clean_sha256"],
        "quarantine_file": a["quarantine_sha256"] == b["quarantine_sha256"],
        "report_counts": a["report"] == b["report"],
        "near_groups": a["groups"] == b["groups"],
    }


def projection(ray1: dict, records: int) -> dict:
    """PROJECTION (not measured): 100 M records on K nodes, from the W=1 run's per-record costs."""
    stages = ray1["stages"]
    driver = stages.get("driver_digest_and_files", 0.0)
    parallel = sum(stages.values()) - driver
    per_par, per_drv = parallel / records, driver / records
    rows = []
    for k in PROJECT_NODES:
        secs = PROJECT_RECORDS * (per_par / (k * PROJECT_CORES) + per_drv)
        rows.append(
            {
                "nodes": k,
                "cores_per_node": PROJECT_CORES,
                "projected_seconds": round(secs),
                "projected_minutes": round(secs / 60, 1),
            }
        )
    return {
        "label": "PROJECTION, not a measurement",
        "records": PROJECT_RECORDS,
        "from": f"the 1-worker Ray run on {records} records: parallel stages {parallel:.1f} s "
        f"({per_par * 1e6:.1f} us/record of one core), driver's sequential part {driver:.1f} s ({per_drv * 1e6:.2f} us/record)",
        "assumes": "linear scaling of the map and shuffle stages over K*C task slots, per-core speed of this machine, "
        "network shuffle and object-store spill costs not measured (loopback here), the driver's "
        "in-order pass (digest, clean/quarantine JSONL) at this machine's speed, eval set as small as here",
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tuneloop-data-ray"))
    ap.add_argument("--workers", default="1,2", help="comma-separated CPU counts of the Ray head, one run each")
    ap.add_argument("--phase", choices=("all", "build", "local", "ray"), default="all")
    ap.add_argument("--object-store-mb", type=int, default=4096)
    a = ap.parse_args()
    workdir = a.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / "data_ray.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("records") != a.records or state.get("seed") != a.seed:
        state = {"records": a.records, "seed": a.seed}

    def save() -> None:
        state_path.write_text(json.dumps(state))

    if a.phase in ("all", "build") and "build_seconds" not in state:
        t = time.perf_counter()
        planted = data_scale.build(a.records, a.seed, workdir)
        state["build_seconds"] = round(time.perf_counter() - t, 1)
        state["planted"] = {
            "exact": len(planted["exact_pairs"]),
            "near": len(planted["near_pairs"]),
            "contaminated": len(planted["contaminated_lines"]),
        }
        state["train_mb"] = round((workdir / "train.jsonl").stat().st_size / 2**20)
        save()
        print(f"built {a.records} records ({state['train_mb']} MB) in {state['build_seconds']} s", flush=True)
    if a.phase in ("all", "local"):
        res = data_scale.run_pass_child(workdir, "ooc")
        res["engine"] = "local"
        state["local"] = res
        save()
        print(f"local (out of core): {res['seconds']} s", flush=True)
    if a.phase in ("all", "ray"):
        for w in [int(x) for x in a.workers.split(",")]:
            res = run_ray(workdir, w, a.object_store_mb)
            state[f"ray{w}"] = res
            save()
            print(
                f"ray, {w} worker CPU(s): {res['seconds']} s (train {res['train_seconds']} s), stages {res['stages']}",
                flush=True,
            )
    out = {
        "benchmark": "data_ray",
        "records": state["records"],
        "seed": state["seed"],
        "machine": "2 vCPU AMD EPYC, 24 GB, no GPU (one machine: the Ray 'cluster' is a head on loopback)",
    }
    local = state.get("local")
    if local:
        out["local_seconds"] = local["seconds"]
        out["local_peak_rss_tree_mb"] = local.get("peak_rss_tree_mb")
    for key in sorted(k for k in state if k.startswith("ray")):
        r = state[key]
        out[f"{key}_seconds"] = r["seconds"]
        out[f"{key}_train_seconds"] = r["train_seconds"]
        out[f"{key}_stages"] = r["stages"]
        out[f"{key}_peak_rss_ray_tree_mb"] = r["peak_rss_ray_tree_mb"]
        if local:
            out[f"{key}_identical_to_local"] = _same(local, r)
            out[f"{key}_vs_local_ratio"] = round(r["seconds"] / local["seconds"], 2)
    if "ray1" in state and "ray2" in state:
        out["ray2_speedup_vs_ray1"] = round(state["ray1"]["seconds"] / state["ray2"]["seconds"], 2)
    if "ray1" in state:
        out["projection"] = projection(state["ray1"], state["records"])
    out["report"] = (local or state.get("ray1") or {}).get("report")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
