"""data.engine: ray against a real Ray cluster started here on 127.0.0.1 (and stopped after): the same result as
data.engine: local (kept records and digest, duplicate groups, quarantine entries and order, report counts), a
worker killed mid-pass changes nothing, an unreachable cluster and a missing Ray are exit 2 before any work."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Single-machine Ray: every node address is 127.0.0.1. By default Ray on Linux registers a node under the
# machine's outward address even when started with --node-ip-address=127.0.0.1 (services.get_node_ip_address);
# this switch (read when ray is imported, and by `ray start` from its environment) keeps it on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'tuneloop[ray]' (the dev extra has it)")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'tuneloop[ray]'")

from tuneloop.config import DataConfig  # noqa: E402
from tuneloop.data import ray_engine  # noqa: E402
from tuneloop.data.validate import check_splits  # noqa: E402
from tuneloop.errors import InputError  # noqa: E402

pytestmark = pytest.mark.ray
RAY = Path(sys.executable).with_name("ray")
PATHS = {"clean_path", "quarantine_path", "report_path", "html_path", "engine", "clean_shards", "quarantine_shards"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on loopback (2 CPUs, a small object store, its own temp dir), stopped after by killing the
    processes it started, by id (no `ray stop`: that would stop every Ray on the machine); none may be left."""
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--include-dashboard=false",
            "--num-cpus=2",
            f"--object-store-memory={200 << 20}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while ray_engine.unreachable(address, timeout=1.0) is not None:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.skip(f"could not start a local Ray head on {address}")
        time.sleep(0.5)
    yield address
    # every node this test talked to was on loopback (checked before the shutdown, asserted after the cleanup)
    nodes = {n["NodeManagerAddress"] for n in ray.nodes()} if ray.is_initialized() else {"127.0.0.1"}
    import psutil  # accelerate's dependency

    if ray.is_initialized():
        ray.shutdown()
    ray_engine._CONNECTED.clear()
    head = psutil.Process(proc.pid)
    procs = [head, *head.children(recursive=True)]  # `ray start`, GCS, raylet, workers: all started here
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"Ray processes left running: {alive}"
    assert nodes == {"127.0.0.1"}, nodes


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)
    )


