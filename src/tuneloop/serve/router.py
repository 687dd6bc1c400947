"""Model refs to registered versions, through the registry API, and the arm each request goes to.

``name`` means the version the ``champion`` alias points at (the deployed one), or the latest version when no
champion is set; ``name:3`` a version number; ``name@alias`` an alias.

Rollouts: :meth:`Router.choose_arm` splits requests for ``name`` and ``name@champion`` of a model with a running
rollout by ``tuneloop.rollout.split.choose_arm`` (sticky by the user key, else per request): ``canary`` goes to
the candidate, ``baseline`` to the rollout's baseline, both tagged with the rollout id. Explicit refs
(``name:3``, other aliases) are never split (arm ``direct``). The rollout record is cached for ``ttl_s`` (a
started or ended rollout takes effect within it; :meth:`Router.invalidate` drops the cache at once). The
candidate takes traffic only once it is marked ready (:meth:`Router.mark_ready`, after the backend loaded and
probed it); until then the model is served as without a rollout, and :meth:`Router.pending` names it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from tuneloop.errors import InputError
from tuneloop.serve.backends import Route
from tuneloop.serve.errors import APIError, not_found

DEFAULT_ALIAS = "champion"


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``(name, selector)``: selector is a version number, an alias (``@``), or None for a bare name."""
    ref = ref.strip()
    if "@" in ref:
        name, _, sel = ref.rpartition("@")
    elif ":" in ref:
        name, _, sel = ref.rpartition(":")
    else:
        return ref, None
    if not name or not sel:
        raise APIError(400, f"malformed model {ref!r}; use 'name', 'name:VERSION' or 'name@ALIAS'", code="invalid_value", param="model")
    return name, sel


def user_hash(user_key: str | None) -> str | None:
    """What the request log keeps of a sticky user key: sha256 (hex, first 16), never the key."""
    return hashlib.sha256(user_key.encode("utf-8")).hexdigest()[:16] if user_key else None


SPLIT_SELECTORS = (None, DEFAULT_ALIAS)


class Router:
    def __init__(self, registry, *, ttl_s: float = 1.0):
        self.registry = registry
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._rollouts: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._ready: set[str] = set()    # candidate refs ("name:5") loaded and probed by the backend
        self._pending: set[str] = set()  # candidate refs a running rollout waits on
        self._lock = threading.Lock()

    def invalidate(self, model: str | None = None) -> None:
        """Forget cached refs and rollout records (of ``model``, or all): the next request reads the registry."""
        with self._lock:
            if model is None:
                self._cache.clear()
                self._rollouts.clear()
                return
            self._rollouts.pop(model, None)
            for ref in [r for r in self._cache if parse_model_ref(r)[0] == model]:
                self._cache.pop(ref, None)

    def rollout(self, model: str) -> dict[str, Any] | None:
        """``model``'s running rollout record (cached for ``ttl_s``), or None."""
        now = time.monotonic()
        with self._lock:
            hit = self._rollouts.get(model)
            if hit and now - hit[0] < self.ttl_s:
                return hit[1]
        try:
            record = self.registry.get_rollout(model)
        except InputError:  # an unknown model has no rollout; resolve() answers 404 for it
            record = None
        if record is not None and record.get("status") != "running":
            record = None
        with self._lock:
            self._rollouts[model] = (now, record)
        return record

    def candidate_ready(self, record: dict[str, Any]) -> bool:
        """Whether a running rollout's candidate may take traffic; if not yet, it is queued for :meth:`pending`."""
        with self._lock:
            if record["candidate"] in self._ready:
                return True
            self._pending.add(record["candidate"])
            return False

    def watch(self, model: str) -> None:
        """Queue the candidate of ``model``'s running rollout (if any) for preparation, before any request asks."""
        record = self.rollout(model)
        if record is not None:
            self.candidate_ready(record)

    def mark_ready(self, candidate_ref: str) -> None:
        with self._lock:
            self._ready.add(candidate_ref)
            self._pending.discard(candidate_ref)

    def pending(self) -> list[str]:
        """Candidates of running rollouts that still wait to be loaded and probed."""
        with self._lock:
            return sorted(self._pending)

    def resolve(self, ref: str) -> dict[str, Any]:
        """The registered version a ref names (cached for ``ttl_s``, so alias moves are seen within a second)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(ref)
            if hit and now - hit[0] < self.ttl_s:
                return hit[1]
        version = self._resolve_uncached(ref)
        with self._lock:
            self._cache[ref] = (now, version)
        return version

    def _resolve_uncached(self, ref: str) -> dict[str, Any]:
        name, sel = parse_model_ref(ref)
        if name not in self.registry.models():
            known = ", ".join(self.registry.models()) or "none registered yet"
            raise not_found(f"the model {name!r} does not exist; registered models: {known} (GET /v1/models lists every version)")
        if sel is None:
            sel = DEFAULT_ALIAS if self.registry.get_alias(name, DEFAULT_ALIAS) is not None else "latest"
        try:
            version = self.registry.get(name, sel)
        except Exception:  # the registry's own message names its database path; say it our way
            raise not_found(f"the model {ref!r} does not exist: {name} has no version or alias {sel!r} "
                            f"(GET /v1/models/{name} lists its versions)") from None
        if version.get("deleted"):
            raise not_found(f"{version['ref']} was deleted; use another version of {name}", code="model_deleted")
        return version

    def choose_arm(self, ref: str, user_key: str | None, request_id: str = "") -> Route:
        """The version and arm for one request: with a running rollout of the model (and its candidate ready),
        ``name`` and ``name@champion`` go to ``canary`` or ``baseline`` (sticky by ``user_key``, else drawn per
        ``request_id``); everything else is the resolved version on the ``direct`` arm."""
        from tuneloop.rollout.split import choose_arm as split_arm

        name, sel = parse_model_ref(ref)
        record = self.rollout(name) if sel in SPLIT_SELECTORS else None
        if record is None:
            return Route(ref=ref, version=self.resolve(ref), arm="direct")
        if not self.candidate_ready(record):
            return Route(ref=ref, version=self.resolve(ref), arm="direct")
        arm = split_arm(record, user_key, request_id)
        target = record["candidate"] if arm == "canary" else record["baseline"]
        return Route(ref=ref, version=self.resolve(target), arm=arm, rollout_id=record["rollout_id"])

    def baseline_of(self, route: Route) -> Route:
        """The baseline arm of the same rollout (where a failed canary request is retried)."""
        record = self.rollout(route.model)
        if record is None or record["rollout_id"] != route.rollout_id:  # ended in between: the champion answers
            return Route(ref=route.ref, version=self.resolve(route.ref), arm="direct")
        return Route(ref=route.ref, version=self.resolve(record["baseline"]), arm="baseline", rollout_id=route.rollout_id)

    def versions(self) -> list[dict[str, Any]]:
        return [v for v in self.registry.list_versions() if not v.get("deleted")]
