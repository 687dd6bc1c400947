"""The ``local`` backend: registered versions loaded in this process, behind dynamic batching.

Adapters of the same base share one loaded base model (PEFT multi-adapter, one active adapter per batch);
full-model versions get a model of their own. Each version is loaded once, checked (artifact sha256 by the
registry, base digest by the lineage, then known-answer probes), and only then takes traffic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneloop.registry.records import ModelVersion
from tuneloop.serve.backends import CallContext, Route
from tuneloop.serve.backends import textgen as tg
from tuneloop.serve.batching import BatchEngine, generate_sync
from tuneloop.serve.errors import APIError, bad_request, scrub_paths
from tuneloop.serve.probes import ProbePlan, plan_probes
from tuneloop.serve.schemas import ChatRequest, CompletionRequest

log = logging.getLogger(__name__)


@dataclass
class LoadedVersion:
    ref: str
    sha256: str
    tokenizer: Any
    engine: BatchEngine
    adapter: str | None
    ctx_len: int
    stop_ids: frozenset[int]
    probe: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)


def adapter_name(version: ModelVersion) -> str:
    """An adapter's name on the shared base (and on vLLM): pinned to its artifact digest."""
    return f"{version.model}-{version.artifact_digest[:12]}"


class LocalBackend:
    kind = "local"

    def __init__(
        self,
        registry,
        workspace_root: Path | None,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        default_max_tokens: int = 256,
        probes: bool = True,
        device: str | None = None,
        queue_depth: Callable[[str, int], None] | None = None,
    ):
        self.registry = registry
        self.workspace_root = Path(workspace_root) if workspace_root else None
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.default_max_tokens = default_max_tokens
        self.probes = probes
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.queue_depth = queue_depth or (lambda _m, _n: None)
        self.versions: dict[str, LoadedVersion] = {}  # by artifact sha256
        self.engines: dict[str, BatchEngine] = {}  # by base path (adapters) or artifact sha256 (full models)
        self.refused: dict[str, str] = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ loading
    async def prepare(self, version: ModelVersion) -> dict[str, Any]:
        lv = await asyncio.to_thread(self.load, version)
        return lv.probe

    def load(self, version: ModelVersion) -> LoadedVersion:
        sha = version.artifact_digest
        with self.lock:
            if sha in self.versions:
                return self.versions[sha]
            if sha in self.refused:
                raise APIError(503, self.refused[sha], code="version_refused")
            try:
                lv = self._load_unlocked(version)
                lv.probe = self._probe(lv, version)
            except APIError as exc:
                self.refused[sha] = exc.message
                raise
            except Exception as exc:
                msg = scrub_paths(f"{version.ref} could not be loaded: {exc}")
                log.exception("loading %s failed", version.ref)
                raise APIError(503, msg, code="version_unavailable") from None
            self.versions[sha] = lv
            log.info("loaded %s (%s); probes: %s", version.ref, sha[:12], lv.probe.get("status"))
            return lv

    def _load_unlocked(self, version: ModelVersion) -> LoadedVersion:
        from tuneloop.modeling import attach_adapter, context_length, load_causal_lm, load_tokenizer, stop_token_ids
        from tuneloop.registry.lineage import check_base

        path = self.registry.open_artifact(version.model, version.version)  # verifies every file's sha256
        cfg = (version.lineage or {}).get("config") or {}
        tok = load_tokenizer(str(path), (cfg.get("data") or {}).get("chat_template"))
        if version.artifact_kind == "adapter":
            lin = version.lineage or {}
            base = check_base(
                lin.get("base") or version.base_model,
                (lin.get("base") or {}).get("digest") or lin.get("base_model_fingerprint"),
            )
            name = adapter_name(version)
            engine = self.engines.get(f"base:{base}")
            if engine is None:
                model = attach_adapter(load_causal_lm(base).to(self.device), str(path), name)
                engine = self._start_engine(f"base:{base}", model, tok, version.model)
            else:
                with engine.exclusive():
                    engine.model = attach_adapter(engine.model, str(path), name)
            adapter: str | None = name
        else:
            engine = self._start_engine(
                version.artifact_digest, load_causal_lm(str(path)).to(self.device), tok, version.model
            )
            adapter = None
        return LoadedVersion(
            version.ref,
            version.artifact_digest,
            tok,
            engine,
            adapter,
            context_length(engine.model),
            frozenset(stop_token_ids(tok)),
        )

    def _start_engine(self, key: str, model, tok, label: str) -> BatchEngine:
        engine = BatchEngine(
            model,
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            pad_id=tok.pad_token_id or 0,
            name=label,
            on_queue_depth=lambda n: self.queue_depth(label, n),
        ).start()
        self.engines[key] = engine
        return engine

    def _probe(self, lv: LoadedVersion, version: ModelVersion) -> dict[str, Any]:
        from tuneloop.modeling import decode_text

        if not self.probes:
            return {"status": "skipped", "reason": "probes switched off"}
        plan: ProbePlan = plan_probes(self.workspace_root, version)
        if plan.skipped_reason:
            log.warning("%s: known-answer probes skipped: %s", version.ref, plan.skipped_reason)
            return {"status": "skipped", "reason": plan.skipped_reason}
        prompts = [
            lv.tokenizer(tg_render(lv.tokenizer, p.messages), add_special_tokens=False)["input_ids"]
            for p in plan.probes
        ]
        outs = generate_sync(
            lv.engine, prompts, max_tokens=plan.max_new_tokens, stop_ids=lv.stop_ids, adapter=lv.adapter
        )
        for p, ids in zip(plan.probes, outs, strict=True):
            got = decode_text(lv.tokenizer, ids).strip()  # as evaluation decodes its answers
            raw = lv.tokenizer.decode(ids, skip_special_tokens=True).strip()  # as evaluations before that recorded them
            if p.expected.strip() not in (got, raw):
                raise APIError(
                    503,
                    f"{version.ref} is refused: known-answer probe {p.item} answered {got[:80]!r} but the "
                    f"evaluation recorded {p.expected[:80]!r}; the loaded weights do not behave like the evaluated "
                    "ones (wrong base model, changed tokenizer or template?)",
                    code="version_refused",
                )
        return {"status": "passed", "probes": len(plan.probes)}

    def loaded(self) -> list[dict[str, Any]]:
        return [
            {
                "version": lv.ref,
                "artifact_sha256": lv.sha256,
                "adapter": lv.adapter,
                "context_length": lv.ctx_len,
                "probes": lv.probe,
                "queue_depth": lv.engine.queue_depth(),
                "batching": lv.engine.stats(),
            }
            for lv in self.versions.values()
        ]

    def abort(self, reason: str) -> int:
        """Shutdown past ``serve.shutdown_grace_s``: every engine ends its waiting and running jobs now (their
        calls answer 503 ``shutting_down``) and takes no new ones; returns how many jobs were ended."""
        return sum(engine.abort(reason) for engine in list(self.engines.values()))

    async def close(self) -> None:
        for engine in list(self.engines.values()):
            await asyncio.to_thread(engine.stop)

    def version_for(self, route: Route) -> LoadedVersion:
        lv = self.versions.get(route.artifact_digest)
        return lv if lv is not None else self.load(route.version)

    # ------------------------------------------------------------------------------------------ chat
    async def chat(self, route: Route, req: ChatRequest, ctx: CallContext):
        tg.reject_unsupported_chat(req)
        lv = self.versions.get(route.artifact_digest)
        if lv is None:  # not `a or await b`: mypy infers b's type from a's context (LoadedVersion | None)
            lv = await asyncio.to_thread(self.load, route.version)
        prompt_ids = chat_prompt_ids(lv.tokenizer, req.messages)
        budget = tg.token_budget(
            len(prompt_ids),
            req.token_budget(),
            lv.ctx_len,
            self.default_max_tokens,
            param="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
            prompt_param="messages",
        )
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = [
            tg.make_params(
                max_tokens=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed, choice=i, top_logprobs=k
            )
            for i in range(req.n)
        ]
        choices = [
            tg.Choice(i, req.stops(), lv.tokenizer, incremental=req.stream or bool(req.stop)) for i in range(req.n)
        ]
        events = tg.run_choices(lv.engine, lv.adapter, prompt_ids, params, lv.stop_ids, choices, stream=req.stream)
        if req.stream:
            return self._chat_stream(route, events, choices, len(prompt_ids), req.logprobs)
        async for _ in events:
            pass
        return {
            "id": tg.new_id("chatcmpl"),
            "object": "chat.completion",
            "created": tg.now(),
            "model": route.version_ref,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": tg.chat_logprobs(c) if req.logprobs else None,
                    "finish_reason": _finish(c),
                }
                for c in choices
            ],
            "usage": tg.usage(len(prompt_ids), choices),
            "system_fingerprint": route.artifact_digest[:16],
        }

    async def _chat_stream(
        self, route: Route, events, choices, prompt_len: int, logprobs: bool
    ) -> AsyncIterator[dict[str, Any]]:
        cid, created = tg.new_id("chatcmpl"), tg.now()

        def chunk(choices_: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": route.version_ref,
                "system_fingerprint": route.artifact_digest[:16],
                "choices": choices_,
            }

        yield chunk(
            [
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for c in choices
            ]
        )
        sent_lp = {c.index: 0 for c in choices}
        async for ch, finished in events:
            text = ch.pending(final=finished)
            lp = None
            if logprobs:
                full = tg.chat_logprobs(ch)["content"]
                lp, sent_lp[ch.index] = {"content": full[sent_lp[ch.index] :]}, len(full)
            if text or finished or lp:
                yield chunk(
                    [
                        {
                            "index": ch.index,
                            "delta": {"content": text} if text else {},
                            "logprobs": lp,
                            "finish_reason": _finish(ch) if finished else None,
                        }
                    ]
                )
        yield {**chunk([]), "usage": tg.usage(prompt_len, choices)}

    # ------------------------------------------------------------------------------------------ completions
    async def completion(self, route: Route, req: CompletionRequest, ctx: CallContext):
        if req.suffix:
            raise bad_request(
                "suffix is not supported by the local backend", param="suffix", code="unsupported_parameter"
            )
        lv = self.versions.get(route.artifact_digest)
        if lv is None:  # not `a or await b`: mypy infers b's type from a's context (LoadedVersion | None)
            lv = await asyncio.to_thread(self.load, route.version)
        prompts = [
            p if isinstance(p, list) else lv.tokenizer(p, add_special_tokens=False)["input_ids"] for p in req.prompts()
        ]
        vocab = len(lv.tokenizer)
        for i, p in enumerate(prompts):
            if any(t < 0 or t >= max(vocab, lv.engine.model.config.vocab_size) for t in p):
                raise bad_request(f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1})", param="prompt")
            if not p:
                raise bad_request(f"prompt {i} is empty", param="prompt")
        budgets = [
            tg.token_budget(
                len(p),
                req.max_tokens if req.max_tokens is not None else None,
                lv.ctx_len,
                min(self.default_max_tokens, 16),
                param="max_tokens",
                prompt_param="prompt",
            )
            for p in prompts
        ]
        if req.stream:
            if req.echo or len(prompts) > 1:
                raise bad_request(
                    "stream: true takes one prompt and no echo here", param="stream", code="unsupported_parameter"
                )
            return self._completion_stream(route, lv, req, prompts[0], budgets[0], ctx)
        out, total_prompt, all_choices = [], 0, []
        for pi, (p, budget) in enumerate(zip(prompts, budgets, strict=True)):
            choices = await self._complete_one(lv, req, p, budget, ctx, base_index=pi * req.n)
            total_prompt += len(p)
            all_choices += choices
            for c in choices:
                echo_text = lv.tokenizer.decode(p, skip_special_tokens=False) if req.echo else ""
                out.append(
                    {
                        "index": c.index,
                        "text": echo_text + c.text,
                        "finish_reason": _finish(c),
                        "logprobs": tg.completion_logprobs(c, p if req.echo else None)
                        if req.logprobs is not None
                        else None,
                    }
                )
        return {
            "id": tg.new_id("cmpl"),
            "object": "text_completion",
            "created": tg.now(),
            "model": route.version_ref,
            "choices": out,
            "usage": tg.usage(total_prompt, all_choices),
            "system_fingerprint": route.artifact_digest[:16],
        }

    async def _complete_one(
        self,
        lv: LoadedVersion,
        req: CompletionRequest,
        prompt: list[int],
        budget: int,
        ctx: CallContext,
        base_index: int,
    ) -> list[tg.Choice]:
        choices = [
            tg.Choice(base_index + i, req.stops(), lv.tokenizer, incremental=bool(req.stop)) for i in range(req.n)
        ]
        if budget == 0 and not (req.echo and req.logprobs is not None):
            for c in choices:
                c.finish_reason = "length"
            return choices
        params = [
            tg.make_params(
                max_tokens=budget,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                choice=i,
                top_logprobs=req.logprobs,
                prompt_logprobs=req.echo and req.logprobs is not None,
            )
            for i in range(req.n)
        ]
        async for _ in tg.run_choices(lv.engine, lv.adapter, prompt, params, lv.stop_ids, choices, stream=False):
            pass
        return choices

    async def _completion_stream(self, route, lv, req, prompt, budget, ctx) -> AsyncIterator[dict[str, Any]]:
        cid, created = tg.new_id("cmpl"), tg.now()
        choices = [tg.Choice(i, req.stops(), lv.tokenizer) for i in range(req.n)]
        params = [
            tg.make_params(
                max_tokens=budget,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                choice=i,
                top_logprobs=req.logprobs,
            )
            for i in range(req.n)
        ]
        async for ch, finished in tg.run_choices(
            lv.engine, lv.adapter, prompt, params, lv.stop_ids, choices, stream=True
        ):
            text = ch.pending(final=finished)
            if text or finished:
                yield {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": route.version_ref,
                    "choices": [
                        {
                            "index": ch.index,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": _finish(ch) if finished else None,
                        }
                    ],
                }
        yield {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": route.version_ref,
            "choices": [],
            "usage": tg.usage(len(prompt), choices),
        }


