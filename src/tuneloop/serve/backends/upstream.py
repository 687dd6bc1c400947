"""The ``openai`` backend: forward to an upstream OpenAI-compatible server (vLLM, SGLang, another gateway).

Each registered version maps to an upstream model name: a tuneloop upstream serves it under its ref
(``name:3``); on vLLM, an adapter version is loaded through vLLM's runtime LoRA API
(``POST /v1/load_lora_adapter``, needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and the artifact directory
visible to the vLLM host) under ``<name>-<sha256[:12]>``, so the name pins the exact weights; a server that
already lists that name is used as it is. Connection failures are retried (the request was never sent, so a
retry is safe); an unreachable upstream gives 503, a failing one 502, a slow one 504, all in OpenAI's shape.
Every request tries the upstream again, so the gateway recovers as soon as it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from tuneloop.registry.records import ModelVersion
from tuneloop.serve.backends import CallContext, Route
from tuneloop.serve.backends.upstream_http import ConnectFailed, Pool, ReadTimeout, UpstreamHTTPError, fast_path_usable
from tuneloop.serve.errors import APIError, scrub_paths
from tuneloop.serve.schemas import ChatRequest, CompletionRequest

log = logging.getLogger(__name__)

RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass
class UpstreamError:
    status: int
    message: str
    code: Any
    param: Any
    type_is_not_found: bool = False

    def model_unknown(self) -> bool:
        """A 404 that says the model name is unknown (vLLM: type NotFoundError, code 404; OpenAI: model_not_found)."""
        return self.status == 404 and (self.code in (None, 404, "404", "model_not_found") or self.type_is_not_found)

    def api_error(self, route: Route) -> APIError:
        """What the gateway's client gets: a 404 means the upstream cannot serve a version the gateway serves
        (503, so a canary failing this way is retried on the baseline); 5xx become 502."""
        if self.status == 404:
            return APIError(
                503, f"the upstream does not serve {route.version_ref}: {self.message}", code="version_unavailable"
            )
        status = self.status if self.status < 500 else 502
        code = self.code if isinstance(self.code, str) else ("upstream_error" if status >= 500 else None)
        return APIError(status, f"upstream: {self.message}", code=code, param=self.param)


def error_fields(data: Any, status: int) -> UpstreamError:
    """An upstream error body as fields: OpenAI's ``{"error": {...}}``, vLLM's older bare error object (integer
    code), or a plain string."""
    err = data.get("error", data) if isinstance(data, dict) else data
    if not isinstance(err, dict):
        return UpstreamError(status, str(err)[:300], None, None)
    return UpstreamError(
        status,
        str(err.get("message", ""))[:2000],
        err.get("code"),
        err.get("param"),
        type_is_not_found=err.get("type") == "NotFoundError",
    )


def lora_name(version: ModelVersion) -> str:
    return f"{version.model}-{version.artifact_digest[:12]}"


class UpstreamBackend:
    kind = "openai"

    def __init__(
        self,
        base_url: str,
        registry,
        *,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 3.0,
        retries: int = 2,
        backoff_s: float = 0.25,
        lora_path_prefix: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.registry = registry
        self.retries, self.backoff_s = retries, backoff_s
        self.lora_path_prefix = lora_path_prefix
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
        )
        # chat and completions go through the lean keep-alive client (httpx costs ~0.7 ms CPU a request); model
        # listing, vLLM probing and adapter loading stay on httpx, as does everything when a proxy applies
        self.pool = (
            Pool(self.base_url, connect_timeout_s=connect_timeout_s, read_timeout_s=timeout_s)
            if fast_path_usable(self.base_url)
            else None
        )
        self.names: dict[str, str] = {}  # artifact sha256 -> upstream model name
        self.refused: dict[str, str] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ naming
    async def prepare(self, version: ModelVersion) -> dict[str, Any]:
        name = await self.upstream_name(version)
        return {"status": "skipped", "reason": "probes run on the upstream's own loads", "upstream_model": name}

    async def upstream_name(self, version: ModelVersion) -> str:
        sha = version.artifact_digest
        if sha in self.names:
            return self.names[sha]
        async with self._lock:
            if sha not in self.names:
                self.names[sha] = await self._find_or_load(version)
        return self.names[sha]

    async def _find_or_load(self, version: ModelVersion) -> str:
        served = await self._upstream_models()
        for candidate in (version.ref, lora_name(version)):
            if candidate in served:
                return candidate
        if version.artifact_kind == "adapter" and await self._is_vllm():
            return await self._load_vllm_adapter(version)
        raise APIError(
            503,
            f"the upstream does not serve {version.ref} (it lists {', '.join(sorted(served)[:10]) or 'nothing'}); "
            f"serve it there as {lora_name(version)!r} (e.g. vLLM --served-model-name or --lora-modules)",
            code="version_unavailable",
        )

    async def _upstream_models(self) -> set[str]:
        r = await self._send("GET", "/models")
        if r.status_code != 200:
            raise APIError(502, f"the upstream answered GET /models with HTTP {r.status_code}", code="upstream_error")
        return {m["id"] for m in r.json().get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)}

    async def _is_vllm(self) -> bool:
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        try:
            r = await self.client.get(f"{root}/version")
            return r.status_code == 200 and "version" in r.json()
        except (httpx.HTTPError, ValueError):
            return False

    async def _load_vllm_adapter(self, version: ModelVersion) -> str:
        """Load the adapter into vLLM under a digest-pinned name (vLLM's runtime LoRA API)."""
        path = str(self.registry.open_artifact(version.model, version.version))  # verified locally first
        if self.lora_path_prefix:
            path = self.lora_path_prefix.rstrip("/") + "/" + path.rsplit("/", 1)[-1]
        name = lora_name(version)
        r = await self._send("POST", "/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if r.status_code != 200 and "already" not in r.text.lower():
            raise APIError(
                503,
                f"vLLM refused to load the adapter of {version.ref} as {name!r}: HTTP {r.status_code} "
                f"{scrub_paths(r.text[:300])}. Start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, "
                "with the artifact store readable at the same path",
                code="version_unavailable",
            )
        log.info("loaded %s into vLLM as %s", version.ref, name)
        return name

    # ------------------------------------------------------------------------------------------ HTTP
    async def _send(self, method: str, path: str, *, json: Any = None, stream: bool = False) -> httpx.Response:
        """One request with retries on connection failures; 503/504 in OpenAI's shape when it cannot be sent."""
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            try:
                req = self.client.build_request(method, url, json=json)
                return await self.client.send(req, stream=stream)
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise APIError(
                        503,
                        f"the upstream {self._where()} is not reachable ({type(exc).__name__}) after "
                        f"{self.retries + 1} attempts; the gateway keeps trying on each request",
                        code="upstream_unavailable",
                        headers={"retry-after": "1"},
                    ) from None
                await asyncio.sleep(self.backoff_s * (attempt + 1))
            except httpx.TimeoutException:
                raise APIError(
                    504, f"the upstream {self._where()} did not answer in time", code="upstream_timeout"
                ) from None
            except httpx.HTTPError as exc:
                raise APIError(
                    502, f"the upstream {self._where()} failed: {type(exc).__name__}", code="upstream_error"
                ) from None
        raise AssertionError("unreachable")

    async def _post_fast(self, path: str, body: dict[str, Any]):
        """``_send`` on the lean client: the same retries, and the same 503/504/502 in OpenAI's shape."""
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        pool = self.pool
        assert pool is not None  # called only when the lean client is on (see the caller)
        for attempt in range(self.retries + 1):
            try:
                return await pool.request("POST", path, data)
            except ConnectFailed as exc:
                if attempt == self.retries:
                    raise APIError(
                        503,
                        f"the upstream {self._where()} is not reachable ({exc}) after "
                        f"{self.retries + 1} attempts; the gateway keeps trying on each request",
                        code="upstream_unavailable",
                        headers={"retry-after": "1"},
                    ) from None
                await asyncio.sleep(self.backoff_s * (attempt + 1))
            except ReadTimeout:
                raise APIError(
                    504, f"the upstream {self._where()} did not answer in time", code="upstream_timeout"
                ) from None
            except UpstreamHTTPError as exc:
                raise APIError(502, f"the upstream {self._where()} failed: {exc}", code="upstream_error") from None
        raise AssertionError("unreachable")

    def _where(self) -> str:
        return httpx.URL(self.base_url).netloc.decode()

    async def _error_of(self, r) -> UpstreamError:
        body = await r.aread()
        await r.aclose()
        try:
            return error_fields(json.loads(body), r.status_code)
        except ValueError:
            return UpstreamError(r.status_code, body.decode("utf-8", "replace")[:300], None, None)

    async def _forward(self, route: Route, path: str, body: dict[str, Any], stream: bool):
        for attempt in range(2):
            upstream_body = {**body, "model": await self.upstream_name(route.version)}
            if stream:
                upstream_body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            if self.pool is not None:
                r = await self._post_fast(path, upstream_body)
            else:
                r = await self._send("POST", path, json=upstream_body, stream=stream)
            if r.status_code < 400:
                break
            err = await self._error_of(r)
            if attempt == 0 and err.model_unknown():
                # the upstream does not know the name (a restarted vLLM forgets adapters loaded at run time);
                # nothing ran, so find or load the version again and retry once
                self.names.pop(route.artifact_digest, None)
                continue
            raise err.api_error(route)
        if not stream:
            try:
                out = json.loads(await r.aread())
            except ReadTimeout:
                raise APIError(
                    504, f"the upstream {self._where()} did not answer in time", code="upstream_timeout"
                ) from None
            except (UpstreamHTTPError, httpx.HTTPError, ValueError) as exc:
                raise APIError(
                    502,
                    f"the upstream {self._where()} sent a broken answer ({type(exc).__name__})",
                    code="upstream_error",
                ) from None
            out["model"] = route.version_ref
            return out
        return self._relay(r, route)

    async def _relay(self, r: httpx.Response, route: Route) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    err = error_fields(chunk, 502)
                    raise APIError(
                        502,
                        f"upstream: {err.message}",
                        code=err.code if isinstance(err.code, str) else "upstream_error",
                    )
                chunk["model"] = route.version_ref
                yield chunk
            raise APIError(502, "the upstream closed the stream before it finished", code="upstream_error")
        except (httpx.HTTPError, UpstreamHTTPError, ValueError) as exc:
            raise APIError(
                502, f"the upstream stream broke off ({type(exc).__name__})", code="upstream_error"
            ) from None
        finally:
            await r.aclose()

    # ------------------------------------------------------------------------------------------ API
    async def chat(self, route: Route, req: ChatRequest, ctx: CallContext):
        return await self._forward(route, "/chat/completions", req.model_dump(exclude_unset=True), req.stream)

    async def completion(self, route: Route, req: CompletionRequest, ctx: CallContext):
        return await self._forward(route, "/completions", req.model_dump(exclude_unset=True), req.stream)

    def loaded(self) -> list[dict[str, Any]]:
        return [{"artifact_sha256": sha, "upstream_model": name} for sha, name in self.names.items()]

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        await self.client.aclose()
