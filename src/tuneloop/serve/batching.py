"""Dynamic batching: one decode loop per loaded model, fed by a bounded queue of generation jobs.

A worker thread takes the waiting jobs that share an adapter (up to ``max_batch_size``), runs one left-padded
prefill with a KV cache (attention mask and position ids follow each row's real tokens, so a row's logits do
not depend on its neighbours), then decodes step by step. A row leaves the batch when it hits a stop token,
its token budget, or its job is cancelled (client gone, stop string seen); the cache drops its row. Jobs that
arrive while a batch runs join it at the next step boundary (continuous batching): they are prefilled on their
own and their cache is merged into the running one, left-padded, so a new request does not wait for the
longest running one to finish.

Entry points: :class:`BatchEngine` (``submit``, ``start``, ``stop``), :class:`GenJob`, :class:`SamplingParams`,
:class:`QueueFull`, :class:`EngineStopped`. Events go to each job's ``emit`` callback from the worker thread.

Shutdown past the grace period: :meth:`BatchEngine.abort` ends every waiting and running job at once with a
:class:`StoppedEvent` and refuses new jobs with :class:`EngineStopped`; the gateway answers both with 503
``shutting_down`` (``serve/server.py``, ``serve/backends/textgen.py``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

BASE_ADAPTER = None  # jobs for the base weights (or a full model) carry adapter=None


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs; the caller answers 429."""


