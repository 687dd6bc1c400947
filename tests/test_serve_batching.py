"""Continuous batching in the engine: jobs that join a running batch at a step boundary (their cache merged,
left-padded, into the running one) decode exactly as they would alone; a job for another adapter is not
overtaken; cancelled waiting jobs are answered."""

from __future__ import annotations

import pytest

PROMPTS = [
    "hi",
    "my invoice shows a double charge for order 4821 and I was billed twice this month",
    "the app crashes",
    "where is my parcel, it was due on monday",
    "I want a refund",
    "reset my password please",
    "thanks",
]


@pytest.fixture(scope="module")
def lm(tiny_model):
    from tuneloop.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    return load_causal_lm(str(tiny_model)), tok


class Recorder:
    """Collects one job's events; ``on_token`` runs a hook after the n-th token (to add jobs mid-batch)."""

    def __init__(self, on_token=None):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.done: str | None = None
        self.on_token = on_token or {}

    def __call__(self, ev) -> None:
        from tuneloop.serve.batching import DoneEvent, TokenEvent

        if isinstance(ev, TokenEvent):
            self.tokens.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            hook = self.on_token.get(len(self.tokens))
            if hook:
                hook()
        elif isinstance(ev, DoneEvent):
            self.done = ev.finish_reason


def job(prompt_ids, max_tokens, rec, adapter=None):
    from tuneloop.serve.batching import GenJob, SamplingParams

    return GenJob(
        prompt_ids, SamplingParams(max_tokens=max_tokens, top_logprobs=0), frozenset(), emit=rec, adapter=adapter
    )


def test_jobs_joining_mid_batch_decode_as_they_would_alone(lm):
    from tuneloop.serve.batching import BatchEngine

    model, tok = lm
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    budgets = [14, 9, 12, 6, 10, 11, 7]
    engine = BatchEngine(model, max_batch_size=8, pad_id=tok.pad_token_id or 0)
    alone = []
    for p, n in zip(ids, budgets, strict=True):
        rec = Recorder()
        engine.run_batch([job(p, n, rec)])
        alone.append(rec)
    assert engine.joined == 0

    recs = [Recorder() for _ in ids]

    def add(*which):
        return lambda: engine.queue.extend(job(ids[i], budgets[i], recs[i]) for i in which)

    # job 0 starts alone; 1 (a longer prompt than the running cache) and 2 join after its 2nd token, 3 and 4
    # after its 5th (rows 1 and 3 have left by then or leave later, so the cache is trimmed and re-padded),
    # 5 and 6 after job 2's 6th token
    recs[0].on_token = {2: add(1, 2), 5: add(3, 4)}
    recs[2].on_token = {6: add(5, 6)}
    engine.run_batch([job(ids[0], budgets[0], recs[0])])
    assert engine.joined == 6 and engine.batches == len(PROMPTS) + 1
    for got, ref in zip(recs, alone, strict=True):
        assert got.tokens == ref.tokens and got.done == ref.done == "length"
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def test_joining_stops_at_another_adapter_and_answers_cancelled_jobs(lm):
    from tuneloop.serve.batching import BatchEngine

    model, tok = lm
    ids = tok("the app crashes", add_special_tokens=False)["input_ids"]
    engine = BatchEngine(model, max_batch_size=4)
    first, cancelled, other, behind = Recorder(), Recorder(), Recorder(), Recorder()
    gone = job(ids, 4, cancelled)
    gone.cancel()
    waiting = [gone, job(ids, 4, other, adapter="another"), job(ids, 4, behind)]
    first.on_token = {1: lambda: engine.queue.extend(waiting)}
    engine.run_batch([job(ids, 4, first)])
    assert cancelled.done == "cancelled" and engine.joined == 0
    assert [j.emit for j in engine.queue] == [other, behind]  # not overtaken; both still wait for the next batch


def test_batch_size_bounds_joining(lm):
    from tuneloop.serve.batching import BatchEngine

    model, tok = lm
    ids = tok("thanks", add_special_tokens=False)["input_ids"]
    engine = BatchEngine(model, max_batch_size=3)
    recs = [Recorder() for _ in range(5)]
    recs[0].on_token = {1: lambda: engine.queue.extend(job(ids, 3, r) for r in recs[1:])}
    engine.run_batch([job(ids, 6, recs[0])])
    # two join at once (3 rows); the other two join when those two finish, before row 0 does
    assert engine.joined == 4 and not engine.queue
    assert all(r.tokens == recs[1].tokens[:3] and r.done == "length" for r in recs[1:])


def test_exclusive_use_stops_joining_so_a_busy_batch_ends(lm):
    from tuneloop.serve.batching import BatchEngine

    model, tok = lm
    ids = tok("thanks", add_special_tokens=False)["input_ids"]
    engine = BatchEngine(model, max_batch_size=4)
    first, late = Recorder(), Recorder()

    def loader_arrives():
        engine.queue.append(job(ids, 3, late))
        engine.draining.set()  # what exclusive() sets while it waits for the model

    first.on_token = {1: loader_arrives}
    engine.run_batch([job(ids, 4, first)])
    assert first.done == "length" and engine.joined == 0 and len(engine.queue) == 1
    with engine.exclusive() as m:
        assert m is model and engine.model_lock.locked()
    assert not engine.draining.is_set()


def test_a_failing_batch_reports_the_error_to_jobs_that_joined_it(lm):
    import threading

    from tuneloop.serve.batching import BatchEngine, ErrorEvent

    model, tok = lm
    ids = tok("thanks", add_special_tokens=False)["input_ids"]
    engine = BatchEngine(model, max_batch_size=4)
    errors: dict[str, str] = {}
    both = threading.Event()

    def watching(name, rec):
        def emit(ev):
            if isinstance(ev, ErrorEvent):
                errors[name] = ev.message
                if len(errors) == 2:
                    both.set()
            rec(ev)

        return emit

    bad = job([model.config.vocab_size + 5], 3, watching("bad", Recorder()))  # past the embedding: its prefill raises
    first = job(ids, 20, watching("first", Recorder(on_token={1: lambda: engine.queue.append(bad)})))
    engine.start()
    try:
        engine.submit(first)
        assert both.wait(30), f"errors seen: {errors}"
    finally:
        engine.stop()
    assert "generation failed" in errors["first"] and "generation failed" in errors["bad"]