def _chat(u: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A directory of two JSONL files and a Parquet file (3,000 records) and an eval file: planted exact copies
    (also across files, one with other whitespace), near copies (one word changed), PII, contamination
    (eval records pasted in), unparseable lines, a wrong structure and a placeholder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    root = tmp_path_factory.mktemp("data")
    evals = [_chat(_words(rng, 30), _words(rng, 30)) for _ in range(50)]
    base = [_chat(_words(rng, 25), _words(rng, 40)) for _ in range(2500)]
    rows: list[dict | str] = []
    for i, rec in enumerate(base):
        rows.append(rec)
        if i % 25 == 3:  # exact copy (whitespace changed: same dedup key)
            rows.append(_chat(base[i // 2]["messages"][0]["content"] + "  ", base[i // 2]["messages"][1]["content"]))
        if i % 17 == 5:  # near copy: one word of the answer replaced
            words = base[i - 1]["messages"][1]["content"].split()
            words[rng.randrange(len(words))] = "changed"
            rows.append(_chat(base[i - 1]["messages"][0]["content"], " ".join(words)))
        if i % 101 == 9:
            rows.append(_chat(f"mail me at user{i}@example.org or call +1 415 555 01{i % 100:02d}", _words(rng, 20)))
        if i % 250 == 1:
            rows.append(evals[i // 250])
        if i % 400 == 2:
            rows += ["{not json", json.dumps({"messages": []}), json.dumps(_chat("fill {{name}} in", "ok"))]
    a, b, c = rows[:1200], rows[1200:2400], rows[2400:]
    (root / "train").mkdir()
    for name, part in (("a.jsonl", a), ("b.jsonl", b)):
        with open(root / "train" / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
                if rng.random() < 0.01:
                    f.write("\n")  # blank lines are skipped, line numbers still count them
    pq.write_table(
        pa.table({"messages": [r["messages"] for r in c if isinstance(r, dict)]}), root / "train" / "c.parquet"
    )
    with open(root / "eval.jsonl", "w", encoding="utf-8") as f:
        for r in evals:
            f.write(json.dumps(r) + "\n")
    return root


def _data(dataset: Path, **kw) -> DataConfig:
    return DataConfig(
        train_data=str(dataset / "train"), eval_data=str(dataset / "eval.jsonl"), near_dup_threshold=0.8, **kw
    )


def _same(local_out: Path, ray_out: Path, local, checked) -> None:
    for split, rep in local.items():
        other = dict(checked.items())[split]
        assert {k: v for k, v in rep.items() if k not in PATHS} == {k: v for k, v in other.items() if k not in PATHS}, (
            split
        )
        for suffix in ("clean.jsonl", "quarantine.jsonl"):
            name = Path(rep["clean_path"]).name.replace("clean.jsonl", suffix)
            assert (local_out / name).read_bytes() == (ray_out / name).read_bytes(), name


def test_ray_engine_equals_local(cluster, dataset, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(ray_engine, "RANGE_BYTES", 40_000)  # several byte ranges per JSONL file
    local = check_splits(_data(dataset), tmp_path / "local")
    checked = check_splits(_data(dataset, engine="ray", ray_address=cluster), tmp_path / "ray")
    tr = checked.train
    assert tr["engine"] == "ray" and tr["records"] > 2500
    # the planted problems were all found (so the comparison below compares something)
    assert tr["duplicates"] > 50 and tr["near_duplicates"] > 50 and tr["contaminated"] >= 5 and tr["invalid"] >= 15
    assert tr["pii_records"] > 10 and tr["near_duplicate_groups"] > 50
    _same(tmp_path / "local", tmp_path / "ray", local, checked)
    # the Parquet shards hold the kept records (canonical JSON, the digest's input) and the quarantine
    shards = pq.read_table(tr["clean_shards"]).sort_by("ord")
    clean = [json.loads(x) for x in Path(tr["clean_path"]).read_text(encoding="utf-8").splitlines()]
    assert [json.loads(x) for x in shards["record"].to_pylist()] == [
        {k: v for k, v in r.items() if k not in ("_line", "_file")} for r in clean
    ]
    assert shards["line"].to_pylist() == [r["_line"] for r in clean]
    assert pq.read_table(tr["quarantine_shards"]).num_rows == tr["records"] - tr["valid"]


def test_worker_killed_mid_pass_is_retried(cluster, dataset, tmp_path):
    marker = tmp_path / "killed-once"
    local = check_splits(_data(dataset), tmp_path / "local")
    checked = ray_engine.check_splits_ray(
        _data(dataset, engine="ray", ray_address=cluster), tmp_path / "ray", fail_marker=str(marker)
    )
    assert marker.exists()  # a worker did kill itself during the read/rules map stage
    _same(tmp_path / "local", tmp_path / "ray", local, checked)


class _WordTokenizer:
    """A whitespace tokenizer: enough for the over-long rule on `text` records (pickled by value to the workers)."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": list(range(len(text.split())))}


def _compare(tmp_path: Path, cluster: str, source, **kw) -> dict:
    from tuneloop.data.validate import validate_dataset

    local = validate_dataset(source, tmp_path / "local", **kw)
    data = DataConfig(train_data="x", engine="ray", ray_address=cluster)
    other = ray_engine.validate_dataset_ray(source, tmp_path / "ray", data=data, **kw)
    assert {k: v for k, v in local.items() if k not in PATHS} == {k: v for k, v in other.items() if k not in PATHS}
    for suffix in ("clean.jsonl", "quarantine.jsonl"):
        assert (tmp_path / "local" / f"train.{suffix}").read_bytes() == (
            tmp_path / "ray" / f"train.{suffix}"
        ).read_bytes()
    return other


def test_kto_sources_and_overlong_equal_local(cluster, tmp_path):
    """A list of sources of kto records (near duplicates only within one label; `_source` per record) and
    text records with the over-long rule dropping some (an exact copy of a dropped record is checked again)."""
    import ray.cloudpickle

    from tuneloop.config import TrainSource
    from tuneloop.data.validate import Checks

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rng = random.Random(3)
    kto = []
    for i in range(300):
        prompt, answer = _words(rng, 10), _words(rng, 40)
        kto.append({**_chat(prompt, answer), "label": i % 3 != 0})
        if i % 5 == 0:
            kto.append({**_chat(prompt, answer + " extra"), "label": i % 2 == 0})
    for name, part in (("a.jsonl", kto[:180]), ("b.jsonl", kto[180:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    sources = [TrainSource(path=str(tmp_path / "a.jsonl")), TrainSource(path=str(tmp_path / "b.jsonl"), weight=2)]
    rep = _compare(tmp_path / "kto", cluster, sources, checks=Checks(near_dup_threshold=0.8))
    assert rep["format"] == "kto" and rep["near_duplicate_groups"] > 10 and len(rep["sources"]) == 2

    recs = []
    for i in range(300):
        t = _words(rng, 80 if i % 7 == 0 else 20)
        recs.append({"text": t})
        if i % 4 == 0:
            recs.append({"text": t.replace(" ", "  ", 2)})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    for policy in ("drop", "truncate"):
        checks = Checks(max_length=50, overlong=policy, near_dup_threshold=0.8)
        rep = _compare(tmp_path / policy, cluster, tmp_path / "t.jsonl", checks=checks, tokenizer=_WordTokenizer())
        assert rep["overlong"]["records"] > 10 and (rep["overlong_dropped"] > 0) == (policy == "drop")


def _config(tmp_path: Path, dataset: Path, address: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"name: t\nbase_model: {tmp_path / 'no-model'}\ntrain_data: {dataset / 'train'}\n"
        f"data:\n  engine: ray\n  ray_address: '{address}'\n",
        encoding="utf-8",
    )
    return cfg


def test_unreachable_cluster_is_exit_2_naming_it(dataset, tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    t = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneloop.cli",
            "data",
            "validate",
            str(_config(tmp_path, dataset, address)),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert address in r.stderr and "ray start --head" in r.stderr
    assert not (tmp_path / "o" / "train.clean.jsonl").exists()  # before any work
    assert time.time() - t < 60
    assert ray_engine.ray_problems(_data(dataset, engine="ray", ray_address=address))[0].startswith(
        "data.ray_address: cannot reach"
    )


def test_without_ray_is_exit_2_with_the_install_line(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'tuneloop\[ray\]'") as e:
        check_splits(_data(dataset, engine="ray", ray_address="127.0.0.1:1"), tmp_path / "o")
    assert e.value.exit_code == 2
    assert "pip install 'tuneloop[ray]'" in ray_engine.ray_problems(_data(dataset, engine="ray"))[0]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", ray)
    assert "no Ray cluster is named" in ray_engine.ray_problems(_data(dataset, engine="ray"))[0]
