"""The ``--json`` output of the CLI is a public interface: its shapes are pinned here (issue 25).

Every verb with ``--json`` that a test can run in seconds is run and its document compared with a snapshot in
``tests/fixtures/json_shapes/``: key names, key order, nesting and value types. Volatile values are normalised
before the comparison (numbers become ``"<int>"`` / ``"<float>"``, timestamps ``"<time>"``, digests and ids
``"<hex>"``, run ids ``"<run_id>"``, temporary paths ``"<tmp>"`` / ``"<basetemp>"``, the MLflow server's URL
``"<registry>"``, ``code_version`` and MLflow's event ``seq``); in the registry scenario strings and booleans are
otherwise kept, in the quick demo's documents (whose values come from training) every scalar becomes its type.
The pipeline config copied into a version's lineage (``config``) is pinned as "a dict" only (its keys are the
config schema's, pinned by the config reference, not by the registry). A key added, removed, renamed or moved
fails the test with a unified diff of the normalised documents.

- ``test_registry_verbs_json_shapes[sqlite|mlflow]``: the same scenario on both registry backends (the local
  SQLite registry, and ``mlflow server`` on loopback): ``models register/list/show/lineage/promote/rollback/tag/
  diff/export/delete/gc`` and ``rollout start/status/abort``. Version 2 is registered with the lineage, metrics
  and gate records of the quick demo's registered version, so the pipeline's records cross both backends.
- ``test_workspace_verbs_json_shapes``: on a copy of the quick demo's workspace: ``demo``, ``status``,
  ``status RUN``, ``models list/show/lineage``, ``rollout status``, ``eval`` and ``data validate``.

To change a shape deliberately, regenerate the snapshots and review the diff in git::

    TUNELOOP_UPDATE_JSON_SHAPES=1 python -m pytest tests/test_json_shapes.py -q

Default is compare. Not covered here (too slow or need services): ``run``/``ci`` (stage summaries of the same
shape as ``demo``), ``judge``, ``drift``, ``feedback export``, ``data diff``, ``models export --format gguf``,
``models recover``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from test_registry_cli import adapters  # noqa: F401  (module fixture: two real LoRA adapters on the tiny model)
from tuneloop.cli import app

try:
    from test_registry_mlflow import mlflow_server  # noqa: F401  (module fixture: `mlflow server` on loopback)
except pytest.skip.Exception:  # mlflow is not installed: the mlflow case skips with the install line
    pass

SNAPSHOTS = Path(__file__).parent / "fixtures" / "json_shapes"
UPDATE = os.environ.get("TUNELOOP_UPDATE_JSON_SHAPES") == "1"
runner = CliRunner()

_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?")
_CODE_VERSION = re.compile(r"\d+\.\d+\.\d+\+[0-9a-f]{12}")  # tuneloop.version.code_version()
_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
_HEX = re.compile(r"[0-9a-f]{12,}")
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
_BASETEMP_ENTRY = re.compile(r"<basetemp>/([A-Za-z_-]+?)\d+")
#: Free text whose numbers come from measurements: their digits are normalised too.
_TEXT_KEYS = {"reason", "warning", "message", "error", "summary", "note"}
#: Values that differ from run to run or machine to machine, replaced whole.
_VOLATILE_KEYS = {"code_version": "<version>", "seq": "<seq>"}
#: Subtrees pinned as their container type only (a list keeps the shape of its first element, types only).
_COLLAPSED_KEYS = {"config"}


class Normaliser:
    """Turns a JSON document into its shape: see the module docstring for what is kept."""

    def __init__(self, literals: dict[str, str] | list[tuple[str, str]], *, values: bool) -> None:
        # Longest first, so a path is replaced before a prefix of it.
        items = literals.items() if isinstance(literals, dict) else literals
        self.literals = sorted(items, key=lambda kv: -len(kv[0]))
        self.values = values

    def text(self, s: str, key: str = "") -> str:
        for literal, placeholder in self.literals:
            s = s.replace(literal, placeholder)
        s = _BASETEMP_ENTRY.sub(r"<basetemp>/\1N", s)
        s = _TIME.sub("<time>", s)
        s = _CODE_VERSION.sub("<version>", s)
        s = _RUN_ID.sub("<run_id>", s)
        s = _HEX.sub("<hex>", s)
        if key in _TEXT_KEYS:
            s = _NUMBER.sub("<n>", s)
        return s

    def __call__(self, obj: Any, key: str = "") -> Any:
        if key in _COLLAPSED_KEYS and isinstance(obj, (dict, list)):
            if isinstance(obj, dict):
                return "<dict>"
            return [Normaliser([], values=False)(obj[0])] if obj else []
        if key in _VOLATILE_KEYS and isinstance(obj, str):
            return _VOLATILE_KEYS[key]
        if isinstance(obj, dict):
            return {self.text(str(k)): self(v, str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self(v, key) for v in obj]
        if isinstance(obj, bool):
            return obj if self.values else "<bool>"
        if isinstance(obj, int):
            return "<int>"
        if isinstance(obj, float):
            return "<float>"
        if isinstance(obj, str):
            return self.text(obj, key) if self.values else "<str>"
        return obj  # None


def check_snapshots(docs: dict[str, Any], folder: str, normalise: Normaliser) -> None:
    """Compare each normalised document with ``SNAPSHOTS/folder/<name>.json`` (or write it when updating);
    fail once, with every difference as a unified diff."""
    where = SNAPSHOTS / folder
    problems = []
    for name, doc in docs.items():
        got = json.dumps(normalise(doc), indent=2) + "\n"
        path = where / f"{name}.json"
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(got, encoding="utf-8")
            continue
        if not path.is_file():
            problems.append(f"{path}: no snapshot (TUNELOOP_UPDATE_JSON_SHAPES=1 writes it)")
            continue
        want = path.read_text(encoding="utf-8")
        if got != want:
            diff = difflib.unified_diff(
                want.splitlines(), got.splitlines(), f"{path} (pinned)", f"{name} (now)", lineterm="", n=2
            )
            problems.append("\n".join(diff))
    if not UPDATE:
        extra = sorted({p.stem for p in where.glob("*.json")} - set(docs))
        if extra:
            problems.append(f"{where}: snapshots no verb produced any more: {extra}")
    if problems:
        pytest.fail(
            "the --json output changed shape (a public interface; see tests/test_json_shapes.py for how to "
            "regenerate the snapshots if the change is deliberate):\n\n" + "\n\n".join(problems),
            pytrace=False,
        )


def tlj(*args: Any, expect: int = 0) -> Any:
    """Run ``tuneloop ARGS --json`` in-process; the exit code must be ``expect`` and stdout one JSON document."""
    r = runner.invoke(app, [str(a) for a in args] + ["--json"])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == expect, f"tuneloop {' '.join(map(str, args))} --json: exit {r.exit_code}\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # outside any git checkout: `models register` records the git state of the cwd
    monkeypatch.setenv("TUNELOOP_USER", "ci-bot")
    monkeypatch.delenv("TUNELOOP_REGISTRY_URI", raising=False)


# ------------------------------------------------------------------------------ the registry verbs


@pytest.fixture(scope="module")
def pipeline_records(quick_demo_pristine) -> dict[str, Any]:
    """The lineage, metrics and gate records the pipeline registered in the quick demo (SQLite)."""
    from tuneloop.registry.api import open_registry
    from tuneloop.workspace import Workspace

    v = open_registry(None, Workspace(quick_demo_pristine / ".tuneloop")).get("support-router", "latest")
    d = v.to_dict()
    return {k: d[k] for k in ("base_model", "lineage", "metrics", "gates")}


@pytest.fixture(params=["sqlite", "mlflow"])
def backend(request, tmp_path) -> tuple[str, list[str], dict[str, str]]:
    """(name, the CLI's registry options, literals to normalise) for a fresh registry on each backend."""
    ws = tmp_path / "ws"
    if request.param == "sqlite":
        return "sqlite", ["-w", ws], {}
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'tuneloop[mlflow]')")
    server = request.getfixturevalue("mlflow_server")
    return "mlflow", ["-w", ws, "--registry", server["url"]], {server["url"]: "<registry>"}


