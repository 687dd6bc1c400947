"""Model refs to registered versions, through the registry API, and the arm each request goes to.

``name`` means the version the ``champion`` alias points at (the deployed one), or the latest version when no
champion is set; ``name:3`` a version number; ``name@alias`` an alias.

Rollouts: :meth:`Router.choose_arm` splits requests for ``name`` and ``name@champion`` of a model with a running
rollout by ``tuneloop.rollout.split.choose_arm`` (sticky by the user key, else per request): ``canary`` goes to
the candidate, ``baseline`` to the rollout's baseline, both tagged with the rollout id. Explicit refs
(``name:3``, other aliases) are never split (arm ``direct``). A reward model (lineage ``kind: reward``) is
never routed: a call for one gets 400 ``not_a_chat_model`` (:func:`refuse_reward_model`).

Caching (:class:`RefreshingCache`): resolved refs and rollout records are kept in memory, and a background
thread reads every entry in use again every ``ttl_s / 2`` s, so a request never waits for the registry once
its ref was seen (a registry read on the event loop took a few ms, once a second per ref: the gateway's p99).
An entry older than ``2 * ttl_s`` (the thread fell behind) is read before it is used. So a moved alias or a
started or ended rollout takes effect within about ``ttl_s``; :meth:`Router.invalidate` drops the cache at once.
A ref that does not exist is cached as its 404 like any value; a registry that cannot be read keeps the last
values served (logged). ``tuneloop serve`` uses ``ttl_s`` 1 s on the local SQLite registry and 5 s on MLflow,
where each read is a few HTTP calls to a shared server.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tuneloop.errors import InputError
from tuneloop.registry.records import ModelVersion
from tuneloop.registry.rollouts import Rollout
from tuneloop.serve.backends import Route
from tuneloop.serve.errors import APIError, not_found

DEFAULT_ALIAS = "champion"
log = logging.getLogger(__name__)


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
        raise APIError(
            400,
            f"malformed model {ref!r}; use 'name', 'name:VERSION' or 'name@ALIAS'",
            code="invalid_value",
            param="model",
        )
    return name, sel


NOT_A_CHAT_MODEL = "not_a_chat_model"


def refuse_reward_model(version: ModelVersion) -> None:
    """A reward model (lineage ``kind: reward``) scores answers and has no chat or completions endpoint: a request
    for one is answered 400 ``not_a_chat_model`` (and ``tuneloop serve`` does not preload it)."""
    from tuneloop.registry.lineage import version_kind

    if version_kind(version) == "reward":
        raise APIError(
            400,
            f"{version.ref} is a reward model (its lineage has kind: reward): it scores answers and has no chat or "
            "completions endpoint; ask for a chat model (GET /v1/models lists the versions), or score answers with it "
            f"from Python: tuneloop.train.reward.load_reward_model({version.ref!r}, registry=...)",
            code=NOT_A_CHAT_MODEL,
            param="model",
        )


def user_hash(user_key: str | None) -> str | None:
    """What the request log keeps of a sticky user key: sha256 (hex, first 16), never the key."""
    return hashlib.sha256(user_key.encode("utf-8")).hexdigest()[:16] if user_key else None


SPLIT_SELECTORS = (None, DEFAULT_ALIAS)


class RefreshingCache:
    """``key -> value`` read by each key's loader; a daemon thread reads the entries in use again (see the module's
    doc). Entries not asked for in ``idle_s`` are dropped. A read that started before :meth:`invalidate` is not stored."""

    def __init__(self, ttl_s: float, *, refresh_every_s: float | None = None, idle_s: float = 60.0):
        self.ttl_s, self.idle_s = ttl_s, idle_s
        self.refresh_every_s = ttl_s / 2 if refresh_every_s is None else refresh_every_s
        self._entries: dict[Any, list] = {}  # key -> [loaded_at, value, loader, last_used]
        self._lock = threading.Lock()
        self._generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, key, load: Callable[[], Any]) -> Any:
        """The value, or the cached not-found error raised again (an unknown model is not read per request)."""
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now - entry[0] < 2 * self.ttl_s:
                entry[3] = now
                value = entry[1]
                if isinstance(value, APIError):
                    raise replace(value)  # a fresh exception each time (re-raising one object grows its traceback)
                return value
            generation = self._generation
        try:
            value = load()
        except APIError as exc:
            if exc.status != 404:
                raise
            value = exc
        with self._lock:
            if generation == self._generation:
                self._entries[key] = [now, value, load, now]
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="tuneloop-router", daemon=True)
                self._thread.start()
        if isinstance(value, APIError):
            raise replace(value)
        return value

    def invalidate(self, keep=lambda key: False) -> None:
        with self._lock:
            self._generation += 1
            self._entries = {k: e for k, e in self._entries.items() if keep(k)}

    def refresh_due(self) -> None:
        """Read again every entry older than ``refresh_every_s``; drop those unused for ``idle_s``."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, e in self._entries.items() if now - e[3] > self.idle_s]:
                del self._entries[key]
            due = [(k, e[2]) for k, e in self._entries.items() if now - e[0] >= self.refresh_every_s]
            generation = self._generation
        for key, load in due:
            started = time.monotonic()
            try:
                value = load()
            except APIError as exc:  # not found (e.g. the version was deleted): that is the new value
                value = exc
            except Exception as exc:  # the registry is unreachable: keep serving what it said last
                log.warning(
                    "router: reading %s from the registry failed (%s: %s); serving the cached value",
                    key,
                    type(exc).__name__,
                    exc,
                )
                continue
            with self._lock:
                entry = self._entries.get(key)
                if generation == self._generation and entry is not None:
                    entry[0], entry[1] = started, value

    def __len__(self) -> int:
        return len(self._entries)

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_every_s):
            try:
                self.refresh_due()
            except Exception:
                log.exception("router cache refresh failed")

    def close(self) -> None:
        self._stop.set()


