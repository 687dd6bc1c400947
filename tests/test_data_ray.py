"""data.engine: ray against a real Ray cluster started here on 127.0.0.1 (and stopped after): the same result as
data.engine: local (kept records and digest, duplicate groups, quarantine entries and order, report counts), a
worker killed mid-pass changes nothing, an unreachable cluster and a missing Ray are exit 2 before any work. Also
on the same head: the Ray engine reading the dataset from a loopback S3 (moto, tests/moto_s3.py) equals the local
engine reading it from disk, and `tuneloop run` with data.engine: ray trains on the Ray engine's Parquet shards."""

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

from moto_s3 import BUCKET, s3_server, upload  # noqa: F401  (s3_server: the fixture)
from planted_data import chat, words, write_planted

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


_words, _chat = words, chat


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """tests/planted_data.py's dataset: planted exact and near copies, PII, contamination, bad lines."""
    return write_planted(tmp_path_factory.mktemp("data"))


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


def test_ray_engine_reads_s3_like_local_reads_disk(cluster, s3_server, dataset, tmp_path, monkeypatch):
    """The planted dataset uploaded to a loopback S3 (moto): the Ray tasks read its objects in byte ranges through
    the filesystem built on the driver (endpoint and keys from the AWS environment, which the Ray workers lack):
    same report, clean file, quarantine and digest as the local engine reading the files on disk."""
    url = upload(dataset, f"s3://{BUCKET}/ray/")
    monkeypatch.setattr(ray_engine, "RANGE_BYTES", 40_000)  # several ranged GETs per object
    local = check_splits(_data(dataset), tmp_path / "local")
    data = DataConfig(
        train_data=url + "train/",
        eval_data=url + "eval.jsonl",
        near_dup_threshold=0.8,
        engine="ray",
        ray_address=cluster,
    )
    checked = check_splits(data, tmp_path / "ray")
    assert checked.train["path"] == url + "train/" and checked.train["digest"] == local.train["digest"]
    assert checked.train["duplicates"] > 50 and checked.train["near_duplicates"] > 50
    for split, rep in local.items():
        other = dict(checked.items())[split]
        assert {k: v for k, v in rep.items() if k not in PATHS | {"path"}} == {
            k: v for k, v in other.items() if k not in PATHS | {"path"}
        }, split
        for suffix in ("clean.jsonl", "quarantine.jsonl"):
            name = f"{split}.{suffix}"
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


def test_tuneloop_run_with_engine_ray(cluster, make_config, tmp_path):
    """`tuneloop run` with data.engine: ray on the tiny model: data (on the cluster) -> preprocessing streams the
    Ray engine's Parquet shards -> a few train steps -> eval -> gates -> registered."""
    cfg = make_config(data__engine="ray", data__ray_address=cluster)
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "run", str(cfg), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["overall"] == "passed", summary
    results = [json.loads(p.read_text()) for p in (tmp_path / ".tuneloop").rglob("result.json")]
    data = next(x for x in results if x.get("stage") == "data_validation")
    assert data["outputs"]["train_clean"].endswith("train.clean.parquet")  # what preprocessing was given
    report = json.loads(Path(data["outputs"]["train_report"]).read_text())
    assert report["engine"] == "ray" and report["valid"] > 0
    prep = next(x for x in results if x.get("stage") == "preprocessing")
    assert 0 < prep["metrics"]["train_samples"] <= report["valid"], prep["metrics"]
    assert prep["metrics"]["eval_samples"] == data["metrics"]["eval_valid"] > 0, prep["metrics"]
    assert any(x.get("stage") == "training" for x in results) and summary["stages"]["evaluation"]["status"] == "passed"