def temp_literals(tmp_path: Path, tmp_path_factory) -> dict[str, str]:
    """This test's directory and the session's (where the tiny model, adapters and quick demo live)."""
    return {str(tmp_path): "<tmp>", str(tmp_path_factory.getbasetemp()): "<basetemp>"}


def test_registry_verbs_json_shapes(env, backend, adapters, pipeline_records, tmp_path, tmp_path_factory):
    from tuneloop.registry.api import open_registry
    from tuneloop.workspace import Workspace

    name, opts, literals = backend
    docs: dict[str, Any] = {}
    docs["models_register"] = tlj("models", "register", adapters[0], "--name", "shape-bot", "--reason", "first", *opts)
    reg = open_registry(opts[3] if len(opts) > 2 else None, Workspace(opts[1]))
    reg.register("shape-bot", adapters[1], artifact_kind="adapter", reason="second", **pipeline_records)
    docs["models_list"] = tlj("models", "list", *opts)
    docs["models_show"] = tlj("models", "show", "shape-bot:2", *opts)
    docs["models_lineage"] = tlj("models", "lineage", "shape-bot:2", *opts)
    docs["models_promote"] = tlj("models", "promote", "shape-bot:1", "--reason", "first champion", *opts)
    tlj("models", "promote", "shape-bot:2", *opts)
    docs["models_rollback"] = tlj("models", "rollback", "shape-bot", "--reason", "back", *opts)
    docs["models_tag"] = tlj("models", "tag", "shape-bot:2", "reviewed=yes", "team=support", *opts)
    docs["models_diff"] = tlj("models", "diff", "shape-bot:1", "shape-bot:2", *opts)
    docs["models_export"] = tlj("models", "export", "shape-bot:2", tmp_path / "exported", *opts)
    docs["rollout_start"] = tlj("rollout", "start", "shape-bot:2", "--reason", "canary", *opts)
    docs["rollout_status"] = tlj("rollout", "status", "shape-bot", *opts)
    docs["rollout_status_all"] = tlj("rollout", "status", *opts)
    docs["rollout_abort"] = tlj("rollout", "abort", "shape-bot", "--reason", "shape test", *opts)
    docs["models_delete"] = tlj("models", "delete", "shape-bot:1", "--force", "--reason", "old", *opts)
    docs["models_list_all"] = tlj("models", "list", "--all", *opts)
    docs["models_gc"] = tlj("models", "gc", *opts)
    literals = {**literals, **temp_literals(tmp_path, tmp_path_factory)}
    check_snapshots(docs, f"registry_{name}", Normaliser(literals, values=True))


# ------------------------------------------------------------------------------ a workspace's verbs


def test_workspace_verbs_json_shapes(env, quick_demo, quick_demo_pristine, tmp_path, tmp_path_factory):
    ws = tmp_path / "demo"
    shutil.copytree(quick_demo_pristine, ws, symlinks=True)
    cfg = ws / "tuneloop.yaml"
    docs: dict[str, Any] = {"demo": json.loads(quick_demo[1].stdout)}
    runs = tlj("status", "-c", cfg)
    docs["status"] = runs
    docs["status_run"] = tlj("status", runs[0]["run_id"], "-c", cfg)
    docs["models_list"] = tlj("models", "list", "-c", cfg)
    docs["models_show"] = tlj("models", "show", "support-router", "-c", cfg)
    docs["models_lineage"] = tlj("models", "lineage", "support-router", "-c", cfg)
    docs["rollout_status_all"] = tlj("rollout", "status", "-c", cfg)
    docs["eval"] = tlj("eval", cfg)
    docs["data_validate"] = tlj("data", "validate", ws / "data" / "eval.jsonl")
    check_snapshots(docs, "workspace", Normaliser(temp_literals(tmp_path, tmp_path_factory), values=False))