class Router:
    def __init__(self, registry, *, ttl_s: float = 1.0, refresh_every_s: float | None = None):
        self.registry = registry
        self.ttl_s = ttl_s
        self.cache = RefreshingCache(ttl_s, refresh_every_s=refresh_every_s)  # keys ("ref", ref), ("rollout", model)
        self._ready: set[str] = set()  # candidate refs ("name:5") loaded and probed by the backend
        self._pending: set[str] = set()  # candidate refs a running rollout waits on
        self._lock = threading.Lock()

    def invalidate(self, model: str | None = None) -> None:
        """Forget cached refs and rollout records (of ``model``, or all): the next request reads the registry."""
        if model is None:
            self.cache.invalidate()
            return
        self.cache.invalidate(
            keep=lambda key: key[1] != model if key[0] == "rollout" else parse_model_ref(key[1])[0] != model
        )

    def close(self) -> None:
        self.cache.close()

    def rollout(self, model: str) -> Rollout | None:
        """``model``'s running rollout record (cached, see the module's doc), or None."""
        return self.cache.get(("rollout", model), lambda: self._read_rollout(model))

    def _read_rollout(self, model: str) -> Rollout | None:
        try:
            record = self.registry.get_rollout(model)
        except InputError:  # an unknown model has no rollout; resolve() answers 404 for it
            return None
        return record if record is not None and record.status == "running" else None

    def candidate_ready(self, record: Rollout) -> bool:
        """Whether a running rollout's candidate may take traffic; if not yet, it is queued for :meth:`pending`."""
        with self._lock:
            if record.candidate in self._ready:
                return True
            self._pending.add(record.candidate)
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

    def resolve(self, ref: str) -> ModelVersion:
        """The registered version a ref names (cached, see the module's doc)."""
        return self.cache.get(("ref", ref), lambda: self._resolve_uncached(ref))

    def _resolve_uncached(self, ref: str) -> ModelVersion:
        name, sel = parse_model_ref(ref)
        if name not in self.registry.models():
            known = ", ".join(self.registry.models()) or "none registered yet"
            raise not_found(
                f"the model {name!r} does not exist; registered models: {known} (GET /v1/models lists every version)"
            )
        if sel is None:
            sel = DEFAULT_ALIAS if self.registry.get_alias(name, DEFAULT_ALIAS) is not None else "latest"
        try:
            version = self.registry.get(name, sel)
        except Exception:  # the registry's own message names its database path; say it our way
            raise not_found(
                f"the model {ref!r} does not exist: {name} has no version or alias {sel!r} "
                f"(GET /v1/models/{name} lists its versions)"
            ) from None
        if version.deleted:
            raise not_found(f"{version.ref} was deleted; use another version of {name}", code="model_deleted")
        return version

    def choose_arm(self, ref: str, user_key: str | None, request_id: str = "") -> Route:
        """The version and arm for one request (:meth:`_arm`); a reward model is refused (:func:`refuse_reward_model`)."""
        route = self._arm(ref, user_key, request_id)
        refuse_reward_model(route.version)
        return route

    def _arm(self, ref: str, user_key: str | None, request_id: str = "") -> Route:
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
        target = record.candidate if arm == "canary" else record.baseline
        return Route(ref=ref, version=self.resolve(target), arm=arm, rollout_id=record.rollout_id)

    def baseline_of(self, route: Route) -> Route:
        """The baseline arm of the same rollout (where a failed canary request is retried)."""
        record = self.rollout(route.model)
        if record is None or record.rollout_id != route.rollout_id:  # ended in between: the champion answers
            return Route(ref=route.ref, version=self.resolve(route.ref), arm="direct")
        return Route(ref=route.ref, version=self.resolve(record.baseline), arm="baseline", rollout_id=route.rollout_id)

    def versions(self) -> list[ModelVersion]:
        return [v for v in self.registry.list_versions() if not v.deleted]
