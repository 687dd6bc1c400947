"""The registry on a real MLflow tracking server (started on loopback for this module, stopped at the end):
register, promote/rollback, tags, soft delete, show/list/lineage, export, tampering, and the same CLI.

Skipped only when mlflow is not importable (install it with `pip install -e '.[mlflow]'`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # starting the server takes ~15-30 s

pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'tuneloop[mlflow]')")

from test_registry_cli import adapters, logits, make_adapter, tl, tlj  # noqa: E402,F401  (fixtures and helpers)
from tuneloop.errors import InputError, IntegrityError  # noqa: E402
from tuneloop.registry.api import ModelRegistry, open_registry  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1:<free port> with a SQLite backend store and a local artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not come up:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "artifacts": root / "artifacts"}
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    log.close()


@pytest.fixture
def reg(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELOOP_USER", "ci-bot")
    monkeypatch.setattr("tuneloop.cli.out.width", 250)
    return open_registry(mlflow_server["url"], tmp_path / "ws")


def test_mlflow_backend_register_promote_rollback_tag_delete(reg, mlflow_server, adapters, tmp_path):
    from mlflow import MlflowClient

    assert isinstance(reg, ModelRegistry) and reg.backend == "mlflow"
    name = f"bot-{tmp_path.name[-8:]}"
    lineage = {"run_id": "r1", "config": {"train": {"learning_rate": 1e-3}}, "data": {"train_digest": "d1"}}
    v1 = reg.register(
        name,
        adapters[0],
        artifact_kind="adapter",
        base_model="tiny",
        lineage=lineage,
        metrics={"evaluation": {"accuracy": 0.5}},
        gates={"min_accuracy": {"passed": True}},
        cache_key="k1",
        reason="first",
    )
    assert v1.ref == f"{name}:1" and v1.lineage == lineage and v1.metrics["evaluation"]["accuracy"] == 0.5
    again = reg.register(
        name, adapters[1], artifact_kind="adapter", base_model="tiny", lineage={}, metrics={}, gates={}, cache_key="k1"
    )
    assert again.existing is True and again.version == 1
    v2 = reg.register(
        name,
        adapters[1],
        artifact_kind="adapter",
        base_model="tiny",
        lineage={**lineage, "config": {"train": {"learning_rate": 2e-4}}},
        metrics={"evaluation": {"accuracy": 0.75}},
        gates={},
    )
    assert v2.version == 2 and v2.artifact_digest != v1.artifact_digest

    # It is really MLflow's Model Registry: versions, aliases and tags are visible to any MLflow client.
    client = MlflowClient(tracking_uri=mlflow_server["url"], registry_uri=mlflow_server["url"])
    reg.promote(name, 1)
    reg.promote(name, 2, reason="better")
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert client.get_model_version_by_alias(name, "previous").version == "1"
    assert reg.aliases(name) == {"champion": 2, "previous": 1}
    assert reg.rollback(name, reason="regression").version == 1
    assert reg.aliases(name) == {"champion": 1, "previous": 2}
    reg.rollback(name)
    assert reg.aliases(name) == {"champion": 2, "previous": 1}
    with pytest.raises(InputError, match="no alias 'prod'"):
        reg.get(name, "prod")

    reg.set_tag(name, 1, "reviewed", "yes")
    assert client.get_model_version(name, "1").tags["reviewed"] == "yes"
    assert reg.get(name, 1).tags == {"reviewed": "yes"}  # internal tuneloop.* tags are not user tags
    reg.remove_tag(name, 1, "reviewed")
    assert reg.get(name, 1).tags == {}

    with pytest.raises(InputError, match="--force"):
        reg.delete(name, 1)
    d = reg.delete(name, 1, force=True, reason="leaked data")
    assert d["removed_aliases"] == ["previous"] and d["collected"] == [v1.artifact_digest]
    assert not [p for p in mlflow_server["artifacts"].rglob("*") if p.is_file() and v1.run_id in str(p)]
    assert [p for p in mlflow_server["artifacts"].rglob("*") if p.is_file() and v2.run_id in str(p)]
    assert [v.version for v in reg.list_versions(name)] == [2]
    assert [v.version for v in reg.list_versions(name, include_deleted=True)] == [1, 2]
    with pytest.raises(InputError, match="deleted"):
        reg.promote(name, 1)
    with pytest.raises(InputError, match="was deleted"):
        reg.register(
            name,
            adapters[0],
            artifact_kind="adapter",
            base_model="tiny",
            lineage={},
            metrics={},
            gates={},
            cache_key="k1",
        )

    events = reg.events(name)
    assert [e.kind for e in events] == [
        "registered",
        "registered",
        "promoted",
        "promoted",
        "rolled_back",
        "rolled_back",
        "tagged",
        "tagged",
        "deleted",
    ]
    assert {e.actor for e in events} == {"ci-bot"} and events[4].reason == "regression"
    assert events[4].details["champion"] == {"old": 2, "new": 1}
    assert name in reg.models()
    with pytest.raises(InputError, match="unknown model"):
        reg.get("no-such-model")


def test_mlflow_cli_export_and_tampering(reg, mlflow_server, tiny_model, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    url = mlflow_server["url"]
    name = f"cli-{tmp_path.name[-8:]}"
    ws = tmp_path / "ws"
    v = tlj("models", "register", adapters[0], "--name", name, "--registry", url, "-w", ws)
    assert v["ref"] == f"{name}:1" and v["artifact_uri"].startswith("runs:/")
    tlj("models", "register", adapters[1], "--name", name, "--registry", url, "-w", ws)
    tlj("models", "promote", f"{name}:1", "--registry", url, "-w", ws)
    assert tlj("models", "promote", f"{name}:2", "--registry", url, "-w", ws)["aliases"] == {
        "champion": 2,
        "previous": 1,
    }
    assert tlj("models", "rollback", name, "--registry", url, "-w", ws)["aliases"] == {"champion": 1, "previous": 2}
    assert tlj("models", "tag", f"{name}@champion", "stage=canary", "--registry", url, "-w", ws)["tags"] == {
        "stage": "canary"
    }
    assert tlj("models", "show", f"{name}@champion", "--registry", url, "-w", ws)["version"] == 1
    assert [e["kind"] for e in tlj("models", "lineage", f"{name}:1", "--registry", url, "-w", ws)["events"]] == [
        "registered",
        "promoted",
        "rolled_back",
        "tagged",
    ]
    assert tlj("models", "diff", f"{name}:1", f"{name}:2", "--registry", url, "-w", ws)["artifact"]["same"] is False
    # $TUNELOOP_REGISTRY_URI points every command (and run) at the server without a flag.
    listed = tlj("models", "list", name, "-w", ws, env={"TUNELOOP_REGISTRY_URI": url})
    assert [x["ref"] for x in listed] == [f"{name}:1", f"{name}:2"]

    # Export downloads the artifact, verifies it and writes a directory plain PEFT loads.
    ids = torch.tensor([[1, 5, 9, 13, 21, 34]])
    tlj("models", "export", f"{name}@champion", tmp_path / "exp", "--registry", url, "-w", ws)
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), tmp_path / "exp"
    )
    from tuneloop.modeling import load_causal_lm

    ours = load_causal_lm(str(tiny_model), adapter=str(adapters[0]))
    assert torch.equal(logits(plain.eval(), ids), logits(ours, ids))

    # Tamper with the copy in MLflow's artifact store; a fresh workspace (no verified local copy) refuses it.
    stored = [p for p in mlflow_server["artifacts"].rglob("adapter_model.safetensors") if v["run_id"] in str(p)]
    assert len(stored) == 1
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0xFF
    stored[0].write_bytes(bytes(data))
    r = tl("models", "export", f"{name}:1", tmp_path / "exp2", "--registry", url, "-w", tmp_path / "fresh")
    assert r.exit_code == 1
    text = " ".join(r.stderr.split())
    assert "failed verification" in text and "adapter_model.safetensors" in text and not (tmp_path / "exp2").exists()
    with pytest.raises(IntegrityError):
        open_registry(url, tmp_path / "fresh2").open_artifact(name, 1)


def test_unreachable_mlflow_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    r = tl("models", "list", "--registry", f"http://127.0.0.1:{_free_port()}", "-w", tmp_path)
    assert r.exit_code == 1 and "MLflow" in r.stderr
    r = tl("models", "list", "--registry", "ftp://nope", "-w", tmp_path)
    assert r.exit_code == 2 and "unsupported registry URI" in " ".join(r.stderr.split())


def test_pipeline_registers_and_deploys_to_the_mlflow_server(mlflow_server, make_config, tmp_path, monkeypatch):
    """The whole loop with `registry.uri` set: the version, its lineage and `champion` live in MLflow."""
    from tuneloop import FineTunePipeline, load_config
    from tuneloop.serve.app import load_served_model

    monkeypatch.setenv("TUNELOOP_USER", "ci-bot")
    url = mlflow_server["url"]
    name = f"loop-{tmp_path.name[-8:]}"
    path = make_config(registry={"uri": url, "model_name": name})
    summary = FineTunePipeline(load_config(path)).run()
    assert summary["overall"] == "passed", summary
    reg = open_registry(load_config(path), tmp_path / ".tuneloop")
    assert reg.backend == "mlflow"
    v = reg.get(name, "champion")
    assert v.version == 1 and v.artifact_kind == "adapter"
    lin = v.lineage
    assert lin["run_id"] == summary["run_id"] and lin["base"]["digest"] == lin["base_model_fingerprint"]
    assert lin["data"]["train_digest"] == summary["stages"]["data_validation"]["metrics"]["digest"]
    assert v.gates["min_accuracy"]["passed"] is True and "accuracy" in v.metrics["evaluation"]
    served = load_served_model(reg, name, "champion")  # downloaded, verified, loaded with its base
    assert served.model_id == f"{name}:1"
    assert not (Path(v.artifact_path) / "training_args.bin").exists()  # safetensors only, no pickles
    # An unchanged re-run finds the same version on the server (cache key) instead of adding one.
    again = FineTunePipeline(load_config(path)).run()
    assert again["stages"]["model_registry"]["metrics"]["version"] == 1
    assert [x.version for x in reg.list_versions(name)] == [1]


# -- hardening (issue 14) ------------------------------------------------------------------------------


def test_mlflow_run_params_name_and_loading_the_champion_with_mlflow_itself(
    reg, mlflow_server, tiny_model, adapters, tmp_path
):
    """Params from the resolved config, the run named after the pipeline run, and `mlflow.pyfunc.load_model`."""
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from tuneloop.modeling import generate, load_causal_lm, load_tokenizer
    from tuneloop.registry.lineage import base_model_ref

    name = f"mlm-{tmp_path.name[-8:]}"
    lineage = {
        "run_id": "20260101-120000-abc123",
        "base": base_model_ref(str(tiny_model)),
        "config": {"train": {"learning_rate": 1e-3, "lora_r": 4}, "data": {"system_prompt": "s" * 7000}},
    }
    v = reg.register(
        name,
        adapters[0],
        artifact_kind="adapter",
        base_model=str(tiny_model),
        lineage=lineage,
        metrics={"evaluation": {"accuracy": 0.5}},
        gates={},
    )
    client = MlflowClient(tracking_uri=mlflow_server["url"])
    run = client.get_run(v.run_id)
    assert run.info.run_name == "20260101-120000-abc123"
    p = run.data.params
    assert p["train.learning_rate"] == "0.001" and p["train.lora_r"] == "4"
    assert p["tuneloop.artifact_digest"] == v.artifact_digest and p["tuneloop.run_id"] == lineage["run_id"]
    assert len(p["data.system_prompt"]) == 6000 and p["data.system_prompt"].endswith("7000 characters]")
    assert json.loads(run.data.tags["tuneloop.params_truncated"]) == ["data.system_prompt"]

    # Same bytes and lineage again: the existing version, no new MLflow run.
    again = reg.register(
        name,
        adapters[0],
        artifact_kind="adapter",
        base_model=str(tiny_model),
        lineage={**lineage, "run_id": "another-run"},
        metrics={},
        gates={},
    )
    assert again.existing is True and again.version == v.version

    reg.promote(name, v.version)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server["url"]
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    prompts = ["hello there", "refund please"]
    got = loaded.predict(prompts, params={"max_new_tokens": 4})
    ours = load_causal_lm(str(tiny_model), adapter=str(adapters[0]))
    want = [
        o["text"]
        for o in generate(
            ours,
            load_tokenizer(str(adapters[0])),
            [[{"role": "user", "content": q}] for q in prompts],
            max_new_tokens=4,
        )
    ]
    assert got == want


def test_mlflow_names_and_tampered_promotion(reg, mlflow_server, adapters, tmp_path):
    name = f"tam-{tmp_path.name[-8:]}"
    for bad in ("a/b", "a/../b", "x" * 300):
        with pytest.raises(InputError, match="invalid model name"):
            reg.register(bad, adapters[0], artifact_kind="adapter", base_model="tiny", lineage={}, metrics={}, gates={})
    v1 = reg.register(name, adapters[0], artifact_kind="adapter", base_model="tiny", lineage={}, metrics={}, gates={})
    v2 = reg.register(name, adapters[1], artifact_kind="adapter", base_model="tiny", lineage={}, metrics={}, gates={})
    with pytest.raises(InputError, match="invalid alias"):
        reg.set_alias(name, "my.alias", 1)
    reg.promote(name, 1)
    # Tamper with v2's copy in MLflow's artifact store: promote, set_alias must refuse it (the local cache
    # holds a good copy from registration, so only a check of the server's bytes catches this).
    stored = [p for p in mlflow_server["artifacts"].rglob("adapter_model.safetensors") if v2.run_id in str(p)]
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0xFF
    stored[0].write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"refusing to point {name}@champion at {name}:2"):
        reg.promote(name, 2)
    with pytest.raises(IntegrityError, match="refusing to point"):
        reg.set_alias(name, "staging", 2)
    assert reg.aliases(name) == {"champion": 1}
    assert v1.version == 1

    # gc on MLflow: the local verified cache keeps what live versions use and drops the rest.
    from test_registry import make_artifact
    from tuneloop.registry.ops import gc

    stray = reg.store.put_dir(make_artifact(tmp_path / "stray", "not registered anywhere"))
    rep = gc(reg)
    assert [a["digest"] for a in rep.artifacts] == [stray] and rep.freed_bytes > 0
    assert reg.store.exists(v1.artifact_digest)
