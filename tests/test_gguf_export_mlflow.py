"""GGUF export on the MLflow registry backend: the ``exported`` event with the file's sha256 is recorded there too.

Uses the MLflow server of tests/test_registry_mlflow.py (started on loopback for this module); skipped where
mlflow or the gguf package is not installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starting the server takes ~15-30 s

pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'tuneloop[mlflow]')")
pytest.importorskip("gguf", reason="the gguf package is not installed: pip install 'tuneloop[gguf]'")

from test_registry_cli import adapters, tl  # noqa: E402,F401  (fixture and helper)
from test_registry_mlflow import mlflow_server  # noqa: E402,F401  (fixture)
from tuneloop.errors import InputError  # noqa: E402
from tuneloop.registry.api import open_registry  # noqa: E402


def test_gguf_export_is_an_event_on_the_mlflow_registry(mlflow_server, adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELOOP_USER", "ci-bot")
    reg = open_registry(mlflow_server["url"], tmp_path / "ws")
    tl(
        "models",
        "register",
        adapters[0],
        "--name",
        "gguf-bot",
        "--registry",
        mlflow_server["url"],
        "-w",
        tmp_path / "ws",
    )
    r = tl(
        "models",
        "export",
        "gguf-bot:1",
        tmp_path / "out",
        "--format",
        "gguf",
        "--quant",
        "q8_0",
        "--registry",
        mlflow_server["url"],
        "-w",
        tmp_path / "ws",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    sha = hashlib.sha256((Path(res["path"]) / res["file"]).read_bytes()).hexdigest()
    assert res["sha256"] == sha and res["file"] == "gguf-bot-1.q8_0.gguf"
    events = [e for e in reg.events("gguf-bot", 1) if e.kind == "exported"]
    assert len(events) == 1 and events[0].details["sha256"] == sha and events[0].actor == "ci-bot"
    assert events[0].details["quant"] == "q8_0" and res["event"]["seq"] == events[0].seq
    with pytest.raises(InputError, match="exported"):
        reg.record_event("gguf-bot", 1, "deleted", {})
