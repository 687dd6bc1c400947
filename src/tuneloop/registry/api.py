"""One registry interface, two backends, and the factory that picks one.

* ``SqliteRegistry`` (``registry/sqlite.py``; crash recovery in ``registry/recovery.py``): SQLite in the
  workspace (``.tuneloop/registry.db``) and a local content-addressed artifact store. The default; needs no set-up.
* ``MlflowRegistry`` (``registry/mlflow_backend.py``): a shared MLflow tracking server. Versions, aliases
  and tags live in MLflow's Model Registry, artifacts in its artifact store. Chosen by
  ``registry.uri: http://host:port`` in the config, ``--registry URI`` on the CLI, or ``$TUNELOOP_REGISTRY_URI``.

Both return the same typed records and raise the same typed errors, so the pipeline and the CLI do not care
which one they talk to: versions as :class:`~tuneloop.registry.records.ModelVersion` (``model``, ``version``,
``ref``, ``created_at``, ``artifact_digest``, ``artifact_kind``, ``base_model``, ``cache_key``, ``lineage``,
``metrics``, ``gates``, ``aliases``, ``tags``, ``deleted``), the event log as
:class:`~tuneloop.registry.events.RegistryEvent` (``model``, ``version``, ``kind``, ``at``, ``actor``,
``reason``, ``details``; ``id`` on SQLite, ``seq`` on MLflow) and canary rollouts as
:class:`~tuneloop.registry.rollouts.Rollout`. Each record's ``to_dict()`` is its JSON form (what ``--json``
prints, byte-compatible with the dicts returned before the records were typed). ``delete`` returns a plain
summary dict, ``{"version": ModelVersion, "removed_aliases": [...], "collected": [digests]}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tuneloop.errors import ConfigError
from tuneloop.registry.events import RegistryEvent
from tuneloop.registry.records import ModelVersion
from tuneloop.registry.rollouts import Rollout

REGISTRY_URI_ENV = "TUNELOOP_REGISTRY_URI"


@runtime_checkable
class ModelRegistry(Protocol):
    """What the pipeline, ``tuneloop serve`` and ``tuneloop models`` need from a registry backend."""

    backend: str

    @property
    def location(self) -> str: ...

    def register(
        self,
        model: str,
        artifact_dir: Path,
        *,
        artifact_kind: str,
        base_model: str,
        lineage: dict,
        metrics: dict,
        gates: dict,
        cache_key: str | None = None,
        actor: str | None = None,
        reason: str = "",
    ) -> ModelVersion: ...

    def promote(
        self, model: str, version: int | str, *, alias: str = "champion", actor: str | None = None, reason: str = ""
    ) -> ModelVersion: ...

    def rollback(
        self, model: str, *, alias: str = "champion", actor: str | None = None, reason: str = ""
    ) -> ModelVersion: ...

    def set_alias(
        self, model: str, alias: str, version: int | str, *, actor: str | None = None, reason: str = ""
    ) -> None: ...

    def parse_ref(self, ref: str) -> tuple[str, str]:
        """``name:3`` / ``name@alias`` / ``name`` -> (model, version string); a static method on both backends."""
        ...

    def set_tag(
        self, model: str, version: int | str, key: str, value: str, *, actor: str | None = None, reason: str = ""
    ) -> ModelVersion: ...

    def remove_tag(
        self, model: str, version: int | str, key: str, *, actor: str | None = None, reason: str = ""
    ) -> ModelVersion: ...

    def record_event(
        self,
        model: str,
        version: int | str,
        kind: str,
        details: dict,
        *,
        actor: str | None = None,
        reason: str = "",
    ) -> RegistryEvent: ...

    def delete(
        self, model: str, version: int | str, *, force: bool = False, actor: str | None = None, reason: str = ""
    ) -> dict: ...

    def get(self, model: str, version: int | str = "latest") -> ModelVersion: ...

    def resolve(self, ref: str) -> ModelVersion: ...

    def open_artifact(self, model: str, version: int | str = "latest") -> Path: ...

    def list_versions(self, model: str | None = None, *, include_deleted: bool = False) -> list[ModelVersion]: ...

    def models(self) -> list[str]: ...

    def get_alias(self, model: str, alias: str) -> int | None: ...

    def aliases(self, model: str) -> dict[str, int]: ...

    def events(self, model: str | None = None, version: int | None = None) -> list[RegistryEvent]: ...

    # Rollouts (records and rules in registry/rollouts.py): the `canary` alias, the record, every decision as an event.

    def start_rollout(
        self,
        model: str,
        candidate_version: int | str,
        *,
        baseline_version: int | str | None = None,
        policy: dict,
        actor: str | None = None,
        reason: str = "",
        weight: float | None = None,
        state_json: str | None = None,
    ) -> Rollout: ...

    def get_rollout(self, model: str, rollout_id: str | None = None) -> Rollout | None: ...

    def list_rollouts(self, model: str) -> list[Rollout]: ...

    def update_rollout(
        self,
        model: str,
        rollout_id: str,
        *,
        revision: int,
        state_json: str | None = None,
        weight: float | None = None,
        status: str = "running",
        decision: dict | None = None,
        actor: str | None = None,
        reason: str = "",
        event: bool = True,
    ) -> Rollout: ...


def registry_uri(cfg_or_uri: Any = None) -> str | None:
    """The registry URI in effect: an explicit URI, else the config's ``registry.uri``, else the environment."""
    if isinstance(cfg_or_uri, str):
        return cfg_or_uri or None
    uri = getattr(getattr(cfg_or_uri, "registry", None), "uri", None)
    return uri or os.environ.get(REGISTRY_URI_ENV) or None


