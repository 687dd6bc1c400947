"""Dynamic batching: one decode loop per loaded model, fed by a bounded queue of generation jobs.

A worker thread takes the waiting jobs that share an adapter (up to ``max_batch_size``), runs one left-padded
prefill with a KV cache (attention mask and position ids follow each row's real tokens, so a row's logits do
not depend on its neighbours), then decodes step by step. A row leaves the batch when it hits a stop token,
its token budget, or its job is cancelled (client gone, stop string seen); the cache drops its row.

Entry points: :class:`BatchEngine` (``submit``, ``start``, ``stop``), :class:`GenJob`, :class:`SamplingParams`,
:class:`QueueFull`. Events go to each job's ``emit`` callback from the worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger("tuneloop.serve")

BASE_ADAPTER = None  # jobs for the base weights (or a full model) carry adapter=None


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs; the caller answers 429."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only; k: and the k best
    prompt_logprobs: bool = False    # logprobs of the prompt tokens (completions echo)


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    logprobs: list[float | None]                # per prompt token; the first has none
    top: list[list[tuple[int, float]] | None]


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"


@dataclass
class ErrorEvent:
    message: str


@dataclass
class GenJob:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    emit: Callable[[Any], None]
    adapter: str | None = BASE_ADAPTER
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    job: GenJob
    generator: torch.Generator | None
    produced: int = 0
    last: int = 0


class BatchEngine:
    """One model (a plain causal LM or a PEFT model holding several adapters) behind a batching worker."""

    def __init__(self, model, *, max_batch_size: int = 16, max_queue: int = 256, pad_id: int = 0,
                 on_queue_depth: Callable[[int], None] | None = None, name: str = "model"):
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue = max_queue
        self.pad_id = pad_id
        self.name = name
        self.on_queue_depth = on_queue_depth or (lambda _n: None)
        self.device = next(model.parameters()).device
        self.queue: deque[GenJob] = deque()
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.batches = 0          # counters for tests, /health and benchmarks
        self.rows = 0
        self.cancelled_rows = 0
        self.cache_kw = _cache_keyword(model)
        self.keep_logits_kw = _takes(model, "logits_to_keep")
        self.model_lock = threading.Lock()  # held while a batch runs; loading an adapter takes it too

    # ---------------------------------------------------------------------------------- queue
    def submit(self, job: GenJob) -> None:
        with self.cond:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{self.name}: {len(self.queue)} requests are waiting (serve.max_queue={self.max_queue})")
            self.queue.append(job)
            self.on_queue_depth(len(self.queue))
            self.cond.notify()

    def start(self) -> "BatchEngine":
        self.running = True
        self.thread = threading.Thread(target=self._loop, name=f"tuneloop-batch-{self.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every waiting and running job and end the worker."""
        with self.cond:
            self.running = False
            for job in self.queue:
                job.cancel()
                job.emit(DoneEvent("cancelled"))
            self.queue.clear()
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def queue_depth(self) -> int:
        return len(self.queue)

    def _take(self) -> list[GenJob]:
        with self.cond:
            while self.running and not self.queue:
                self.cond.wait(0.5)
            if not self.running:
                return []
            adapter = self.queue[0].adapter
            batch, rest = [], deque()
            while self.queue:
                job = self.queue.popleft()
                if job.cancelled.is_set():
                    job.emit(DoneEvent("cancelled"))
                elif job.adapter == adapter and len(batch) < self.max_batch_size:
                    batch.append(job)
                else:
                    rest.append(job)
            self.queue = rest
            self.on_queue_depth(len(self.queue))
            return batch

    def _loop(self) -> None:
        while self.running:
            batch = self._take()
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as exc:  # one bad batch must not kill the worker
                log.exception("generation failed on %s", self.name)
                for job in batch:
                    job.emit(ErrorEvent(f"generation failed: {type(exc).__name__}: {exc}"))

    # ---------------------------------------------------------------------------------- decoding
    @torch.inference_mode()
    def run_batch(self, jobs: list[GenJob]) -> None:
        """Prefill the jobs together, then decode until every row is finished."""
        self.batches += 1
        self.rows += len(jobs)
        with self.model_lock, self._adapter(jobs[0].adapter):
            rows = [_Row(j, _generator(j.params)) for j in jobs]
            logits, cache, mask, pos = self._prefill(rows)
            while rows:
                keep = self._step_rows(rows, logits)
                if not keep:
                    return
                if len(keep) < len(rows):
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, pos = mask[idx], pos[idx]
                    rows = [rows[i] for i in keep]
                ids = torch.tensor([[r.last] for r in rows], device=self.device)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                pos = pos + 1
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self.cache_kw: cache})
                logits = out.logits[:, -1, :].float()

    def _prefill(self, rows: list[_Row]):
        width = max(len(r.job.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.job.prompt_ids
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        extra = {self.cache_kw: cache}
        if self.keep_logits_kw and not any(r.job.params.prompt_logprobs for r in rows):
            extra["logits_to_keep"] = 1  # only the last position's logits are needed
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
        for i, r in enumerate(rows):
            if r.job.params.prompt_logprobs:
                n = len(r.job.prompt_ids)
                r.job.emit(_prompt_logprobs(out.logits[i, width - n:, :].float(), r.job.prompt_ids, r.job.params.top_logprobs or 0))
        return out.logits[:, -1, :].float(), cache, mask, pos[:, -1:]

    def _step_rows(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, emit it, and return the indices of rows that go on."""
        keep = []
        for i, r in enumerate(rows):
            job = r.job
            if job.cancelled.is_set():
                self.cancelled_rows += 1
                job.emit(DoneEvent("cancelled"))
                continue
            if job.params.max_tokens <= r.produced:
                job.emit(DoneEvent("length"))
                continue
            row_logits = logits[i]
            tok = pick_token(row_logits, job.params, r.generator)
            r.produced += 1
            r.last = tok
            if tok in job.stop_ids:
                job.emit(DoneEvent("stop"))
                continue
            job.emit(_token_event(row_logits, tok, job.params.top_logprobs))
            if r.produced >= job.params.max_tokens:
                job.emit(DoneEvent("length"))
                continue
            keep.append(i)
        return keep

    def _adapter(self, adapter: str | None):
        """Context: the PEFT model with ``adapter`` active, or with adapters disabled for the base weights."""
        import contextlib

        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()


def _takes(model, name: str) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def _cache_keyword(model) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever the model's forward takes."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature and nucleus (top_p) sampling with the row's generator."""
    if params.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_p, dim=-1) - sorted_p > params.top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _token_event(logits: torch.Tensor, tok: int, k: int | None) -> TokenEvent:
    if k is None:
        return TokenEvent(tok)
    lp = torch.log_softmax(logits, dim=-1)
    top = None
    if k > 0:
        vals, idx = torch.topk(lp, k)
        top = [(int(t), float(v)) for t, v in zip(idx.tolist(), vals.tolist())]
    return TokenEvent(tok, float(lp[tok]), top)


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> PromptLogprobs:
    """Logprob of each prompt token given the ones before it (the first token has none)."""
    lp = torch.log_softmax(logits, dim=-1)  # row j predicts token j+1
    target = torch.tensor(prompt[1:], dtype=torch.long, device=lp.device)
    chosen = lp[:-1].gather(1, target[:, None])[:, 0].tolist() if len(prompt) > 1 else []
    tops: list[list[tuple[int, float]] | None] = [None]
    if k > 0 and len(prompt) > 1:
        vals, idx = torch.topk(lp[:-1], k, dim=-1)
        tops += [[(int(t), float(v)) for t, v in zip(ir, vr)] for ir, vr in zip(idx.tolist(), vals.tolist())]
    else:
        tops += [None] * (len(prompt) - 1)
    return PromptLogprobs([None, *chosen], tops)


def generate_sync(engine: BatchEngine, prompts: list[list[int]], *, max_tokens: int, stop_ids: frozenset[int],
                  adapter: str | None = None, timeout: float = 300.0) -> list[list[int]]:
    """Greedy token ids for several prompts through the engine's queue (used by the known-answer probes)."""
    outs: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    errors: list[str] = []

    def emitter(i: int):
        def emit(ev: Any) -> None:
            if isinstance(ev, TokenEvent):
                outs[i].append(ev.token_id)
            elif isinstance(ev, (DoneEvent, ErrorEvent)):
                if isinstance(ev, ErrorEvent):
                    errors.append(ev.message)
                done[i].set()
        return emit

    for i, p in enumerate(prompts):
        engine.submit(GenJob(p, SamplingParams(max_tokens=max_tokens), stop_ids, emit=emitter(i), adapter=adapter))
    deadline = time.monotonic() + timeout
    for d in done:
        if not d.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{engine.name}: probe generation did not finish within {timeout:.0f} s")
    if errors:
        raise RuntimeError(errors[0])
    return outs