class EngineStopped(Exception):
    """The engine takes no more jobs (:meth:`BatchEngine.abort`: the gateway is shutting down past its grace
    period); the caller answers 503."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only; k: and the k best
    prompt_logprobs: bool = False  # logprobs of the prompt tokens (completions echo)


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    logprobs: list[float | None]  # per prompt token; the first has none
    top: list[list[tuple[int, float]] | None]


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    # the stop token that ended the row (end-of-sequence), with its logprob when the job asked for logprobs:
    # it is not part of the text, but OpenAI and vLLM list it among the completion's logprobs
    stop_token: TokenEvent | None = None


@dataclass
class ErrorEvent:
    message: str


@dataclass
class StoppedEvent:
    """The engine ended this job unfinished (:meth:`BatchEngine.abort`); ``reason`` says why."""

    reason: str


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


@dataclass
class _BatchState:
    """The running batch's tensors: next-token logits, KV cache, attention mask (left padding is 0) and the
    position of each row's last token."""

    logits: torch.Tensor
    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor
    can_join: bool

    def select(self, keep: list[int]) -> None:
        """Keep these rows; then drop the leading columns that are padding in every remaining row."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.logits = self.mask[idx], self.pos[idx], self.logits[idx]
        if self.can_join:
            first = int(self.mask.any(dim=0).to(torch.int8).argmax())
            if first > 0:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def merge(self, other: _BatchState) -> _BatchState:
        """Append ``other``'s rows: both caches and masks are left-padded to the longer one, then concatenated."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad_left(mine.keys, width, 2), pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([pad_left(mine.values, width, 2), pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(other.mask, width, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.logits = torch.cat([self.logits, other.logits])
        return self


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width``."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def mergeable_cache(cache: Any) -> bool:
    """Whether new rows can be merged into this cache: every layer a plain full-length dynamic layer
    (sliding-window or quantised layers keep the per-batch behaviour: a new job waits for the batch to end)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return (
        layers is not None
        and bool(layers)
        and all(type(layer) is DynamicLayer and layer.keys is not None and layer.keys.dim() == 4 for layer in layers)
    )


class BatchEngine:
    """One model (a plain causal LM or a PEFT model holding several adapters) behind a batching worker."""

    def __init__(
        self,
        model,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        pad_id: int = 0,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "model",
    ):
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
        self.batches = 0  # counters for tests, /health and benchmarks
        self.rows = 0
        self.cancelled_rows = 0
        self.joined = 0  # rows that joined a running batch at a step boundary
        self.prefills = 0  # prefill forwards (a batch's first, and one per group of joiners)
        self.decode_steps = 0  # decode forwards
        self.decoded_rows = 0  # rows over all decode forwards: decoded_rows / decode_steps is the mean batch size
        self.cache_kw = _cache_keyword(model)
        self.keep_logits_kw = _takes(model, "logits_to_keep")
        self.model_lock = threading.Lock()  # held while a batch runs; loading an adapter takes it too
        self.batch_jobs: list[GenJob] = []  # every job of the running batch (for error reports)
        self.draining = threading.Event()  # set while someone waits for model_lock: running batches stop taking joiners
        self.stopped: str | None = None  # abort()'s reason: every job gets a StoppedEvent, submit raises EngineStopped

    # ---------------------------------------------------------------------------------- queue
    def submit(self, job: GenJob) -> None:
        with self.cond:
            if self.stopped is not None:
                raise EngineStopped(f"{self.name}: {self.stopped}")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(
                    f"{self.name}: {len(self.queue)} requests are waiting (serve.max_queue={self.max_queue})"
                )
            self.queue.append(job)
            self.on_queue_depth(len(self.queue))
            self.cond.notify()

    def start(self) -> BatchEngine:
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

    def abort(self, reason: str) -> int:
        """End every waiting and running job now with a :class:`StoppedEvent` and refuse new ones
        (:class:`EngineStopped`): the gateway's shutdown past ``serve.shutdown_grace_s``. The event is emitted
        before the job is cancelled, so its reader sees it before any ``DoneEvent("cancelled")``; a running row
        leaves its batch at the next step. Returns how many jobs were ended (the worker runs on until
        :meth:`stop`)."""
        with self.cond:
            self.stopped = reason
            ended = list(self.queue)
            self.queue.clear()
            self.on_queue_depth(0)
            self.cond.notify_all()
        ended += [job for job in list(self.batch_jobs) if not job.cancelled.is_set()]
        for job in ended:
            job.emit(StoppedEvent(reason))
            job.cancel()
        return len(ended)

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the model between batches (to attach an adapter): the running batch stops taking new jobs, so it
        ends within its rows' token budgets even under a steady stream of requests."""
        self.draining.set()
        try:
            with self.model_lock:
                yield self.model
        finally:
            self.draining.clear()

    def queue_depth(self) -> int:
        return len(self.queue)

    def _take(self) -> list[GenJob]:
        with self.cond:
            while self.running and not self.queue:
                self.cond.wait(0.5)
            if not self.running:
                return []
            adapter = self.queue[0].adapter
            batch: list[GenJob] = []
            rest: deque[GenJob] = deque()
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
                for job in self.batch_jobs:  # the jobs it started with and those that joined it
                    if not job.cancelled.is_set():
                        job.emit(ErrorEvent(f"generation failed: {type(exc).__name__}: {exc}"))

    # ---------------------------------------------------------------------------------- decoding
    @torch.inference_mode()
    def run_batch(self, jobs: list[GenJob]) -> None:
        """Prefill the jobs together, then decode step by step until no row is left.

        Continuous batching: at every step boundary, waiting jobs for the same adapter join the running batch
        (up to ``max_batch_size``): they are prefilled on their own and their KV cache is merged into the
        running one, left-padded, with the attention mask hiding the padding.
        """
        self.batches += 1
        self.rows += len(jobs)
        self.batch_jobs = list(jobs)
        adapter = jobs[0].adapter
        with self.model_lock, self._adapter(adapter):
            rows = [_Row(j, _generator(j.params)) for j in jobs]
            state = self._prefill(rows)
            while rows:
                keep = self._step_rows(rows, state.logits)
                if len(keep) < len(rows):
                    rows = [rows[i] for i in keep]
                    state.select(keep)
                if rows:
                    self._decode(state, rows)
                joiners = (
                    []
                    if self.draining.is_set() or not state.can_join
                    else self._take_joiners(adapter, self.max_batch_size - len(rows))
                )
                if joiners:
                    self.batch_jobs += joiners
                    new_rows = [_Row(j, _generator(j.params)) for j in joiners]
                    new_state = self._prefill(new_rows)
                    state = state.merge(new_state) if rows else new_state
                    rows += new_rows
                    self.rows += len(joiners)
                    self.joined += len(joiners)

    def stats(self) -> dict[str, int]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "joined": self.joined,
            "prefills": self.prefills,
            "decode_steps": self.decode_steps,
            "decoded_rows": self.decoded_rows,
            "cancelled_rows": self.cancelled_rows,
        }

    def _decode(self, state: _BatchState, rows: list[_Row]) -> None:
        self.decode_steps += 1
        self.decoded_rows += len(rows)
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(rows), 1)], dim=1)
        state.pos = state.pos + 1
        out = self.model(
            input_ids=ids,
            attention_mask=state.mask,
            position_ids=state.pos,
            use_cache=True,
            **{self.cache_kw: state.cache},
        )
        state.logits = out.logits[:, -1, :].float()

    def _take_joiners(self, adapter: str | None, room: int) -> list[GenJob]:
        """Waiting jobs for ``adapter`` from the front of the queue, up to ``room``; stops at the first job for
        another adapter, so that one is not starved by a steady stream for this one (the batch drains first)."""
        if room <= 0 or not self.queue:
            return []
        out: list[GenJob] = []
        with self.cond:
            while self.queue and len(out) < room:
                job = self.queue[0]
                if job.cancelled.is_set():
                    self.queue.popleft()
                    job.emit(DoneEvent("cancelled"))
                elif job.adapter == adapter:
                    out.append(self.queue.popleft())
                else:
                    break
            self.on_queue_depth(len(self.queue))
        return out

    def _prefill(self, rows: list[_Row]) -> _BatchState:
        self.prefills += 1
        width = max(len(r.job.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.job.prompt_ids
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        extra: dict[str, Any] = {self.cache_kw: cache}
        if self.keep_logits_kw and not any(r.job.params.prompt_logprobs for r in rows):
            extra["logits_to_keep"] = 1  # only the last position's logits are needed
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
        for i, r in enumerate(rows):
            if r.job.params.prompt_logprobs:
                n = len(r.job.prompt_ids)
                r.job.emit(
                    _prompt_logprobs(
                        out.logits[i, width - n :, :].float(), r.job.prompt_ids, r.job.params.top_logprobs or 0
                    )
                )
        return _BatchState(out.logits[:, -1, :].float(), cache, mask, pos[:, -1:], mergeable_cache(cache))

    def _step_rows(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, emit it, and return the indices of rows that go on."""
        keep = []
        greedy = torch.argmax(logits, dim=-1).tolist()  # one call for every greedy row
        for i, r in enumerate(rows):
            job = r.job
            if self.stopped is not None and not job.cancelled.is_set():  # taken just before abort() cleared the queue
                job.emit(StoppedEvent(self.stopped))
                job.cancel()
            if job.cancelled.is_set():
                self.cancelled_rows += 1
                job.emit(DoneEvent("cancelled"))
                continue
            if job.params.max_tokens <= r.produced:
                job.emit(DoneEvent("length"))
                continue
            tok = greedy[i] if r.generator is None else pick_token(logits[i], job.params, r.generator)
            r.produced += 1
            r.last = tok
            k = job.params.top_logprobs
            if tok in job.stop_ids:
                job.emit(DoneEvent("stop", None if k is None else _token_event(logits[i], tok, k)))
                continue
            job.emit(TokenEvent(tok) if k is None else _token_event(logits[i], tok, k))
            if r.produced >= job.params.max_tokens:
                job.emit(DoneEvent("length"))
                continue
            keep.append(i)
        return keep

    def _adapter(self, adapter: str | None):
        """Context: the PEFT model with ``adapter`` active, or with adapters disabled for the base weights."""
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
        top = [(int(t), float(v)) for t, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    return TokenEvent(tok, float(lp[tok]), top)


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> PromptLogprobs:
    """Logprob of each prompt token given the ones before it (the first token has none)."""
    lp = torch.log_softmax(logits, dim=-1)  # row j predicts token j+1
    target = torch.tensor(prompt[1:], dtype=torch.long, device=lp.device)
    chosen = lp[:-1].gather(1, target[:, None])[:, 0].tolist() if len(prompt) > 1 else []
    tops: list[list[tuple[int, float]] | None] = [None]
    if k > 0 and len(prompt) > 1:
        vals, idx = torch.topk(lp[:-1], k, dim=-1)
        tops += [
            [(int(t), float(v)) for t, v in zip(ir, vr, strict=True)]
            for ir, vr in zip(idx.tolist(), vals.tolist(), strict=True)
        ]
    else:
        tops += [None] * (len(prompt) - 1)
    return PromptLogprobs([None, *chosen], tops)


def generate_sync(
    engine: BatchEngine,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    stop_ids: frozenset[int],
    adapter: str | None = None,
    timeout: float = 300.0,
) -> list[list[int]]:
    """Greedy token ids for several prompts through the engine's queue (used by the known-answer probes)."""
    outs: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    errors: list[str] = []

    def emitter(i: int):
        def emit(ev: Any) -> None:
            if isinstance(ev, TokenEvent):
                outs[i].append(ev.token_id)
            elif isinstance(ev, (DoneEvent, ErrorEvent, StoppedEvent)):
                if isinstance(ev, (ErrorEvent, StoppedEvent)):
                    errors.append(ev.message if isinstance(ev, ErrorEvent) else ev.reason)
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