def registry_problem(cfg: Any) -> str | None:
    """Why the configured registry cannot be used, found before any work is done (None when it can).

    For an MLflow URI: mlflow must be importable and the server must answer ``GET /health``.
    """
    uri = registry_uri(cfg)
    if uri is None or not uri.startswith(("http://", "https://")):
        return None
    import importlib.util
    import urllib.request

    if importlib.util.find_spec("mlflow") is None:
        return (
            f"registry.uri: {uri} is an MLflow server but mlflow is not installed; run `pip install 'tuneloop[mlflow]'`"
        )
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
            if r.status == 200:
                return None
            status = f"HTTP {r.status}"
    except OSError as e:
        status = str(e)
    return (
        f"registry.uri: the MLflow server {uri} does not answer /health ({status}); start it "
        "(`mlflow server --host 0.0.0.0 --port 5000 ...`) or fix registry.uri / $TUNELOOP_REGISTRY_URI"
    )


def open_registry(cfg_or_uri: Any = None, workspace: Any = None) -> ModelRegistry:
    """The registry for a config (its ``registry.uri``), an explicit URI, or the default local one.

    ``workspace`` (a ``Workspace`` or a directory) holds the SQLite registry, or for MLflow the local
    verified copies of downloaded artifacts. Without a URI anywhere (config, ``$TUNELOOP_REGISTRY_URI``),
    the SQLite registry in the workspace is used.
    """
    root = workspace if workspace is None or isinstance(workspace, (str, os.PathLike)) else workspace.root
    uri = registry_uri(cfg_or_uri)
    if uri is None or uri in ("local", "sqlite"):
        if root is None:
            raise ConfigError("no workspace to hold the local registry; pass a config or run inside a workspace")
        from tuneloop.registry.sqlite import SqliteRegistry

        return SqliteRegistry(Path(root))
    if uri.startswith(("http://", "https://")):
        from tuneloop.registry.mlflow_backend import MlflowRegistry

        cache = Path(root) / "mlflow-cache" if root is not None else None
        return MlflowRegistry(uri, cache_dir=cache)
    raise ConfigError(
        f"registry.uri: unsupported registry URI {uri!r}; use http(s)://host:port for an MLflow tracking "
        f"server, or leave it unset for the local SQLite registry in the workspace"
    )
