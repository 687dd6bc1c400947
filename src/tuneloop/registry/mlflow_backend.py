"""The registry on a shared MLflow tracking server (``registry.uri: http://host:port``).

Same interface and semantics as the SQLite :class:`tuneloop.registry.sqlite.SqliteRegistry`, stored in MLflow:

* a tuneloop model is an MLflow *registered model* (tagged ``tuneloop.managed``); a version is an MLflow
  *model version*, numbered by the server. Its record (kind, base, artifact sha256, cache key, lineage,
  metrics, gates, deletion) lives in model-version tags under ``tuneloop.``; user tags are the other tags.
* aliases are MLflow aliases (``champion``, ``previous``, ...), so ``models:/name@champion`` works in MLflow.
* artifacts: each registration is an MLflow run in the experiment ``tuneloop-registry``, named after the
  pipeline run id (``lineage["run_id"]``); the directory is logged as the run's ``artifact/`` (with the
  ``.manifest.json`` of per-file sha256), its metrics as run metrics, the resolved config as params
  (dotted keys, values cut at MLflow's 6,000 characters and listed in the ``tuneloop.params_truncated`` tag),
  and an ``MLmodel`` at the run's root, which is the model version's source, so
  ``mlflow.pyfunc.load_model("models:/NAME@champion")`` loads it (see ``registry/mlflow_pyfunc.py``).
  Before an alias moves, the server's copy is downloaded and verified. ``open_artifact`` downloads into a local content-addressed cache and refuses a copy whose
  sha256 digest differs from the one recorded at registration (IntegrityError naming the files).
* events (registered, promoted, rolled_back, alias_set, tagged, deleted) are registered-model tags
  ``tuneloop.event.<time>.<random>`` holding JSON; they are only ever added.
* rollouts (``registry/rollouts.py``): a record is JSON in registered-model tags, split into parts of at most
  4,500 characters (MLflow's SQL stores hold 5,000 per tag value): ``tuneloop.rollout.<n>.<revision>.<token>.<i>``,
  written first, then the pointer ``tuneloop.rollout.<n>`` (revision, writer token, parts), which commits it;
  parts of older revisions are then deleted. The ``canary`` alias is an MLflow alias; decisions are events.

MLflow has no multi-statement transactions, so unlike SQLite:
* the compare-and-set of ``update_rollout`` is best effort: the revision is checked just before writing and
  the pointer read back after it (a writer whose pointer was overwritten gets ``RolloutConflict``), but two
  replicas writing within the same few milliseconds can both land a decision (both are recorded as events,
  the later record wins); likewise two simultaneous ``start_rollout`` calls. Give one replica the ticks
  (or use the SQLite registry) where that matters;
* two processes promoting the same alias at the same moment may interleave (the last one wins, both events
  are recorded), and two registrations with the same cache key at the same moment may both create a
  version. Version numbers are still unique (the server assigns them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError, IntegrityError, TuneloopError
from tuneloop.fsutil import read_json, sha256_file, utcnow
from tuneloop.registry.events import RegistryEvent
from tuneloop.registry.names import (
    alias_hint,
    check_alias_name,
    check_model_name,
    check_tag,
    parse_ref,
    previous_alias,
    version_ranges,
)
from tuneloop.registry.records import ARTIFACT_KINDS, ModelVersion, check_note_event, to_json
from tuneloop.registry.rollouts import (
    CANARY_ALIAS,
    ENDED,
    MAX_TAG_CHARS,
    Rollout,
    RolloutConflict,
    check_json,
    check_start,
    check_update,
    check_weight,
    decision_details,
    new_record,
    split_chunks,
    update_event_kind,
    updated_record,
)
from tuneloop.registry.store import MANIFEST_NAME, ArtifactStore

log = logging.getLogger(__name__)
EXPERIMENT = "tuneloop-registry"
P = "tuneloop."
_RECORD_KEYS = ("kind", "base_model", "artifact_digest", "cache_key", "created_at", "lineage", "metrics", "gates")
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
MAX_PARAM_KEY = 250
_PARAM_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
_ROLLOUT_POINTER = re.compile(r"^tuneloop\.rollout\.(\d+)$")
_ROLLOUT_PART = re.compile(r"^tuneloop\.rollout\.(\d+)\.(\d+)\.[0-9a-f]+\.\d+$")


class MlflowRegistry:
    """Model versions, aliases, tags and events in an MLflow Model Registry; artifacts in its artifact store."""

    parse_ref = staticmethod(parse_ref)
    backend = "mlflow"

    def __init__(self, uri: str, *, cache_dir: Path | None = None):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise InputError(
                f"registry.uri is {uri!r} (an MLflow server) but mlflow is not installed; "
                "install it with `pip install 'tuneloop[mlflow]'`"
            ) from None
        # Fail fast when the server is down instead of retrying for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        # MLflow prints "View run ... at URL" on stdout, which would break `--json`: keep stdout ours.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = uri.rstrip("/")
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        cache_dir = (
            Path(cache_dir)
            if cache_dir
            else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneloop" / "mlflow"
        )
        self.store = ArtifactStore(cache_dir / "artifacts")
        self.removed_temps = self.store.remove_dead_temps()
        self._experiment_id: str | None = None

    @property
    def location(self) -> str:
        return self.uri

    # -- errors -----------------------------------------------------------------------------------

    @contextmanager
    def _mlflow(self, doing: str) -> Iterator[None]:
        """Map MLflow and connection errors to tuneloop's typed errors, saying which server and what to do."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except TuneloopError:
            raise
        except MlflowException as e:
            code = getattr(e, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"):
                raise InputError(f"MLflow registry {self.uri}: cannot {doing}: {e.message}") from None
            raise TuneloopError(
                f"MLflow registry {self.uri}: cannot {doing}: {e.message}; check that the server is running "
                "and reachable (`curl URI/health`), then try again"
            ) from None
        except (OSError, ConnectionError) as e:
            raise TuneloopError(
                f"cannot reach the MLflow server {self.uri} to {doing}: {e}; start it (`mlflow server ...`) "
                "or fix registry.uri / $TUNELOOP_REGISTRY_URI"
            ) from None

    # -- writing ----------------------------------------------------------------------------------

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
    ) -> ModelVersion:
        """Log ``artifact_dir`` as an MLflow run and create the next model version of ``model`` from it."""
        from tuneloop.registry.lineage import check_artifact_dir, origin_key

        check_model_name(model)
        if artifact_kind not in ARTIFACT_KINDS:
            raise InputError(f"artifact_kind must be one of {', '.join(ARTIFACT_KINDS)}, got {artifact_kind!r}")
        if not isinstance(base_model, str) or not base_model:
            raise InputError(f"base_model must be a non-empty string (a hub id or a path), got {base_model!r}")
        record = {
            "lineage": to_json(lineage, "lineage"),
            "metrics": to_json(metrics, "metrics"),
            "gates": to_json(gates, "gates"),
        }
        check_artifact_dir(Path(artifact_dir), artifact_kind)
        if cache_key is not None:
            found = self._by_cache_key(model, cache_key)
            if found is not None:
                return found
        # The local store computes the manifest (per-file sha256) and keeps a verified copy to upload.
        digest = self.store.put_dir(Path(artifact_dir))
        found = self._by_origin(model, origin_key(digest, artifact_kind, lineage, gates))
        if found is not None:
            return found
        stored = self.store.open_verified(digest)
        now = utcnow()
        with self._mlflow(f"register a version of {model!r}"):
            self._ensure_model(model)
            base: dict = lineage["base"] if isinstance(lineage.get("base"), dict) else {}
            meta = {
                "artifact_digest": digest,
                "artifact_kind": artifact_kind,
                "base_model": base_model,
                "base_digest": base.get("digest") or lineage.get("base_model_fingerprint"),
            }
            run_id = self._log_run(model, stored, lineage, metrics, meta)
            tags = {
                f"{P}kind": artifact_kind,
                f"{P}base_model": base_model,
                f"{P}artifact_digest": digest,
                f"{P}created_at": now,
                **{f"{P}{k}": v for k, v in record.items()},
            }
            if cache_key is not None:
                tags[f"{P}cache_key"] = cache_key
            # The source is the run's root: its MLmodel makes `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` work.
            mv = self.client.create_model_version(model, f"runs:/{run_id}", run_id=run_id, tags=tags)
            number = int(mv.version)
            self._add_event(
                model,
                number,
                "registered",
                actor,
                reason,
                {"artifact_digest": digest, "artifact_kind": artifact_kind, "cache_key": cache_key, "run_id": run_id},
            )
            return self.get(model, number)

    def set_alias(
        self, model: str, alias: str, version: int | str, *, actor: str | None = None, reason: str = ""
    ) -> None:
        check_alias_name(alias)
        target = self._get_live(model, self._verified(model, version, alias), f"point alias {alias!r} at").version
        old = self._aliases(model).get(alias)
        with self._mlflow(f"set alias {alias!r} of {model!r}"):
            self.client.set_registered_model_alias(model, alias, str(target))
        self._add_event(model, target, "alias_set", actor, reason, {"alias": alias, "old": old, "new": target})

    def promote(
        self, model: str, version: int | str, *, alias: str = "champion", actor: str | None = None, reason: str = ""
    ) -> ModelVersion:
        check_alias_name(alias)
        prev_name = previous_alias(alias)
        if alias == "previous" or alias.endswith("-previous"):
            raise InputError(f"alias {alias!r} is kept by promote/rollback; promote to the alias it backs up instead")
        target = self._get_live(model, self._verified(model, version, alias), f"promote to {alias!r}").version
        aliases = self._aliases(model)
        old, old_previous = aliases.get(alias), aliases.get(prev_name)
        if old != target:
            with self._mlflow(f"promote {model}:{target}"):
                if old is not None:
                    self.client.set_registered_model_alias(model, prev_name, str(old))
                self.client.set_registered_model_alias(model, alias, str(target))
            details = {
                "alias": alias,
                alias: {"old": old, "new": target},
                prev_name: {"old": old_previous, "new": old if old is not None else old_previous},
            }
            self._add_event(model, target, "promoted", actor, reason, details)
        return self.get(model, target)

    def rollback(
        self, model: str, *, alias: str = "champion", actor: str | None = None, reason: str = ""
    ) -> ModelVersion:
        check_alias_name(alias)
        prev_name = previous_alias(alias)
        aliases = self._aliases(model)
        current, previous = aliases.get(alias), aliases.get(prev_name)
        if previous is None:
            raise InputError(
                f"cannot roll back {model}@{alias}: there is no {prev_name!r} alias (nothing was promoted over "
                f"another version yet){alias_hint(aliases)}; use `tuneloop models promote {model}:VERSION "
                f"--alias {alias}` to pick a version"
            )
        self._get_live(model, self._verified(model, previous, alias), "roll back to")
        with self._mlflow(f"roll back {model}@{alias}"):
            self.client.set_registered_model_alias(model, alias, str(previous))
            if current is not None:
                self.client.set_registered_model_alias(model, prev_name, str(current))
            else:
                self.client.delete_registered_model_alias(model, prev_name)
        details = {
            "alias": alias,
            alias: {"old": current, "new": previous},
            prev_name: {"old": previous, "new": current},
        }
        self._add_event(model, previous, "rolled_back", actor, reason, details)
        return self.get(model, previous)

    def set_tag(
        self, model: str, version: int | str, key: str, value: str, *, actor: str | None = None, reason: str = ""
    ) -> ModelVersion:
        check_tag(key, value)
        v = self.get(model, version)
        old = v.tags.get(key)
        if old != value:
            with self._mlflow(f"tag {v.ref}"):
                self.client.set_model_version_tag(model, str(v.version), key, value)
            self._add_event(model, v.version, "tagged", actor, reason, {"key": key, "old": old, "new": value})
        return self.get(model, v.version)

    def remove_tag(
        self, model: str, version: int | str, key: str, *, actor: str | None = None, reason: str = ""
    ) -> ModelVersion:
        v = self.get(model, version)
        if key not in v.tags:
            raise InputError(f"{v.ref} has no tag {key!r}; its tags: {', '.join(sorted(v.tags)) or 'none'}")
        with self._mlflow(f"untag {v.ref}"):
            self.client.delete_model_version_tag(model, str(v.version), key)
        self._add_event(model, v.version, "tagged", actor, reason, {"key": key, "old": v.tags[key], "new": None})
        return self.get(model, v.version)

    def record_event(
        self, model: str, version: int | str, kind: str, details: dict, *, actor: str | None = None, reason: str = ""
    ) -> RegistryEvent:
        """Record a note event (``NOTE_EVENT_KINDS``, e.g. ``exported``) on a version; returns it as ``events`` lists it."""
        check_note_event(kind)
        number = self.get(model, version).version
        return self._add_event(model, number, kind, actor, reason, details)

    def delete(
        self, model: str, version: int | str, *, force: bool = False, actor: str | None = None, reason: str = ""
    ) -> dict:
        """Soft delete: a ``tuneloop.deleted`` tag, aliases removed only with ``force``, run artifacts collected."""
        from tuneloop.registry.lineage import actor as default_actor

        v = self.get(model, version)
        number = v.version
        if v.deleted:
            raise InputError(f"{v.ref} was already deleted on {v.deleted['at']} by {v.deleted['actor']}")
        pointing = sorted(v.aliases)
        if pointing and not force:
            raise InputError(
                f"{v.ref} is what alias(es) {', '.join(pointing)} point at; promote or roll back to another "
                "version first, or delete with --force to remove the alias(es) too"
            )
        deletion = {"at": utcnow(), "actor": actor or default_actor(), "reason": reason or ""}
        with self._mlflow(f"delete {v.ref}"):
            for a in pointing:
                self.client.delete_registered_model_alias(model, a)
            self.client.set_model_version_tag(model, str(number), f"{P}deleted", json.dumps(deletion))
        self._add_event(
            model,
            number,
            "deleted",
            actor,
            reason,
            {"artifact_digest": v.artifact_digest, "removed_aliases": pointing},
        )
        collected = self._collect(v)
        return {"version": self.get(model, number), "removed_aliases": pointing, "collected": collected}

    def _collect(self, v: ModelVersion) -> list[str]:
        """Delete the version's run artifacts unless another live version uses the same source."""
        source = v.artifact_uri
        for other in self.list_versions():
            if other.artifact_uri == source and other.ref != v.ref:
                return []
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            with self._mlflow(f"delete the artifacts of {v.ref}"):
                run = self.client.get_run(str(v.run_id))
                repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.uri)
                repo.delete_artifacts("artifact")
                if any(f.path == "MLmodel" for f in repo.list_artifacts()):
                    repo.delete_artifacts("MLmodel")
        except TuneloopError as e:
            # The deletion itself is recorded; an artifact store that refuses deletes only costs space.
            log.warning("%s was deleted, but its artifacts stay in the MLflow artifact store: %s", v.ref, e)
            return []
        if not any(o.artifact_digest == v.artifact_digest for o in self.list_versions()):
            self.store.remove(v.artifact_digest)
        return [v.artifact_digest]

    # -- rollouts (see registry/rollouts.py) -----------------------------------------------------------

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
    ) -> Rollout:
        """Start a canary rollout (see ``SqliteRegistry.start_rollout``); one running rollout per model, best effort."""
        from tuneloop.registry.lineage import actor as default_actor

        cand = self._get_live(
            model, self._verified(model, candidate_version, CANARY_ALIAS), "start a rollout of"
        ).version
        weight = float(policy.get("weights", [0.05])[0]) if weight is None else weight
        check_weight(weight)
        policy = json.loads(check_json(policy, "the rollout policy"))
        base = self._aliases(model).get("champion") if baseline_version is None else baseline_version
        if base is not None:
            base = self._get_live(model, base, "compare a canary with").version
        rollouts, tags = self._rollouts(model)
        base = check_start(model, cand, base, next((r for r in rollouts.values() if r.status == "running"), None))
        record = new_record(
            model,
            max(rollouts, default=0) + 1,
            cand,
            base,
            policy=policy,
            weight=weight,
            state_json=state_json,
            actor=actor or default_actor(),
            reason=reason,
            now=utcnow(),
        )
        old = self._aliases(model).get(CANARY_ALIAS)
        with self._mlflow(f"start a rollout of {model}:{cand}"):
            self._write_rollout(model, record, tags)
            self.client.set_registered_model_alias(model, CANARY_ALIAS, str(cand))
        details = {**decision_details(record, None), "policy": policy, CANARY_ALIAS: {"old": old, "new": cand}}
        self._add_event(model, cand, "rollout_started", actor, reason, details)
        return record

    def get_rollout(self, model: str, rollout_id: str | None = None) -> Rollout | None:
        rollouts, _ = self._rollouts(model)
        if rollout_id is not None:
            return self._rollout_by_id(model, rollouts, rollout_id)
        running = [r for r in rollouts.values() if r.status == "running"]
        if running:
            return running[-1]
        return rollouts[max(rollouts)] if rollouts else None

    def list_rollouts(self, model: str) -> list[Rollout]:
        rollouts, _ = self._rollouts(model)
        return [rollouts[n] for n in sorted(rollouts)]

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
    ) -> Rollout:
        """Compare-and-set on the revision, best effort: MLflow has no transactions (see the module docstring)."""
        decision_json = None if decision is None else json.loads(check_json(decision, "the rollout decision"))
        rollouts, tags = self._rollouts(model)
        record = self._rollout_by_id(model, rollouts, rollout_id)
        check_update(record, revision, status, weight)
        if status == "promoted":
            self._verified(model, record.candidate_version, "champion")
        new = updated_record(
            record, state_json=state_json, weight=weight, status=status, decision=decision_json, now=utcnow()
        )
        with self._mlflow(f"update rollout {rollout_id}"):
            current, _ = self._rollouts(model)  # as late as possible before writing: the compare of compare-and-set
            check_update(current[record.number], revision, status, weight)
            token = self._write_rollout(model, new, tags)
            if self._rollout_pointer(model, new.number).get("token") != token:
                raise RolloutConflict(
                    f"rollout {rollout_id} was updated concurrently (another replica wrote revision "
                    f"{new.revision} too); re-read it and decide again"
                )
            changes = self._end_rollout_aliases(new, actor, reason) if status in ENDED else {}
        if (decision is not None and event) or status in ENDED:
            details = {**decision_details(new, decision_json), **changes}
            self._add_event(model, new.candidate_version, update_event_kind(status), actor, reason, fit_tag(details))
        return new

    def _end_rollout_aliases(self, record: Rollout, actor: str | None, reason: str) -> dict[str, Any]:
        model, cand = record.model, record.candidate_version
        aliases, changes = self._aliases(model), {}
        if record.status == "promoted":
            old, old_previous = aliases.get("champion"), aliases.get("previous")
            if old != cand:
                if old is not None:
                    self.client.set_registered_model_alias(model, "previous", str(old))
                self.client.set_registered_model_alias(model, "champion", str(cand))
                changes = {
                    "alias": "champion",
                    "champion": {"old": old, "new": cand},
                    "previous": {"old": old_previous, "new": old if old is not None else old_previous},
                }
                self._add_event(model, cand, "promoted", actor, reason, {**changes, "rollout_id": record.rollout_id})
        canary = aliases.get(CANARY_ALIAS)
        if canary == cand:
            self.client.delete_registered_model_alias(model, CANARY_ALIAS)
        changes[CANARY_ALIAS] = {"old": canary, "new": None if canary == cand else canary}
        return changes

    def _rollouts(self, model: str) -> tuple[dict[int, Rollout], dict[str, str]]:
        """Every rollout record of ``model`` by number, and the model's tags they were read from.

        A record is a pointer tag ``tuneloop.rollout.<n>`` (revision, writer token, number of parts) and its
        parts ``tuneloop.rollout.<n>.<revision>.<token>.<i>``; a read that catches a writer between the two
        is retried.
        """
        for attempt in range(5):
            tags = dict(self._registered_model(model).tags)
            out, torn = {}, False
            for key, value in tags.items():
                m = _ROLLOUT_POINTER.match(key)
                if not m:
                    continue
                pointer, n = json.loads(value), int(m.group(1))
                parts = [
                    tags.get(f"{P}rollout.{n}.{pointer['revision']}.{pointer['token']}.{i}")
                    for i in range(pointer["parts"])
                ]
                if any(p is None for p in parts):
                    torn = True
                    break
                out[n] = Rollout.from_dict(json.loads("".join(p for p in parts if p is not None)))
            if not torn:
                return out, tags
            time.sleep(0.05 * (attempt + 1))
        raise TuneloopError(
            f"MLflow registry {self.uri}: the rollout records of {model!r} kept changing while read; try again"
        )

    def _rollout_pointer(self, model: str, number: int) -> dict:
        value = self._registered_model(model).tags.get(f"{P}rollout.{number}")
        return json.loads(value) if value else {}

    def _rollout_by_id(self, model: str, rollouts: dict[int, Rollout], rollout_id: str) -> Rollout:
        for r in rollouts.values():
            if r.rollout_id == rollout_id:
                return r
        known = ", ".join(rollouts[n].rollout_id for n in sorted(rollouts)) or "none"
        raise InputError(f"{model} has no rollout {rollout_id!r}; its rollouts: {known}")

    def _write_rollout(self, model: str, record: Rollout, old_tags: dict[str, str]) -> str:
        """Write the record's parts, then its pointer (the commit); drop parts of older revisions. Returns the token."""
        token, n, rev = secrets.token_hex(4), record.number, record.revision
        chunks = split_chunks(check_json(record.to_dict(), "the rollout record"))
        for i, chunk in enumerate(chunks):
            self.client.set_registered_model_tag(model, f"{P}rollout.{n}.{rev}.{token}.{i}", chunk)
        pointer = {
            "rollout_id": record.rollout_id,
            "status": record.status,
            "revision": rev,
            "token": token,
            "parts": len(chunks),
        }
        self.client.set_registered_model_tag(model, f"{P}rollout.{n}", json.dumps(pointer, sort_keys=True))
        for key in old_tags:
            m = _ROLLOUT_PART.match(key)
            if m and int(m.group(1)) == n and int(m.group(2)) < rev:
                self.client.delete_registered_model_tag(model, key)
        return token

    # -- reading ----------------------------------------------------------------------------------

    def get(self, model: str, version: int | str = "latest") -> ModelVersion:
        versions = self._versions(model)
        number = self._resolve(model, version, versions)
        if number not in versions:
            live = [n for n, v in sorted(versions.items()) if not v.deleted]
            raise InputError(
                f"model {model!r} has no version {number}; known versions: {version_ranges(live)}{alias_hint(self._aliases(model))}"
            )
        return versions[number]

    def resolve(self, ref: str) -> ModelVersion:
        return self.get(*parse_ref(ref))

    def open_artifact(self, model: str, version: int | str = "latest") -> Path:
        """Download (or reuse a verified local copy of) a version's artifact; refuse it if any byte differs."""
        v = self.get(model, version)
        if v.deleted:
            raise InputError(f"{v.ref} was deleted on {v.deleted['at']} by {v.deleted['actor']}; its artifact is gone")
        if self.store.exists(v.artifact_digest):
            try:
                return self.store.open_verified(v.artifact_digest)
            except IntegrityError:
                pass  # a damaged local copy: download it again
        return self._download_verified(v)

    def _download_verified(self, v: ModelVersion) -> Path:
        """Download a version's artifact from the server, check every byte, keep it in the local cache."""
        digest = v.artifact_digest
        tmp = self.store.make_temp("download")
        try:
            with self._mlflow(f"download the artifact of {v.ref}"):
                got = Path(self.client.download_artifacts(str(v.run_id), "artifact", str(tmp)))
            problems = _problems_against_manifest(got)
            from tuneloop.fsutil import sha256_dir

            actual = sha256_dir(got)
            if actual != digest or problems:
                shown = "\n".join(f"  - {p}" for p in problems[:20]) or "  - the directory digest differs"
                raise IntegrityError(
                    f"artifact of {v.ref} downloaded from {v.artifact_uri} failed verification "
                    f"(sha256 {actual[:16]}..., registered {digest[:16]}...):\n{shown}\n"
                    "The copy in the MLflow artifact store is corrupted or was modified after registration; "
                    "restore it from a backup or register the original directory again as a new version."
                )
            self.store.put_dir(got)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.store.open_verified(digest)

    def _verified(self, model: str, version: int | str, alias: str) -> int:
        """Resolve ``version`` and check the server's copy of its artifact before ``alias`` may point at it."""
        v = self.get(model, version)
        if not v.deleted:  # a deleted version is refused with its own message by _get_live
            try:
                self._download_verified(v)
            except IntegrityError as e:
                raise IntegrityError(f"refusing to point {model}@{alias} at {v.ref}: {e}") from None
        return v.version

    def gc(self) -> list[tuple[str, int]]:
        """Remove local cached copies of artifacts that no live version on the server uses."""
        from tuneloop.registry.store import tree_size

        live = {v.artifact_digest for v in self.list_versions()}
        out = []
        for d in self.store.digests():
            size = tree_size(self.store.path(d))
            if d not in live and self.store.remove(d):
                out.append((d, size))
        return out

    def list_versions(self, model: str | None = None, *, include_deleted: bool = False) -> list[ModelVersion]:
        names = [model] if model is not None else self.models()
        out = []
        for name in names:
            out += [v for _, v in sorted(self._versions(name).items()) if include_deleted or not v.deleted]
        return out

    def models(self) -> list[str]:
        with self._mlflow("list registered models"):
            found = self.client.search_registered_models(filter_string=f"tags.`{P}managed` = 'true'", max_results=1000)
        return sorted(m.name for m in found)

    def get_alias(self, model: str, alias: str) -> int | None:
        return self._aliases(model).get(alias)

    def aliases(self, model: str) -> dict[str, int]:
        return self._aliases(model)

    def events(self, model: str | None = None, version: int | None = None) -> list[RegistryEvent]:
        out = []
        for name in [model] if model is not None else self.models():
            rm = self._registered_model(name)
            for key in sorted(k for k in rm.tags if k.startswith(f"{P}event.")):
                e = json.loads(rm.tags[key])
                if version is None or e.get("version") == version:
                    out.append(RegistryEvent.from_mlflow(name, e, sorted_keys=True))
        out.sort(key=lambda e: str(e.seq))
        return out

    # -- internals --------------------------------------------------------------------------------

    def _experiment(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(EXPERIMENT)
                except MlflowException:  # created concurrently
                    created = self.client.get_experiment_by_name(EXPERIMENT)
                    if created is None:
                        raise
                    self._experiment_id = created.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _ensure_model(self, model: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                model, tags={f"{P}managed": "true"}, description="registered by tuneloop"
            )
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            self.client.set_registered_model_tag(model, f"{P}managed", "true")

    def _registered_model(self, model: str):
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(model)
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                with self._mlflow(f"read model {model!r}"):
                    raise
            rm = None
        except (OSError, ConnectionError):
            with self._mlflow(f"read model {model!r}"):
                raise
        if rm is None or rm.tags.get(f"{P}managed") != "true":
            known = self.models()
            raise InputError(
                f"unknown model {model!r} in the MLflow registry {self.uri}; known models: "
                f"{', '.join(known) if known else 'none yet (register a model first)'}"
            )
        return rm

    def _aliases(self, model: str) -> dict[str, int]:
        rm = self._registered_model(model)
        return {a: int(v) for a, v in sorted((rm.aliases or {}).items())}

    def _versions(self, model: str) -> dict[int, ModelVersion]:
        aliases = self._aliases(model)
        with self._mlflow(f"list versions of {model!r}"):
            mvs = self.client.search_model_versions(filter_string=f"name = '{model}'", max_results=10000)
        out = {}
        for mv in mvs:
            number = int(mv.version)
            t = mv.tags or {}
            if f"{P}artifact_digest" not in t:
                continue  # a version created outside tuneloop
            deleted = json.loads(t[f"{P}deleted"]) if f"{P}deleted" in t else None
            out[number] = ModelVersion(
                model=model,
                version=number,
                created_at=t.get(f"{P}created_at"),
                artifact_digest=t[f"{P}artifact_digest"],
                artifact_path=str(self.store.path(t[f"{P}artifact_digest"])),
                artifact_uri=mv.source,
                run_id=mv.run_id,
                artifact_kind=t.get(f"{P}kind"),
                base_model=t.get(f"{P}base_model", ""),  # always set by register
                cache_key=t.get(f"{P}cache_key"),
                lineage=json.loads(t.get(f"{P}lineage", "{}")),
                metrics=json.loads(t.get(f"{P}metrics", "{}")),
                gates=json.loads(t.get(f"{P}gates", "{}")),
                aliases=tuple(sorted(a for a, n in aliases.items() if n == number)),
                tags=dict(sorted((k, v) for k, v in t.items() if not k.startswith(P))),
                deleted=deleted,
                backend="mlflow",
            )
        return out

    def _resolve(self, model: str, version: int | str, versions: dict[int, ModelVersion]) -> int:
        if isinstance(version, bool) or not isinstance(version, (int, str)):
            raise InputError(f"version must be a number, 'latest' or an alias name, got {version!r}")
        if isinstance(version, int):
            return version
        text = version.strip()
        if text.isdigit():
            return int(text)
        if text == "latest":
            live = [n for n, v in versions.items() if not v.deleted]
            if not live:
                raise InputError(f"model {model!r} has no live versions; register a new one")
            return max(live)
        aliases = self._aliases(model)
        if text not in aliases:
            live = sorted(n for n, v in versions.items() if not v.deleted)
            raise InputError(
                f"model {model!r} has no alias {text!r}{alias_hint(aliases)}; use a version number ({version_ranges(live)}) or 'latest'"
            )
        return aliases[text]

    def _get_live(self, model: str, version: int | str, doing: str) -> ModelVersion:
        v = self.get(model, version)
        if v.deleted:
            live = [x.version for x in self.list_versions(model)]
            raise InputError(
                f"cannot {doing} {v.ref}: it was deleted on {v.deleted['at']} by {v.deleted['actor']}; "
                f"live versions: {version_ranges(live)}"
            )
        return v

    def _by_cache_key(self, model: str, cache_key: str) -> ModelVersion | None:
        try:
            versions = self._versions(model)
        except InputError:
            return None  # no such model yet
        for _, v in sorted(versions.items()):
            if v.cache_key == cache_key:
                if v.deleted:
                    raise InputError(
                        f"these exact inputs were registered as {v.ref}, which was deleted on {v.deleted['at']} "
                        f"by {v.deleted['actor']}; change the data or config (e.g. the seed) to train a new one"
                    )
                return v.found()
        return None

    def _by_origin(self, model: str, key: str) -> ModelVersion | None:
        from tuneloop.registry.lineage import origin_key

        try:
            versions = self._versions(model)
        except InputError:
            return None  # no such model yet
        for _, v in sorted(versions.items()):
            if not v.deleted and origin_key(v.artifact_digest, v.artifact_kind, v.lineage, v.gates) == key:
                return v.found()
        return None

    def _add_event(
        self, model: str, version: int | None, kind: str, actor: str | None, reason: str, details: dict
    ) -> RegistryEvent:
        from tuneloop.registry.lineage import actor as default_actor

        seq = f"{time.time_ns():020d}.{secrets.token_hex(4)}"
        event = {
            "version": version,
            "kind": kind,
            "at": utcnow(),
            "seq": seq,
            "actor": actor or default_actor(),
            "reason": reason or "",
            "details": details,
        }
        with self._mlflow(f"record a {kind} event for {model!r}"):
            self.client.set_registered_model_tag(model, f"{P}event.{seq}", json.dumps(event, sort_keys=True))
        return RegistryEvent.from_mlflow(model, event, sorted_keys=False)

    def _log_run(self, model: str, stored: Path, lineage: dict, metrics: dict, meta: dict) -> str:
        """One MLflow run per registration, named after the pipeline run: params, metrics, artifact, MLmodel."""
        from tuneloop.registry.mlflow_pyfunc import write_mlmodel

        run = self.client.create_run(
            self._experiment(),
            run_name=str(lineage.get("run_id") or f"{model}-register"),
            tags={
                f"{P}model": model,
                f"{P}kind": meta["artifact_kind"],
                f"{P}artifact_digest": meta["artifact_digest"],
            },
        )
        run_id = run.info.run_id
        try:
            self._log_params(run_id, lineage, meta)
            self.client.log_artifacts(run_id, str(stored), "artifact")
            self._log_metrics(run_id, metrics)
            tmp = self.store.make_temp("mlmodel")
            try:
                write_mlmodel(tmp, run_id=run_id, meta=meta)
                self.client.log_artifacts(run_id, str(tmp))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _log_params(self, run_id: str, lineage: dict, meta: dict) -> None:
        """The resolved config as params (dotted keys), plus what was registered; long values truncated and noted."""
        params, truncated = mlflow_params(lineage["config"] if isinstance(lineage.get("config"), dict) else {})
        for key in ("config_hash", "code_version", "run_id", "pipeline"):
            if isinstance(lineage.get(key), str):
                params[f"{P}{key}"] = lineage[key][:MAX_PARAM_VALUE]
        params.update({f"{P}{k}": str(v)[:MAX_PARAM_VALUE] for k, v in meta.items() if v is not None})
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])
        if truncated:
            note = json.dumps(truncated)
            self.client.set_tag(run_id, f"{P}params_truncated", note if len(note) <= 5000 else note[:4990] + " ...]")

    def _log_metrics(self, run_id: str, metrics: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        flat = []

        def walk(obj: Any, prefix: str) -> None:
            if isinstance(obj, dict):
                for k, val in obj.items():
                    walk(val, f"{prefix}.{k}" if prefix else str(k))
            elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
                flat.append(Metric(prefix[:250], float(obj), stamp, 0))

        walk(metrics, "")
        for i in range(0, len(flat), 1000):
            self.client.log_batch(run_id, metrics=flat[i : i + 1000])


def _problems_against_manifest(d: Path) -> list[str]:
    """Files of a downloaded artifact that differ from its manifest (the manifest itself is checked by digest)."""
    try:
        expected = {e["path"]: e for e in read_json(d / MANIFEST_NAME)["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_NAME} is missing or unreadable ({e})"]
    present = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    problems = [f"missing file {r!r}" for r in sorted(expected.keys() - present)]
    problems += [f"extra file {r!r} (not in the manifest)" for r in sorted(present - expected.keys())]
    for rel in sorted(expected.keys() & present):
        got = sha256_file(d / rel)
        if got != expected[rel].get("sha256"):
            problems.append(
                f"file {rel!r} differs: sha256 {got[:12]}..., manifest says {str(expected[rel].get('sha256'))[:12]}..."
            )
    return problems


def mlflow_params(config: dict) -> tuple[dict[str, str], list[str]]:
    """A nested config as MLflow params: dotted keys, JSON for non-strings, values cut to MLflow's limit.

    Returns the params and the keys whose value was truncated (the truncated value ends with a note).
    """
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif prefix:
            flat[prefix] = obj

    walk(config, "")
    params, truncated = {}, []
    for key, value in flat.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        name = _PARAM_KEY_BAD.sub("_", key)[:MAX_PARAM_KEY]
        if len(text) > MAX_PARAM_VALUE:
            note = f"...[truncated by tuneloop: {len(text)} characters]"
            text = text[: MAX_PARAM_VALUE - len(note)] + note
            truncated.append(name)
        params[name] = text
    return params, truncated


def fit_tag(details: dict) -> dict:
    """Event details that fit one MLflow tag (5,000 characters on a SQL store): a decision's per-metric
    statistics are left out, with a note, only if the whole event would not fit (the rollout record keeps them)."""
    if len(json.dumps(details)) < MAX_TAG_CHARS - 500 or not isinstance(details.get("decision"), dict):
        return details
    decision = {k: v for k, v in details["decision"].items() if k != "metrics"}
    decision["metrics_omitted"] = "too long for an MLflow tag: see the rollout record's last_decision"
    return {**details, "decision": decision}
