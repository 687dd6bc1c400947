"""Registry hardening (issue 14): symlinks, content checks, dead temp copies, a lost database and recover,
one naming rule, verification before an alias moves, dedup by digest + lineage, a workspace that is a file.

Fast: fake artifacts with real safetensors bytes (no model is trained or loaded).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from test_registry import make_artifact, register, safetensors_bytes
from test_registry_cli import adapters, make_adapter, msg, tl, tlj  # noqa: F401  (fixture and its helper)
from tuneloop.errors import InputError, IntegrityError
from tuneloop.registry.content import check_contents, safetensors_problem
from tuneloop.registry.mlflow_backend import MAX_PARAM_VALUE, mlflow_params
from tuneloop.registry.names import check_alias_name, check_model_name
from tuneloop.registry.ops import gc, recover
from tuneloop.registry.sqlite import RegistryLostError, SqliteRegistry
from tuneloop.registry.store import ArtifactStore
from tuneloop.workspace import Workspace

_MP = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


@pytest.fixture(autouse=True)
def _user(monkeypatch):
    monkeypatch.setenv("TUNELOOP_USER", "ci-bot")
    monkeypatch.delenv("TUNELOOP_REGISTRY_URI", raising=False)


# -- 1. symlinks ------------------------------------------------------------------------------------


def test_symlink_leaving_the_directory_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    src = make_artifact(tmp_path / "a")
    (src / "notes.txt").symlink_to(secret)
    reg = SqliteRegistry(tmp_path / "reg")
    with pytest.raises(InputError, match=r"notes.txt -> .*secret.txt .*outside") as e:
        register(reg, "m", src)
    assert "cp -rL" in str(e.value)
    with pytest.raises(InputError, match="outside"):  # the store refuses it on its own too
        ArtifactStore(tmp_path / "s").put_dir(src)
    # A relative link climbing out, a linked directory outside, and a dangling link: all refused.
    (src / "notes.txt").unlink()
    (src / "sub" / "up.txt").symlink_to("../../secret.txt")
    with pytest.raises(InputError, match="up.txt"):
        register(reg, "m", src)
    (src / "sub" / "up.txt").unlink()
    (src / "ext").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(InputError, match="ext ->"):
        register(reg, "m", src)
    (src / "ext").unlink()
    (src / "gone.txt").symlink_to(tmp_path / "nope")
    with pytest.raises(InputError, match="does not exist"):
        register(reg, "m", src)
    (src / "gone.txt").unlink()
    assert reg.models() == []

    # The CLI: exit 2 with the message, nothing stored (the issue's `ln -s /etc/passwd adapter/notes.txt`).
    (src / "notes.txt").symlink_to("/etc/passwd")
    r = tl("models", "register", src, "--name", "t", "--base", "b", "-w", tmp_path / "ws")
    assert r.exit_code == 2 and "notes.txt -> /etc/passwd" in msg(r)


def test_symlink_inside_the_directory_is_stored_as_a_copy(tmp_path):
    src = make_artifact(tmp_path / "a")
    (src / "tokenizer.json").symlink_to("sub/tokenizer.json")
    (src / "linked").symlink_to("sub", target_is_directory=True)
    v = register(SqliteRegistry(tmp_path / "reg"), "m", src)
    stored = Path(v.artifact_path) / "tokenizer.json"
    assert not stored.is_symlink() and stored.read_text() == "{}"
    assert not (Path(v.artifact_path) / "linked").exists()  # a linked directory: its files once, at their real path


# -- 2. content checks ------------------------------------------------------------------------------


def test_pickles_are_refused_by_their_bytes_whatever_their_name(tmp_path):
    import torch

    payload = pickle.dumps({"w": [1, 2, 3]}, protocol=4)
    cases = {
        "adapter_model.safetensors": payload,  # the issue: a pickle named like safetensors
        "weights": payload,  # no extension
        "scaler.joblib": pickle.dumps([1], protocol=2),
    }
    for name, data in cases.items():
        src = make_artifact(tmp_path / name.replace(".", "_"), extra={name: data})
        with pytest.raises(InputError) as e:
            check_contents(src)
        assert name in str(e.value) and "safe_serialization=True" in str(e.value)
    # torch.save's zip format, with any name.
    zsrc = make_artifact(tmp_path / "zip")
    torch.save({"w": torch.zeros(2)}, zsrc / "checkpoint.dat")
    with pytest.raises(InputError, match=r"checkpoint.dat: it is a zip archive holding a pickle .*data.pkl"):
        check_contents(zsrc)
    # .npy: plain arrays are fine, arrays of Python objects are pickles; the same inside an .npz.
    nsrc = make_artifact(tmp_path / "npy")
    np.save(nsrc / "ok.npy", np.arange(4))
    check_contents(nsrc)
    np.save(nsrc / "bad.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="bad.npy: it is a .npy array of Python objects"):
        check_contents(nsrc)
    (nsrc / "bad.npy").unlink()
    np.savez(nsrc / "arrays.npz", x=np.array([None, 1], dtype=object))
    with pytest.raises(InputError, match="arrays.npz: .*objects"):
        check_contents(nsrc)


def test_safetensors_must_parse(tmp_path):
    good = safetensors_bytes("abc")
    bad = {
        "truncated": good[:-3],
        "garbage": b"not a safetensors file at all",
        "short": b"\x01\x02",
        "header-not-json": (8).to_bytes(8, "little") + b"{{{{{{{{",
        "overlap": _safetensors({"a": ("U8", [4], [0, 4]), "b": ("U8", [4], [2, 6])}, 6),
        "bad-dtype": _safetensors({"a": ("NOPE", [4], [0, 4])}, 4),
    }
    for what, data in bad.items():
        f = tmp_path / f"{what}.safetensors"
        f.write_bytes(data)
        assert safetensors_problem(f) is not None, what
    src = make_artifact(tmp_path / "a", extra={"model-00001.safetensors": bad["truncated"]})
    with pytest.raises(InputError, match="model-00001.safetensors: not a valid safetensors file"):
        register(SqliteRegistry(tmp_path / "reg"), "m", src)


def test_valid_safetensors_starting_like_a_pickle_is_accepted(tmp_path):
    """A header of 1152 bytes makes the file start with 0x80 0x04, the pickle protocol-4 magic."""
    data = _safetensors({"w": ("F32", [2], [0, 8])}, 8, header_len=0x0480)
    assert data[:2] == b"\x80\x04"
    src = make_artifact(tmp_path / "a", extra={"model.safetensors": data})
    check_contents(src)
    from safetensors.numpy import load_file

    assert load_file(src / "model.safetensors")["w"].shape == (2,)


def _safetensors(tensors: dict, data_len: int, header_len: int | None = None) -> bytes:
    header = json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()}).encode()
    if header_len is not None:
        header = header.ljust(header_len, b" ")
    return len(header).to_bytes(8, "little") + header + b"\0" * data_len


# -- 3. temporary copies of killed processes -------------------------------------------------------


def _put_big(root: str, src: str) -> None:
    ArtifactStore(Path(root)).put_dir(Path(src))


def test_dead_temp_copies_are_removed_on_open_and_gc_reports_them(tmp_path):
    ws = tmp_path / "ws"
    reg = SqliteRegistry(ws)
    register(reg, "m", make_artifact(tmp_path / "first"))
    store_root = ws / "artifacts"
    big = make_artifact(tmp_path / "big", extra={"blob.dat": b"\0" + os.urandom(1 << 20) * 24})
    for _ in range(2):  # two kills mid-copy, as in the issue
        proc = _MP.Process(target=_put_big, args=(str(store_root), str(big)))
        proc.start()
        deadline = time.monotonic() + 30
        while not [
            f
            for p in store_root.iterdir()
            if p.name.startswith(f".tmp-put-{proc.pid}@")
            for f in p.rglob("*")
            if f.is_file() and f.stat().st_size > 0
        ]:
            assert time.monotonic() < deadline and proc.is_alive(), "worker never started copying"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    left = [p for p in store_root.iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 2
    # A copy in progress of a live process (this one) and an ownerless old-style one are kept on open.
    live = ArtifactStore(store_root).make_temp("put")
    legacy = store_root / ".tmp-abc123"
    legacy.mkdir()
    (legacy / "x").write_bytes(b"y" * 1000)
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))

    reopened = SqliteRegistry(ws)
    assert sorted(r.path for r in reopened.removed_temps) == sorted(str(p) for p in left)
    assert all(r.bytes > 0 and "is gone" in r.owner for r in reopened.removed_temps)
    assert live.exists() and legacy.exists()
    # gc: the ownerless copy older than an hour goes; the live one stays. CLI reports bytes and entries.
    rep = tlj("models", "gc", "-w", ws)
    assert rep["entries"] == 1 and rep["temps"][0]["path"] == str(legacy) and rep["freed_bytes"] == 1000
    assert live.exists() and not legacy.exists()
    live.rmdir()
    assert reopened.list_versions("m")[0].version == 1


def test_gc_removes_unreferenced_artifacts_and_counts_bytes(tmp_path):
    reg = SqliteRegistry(tmp_path / "ws")
    v = register(reg, "m", make_artifact(tmp_path / "a"))
    orphan = reg.store.put_dir(make_artifact(tmp_path / "b", "orphan"))  # e.g. a crash before commit
    size = sum(f.stat().st_size for f in reg.store.path(orphan).rglob("*") if f.is_file())
    rep = gc(reg)
    assert rep.artifacts == [{"digest": orphan, "bytes": size}] and rep.freed_bytes == size
    assert reg.store.exists(v.artifact_digest) and not reg.store.exists(orphan)
    assert "1 unreferenced artifact(s)" in rep.summary()


# -- 4. a lost database, and recover -------------------------------------------------------------------


def _populated(tmp_path) -> tuple[Path, SqliteRegistry]:
    ws = tmp_path / "ws"
    reg = SqliteRegistry(ws)
    lineage = {"run_id": "r1", "data": {"train_digest": "d1"}, "config": {"train": {"lr": 0.001}}}
    for i in range(1, 5):
        register(
            reg,
            "bot",
            make_artifact(tmp_path / f"a{i}", f"w{i}"),
            lineage={**lineage, "run_id": f"r{i}"},
            metrics={"acc": i / 10},
            cache_key=f"k{i}",
        )
    register(reg, "other", make_artifact(tmp_path / "o"))
    reg.promote("bot", 1)
    reg.promote("bot", 2, reason="better")
    reg.promote("bot", 3)
    reg.rollback("bot", reason="regression")  # champion 2, previous 3
    reg.set_alias("bot", "staging", 4)
    reg.set_tag("bot", 2, "reviewed", "yes")
    reg.set_tag("bot", 2, "owner", "ann")
    reg.remove_tag("bot", 2, "owner")
    reg.delete("bot", 1, reason="leaked data")
    return ws, reg


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_lost_database_is_an_error_naming_recover_and_recover_rebuilds_it(tmp_path, damage):
    ws, reg = _populated(tmp_path)
    before = {
        "versions": reg.list_versions(include_deleted=True),
        "aliases": {m: reg.aliases(m) for m in reg.models()},
        "events": reg.events(),
    }
    assert before["aliases"]["bot"] == {"champion": 2, "previous": 3, "staging": 4}
    db = ws / "registry.db"
    for suffix in ("", "-wal", "-shm"):
        p = db.with_name(db.name + suffix)
        if damage == "delete":
            p.unlink(missing_ok=True)
        elif p.exists():
            p.write_bytes(b"")

    with pytest.raises(RegistryLostError, match="tuneloop models recover"):
        SqliteRegistry(ws)
    r = tl("models", "list", "-w", ws)
    assert r.exit_code == 2 and "tuneloop models recover" in msg(r) and "was lost" in msg(r)

    out = tlj("models", "recover", "-w", ws)
    assert out["versions"] == 5 and out["models"] == ["bot", "other"] and out["deleted"] == ["bot:1"]
    assert out["aliases"] == {"bot": {"champion": 2, "previous": 3, "staging": 4}}
    assert out["missing_artifacts"] == [] and out["skipped_events"] == 0
    reg = SqliteRegistry(ws)
    after = {
        "versions": reg.list_versions(include_deleted=True),
        "aliases": {m: reg.aliases(m) for m in reg.models()},
        "events": reg.events(),
    }
    drop_ids = [{k: v for k, v in e.to_dict().items() if k != "id"} for e in before["events"]]
    assert after["versions"] == before["versions"]  # rows, lineage, metrics, gates, tags, deletions
    assert after["aliases"] == before["aliases"]
    assert [{k: v for k, v in e.to_dict().items() if k != "id"} for e in after["events"]] == drop_ids
    reg.open_artifact("bot", "champion")
    assert (
        reg.register(
            "bot",
            make_artifact(tmp_path / "a5", "w5"),
            artifact_kind="adapter",
            base_model="b",
            lineage={},
            metrics={},
            gates={},
        ).version
        == 5
    )
    # A database that still has versions is never replaced.
    with pytest.raises(InputError, match="only rebuilds a missing, empty or unreadable database"):
        recover(ws)


def test_records_are_backfilled_for_a_registry_made_before_them(tmp_path):
    import shutil

    ws, reg = _populated(tmp_path)
    shutil.rmtree(ws / "artifacts" / ".versions")  # what an older tuneloop left: no records, no journal
    assert SqliteRegistry(ws).store.has_records()  # opening writes them once
    aliases = reg.aliases("bot")
    (ws / "registry.db").unlink()
    for suffix in ("-wal", "-shm"):
        (ws / f"registry.db{suffix}").unlink(missing_ok=True)
    rep = recover(ws)
    assert rep.versions == 5 and rep.aliases["bot"] == aliases and rep.deleted == ["bot:1"]
    assert SqliteRegistry(ws).get("bot", 2).tags == {"reviewed": "yes"}


def test_recover_without_the_journal_keeps_versions_and_the_aliases_of_the_records(tmp_path):
    ws = tmp_path / "ws"
    reg = SqliteRegistry(ws)
    register(reg, "m", make_artifact(tmp_path / "a"), reason="first")
    reg.promote("m", 1)
    register(reg, "m", make_artifact(tmp_path / "b", "w2"))  # its record holds the aliases then: champion 1
    (ws / "artifacts" / ".versions" / "events.jsonl").unlink()
    for suffix in ("", "-wal", "-shm"):
        (ws / f"registry.db{suffix}").unlink(missing_ok=True)
    rep = recover(ws)
    assert rep.versions == 2 and rep.aliases == {"m": {"champion": 1}}
    events = SqliteRegistry(ws).events("m")
    assert [(e.kind, e.version, e.reason) for e in events] == [
        ("registered", 1, "first"),
        ("registered", 2, ""),
    ]


def test_a_garbage_database_is_moved_aside_by_recover(tmp_path):
    ws, reg = _populated(tmp_path)
    for suffix in ("-wal", "-shm"):
        (ws / f"registry.db{suffix}").unlink(missing_ok=True)
    (ws / "registry.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(Exception, match="tuneloop models recover"):
        SqliteRegistry(ws)
    rep = recover(ws)
    assert rep.versions == 5 and rep.moved_aside and Path(rep.moved_aside).read_bytes().startswith(b"this is not")
    assert "moved to" in rep.summary()


def test_a_fresh_registry_and_an_empty_store_are_fine(tmp_path):
    ws = tmp_path / "ws"
    assert SqliteRegistry(ws).models() == []
    assert SqliteRegistry(ws).models() == []  # reopening an empty registry is not "lost"
    with pytest.raises(InputError, match="nothing to recover"):
        recover(tmp_path / "empty")


def test_a_registration_killed_before_commit_writes_no_record(tmp_path):
    from test_registry import _MP as MP
    from test_registry import _register_then_die_before_commit

    ws = tmp_path / "ws"
    SqliteRegistry(ws)
    proc = MP.Process(target=_register_then_die_before_commit, args=(str(ws), str(make_artifact(tmp_path / "d"))))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    reg = SqliteRegistry(ws)  # an artifact but no record and a healthy (version-less) database: not "lost"
    assert reg.models() == [] and not reg.store.has_records()


# -- 5. names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a/../b", "a//b", "a/b", "x" * 5000, "..", "a..b", "-a", ".a", "a:1", "a@b", "", "a b"]
)
def test_one_naming_rule_for_models(tmp_path, name):
    with pytest.raises(InputError, match="invalid model name") as e:
        register(SqliteRegistry(tmp_path / "reg"), name, make_artifact(tmp_path / "a"))
    assert len(str(e.value)) < 400  # a 5000-character name is not echoed back whole


def test_naming_rule_accepts_ordinary_names_and_checks_aliases():
    for ok in ("support-bot", "bot_2", "Qwen2.5-0.5B-lora", "x" * 128):
        assert check_model_name(ok) == ok
    assert check_alias_name("champion") == "champion"
    for bad in ("latest", "v3", "V12", "my.alias", "1st", "a/b", "x" * 129):
        with pytest.raises(InputError, match="alias"):
            check_alias_name(bad)


# -- 6. verify before an alias moves -----------------------------------------------------------------


def _tamper(reg: SqliteRegistry, version: int) -> None:
    target = Path(reg.get("m", version).artifact_path) / "adapter_model.safetensors"
    os.chmod(target, 0o644)
    target.write_bytes(safetensors_bytes("evil"))


def test_no_alias_moves_to_a_tampered_version(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    for i in (1, 2, 3):
        register(reg, "m", make_artifact(tmp_path / f"a{i}", f"w{i}"))
    reg.promote("m", 1)
    reg.promote("m", 2)  # champion 2, previous 1
    _tamper(reg, 3)
    with pytest.raises(IntegrityError, match=r"(?s)refusing to point m@champion at m:3: .*adapter_model.safetensors"):
        reg.promote("m", 3)
    with pytest.raises(IntegrityError, match="refusing to point m@staging at m:3"):
        reg.set_alias("m", "staging", 3)
    _tamper(reg, 1)
    with pytest.raises(IntegrityError, match="refusing to point m@champion at m:1"):
        reg.rollback("m")
    assert reg.aliases("m") == {"champion": 2, "previous": 1}
    assert [e.kind for e in reg.events("m")].count("promoted") == 2
    r = tl("models", "promote", "m:3", "-w", tmp_path / "reg")
    assert r.exit_code == 1 and "failed verification" in msg(r)


# -- 9. registering the same thing again -------------------------------------------------------------


def test_same_digest_and_lineage_from_a_copied_workspace_returns_the_existing_version(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg")
    lin = {
        "run_id": "r1",
        "config_path": "/home/a/bot.yaml",
        "config_hash": "h1",
        "base": {"id": "b", "path": "/home/a/base", "digest": "dir:123"},
        "data": {"train_digest": "d1", "train_path": "/home/a/train.jsonl"},
        "code_version": "1",
    }
    gates = {"min_accuracy": {"passed": True, "verdict": "PASS", "value": 0.9}}
    v1 = register(reg, "m", make_artifact(tmp_path / "a"), lineage=lin, gates=gates, cache_key="k1")
    copied = {
        **lin,
        "run_id": "r2",
        "config_path": "/tmp/copy/bot.yaml",
        "config_hash": "h2",
        "base": {**lin["base"], "path": "/tmp/copy/base"},
        "data": {"train_digest": "d1", "train_path": "/tmp/copy/train.jsonl"},
    }
    again = register(reg, "m", make_artifact(tmp_path / "copy"), lineage=copied, gates=gates, cache_key="k2")
    assert again.existing is True and again.version == v1.version == 1
    # Different data, different gate results (a verdict, or a threshold), or different bytes: a new version.
    assert (
        register(
            reg, "m", make_artifact(tmp_path / "b"), lineage={**lin, "data": {"train_digest": "d2"}}, gates=gates
        ).version
        == 2
    )
    assert (
        register(
            reg,
            "m",
            make_artifact(tmp_path / "c"),
            lineage=lin,
            gates={"min_accuracy": {"passed": False, "verdict": "FAIL"}},
        ).version
        == 3
    )
    assert (
        register(
            reg,
            "m",
            make_artifact(tmp_path / "e"),
            lineage=lin,
            gates={"min_accuracy": {**gates["min_accuracy"], "threshold": 0.5}},
        ).version
        == 4
    )
    assert register(reg, "m", make_artifact(tmp_path / "d", "other"), lineage=lin, gates=gates).version == 5
    # A deleted version is not returned: the same inputs register anew.
    reg.delete("m", 5)
    assert register(reg, "m", make_artifact(tmp_path / "d2", "other"), lineage=lin, gates=gates).version == 6


# -- 8. MLflow params (the server round trip is in test_registry_mlflow.py) -------------------------


def test_mlflow_params_are_dotted_and_truncated_within_limits():
    params, truncated = mlflow_params(
        {
            "train": {"learning_rate": 1e-4, "lora": {"r": 8, "targets": ["q", "v"]}, "packing": False},
            "data": {"rules": {"bad key!": "x"}, "prompt": "p" * 10000, "empty": {}},
            "name": "bot",
            "seed": None,
        }
    )
    assert params["train.learning_rate"] == "0.0001" and params["train.lora.r"] == "8"
    assert params["train.lora.targets"] == '["q", "v"]' and params["train.packing"] == "false"
    assert params["data.rules.bad key_"] == "x" and params["data.empty"] == "{}" and params["seed"] == "null"
    assert params["name"] == "bot"
    assert len(params["data.prompt"]) == MAX_PARAM_VALUE and params["data.prompt"].endswith("10000 characters]")
    assert truncated == ["data.prompt"]


# -- 10. a workspace that is a file ------------------------------------------------------------------


def test_a_workspace_that_is_a_file_is_an_input_error(tmp_path, make_config):
    f = tmp_path / "ws-file"
    f.write_text("not a directory")
    with pytest.raises(InputError, match="is a file, not a directory"):
        Workspace(f)
    with pytest.raises(InputError, match="is inside .*ws-file, which is a file"):
        Workspace(f / "sub")
    with pytest.raises(InputError, match="is a file"):
        SqliteRegistry(f)
    cfg = make_config(workspace=str(f))
    for args in (
        ["run", cfg],
        ["eval", cfg],
        ["status", "-c", cfg],
        ["serve", cfg],
        ["models", "list", "-c", cfg],
        ["models", "list", "-w", f],
        ["models", "gc", "-w", f],
        ["models", "recover", "-c", cfg],
    ):
        r = tl(*args)
        assert r.exit_code == 2 and "is a file, not a directory" in msg(r), (args, r.stderr)


def test_export_says_an_adapter(tmp_path, adapters, monkeypatch):
    from tuneloop import cli

    monkeypatch.setattr(cli.out, "width", 400)
    ws = tmp_path / "ws"
    tlj("models", "register", adapters[0], "--name", "bot", "-w", ws)
    r = tl("models", "export", "bot:1", tmp_path / "exp", "-w", ws)
    assert r.exit_code == 0 and "exported bot:1 as an adapter to" in r.stdout, r.stdout
