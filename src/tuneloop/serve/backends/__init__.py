"""Backends behind one interface: ``local`` (models loaded here, dynamic batching) and ``openai`` (an upstream
OpenAI-compatible server: vLLM, SGLang, another tuneloop gateway).

A backend answers OpenAI requests for a :class:`Route` (the registered version the router chose). A
non-streaming call returns the response body as a dict; a streaming call returns an async iterator of chunk
dicts that always ends with a usage chunk (``choices: []``); the app drops that chunk when the client did not
ask for ``stream_options.include_usage``, and logs it either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuneloop.registry.records import ModelVersion
from tuneloop.serve.schemas import ChatRequest, CompletionRequest


@dataclass
class Route:
    """Which registered version answers a request, and on which arm of a rollout."""

    ref: str  # what the client asked for: "support-bot", "support-bot:3", "support-bot@champion"
    version: ModelVersion  # the registered version it resolved to
    arm: str = "direct"
    rollout_id: str | None = None  # set on the baseline and canary arms of a running rollout

    @property
    def model(self) -> str:
        return self.version.model

    @property
    def version_ref(self) -> str:
        """The resolved version's ref, ``support-bot:3``: the ``model`` of every response and ``x-tuneloop-version``."""
        return self.version.ref

    @property
    def artifact_digest(self) -> str:
        """The served artifact's digest (``x-tuneloop-artifact``; ``artifact_sha256`` in the request log)."""
        return self.version.artifact_digest


@dataclass
class CallContext:
    """Per-request facts a backend may use: the id, and a way to learn that the client went away."""

    request_id: str
    is_disconnected: Callable[[], Awaitable[bool]] = field(default=lambda: _never())


async def _never() -> bool:
    return False


class Backend(Protocol):
    kind: str

    async def prepare(self, version: ModelVersion) -> dict[str, Any]:
        """Load (and probe) a version before it takes traffic; returns its status. Raises APIError 503 if refused."""
        ...

    async def chat(
        self, route: Route, req: ChatRequest, ctx: CallContext
    ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]: ...

    async def completion(
        self, route: Route, req: CompletionRequest, ctx: CallContext
    ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]: ...

    def loaded(self) -> list[dict[str, Any]]:
        """What is loaded now (for /admin and /health); no filesystem paths."""
        ...

    async def close(self) -> None: ...

    # optional: ``abort(reason) -> int`` ends every queued and running generation at once (shutdown past
    # ``serve.shutdown_grace_s``); the local backend has it, a backend without it has its calls cancelled instead
