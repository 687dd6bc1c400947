"""`gates.against: champion` and `tuneloop eval --against champion|VERSION` use the configured registry: here a
real MLflow tracking server (started on loopback by the fixture of test_registry_mlflow, stopped after).

Before the fix (issue 14, point 7) both opened the workspace's SQLite registry directly, found no champion
there and silently compared with the base model.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'tuneloop[mlflow]')")

from test_registry_mlflow import mlflow_server  # noqa: E402,F401  (fixture)
from tuneloop import FineTunePipeline, load_config  # noqa: E402
from tuneloop.checks import run_eval  # noqa: E402
from tuneloop.registry.api import open_registry  # noqa: E402


def test_champion_comparisons_use_the_mlflow_registry(mlflow_server, make_config, tmp_path):  # noqa: F811
    name = f"champ-{tmp_path.name[-8:]}"
    path = make_config(registry={"uri": mlflow_server["url"], "model_name": name})
    first = FineTunePipeline(load_config(path)).run()  # auto_deploy: version 1 becomes the champion in MLflow
    assert first["overall"] == "passed", first
    assert not (tmp_path / ".tuneloop" / "registry.db").exists()  # nothing went to a local SQLite registry

    # The pipeline gated against the MLflow champion: the candidate equals it, so every paired change is 0.
    path = make_config(
        registry={"uri": mlflow_server["url"], "model_name": name},
        gates__against="champion",
        deploy={"auto_deploy": False},
    )
    again = FineTunePipeline(load_config(path)).run()
    ev = again["stages"]["evaluation"]["metrics"]
    assert ev["against"] == f"champion {name}:1" and "against_note" not in ev, ev
    assert again["stages"]["training"]["cached"] is True

    cfg = load_config(path)
    report = run_eval(cfg, model=f"{name}:1", against="champion")
    assert report["against"] == f"champion {name}:1" and report["model"] == f"candidate {name}:1"
    assert "against_note" not in report["metrics"]
    assert report["gates"]["max_capability_drop"]["value"] == 0.0
    by_version = run_eval(cfg, model=f"{name}:1", against="1")
    assert by_version["against"] == f"version {name}:1"
    assert open_registry(cfg, tmp_path / ".tuneloop").backend == "mlflow"
    assert not (tmp_path / ".tuneloop" / "registry.db").exists()
