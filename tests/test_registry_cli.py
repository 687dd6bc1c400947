"""`tuneloop models ...`: register external directories, promote/rollback round trips, tags, soft delete with
artifact GC, diff, lineage, export loaded by plain transformers/PEFT, tampering refused, --json output.

Most commands run in-process through Typer's CliRunner (stdout and stderr kept apart, real exit codes); one
test runs real subprocesses to check that --json leaves exactly one JSON document on stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tuneloop import cli
from tuneloop.cli import app
from tuneloop.errors import InputError, IntegrityError
from tuneloop.registry.api import open_registry
from tuneloop.registry.records import ModelVersion
from tuneloop.registry.sqlite import SCHEMA_VERSION, SqliteRegistry

runner = CliRunner()


def tl(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def msg(result) -> str:
    """stderr with Rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def tlj(*args, env=None):
    r = tl(*args, "--json", env=env)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def make_adapter(base: Path, out: Path, seed: int, *, base_name: str | None = "same") -> Path:
    """A real LoRA adapter on the tiny base, with non-zero B so it changes the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base) if base_name == "same" else base_name
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model, d / "a1", 1), make_adapter(tiny_model, d / "a2", 2)


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELOOP_USER", "ci-bot")
    monkeypatch.delenv("TUNELOOP_REGISTRY_URI", raising=False)
    monkeypatch.setattr(cli.out, "width", 250)  # Rich tables wide enough to read in assertions
    return tmp_path / "ws"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_register_external_adapter_and_full_model(ws, tiny_model, adapters, tmp_path):
    v = tlj("models", "register", adapters[0], "--name", "bot", "-w", ws, "--reason", "trained on a laptop")
    assert v["ref"] == "bot:1" and v["artifact_kind"] == "adapter"
    assert v["base_model"] == str(tiny_model)
    assert v["lineage"]["base"]["digest"].startswith("dir:") and v["lineage"]["base"]["path"] == str(
        tiny_model.resolve()
    )
    stored = Path(v["artifact_path"])
    assert (stored / "adapter_model.safetensors").is_file()
    assert not (stored / "model.safetensors").exists()  # the base is referenced, not copied
    m = tlj("models", "register", tiny_model, "--name", "base-copy", "-w", ws)
    assert m["artifact_kind"] == "model" and (Path(m["artifact_path"]) / "model.safetensors").is_file()

    # An adapter that names no base needs --base; --base overrides what adapter_config says.
    nobase = make_adapter(tiny_model, tmp_path / "nobase", 3, base_name=None)
    r = tl("models", "register", nobase, "--name", "bot", "-w", ws)
    assert r.exit_code == 2 and "--base" in msg(r)
    v2 = tlj("models", "register", nobase, "--name", "bot", "--base", tiny_model, "-w", ws)
    assert v2["version"] == 2 and v2["lineage"]["adapter_config_base"] is None

    # Pickle weights are refused up front, with the fix in the message.
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text("{}")
    (binonly / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    r = tl("models", "register", binonly, "--name", "bad", "-w", ws)
    assert r.exit_code == 2 and "pickle" in msg(r) and "safe_serialization=True" in msg(r)
    (binonly / "pytorch_model.bin").unlink()
    r = tl("models", "register", binonly, "--name", "bad", "-w", ws)
    assert r.exit_code == 2 and "no *.safetensors" in msg(r)
    r = tl("models", "register", tmp_path / "nope", "--name", "bad", "-w", ws)
    assert r.exit_code == 2

    listing = tlj("models", "list", "-w", ws)
    assert [x["ref"] for x in listing] == ["base-copy:1", "bot:1", "bot:2"]
    lin = tlj("models", "lineage", "bot:1", "-w", ws)
    assert lin["base_model"]["digest"] == v["lineage"]["base"]["digest"]
    assert [(e["kind"], e["actor"], e["reason"]) for e in lin["events"]] == [
        ("registered", "ci-bot", "trained on a laptop")
    ]
    assert "registered" in tl("models", "lineage", "bot:1", "-w", ws).stdout  # the Rich view renders


def register_from_other_data(ws, path: Path, like: dict) -> ModelVersion:
    """The same bytes as ``like`` but other training data in the lineage: a new version sharing the artifact."""
    lineage = {**like["lineage"], "data": {"train_digest": f"other-data-{like['version']}"}}
    return SqliteRegistry(ws).register(
        like["model"],
        path,
        artifact_kind=like["artifact_kind"],
        base_model=like["base_model"],
        lineage=lineage,
        metrics={},
        gates={},
    )


def test_promote_rollback_round_trip_and_events(ws, adapters):
    v1 = tlj("models", "register", adapters[0], "--name", "bot", "-w", ws)
    tlj("models", "register", adapters[1], "--name", "bot", "-w", ws)
    assert register_from_other_data(ws, adapters[0], v1).version == 3
    r = tl("models", "rollback", "bot", "-w", ws)
    assert r.exit_code == 2 and "no 'previous' alias" in msg(r)

    assert tlj("models", "promote", "bot:1", "-w", ws)["aliases"] == {"champion": 1}
    p = tlj("models", "promote", "bot:2", "-w", ws, "--reason", "better accuracy")
    assert p["aliases"] == {"champion": 2, "previous": 1}
    # Rollback restores previous and keeps the rolled-back version as previous: twice round-trips.
    assert tlj("models", "rollback", "bot", "-w", ws, "--reason", "bad answers")["aliases"] == {
        "champion": 1,
        "previous": 2,
    }
    assert tlj("models", "rollback", "bot", "-w", ws)["aliases"] == {"champion": 2, "previous": 1}
    assert tlj("models", "promote", "bot", "-w", ws)["aliases"] == {"champion": 3, "previous": 2}  # bare name = latest

    # Other aliases keep their own `<alias>-previous`.
    tlj("models", "promote", "bot:1", "--alias", "staging", "-w", ws)
    s = tlj("models", "promote", "bot:3", "--alias", "staging", "-w", ws)
    assert s["aliases"] == {"champion": 3, "previous": 2, "staging": 3, "staging-previous": 1}
    assert tlj("models", "rollback", "bot", "--alias", "staging", "-w", ws)["aliases"]["staging"] == 1
    assert tlj("models", "show", "bot@staging", "-w", ws)["version"] == 1

    events = SqliteRegistry(ws).events("bot")
    kinds = [e.kind for e in events]
    assert kinds == ["registered"] * 3 + [
        "promoted",
        "promoted",
        "rolled_back",
        "rolled_back",
        "promoted",
        "promoted",
        "promoted",
        "rolled_back",
    ]
    rb = events[5]
    assert rb.actor == "ci-bot" and rb.reason == "bad answers"
    assert rb.details["champion"] == {"old": 2, "new": 1} and rb.details["previous"] == {"old": 1, "new": 2}
    assert "champion" in tl("models", "list", "-w", ws).stdout
    shown = tl("models", "show", "bot@champion", "-w", ws)
    assert shown.exit_code == 0 and "bot:3" in shown.stdout and "champion" in shown.stdout


def test_tags_soft_delete_and_artifact_gc(ws, adapters):
    v1 = tlj("models", "register", adapters[0], "--name", "bot", "-w", ws)
    again = tlj("models", "register", adapters[0], "--name", "bot", "-w", ws)  # same bytes, same lineage
    assert again["version"] == 1 and again["existing"] is True
    v2 = register_from_other_data(ws, adapters[0], v1)  # same bytes, other data: one artifact, two versions
    v3 = tlj("models", "register", adapters[1], "--name", "bot", "-w", ws)
    assert v1["artifact_digest"] == v2.artifact_digest != v3["artifact_digest"]

    t = tlj("models", "tag", "bot:1", "reviewed=yes", "owner=ann", "-w", ws)
    assert t["tags"] == {"owner": "ann", "reviewed": "yes"}
    assert tlj("models", "tag", "bot:1", "--remove", "owner", "-w", ws)["tags"] == {"reviewed": "yes"}
    assert tl("models", "tag", "bot:1", "--remove", "nope", "-w", ws).exit_code == 2
    assert tl("models", "tag", "bot:1", "novalue", "-w", ws).exit_code == 2
    assert tl("models", "tag", "bot:1", "tuneloop.x=1", "-w", ws).exit_code == 2  # reserved prefix

    tlj("models", "promote", "bot:1", "-w", ws)
    r = tl("models", "delete", "bot:1", "-w", ws)
    assert r.exit_code == 2 and "champion" in msg(r) and "--force" in msg(r)
    d = tlj("models", "delete", "bot:1", "--force", "--reason", "leaked eval data", "-w", ws)
    assert d["removed_aliases"] == ["champion"] and d["collected"] == []  # v2 still uses the artifact
    assert Path(v1["artifact_path"]).is_dir()
    assert [x["ref"] for x in tlj("models", "list", "-w", ws)] == ["bot:2", "bot:3"]
    every = tlj("models", "list", "--all", "-w", ws)
    assert [x["ref"] for x in every] == ["bot:1", "bot:2", "bot:3"]
    assert every[0]["deleted"]["reason"] == "leaked eval data" and every[0]["deleted"]["actor"] == "ci-bot"
    assert tlj("models", "show", "bot:1", "-w", ws)["deleted"]  # lineage stays inspectable
    r = tl("models", "promote", "bot:1", "-w", ws)
    assert r.exit_code == 2 and "deleted" in msg(r)
    assert tl("models", "delete", "bot:1", "-w", ws).exit_code == 2  # already deleted

    d2 = tlj("models", "delete", "bot:2", "-w", ws)
    assert d2["collected"] == [v1["artifact_digest"]] and not Path(v1["artifact_path"]).exists()
    d3 = tlj("models", "delete", "bot:3", "-w", ws)
    assert d3["collected"] == [v3["artifact_digest"]]
    r = tl("models", "show", "bot", "-w", ws)
    assert r.exit_code == 2 and "no live versions" in msg(r)
    kinds = [e.kind for e in SqliteRegistry(ws).events("bot")]
    assert kinds.count("tagged") == 3 and kinds.count("deleted") == 3

    # A version with the same cache key as a deleted one is not silently resurrected.
    reg = SqliteRegistry(ws)
    args = dict(artifact_kind="adapter", base_model="b", lineage={}, metrics={}, gates={})
    reg.register("m", adapters[0], cache_key="k", **args)
    reg.delete("m", 1)
    with pytest.raises(InputError, match="was deleted"):
        reg.register("m", adapters[0], cache_key="k", **args)


def test_diff_compares_config_data_and_metrics(ws, adapters):
    reg = open_registry(None, ws)
    base_cfg = {"train": {"learning_rate": 1e-3, "lora_r": 4}, "seed": 0}
    for i, (lr, acc, digest) in enumerate([(1e-3, 0.5, "d1"), (2e-4, 0.75, "d2")]):
        reg.register(
            "bot",
            adapters[i],
            artifact_kind="adapter",
            base_model="tiny",
            lineage={
                "config": {**base_cfg, "train": {**base_cfg["train"], "learning_rate": lr}},
                "config_hash": f"h{i}",
                "data": {"train_digest": digest, "eval_digest": "e"},
            },
            metrics={"evaluation": {"accuracy": acc, "harmful_rate": 0.0}},
            gates={"min_accuracy": {"passed": i == 1}},
        )
    d = tlj("models", "diff", "bot:1", "bot:2", "-w", ws)
    assert d["config"] == [{"key": "train.learning_rate", "a": 1e-3, "b": 2e-4}]
    assert d["data"] == [{"key": "train_digest", "a": "d1", "b": "d2"}]
    acc = next(m for m in d["metrics"] if m["key"] == "evaluation.accuracy")
    assert acc["delta"] == pytest.approx(0.25)
    assert next(m for m in d["metrics"] if m["key"] == "evaluation.harmful_rate")["delta"] == 0
    assert d["gates"] == {"min_accuracy": {"a": False, "b": True}}
    assert d["artifact"]["same"] is False and d["config_hash"]["same"] is False
    text = tl("models", "diff", "bot:1", "bot:2", "-w", ws).stdout
    assert "train.learning_rate" in text and "0.25" in text


def test_export_loads_with_plain_transformers_and_peft(ws, tiny_model, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneloop.serve.app import load_served_model

    tlj("models", "register", adapters[0], "--name", "bot", "-w", ws)
    tlj("models", "register", tiny_model, "--name", "full", "-w", ws)
    ids = torch.tensor([[1, 5, 9, 13, 21, 34]])
    registered = logits(load_served_model(SqliteRegistry(ws), "bot", "latest").model, ids)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(tiny_model), ids)
    assert not torch.allclose(registered, base_logits, atol=1e-3)  # the adapter really changes the model

    e = tlj("models", "export", "bot:1", tmp_path / "exp-adapter", "-w", ws)
    assert e["kind"] == "adapter" and "adapter_model.safetensors" in e["files"] and "tokenizer.json" in e["files"]
    cfg = json.loads((tmp_path / "exp-adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model.resolve())
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), tmp_path / "exp-adapter"
    )
    assert torch.equal(logits(plain.eval(), ids), registered)

    e = tlj("models", "export", "bot@latest", tmp_path / "exp-merged", "--merged", "-w", ws)
    assert e["kind"] == "model" and "model.safetensors" in e["files"] and "tokenizer_config.json" in e["files"]
    assert not any(f.endswith(".bin") for f in e["files"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exp-merged")
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(logits(merged, ids), registered, atol=1e-4)

    tlj("models", "export", "full", tmp_path / "exp-full", "-w", ws)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "exp-full"), ids), base_logits)

    r = tl("models", "export", "bot:1", tmp_path / "exp-adapter", "-w", ws)  # exists and is not empty
    assert r.exit_code == 2 and "not an empty directory" in msg(r)
    r = tl("models", "export", "full", tmp_path / "exp-x", "--merged", "-w", ws)
    assert r.exit_code == 2 and "nothing to merge" in msg(r) and not (tmp_path / "exp-x").exists()


def test_tampered_artifact_and_changed_base_are_refused(ws, tiny_model, adapters, tmp_path):
    from tuneloop.serve.app import load_served_model

    base = tmp_path / "base-copy"
    shutil.copytree(tiny_model, base)
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters[0], adapter)
    v = tlj("models", "register", adapter, "--name", "bot", "--base", base, "-w", ws)

    # Change the base the adapter was registered against: export --merged and serving refuse.
    original = (base / "config.json").read_bytes()
    cfg = json.loads(original)
    (base / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    r = tl("models", "export", "bot:1", tmp_path / "out0", "--merged", "-w", ws)
    assert r.exit_code == 1 and "changed since the adapter was registered" in msg(r)
    with pytest.raises(IntegrityError, match="base model"):
        load_served_model(SqliteRegistry(ws), "bot", "1")
    (base / "config.json").write_bytes(original)

    target = Path(v["artifact_path"]) / "adapter_model.safetensors"
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    r = tl("models", "export", "bot:1", tmp_path / "out1", "-w", ws)
    assert r.exit_code == 1
    assert "failed verification" in msg(r) and "adapter_model.safetensors" in msg(r)
    assert not (tmp_path / "out1").exists()
    with pytest.raises(IntegrityError):
        load_served_model(SqliteRegistry(ws), "bot", "1")
    # Registering the original again repairs the stored copy.
    tlj("models", "register", adapter, "--name", "bot", "--base", base, "-w", ws)
    tlj("models", "export", "bot:1", tmp_path / "out2", "-w", ws)


def test_json_is_exactly_one_document_on_stdout_in_a_subprocess(ws, adapters, tmp_path):
    env = {**os.environ, "TUNELOOP_USER": "ci-bot"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "tuneloop.cli", "models"]
    r = subprocess.run(
        [*cmd, "register", str(adapters[0]), "--name", "bot", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "no tuneloop workspace" in msg(r) and r.stdout == ""
    (tmp_path / ".tuneloop").mkdir()  # found by searching upwards from a sub-directory
    (tmp_path / "sub").mkdir()
    r = subprocess.run(
        [*cmd, "register", str(adapters[0]), "--name", "bot", "--json"],
        cwd=tmp_path / "sub",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, msg(r)
    assert json.loads(r.stdout)["ref"] == "bot:1"
    r = subprocess.run(
        [*cmd, "list", "--json"], cwd=tmp_path / "sub", env=env, capture_output=True, text=True, timeout=120
    )
    assert [v["ref"] for v in json.loads(r.stdout)] == ["bot:1"]


def test_git_info_and_base_model_ref(tmp_path, tiny_model):
    from tuneloop.registry.lineage import base_model_ref, git_info

    assert git_info(tmp_path) is None  # not a repository
    if shutil.which("git"):
        run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
        run("init", "-q")
        (tmp_path / "f.txt").write_text("x")
        run("add", "f.txt")
        run("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "init")
        info = git_info(tmp_path)
        assert len(info["commit"]) == 40 and info["dirty"] is False
        (tmp_path / "f.txt").write_text("y")
        assert git_info(tmp_path)["dirty"] is True
    ref = base_model_ref(str(tiny_model))
    assert ref["path"] == str(tiny_model.resolve()) and ref["digest"].startswith("dir:")
    assert base_model_ref("org/some-model") == {
        "id": "org/some-model",
        "path": None,
        "revision": None,
        "digest": "hub:org/some-model",
    }


def test_preflight_refuses_an_unreachable_registry_before_training(make_config, monkeypatch):
    import socket

    from tuneloop import FineTunePipeline, load_config
    from tuneloop.errors import ConfigError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TUNELOOP_REGISTRY_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="does not answer /health|mlflow is not installed"):
        FineTunePipeline(load_config(make_config())).preflight()


def test_a_schema_v1_registry_is_upgraded_in_place(tmp_path, adapters):
    import sqlite3

    reg = SqliteRegistry(tmp_path / "reg")
    reg.register("m", adapters[0], artifact_kind="adapter", base_model="b", lineage={}, metrics={}, gates={})
    with sqlite3.connect(tmp_path / "reg" / "registry.db") as conn:  # what tuneloop 0.1 (schema 1) wrote
        conn.executescript("DROP TABLE tags; DROP TABLE deletions; PRAGMA user_version = 1;")
    reg = SqliteRegistry(tmp_path / "reg")
    assert reg.set_tag("m", 1, "k", "v").tags == {"k": "v"}
    assert reg.delete("m", 1)["version"].deleted
    with sqlite3.connect(tmp_path / "reg" / "registry.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _all_linear_adapter(base: Path, out: Path, *, base_name: str) -> Path:
    """A LoRA adapter on every linear layer, as PEFT saves it (``target_modules`` as 14 full paths), with a
    tokenizer_config that carries this machine's flags."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / f, out / f)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tc, "is_local": True, "local_files_only": True}))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == 14 and "model.layers.0.self_attn.q_proj" in cfg["target_modules"]
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_name}))
    return out


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