def _finish(c: tg.Choice) -> str:
    return "stop" if c.finish_reason == "stop" else "length"


def tg_render(tok, messages: list[dict[str, str]]) -> str:
    from tuneloop.modeling import render_prompt

    return render_prompt(tok, messages)


def chat_prompt_ids(tok, messages) -> list[int]:
    """A chat request's prompt: its messages (:func:`textgen.chat_messages`) rendered with the version's chat
    template and the generation prompt, tokenized without added special tokens -- token for token what
    training's preprocessing (``tuneloop.data.prepare``) puts before the assistant's answer."""
    return tok(tg_render(tok, tg.chat_messages(messages)), add_special_tokens=False)["input_ids"]


@dataclass
class ServedModel:
    """One version loaded on its own (no batching): for in-process use and checks outside the gateway."""

    model: Any
    tokenizer: Any
    model_id: str  # e.g. "support-bot:3"
    version: ModelVersion


def load_served_model(registry, model_name: str, ref: str = "champion") -> ServedModel:
    """Load a version (number, alias or ``latest``) after verifying its artifact's sha256 and, for an adapter,
    its base model's digest (IntegrityError when the base changed since registration)."""
    from tuneloop.modeling import load_causal_lm, load_tokenizer
    from tuneloop.registry.lineage import check_base

    v = registry.get(model_name, ref)
    path = registry.open_artifact(model_name, v.version)
    if v.artifact_kind == "adapter":
        lin = v.lineage or {}
        base = check_base(
            lin.get("base") or v.base_model,
            (lin.get("base") or {}).get("digest") or lin.get("base_model_fingerprint"),
        )
        model = load_causal_lm(base, adapter=str(path))
    else:
        model = load_causal_lm(str(path))
    return ServedModel(model=model, tokenizer=load_tokenizer(str(path)), model_id=v.ref, version=v)
