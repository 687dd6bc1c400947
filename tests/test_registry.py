"""Registry and artifact store: versions, dedup, aliases, immutability, integrity, concurrency, crashes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tuneloop.errors import InputError, IntegrityError
from tuneloop.fsutil import sha256_dir
from tuneloop.registry import sqlite as registry_sqlite
from tuneloop.registry.names import parse_ref
from tuneloop.registry.records import ModelVersion
from tuneloop.registry.sqlite import SqliteRegistry
from tuneloop.registry.store import MANIFEST_NAME, ArtifactStore

# fork keeps the workers cheap (no re-import of the test session); spawn where fork does not exist.
_MP = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def safetensors_bytes(content: str = "weights-v1") -> bytes:
    """A small valid safetensors file whose tensor bytes depend on ``content`` (different content, digest)."""
    import numpy as np
    from safetensors.numpy import save

    data = np.frombuffer(content.encode().ljust(16, b"."), dtype=np.uint8).copy()
    return save({"w": data})


def make_artifact(path: Path, content: str = "weights-v1", extra: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(safetensors_bytes(content))
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "tokenizer.json").write_text("{}")
    for name, data in (extra or {}).items():
        (path / name).write_bytes(data)
    return path


def register(reg: SqliteRegistry, model: str, src: Path, **kw) -> ModelVersion:
    args = dict(
        artifact_kind="adapter",
        base_model="tiny-base",
        lineage={"run": "r1"},
        metrics={"acc": 0.9},
        gates={"min_accuracy": "passed"},
    )
    args.update(kw)
    return reg.register(model, src, **args)


# -- store --------------------------------------------------------------------------------------


def test_store_put_dedup_and_manifest(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    src = make_artifact(tmp_path / "a", extra={".hidden": b"not stored"})
    digest = store.put_dir(src)
    assert digest == sha256_dir(src)
    stored = store.open_verified(digest)
    assert (stored / "sub" / "tokenizer.json").read_text() == "{}"
    assert not (stored / ".hidden").exists()
    assert (stored / MANIFEST_NAME).is_file()
    # Same content from another directory: same digest, no second copy.
    again = store.put_dir(make_artifact(tmp_path / "b"))
    assert again == digest
    assert [p.name for p in (tmp_path / "store").iterdir()] == [digest]


def test_store_rejects_missing_and_empty_dirs(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(InputError, match="does not exist"):
        store.put_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files"):
        store.put_dir(tmp_path / "empty")
    with pytest.raises(InputError, match="not an artifact digest"):
        store.path("../etc")


@pytest.mark.parametrize("damage", ["modify", "delete", "add", "manifest"])
def test_store_detects_tampering_and_put_repairs(tmp_path, damage):
    store = ArtifactStore(tmp_path / "store")
    src = make_artifact(tmp_path / "a")
    digest = store.put_dir(src)
    stored = store.path(digest)
    target = stored / "adapter_model.safetensors"
    if damage == "modify":
        os.chmod(target, 0o644)
        target.write_bytes(safetensors_bytes("weights-evil"))
        expected = "file 'adapter_model.safetensors' differs"
    elif damage == "delete":
        target.unlink()
        expected = "missing file 'adapter_model.safetensors'"
    elif damage == "add":
        (stored / "backdoor.bin").write_bytes(b"x")
        expected = "extra file 'backdoor.bin'"
    else:  # rewrite the file and its manifest entry consistently: only the dir digest can catch it
        import json

        os.chmod(target, 0o644)
        target.write_text("weights-evil")
        m = json.loads((stored / MANIFEST_NAME).read_text())
        from tuneloop.fsutil import sha256_file

        for e in m["files"]:
            if e["path"] == "adapter_model.safetensors":
                e["sha256"], e["size"] = sha256_file(target), target.stat().st_size
        (stored / MANIFEST_NAME).write_text(json.dumps(m))
        expected = "manifest does not match the directory digest"
    with pytest.raises(IntegrityError, match=expected) as err:
        store.open_verified(digest)
    assert "Register the original directory again" in str(err.value)
    # Putting the original content again replaces the damaged copy.
    assert store.put_dir(src) == digest
    store.verify(digest)


# -- registry -----------------------------------------------------------------------------------


def test_register_versions_and_dedup(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    src = make_artifact(tmp_path / "a")
    v1 = register(reg, "support-bot", src, cache_key="k1")
    # Same content from other data: a new version sharing the stored artifact.
    v2 = register(
        reg, "support-bot", make_artifact(tmp_path / "b"), cache_key="k2", lineage={"data": {"train_digest": "d2"}}
    )
    v3 = register(reg, "support-bot", make_artifact(tmp_path / "c", "weights-v2"), artifact_kind="model")
    assert [v.version for v in (v1, v2, v3)] == [1, 2, 3]
    assert v1.ref == "support-bot:1" and not v1.existing
    assert v1.artifact_digest == v2.artifact_digest != v3.artifact_digest
    assert len([p for p in (tmp_path / "reg" / "artifacts").iterdir() if not p.name.startswith(".")]) == 2
    assert Path(v1.artifact_path).is_dir()
    assert v1.lineage == {"run": "r1"} and v1.metrics == {"acc": 0.9}
    assert v1.gates == {"min_accuracy": "passed"} and v1.base_model == "tiny-base"
    assert v1.created_at.endswith("+00:00")
    assert reg.get("support-bot", "latest").version == 3
    assert reg.get("support-bot", "2").cache_key == "k2"
    # Same content and same lineage again (another cache key, e.g. a copied workspace): the existing version.
    again = register(
        reg, "support-bot", make_artifact(tmp_path / "b2"), cache_key="k9", lineage={"data": {"train_digest": "d2"}}
    )
    assert again.version == 2 and again.existing is True
    assert [v.version for v in reg.list_versions("support-bot")] == [1, 2, 3]
    register(reg, "other", src)
    assert reg.models() == ["other", "support-bot"]
    assert [v.ref for v in reg.list_versions()] == ["other:1", "support-bot:1", "support-bot:2", "support-bot:3"]
    assert reg.open_artifact("support-bot", 1) == Path(v1.artifact_path)
    assert [e.kind for e in reg.events("support-bot")] == ["registered"] * 3


def test_register_is_idempotent_per_cache_key(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    first = register(reg, "m", make_artifact(tmp_path / "a"), cache_key="abc")
    again = register(reg, "m", make_artifact(tmp_path / "b", "different"), cache_key="abc")
    assert again.existing is True
    assert again.version == first.version == 1
    assert again.artifact_digest == first.artifact_digest
    assert len(reg.list_versions("m")) == 1
    # The same cache key under another model is a different thing.
    assert register(reg, "m2", make_artifact(tmp_path / "a"), cache_key="abc").version == 1


def test_register_validates_inputs(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    src = make_artifact(tmp_path / "a")
    with pytest.raises(InputError, match="artifact_kind"):
        register(reg, "m", src, artifact_kind="checkpoint")
    with pytest.raises(InputError, match="invalid model name"):
        register(reg, "m:1", src)
    with pytest.raises(InputError, match="JSON"):
        register(reg, "m", src, metrics={"acc": float("nan")})
    with pytest.raises(InputError, match="does not exist"):
        register(reg, "m", tmp_path / "missing")
    assert reg.models() == []


def test_aliases_and_promote(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    for i in range(3):
        register(reg, "m", make_artifact(tmp_path / f"a{i}", f"w{i}"))
    assert reg.aliases("m") == {}
    reg.promote("m", 1, actor="alice", reason="first")
    assert reg.aliases("m") == {"champion": 1}
    reg.promote("m", "2")
    assert reg.aliases("m") == {"champion": 2, "previous": 1}
    reg.promote("m", 2)  # no-op: already champion
    assert reg.aliases("m") == {"champion": 2, "previous": 1}
    reg.set_alias("m", "canary", 3, reason="try it")
    reg.set_alias("m", "canary", "champion")
    assert reg.get_alias("m", "canary") == 2 and reg.get_alias("m", "nope") is None
    assert reg.get("m", "champion").aliases == ("canary", "champion")
    assert reg.get("m", "previous").version == 1
    assert [v.aliases for v in reg.list_versions("m")] == [("previous",), ("canary", "champion"), ()]

    events = reg.events("m")
    assert [e.kind for e in events] == ["registered"] * 3 + ["promoted", "promoted", "alias_set", "alias_set"]
    assert events[3].actor == "alice" and events[3].reason == "first"
    assert events[4].details["champion"] == {"old": 1, "new": 2}
    assert events[5].details == {"alias": "canary", "old": None, "new": 3}
    assert events[6].details == {"alias": "canary", "old": 3, "new": 2}
    assert events[5].actor  # defaults to the login name

    with pytest.raises(InputError, match="no version 9"):
        reg.set_alias("m", "canary", 9)
    with pytest.raises(InputError, match="reserved"):
        reg.set_alias("m", "latest", 1)
    with pytest.raises(InputError, match="invalid alias"):
        reg.set_alias("m", "7", 1)


def test_unknown_refs_list_what_exists(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    register(reg, "support-bot", make_artifact(tmp_path / "a"))
    register(reg, "support-bot", make_artifact(tmp_path / "b", "w2"))
    reg.promote("support-bot", 2)
    with pytest.raises(InputError, match=r"unknown model 'nope'.*known models: support-bot"):
        reg.get("nope", 1)
    with pytest.raises(InputError, match=r"no version 7; known versions: 1-2; aliases: champion -> 2"):
        reg.get("support-bot", 7)
    with pytest.raises(InputError, match=r"no alias 'prod'; aliases: champion -> 2"):
        reg.get("support-bot", "prod")
    with pytest.raises(InputError, match="unknown model"):
        reg.list_versions("nope")
    assert reg.resolve("support-bot@champion").version == 2
    assert reg.resolve("support-bot").version == 2
    assert reg.resolve("support-bot:1").version == 1


def test_parse_ref():
    assert parse_ref("support-bot:3") == ("support-bot", "3")
    assert parse_ref("support-bot@champion") == ("support-bot", "champion")
    assert parse_ref("support-bot") == ("support-bot", "latest")
    assert parse_ref("org/model:latest") == ("org/model", "latest")
    assert SqliteRegistry.parse_ref("a@b") == ("a", "b")
    for bad in ["", ":3", "m@", "m:"]:
        with pytest.raises(InputError):
            parse_ref(bad)


def test_versions_and_events_are_immutable(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    register(reg, "m", make_artifact(tmp_path / "a"))
    conn = sqlite3.connect(tmp_path / "reg" / "registry.db")
    try:
        for sql in [
            "UPDATE versions SET metrics = '{\"acc\": 1.0}'",
            "UPDATE versions SET artifact_digest = 'x'",
            "DELETE FROM versions",
            "UPDATE events SET actor = 'mallory'",
            "DELETE FROM events",
        ]:
            with pytest.raises(sqlite3.IntegrityError, match="immutable|append-only"):
                conn.execute(sql)
    finally:
        conn.close()
    assert reg.get("m", 1).metrics == {"acc": 0.9}
    assert len(reg.events()) == 1


def test_tampered_artifact_fails_open(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    v = register(reg, "m", make_artifact(tmp_path / "a"))
    f = Path(v.artifact_path) / "adapter_config.json"
    os.chmod(f, 0o644)
    f.write_text('{"r": 64}')
    with pytest.raises(IntegrityError, match="adapter_config.json"):
        reg.open_artifact("m", 1)
    with pytest.raises(IntegrityError):
        reg.store.open_verified(v.artifact_digest)


# -- concurrency and crashes ----------------------------------------------------------------------


def _register_worker(root: str, src: str, i: int, start) -> None:
    start.wait()
    reg = SqliteRegistry(Path(root))
    register(reg, "m", Path(src), lineage={"worker": i})


def test_concurrent_registration_allocates_each_version_once(tmp_path):
    root = tmp_path / "reg"
    # Half the workers share content, so concurrent puts of the same directory race too.
    srcs = [make_artifact(tmp_path / f"src{i}", f"weights-{i % 4}") for i in range(8)]
    start = _MP.Event()
    procs = [_MP.Process(target=_register_worker, args=(str(root), str(srcs[i]), i, start)) for i in range(8)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    reg = SqliteRegistry(root)
    versions = reg.list_versions("m")
    assert sorted(v.version for v in versions) == list(range(1, 9))
    assert sorted(v.lineage["worker"] for v in versions) == list(range(8))
    assert len({v.artifact_digest for v in versions}) == 4
    for v in versions:
        reg.store.verify(v.artifact_digest)
    assert len(reg.events("m")) == 8
    assert not [p for p in (root / "artifacts").iterdir() if p.name.startswith(".tmp")]


def _register_big_worker(root: str, src: str) -> None:
    register(SqliteRegistry(Path(root)), "m", Path(src), cache_key="big")


def _register_then_die_before_commit(root: str, src: str) -> None:
    """Kill this process from inside the registration transaction, after the version row is inserted.

    Patching the module's event helper (in this child process only) stands in for a crash at the
    worst moment; the production code has no hook for it.
    """

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    registry_sqlite.insert_event = die
    register(SqliteRegistry(Path(root)), "m", Path(src), cache_key="doomed")


def test_killed_registration_leaves_no_partial_version(tmp_path):
    root = tmp_path / "reg"
    reg = SqliteRegistry(root)
    register(reg, "m", make_artifact(tmp_path / "first"))

    # 1) Killed while copying a large-ish file into the store.
    big = make_artifact(tmp_path / "big", extra={"blob.dat": b"\0" + os.urandom(1 << 20) * 48})
    proc = _MP.Process(target=_register_big_worker, args=(str(root), str(big)))
    proc.start()
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".tmp-") for p in (root / "artifacts").iterdir()):
        assert time.monotonic() < deadline and proc.is_alive(), "worker never started copying"
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    assert [v.version for v in reg.list_versions("m")] == [1]

    # 2) Killed inside the transaction, after the version row was inserted but before commit.
    doomed = make_artifact(tmp_path / "d", "w-d")
    proc = _MP.Process(target=_register_then_die_before_commit, args=(str(root), str(doomed)))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    reg = SqliteRegistry(root)
    assert [v.version for v in reg.list_versions("m")] == [1]
    assert [e.kind for e in reg.events("m")] == ["registered"]

    # The registry is still usable and the interrupted registrations can simply be retried.
    again = register(reg, "m", big, cache_key="big")
    assert again.version == 2 and not again.existing
    reg.open_artifact("m", 2)
    assert register(reg, "m", doomed, cache_key="doomed").version == 3
    with sqlite3.connect(root / "registry.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
