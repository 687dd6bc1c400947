"""Object-store inputs (``s3://``) for the local engine, against a real S3-compatible server on loopback (moto in
server mode, tests/moto_s3.py): the same records read from S3 give the same clean file, quarantine, report and
data digest as from disk, for the out-of-core and the in-memory pass; a missing bucket or key, refused credentials
and a missing s3fs are exit 2 naming the URL. The Ray engine reading S3 is in tests/test_data_ray.py."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moto_s3 import BUCKET, require_auth, s3_server, upload  # noqa: F401  (s3_server: the fixture)
from planted_data import write_planted
from tuneloop.config import DataConfig, TrainSource
from tuneloop.data import objstore
from tuneloop.data.outofcore import OutOfCore
from tuneloop.data.sources import source_digest, source_problem
from tuneloop.data.validate import check_splits, validate_dataset
from tuneloop.errors import InputError

PATHS = {"path", "clean_path", "quarantine_path", "report_path", "html_path"}
CLI = [sys.executable, "-m", "tuneloop.cli"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, s3_server):
    """The planted dataset on disk and the same bytes under s3://tuneloop-data/planted/."""
    root = write_planted(tmp_path_factory.mktemp("data"))
    return root, upload(root, f"s3://{BUCKET}/planted/")


def _same(a: Path, b: Path, rep_a: dict, rep_b: dict, name: str = "train") -> None:
    assert {k: v for k, v in rep_a.items() if k not in PATHS} == {k: v for k, v in rep_b.items() if k not in PATHS}
    for suffix in ("clean.jsonl", "quarantine.jsonl"):
        assert (a / f"{name}.{suffix}").read_bytes() == (b / f"{name}.{suffix}").read_bytes(), suffix


