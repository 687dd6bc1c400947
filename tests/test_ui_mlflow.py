"""`tuneloop ui` over the MLflow registry backend: the registry pages read a real MLflow server (started on
loopback by tests/test_registry_mlflow.py's fixture) and promote with a reason is an event there, as the CLI's is.
"""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow  # starting the MLflow server takes ~15-30 s

pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'tuneloop[mlflow]')")

from test_registry_cli import adapters, tl  # noqa: E402,F401  (fixture and helper)
from test_registry_mlflow import mlflow_server  # noqa: E402,F401  (fixture)
from tuneloop.config import load_config  # noqa: E402
from tuneloop.registry.api import open_registry  # noqa: E402
from tuneloop.serve.server import BackgroundServer  # noqa: E402
from tuneloop.ui.app import create_app  # noqa: E402

MODEL = "ui-mlflow-bot"


def test_registry_pages_and_promote_on_the_mlflow_registry(mlflow_server, adapters, make_config, tmp_path):  # noqa: F811
    url = mlflow_server["url"]
    path = make_config(registry={"uri": url, "model_name": MODEL})
    ws = path.parent / ".tuneloop"
    for adapter in adapters[:2]:
        r = tl("models", "register", adapter, "--name", MODEL, "--registry", url, "-w", ws)
        assert r.exit_code == 0, r.stderr
    app = create_app(ws, load_config(path), config_path=path)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        info = c.get("/api/info").json()
        assert info["registry"].get("backend") == "mlflow", info
        models = c.get("/api/models").json()["models"]
        mine = next(m for m in models if m["name"] == MODEL)
        assert [v["ref"] for v in mine["versions"]] == [f"{MODEL}:1", f"{MODEL}:2"]
        version = c.get(f"/api/models/{MODEL}/2").json()
        assert version["version"]["artifact_digest"] and any(n["kind"] == "version" for n in version["graph"]["nodes"])
        r = c.post(f"/api/models/{MODEL}/promote", json={"version": 2, "reason": "ui on mlflow: v2 reviewed"})
        assert r.status_code == 200, r.text
    reg = open_registry(url, ws)
    assert reg.aliases(MODEL)["champion"] == 2
    ev = [e for e in reg.events(MODEL) if e.kind == "promoted"][-1]
    assert (ev.version, ev.reason) == (2, "ui on mlflow: v2 reviewed")
