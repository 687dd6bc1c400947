"""Model refs to registered versions, through the registry API, and the arm each request goes to.

``name`` means the version the ``champion`` alias points at (the deployed one), or the latest version when no
champion is set; ``name:3`` a version number; ``name@alias`` an alias. :meth:`Router.choose_arm` is the hook
the rollout work extends: today every request goes to the resolved version on the ``direct`` arm.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

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


class Router:
    def __init__(self, registry, *, ttl_s: float = 1.0):
        self.registry = registry
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

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

    def choose_arm(self, ref: str, user_key: str | None) -> Route:
        """The version and arm for one request. Rollouts override this: (baseline | canary) by a sticky hash of
        ``user_key``; without a rollout it is the resolved version on the ``direct`` arm."""
        return Route(ref=ref, version=self.resolve(ref), arm="direct")

    def versions(self) -> list[dict[str, Any]]:
        return [v for v in self.registry.list_versions() if not v.get("deleted")]