def test_local_engine_from_s3_equals_from_disk(planted, tmp_path):
    root, url = planted
    on_disk = check_splits(
        DataConfig(train_data=str(root / "train"), eval_data=str(root / "eval.jsonl"), near_dup_threshold=0.8),
        tmp_path / "disk",
    )
    from_s3 = check_splits(
        DataConfig(train_data=url + "train/", eval_data=url + "eval.jsonl", near_dup_threshold=0.8), tmp_path / "s3"
    )
    tr = from_s3.train
    assert tr["path"] == url + "train/" and from_s3.eval is not None and from_s3.eval["path"] == url + "eval.jsonl"
    # the planted problems were found (the comparison compares something), the digest is the disk copy's
    assert tr["records"] > 2500 and tr["duplicates"] > 50 and tr["near_duplicates"] > 50
    assert tr["contaminated"] >= 5 and tr["invalid"] >= 15 and tr["pii_records"] > 10
    assert tr["digest"] == on_disk.train["digest"]
    for split in ("train", "eval"):
        _same(tmp_path / "disk", tmp_path / "s3", dict(on_disk.items())[split], dict(from_s3.items())[split], split)
    # quarantine entries name the object below the prefix and its line, as a directory's file and line
    first = json.loads((tmp_path / "s3" / "train.quarantine.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["file"] in ("a.jsonl", "b.jsonl", "c.parquet") and first["line"] >= 1

    # `tuneloop data validate <prefix> --eval <object>`: the same digest; the report is named after the prefix
    r = subprocess.run(
        [
            *CLI,
            "data",
            "validate",
            url + "train/",
            "--eval",
            url + "eval.jsonl",
            "--json",
            "--out",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode in (0, 1), r.stderr  # 1: a data gate failed (the planted duplicates)
    default = check_splits(
        DataConfig(train_data=str(root / "train"), eval_data=str(root / "eval.jsonl")), tmp_path / "d"
    )
    assert json.loads(r.stdout)["digest"] == default.train["digest"]  # the CLI's default data settings
    assert (tmp_path / "cli" / "train.report.json").is_file()

    # the in-memory pass reads the same objects to the same answer
    mem = validate_dataset(url + "train/", tmp_path / "mem", ooc=OutOfCore(enabled=False))
    disk_mem = validate_dataset(root / "train", tmp_path / "disk-mem", ooc=OutOfCore(enabled=False))
    _same(tmp_path / "disk-mem", tmp_path / "mem", disk_mem, mem)
    assert mem["digest"] == disk_mem["digest"]


def test_single_objects_compressed_parquet_and_errors_naming_the_url(planted, tmp_path):
    root, url = planted
    lines = (root / "train" / "a.jsonl").read_bytes()
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(lines))
    one = upload(gz, f"s3://{BUCKET}/single/a.jsonl.gz")
    rep = validate_dataset(one, tmp_path / "gz")
    disk = validate_dataset(root / "train" / "a.jsonl", tmp_path / "plain")
    _same(tmp_path / "plain", tmp_path / "gz", disk, rep)
    assert rep["path"] == one
    pq_url = url + "train/c.parquet"
    assert (
        validate_dataset(pq_url, tmp_path / "pq")["digest"]
        == validate_dataset(root / "train" / "c.parquet", tmp_path / "pq-disk")["digest"]
    )

    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"text": "a"},\n{"text": "b",,}\n]\n', encoding="utf-8")
    bad = upload(broken, f"s3://{BUCKET}/single/broken.json")
    with pytest.raises(InputError, match=r"s3://tuneloop-data/single/broken\.json:3:\d+: invalid JSON") as e:
        validate_dataset(bad, tmp_path / "broken")
    assert e.value.exit_code == 2

    # cache identity: from the listing (names, sizes, ETags), changes when an object is rewritten
    before = source_digest(url + "train/")
    assert before == source_digest(url + "train/") and before != source_digest(one)
    upload(broken, url + "train/zz.jsonl")
    try:
        assert source_digest(url + "train/") != before
    finally:
        objstore.filesystem(url).rm_file(url + "train/zz.jsonl")


def test_missing_bucket_key_and_refused_credentials_are_exit_2_naming_the_url(planted, s3_server, tmp_path):
    _, url = planted
    for missing in ("s3://no-such-bucket-tl/x.jsonl", f"s3://{BUCKET}/planted/nope.jsonl", f"s3://{BUCKET}/empty/"):
        problem = source_problem(missing)
        assert problem is not None and missing in problem and ("not found" in problem or "no " in problem), problem
        with pytest.raises(InputError, match="not found|no "):
            validate_dataset(missing, tmp_path / "o")
    assert source_problem(url + "train/") is None and source_problem(url + "eval.jsonl") is None
    overlap = source_problem([TrainSource(path=url + "train/"), TrainSource(path=url + "train/a.jsonl")])
    assert overlap is not None and "hold the same objects" in overlap

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\nbase_model: {tmp_path / 'm'}\ntrain_data: s3://{BUCKET}/planted/nope.jsonl\n")
    r = subprocess.run(
        [*CLI, "data", "validate", str(cfg), "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"s3://{BUCKET}/planted/nope.jsonl" in r.stderr and "not found" in r.stderr, r.stderr
    assert not (tmp_path / "cli" / "train.clean.jsonl").exists()

    with require_auth(s3_server):
        problem = source_problem(url + "eval.jsonl")
        assert problem is not None and url + "eval.jsonl" in problem and "AWS_ACCESS_KEY_ID" in problem, problem
        with pytest.raises(InputError, match="access denied|refused") as e:
            validate_dataset(url + "eval.jsonl", tmp_path / "denied")
        assert e.value.exit_code == 2


def test_without_s3fs_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'tuneloop\[s3\]'") as e:
        validate_dataset("s3://bucket/x.jsonl", tmp_path / "o")
    assert e.value.exit_code == 2 and "s3://bucket/x.jsonl" in str(e.value)
    assert "pip install 'tuneloop[s3]'" in (source_problem("s3://bucket/x.jsonl") or "")
    assert "unsupported URL scheme" in (source_problem("ftp://host/x.jsonl") or "")