def test_export_is_what_a_hub_or_vllm_user_expects(ws, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.registry.ops import export_version
    from tuneloop.serve.app import load_served_model
    from tuneloop.version import __version__

    # The base sits in a Hugging Face cache layout, as a hub model does: the export names it by its hub id.
    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model, snapshot)
    adapter = _all_linear_adapter(tiny_model, tmp_path / "a", base_name=str(snapshot))
    tlj("models", "register", adapter, "--name", "bot", "-w", ws)
    ids = torch.tensor([[1, 5, 9, 13, 21, 34]])
    registered = logits(load_served_model(SqliteRegistry(ws), "bot", "1").model, ids)

    old = os.umask(0o022)
    try:
        e = tlj("models", "export", "bot:1", tmp_path / "exp", "-w", ws)
        merged = export_version(SqliteRegistry(ws), "bot:1", tmp_path / "exp-merged", merged=True)
        os.umask(0o027)
        export_version(SqliteRegistry(ws), "bot:1", tmp_path / "exp-027")
    finally:
        os.umask(old)
    exp = tmp_path / "exp"
    cfg = json.loads((exp / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "acme/tiny-chat" == e["base_model"]
    # Module names mean the same modules: PEFT builds the same model from them.
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), exp).eval()
    assert torch.equal(logits(plain, ids), registered)

    for d in (exp, tmp_path / "exp-merged"):
        tc = json.loads((d / "tokenizer_config.json").read_text())
        assert "is_local" not in tc and "local_files_only" not in tc
        AutoTokenizer.from_pretrained(d)
    assert _modes(exp) == {("d", 0o755), ("f", 0o644)}
    assert _modes(tmp_path / "exp-merged") == {("d", 0o755), ("f", 0o644)} and "model.safetensors" in merged["files"]
    assert _modes(tmp_path / "exp-027") == {("d", 0o750), ("f", 0o640)}  # the umask is respected

    for f in [*exp.glob("*.json"), *(tmp_path / "exp-merged").glob("*.json")]:
        assert str(tmp_path) not in f.read_text(), f  # nothing names this machine's paths

    card = (exp / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "base_model: acme/tiny-chat" in card
    assert "Model Card for Model ID" not in card and f"tuneloop {__version__}" in card and e["ref"] in card
    assert "# bot:1" in (tmp_path / "exp-merged" / "README.md").read_text()


def test_export_of_a_pipeline_version_names_the_base_as_the_config_gave_it(ws, tiny_model, adapters, tmp_path):
    """Lineage from a run: the base path relative to the config, data digests, metrics and gate verdicts."""
    from tuneloop.registry.lineage import base_model_ref
    from tuneloop.registry.ops import export_version

    reg = SqliteRegistry(ws)
    gates = {
        "min_accuracy": {
            "verdict": "PASS",
            "passed": True,
            "value": 0.9167,
            "interval": [0.7, 0.98],
            "op": ">=",
            "threshold": 0.5,
        },
        "max_accuracy_drop": {
            "verdict": "NOT_APPLIED",
            "passed": None,
            "value": -0.5,
            "interval": [-0.8, -0.2],
            "op": "<=",
            "threshold": None,
        },
    }
    reg.register(
        "bot",
        adapters[0],
        artifact_kind="adapter",
        base_model=str(tiny_model),
        gates=gates,
        lineage={
            "base_model_given": "models/base",
            "base": base_model_ref(str(tiny_model)),
            "run_id": "r1",
            "pipeline": "bot",
            "data": {"train_digest": "a" * 64, "eval_digest": "b" * 64},
            "code_version": "0.1.0+abc",
        },
        metrics={"evaluation": {"accuracy": 0.9167, "eval_items": 12}},
    )
    e = export_version(reg, "bot:1", tmp_path / "exp")
    assert (
        json.loads((tmp_path / "exp" / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/base"
    )
    assert e["base_model"] == "models/base" and e["base_model_path"] == str(tiny_model)
    card = (tmp_path / "exp" / "README.md").read_text()
    for text in (
        "base_model: models/base",
        "a" * 64,
        "b" * 64,
        "| accuracy | 0.9167 |",
        "| min_accuracy | PASS | 0.9167 | [0.7, 0.98] | >= 0.5 |",
        "| max_accuracy_drop | NOT_APPLIED |",
        "0.1.0+abc",
        "`bot` / `r1`",
    ):
        assert text in card, text
    assert json.loads((tmp_path / "exp" / "tuneloop_export.json").read_text())["base_model"] == "models/base"
    # every export is an event on the version, with the sha256 of the weights it wrote
    from tuneloop.fsutil import sha256_file

    ev = [x for x in reg.events("bot", 1) if x.kind == "exported"]
    assert len(ev) == 1 and ev[0].details["format"] == "hf" and ev[0].details["path"] == e["path"]
    assert ev[0].details["sha256"] == {
        "adapter_model.safetensors": sha256_file(tmp_path / "exp" / "adapter_model.safetensors")
    }


def test_module_names_only_where_they_mean_the_same_modules():
    from tuneloop.registry.card import hub_id_from_path, module_names

    every = [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "v_proj")]
    assert module_names(every) == ["q_proj", "v_proj"] == module_names(every, 3)
    assert module_names(every, 4) == every  # layer 3 of the base is not adapted
    some = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)] + ["model.layers.0.self_attn.v_proj"]
    assert module_names(some) == some  # v_proj only in layer 0: names would widen the adapter
    assert module_names(["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]  # not from layer 0
    assert module_names(".*q_proj") == ".*q_proj" and module_names(["q_proj"]) == ["q_proj"]
    assert (
        hub_id_from_path("/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc/")
        == "Qwen/Qwen2.5-0.5B"
    )
    assert hub_id_from_path("/models/base") is None
