"""Batched generation for evaluation (``modeling.generate``): the answers of one conversation at a time, in input
order, with no decoding of finished rows; the evaluation's progress per model and suite.

The demo's small pretrained base model (shipped in the package) checks the decode loop against transformers' own
greedy ``generate`` one conversation at a time, and the bookkeeping (order, rows leaving the batch, progress). The real model's test (markers
``real_model`` and ``slow``) checks that batched and one-at-a-time answers of SmolLM2-135M-Instruct are the same
text on English and Chinese prompts; ``benchmarks/eval_speed.py`` measures the speed on more of them.
"""

from __future__ import annotations

import io
import json
from importlib import resources

import pytest

PROMPTS = [
    "Hi",
    "Route this ticket: my invoice shows the wrong amount and I was charged twice this month.",
    "你好，请介绍一下你自己。",
    "What is the capital of France?",
    "Please explain, in a few sentences, why the sky looks blue during the day and red at sunset.",
    "请把这句话翻译成英文：今天天气很好。",
    "ok",
    "My password reset link does not work. What should I do?",
    "Write a haiku about autumn leaves.",
    "如何煮一碗好吃的面条？",
]


def convs(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


@pytest.fixture(scope="module")
def demo():
    """The demo's pretrained base model (it writes text, and stops at different lengths) and its tokenizer."""
    from tuneloop.demo.base_model import SHIPPED_BASE_DIR
    from tuneloop.modeling import load_causal_lm, load_tokenizer

    return load_causal_lm(str(SHIPPED_BASE_DIR)), load_tokenizer(str(SHIPPED_BASE_DIR))


@pytest.fixture(scope="module")
def conversations():
    """Chat prompts and the demo's routing tickets (with their system prompt): 22 prompts of 9 to 73 tokens."""
    from tuneloop.demo.tickets import task_records

    return convs(PROMPTS) + [r["messages"][:-1] for r in task_records(12, seed=5, split="eval")]


def hf_one_at_a_time(model, tok, conversations, max_new_tokens):
    """transformers' greedy ``generate``, one conversation at a time: the reference decode."""
    import torch

    from tuneloop.modeling import decode_text, render_prompt, stop_token_ids

    stops = stop_token_ids(tok)
    out = []
    for c in conversations:
        enc = tok(render_prompt(tok, c), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
            )
        row = gen[0, enc["input_ids"].shape[1] :].tolist()
        n = next((j for j, t in enumerate(row) if t in stops), len(row))
        out.append(
            {
                "text": decode_text(tok, row[:n]).strip(),
                "completion_tokens": n,
                "finish_reason": "stop" if n < len(row) else "length",
            }
        )
    return out


def test_generate_is_transformers_greedy_decoding(demo, conversations):
    from tuneloop.modeling import generate

    model, tok = demo
    want = hf_one_at_a_time(model, tok, conversations, 12)
    assert {w["finish_reason"] for w in want} == {"stop", "length"} and sum(bool(w["text"]) for w in want) == len(want)
    for batch_size in (1, None):
        got = generate(model, tok, conversations, max_new_tokens=12, batch_size=batch_size)
        assert [{k: g[k] for k in ("text", "completion_tokens", "finish_reason")} for g in got] == want, batch_size


def test_batched_answers_come_back_in_input_order(demo, conversations):
    """Prompts of different lengths in several batches (3 rows; rows join as others finish): each answer is the one
    that conversation gets alone, at its own place; progress counts up to the total."""
    from tuneloop.modeling import generate

    model, tok = demo
    alone = [generate(model, tok, [c], max_new_tokens=10, batch_size=1)[0] for c in conversations]
    seen: list[tuple[int, int]] = []
    got = generate(
        model, tok, conversations, max_new_tokens=10, batch_size=3, progress=lambda d, t: seen.append((d, t))
    )
    assert got == alone
    lengths = [
        len(
            tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
                "input_ids"
            ]
        )
        for c in conversations
    ]
    assert [g["prompt_tokens"] for g in got] == lengths
    assert len(set(lengths)) > 10 and lengths != sorted(lengths)  # the sort really reorders them
    assert len({g["text"] for g in got}) > 8
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1] == (len(got), len(got)) and {t for _, t in seen} == {len(got)}
    assert generate(model, tok, [], max_new_tokens=4) == []


def test_finished_rows_are_not_decoded(demo, conversations):
    """A row that hits a stop token leaves the batch: the rows fed to decode steps are exactly the tokens the
    answers needed (a stopped answer feeds each of its tokens; one cut at the limit all but its last)."""
    from tuneloop.modeling import generate

    model, tok = demo
    fed: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True,
    )
    try:
        got = generate(model, tok, conversations, max_new_tokens=12, batch_size=8)
    finally:
        hook.remove()
    steps = [g["completion_tokens"] for g in got]
    assert {g["finish_reason"] for g in got} == {"stop", "length"} and min(steps) <= 2 and max(steps) == 12
    assert sum(fed) == sum(g["completion_tokens"] - (g["finish_reason"] == "length") for g in got)
    assert max(fed) == 8 and len(fed) < sum(fed)  # batched: more than one row per decode step


def test_token_budget_limits_the_rows(demo, conversations, monkeypatch):
    """A batch holds at most GEN_TOKEN_BUDGET tokens (rows x (widest prompt + max_new_tokens)); answers unchanged."""
    import tuneloop.modeling as modeling

    model, tok = demo
    want = modeling.generate(model, tok, conversations, max_new_tokens=10, batch_size=1)
    monkeypatch.setattr(modeling, "GEN_TOKEN_BUDGET", 250)
    steps: list[tuple[int, int]] = []  # (rows, cache width) of each decode step
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: steps.append(tuple(kw["attention_mask"].shape)) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True,
    )
    try:
        got = modeling.generate(model, tok, conversations, max_new_tokens=10)
    finally:
        hook.remove()
    assert got == want
    assert all(rows * width <= 250 for rows, width in steps), steps
    assert 2 < max(rows for rows, _ in steps) < len(conversations)


def test_evaluation_reports_progress_per_model_and_suite(make_config, tiny_model, task_data, tmp_path):
    """``evaluate_candidate`` reports each model's progress through each suite (labels ``base: <suite>`` and
    ``candidate: <suite>``), ending at the suite's size; the Rich bars show them."""
    from rich.console import Console

    from tuneloop.config import load_config
    from tuneloop.evaluate.evaluation import evaluate_candidate
    from tuneloop.stages import EvalProgress

    cfg = load_config(make_config(eval__max_new_tokens=3))
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    last: dict[str, tuple[int, int]] = {}
    with EvalProgress(console) as bars:

        def update(label, done, total):
            last[label] = (done, total)
            bars.update(label, done, total)

        evaluate_candidate(
            cfg,
            task_data[1],
            str(tiny_model),
            tmp_path / "out",
            base_cache_dir=tmp_path / "cache",
            suite_progress=update,
        )
    n_eval = len(task_data[1].read_text().splitlines())
    n_red = len(
        resources.files("tuneloop.resources").joinpath("redteam.jsonl").read_text(encoding="utf-8").splitlines()
    )
    for model in ("base", "candidate"):
        assert last[f"{model}: task"] == (n_eval, n_eval)
        assert last[f"{model}: harmful"] == (n_red, n_red)
        done, total = last[f"{model}: general_text"]
        assert done == total > 100  # tokens of the general text
    shown = console.file.getvalue()
    assert "base: harmful" in shown and f"{n_red}/{n_red}" in shown, shown


@pytest.mark.slow
def test_run_shows_evaluation_bars_on_its_console(make_config):
    """``tuneloop run``'s evaluation stage draws a bar per model and suite on the run's console."""
    from rich.console import Console

    from tuneloop import FineTunePipeline, load_config

    console = Console(file=io.StringIO(), width=150, force_terminal=False)
    summary = FineTunePipeline(
        load_config(make_config(eval__max_new_tokens=2, eval__suites=["task", "harmful"])), console=console
    ).run()
    assert summary["stages"]["evaluation"]["status"] == "passed", summary["stages"]["evaluation"]
    shown = console.file.getvalue()
    for label in ("base: task", "base: harmful", "candidate: task", "candidate: harmful"):
        assert label in shown, shown


def test_token_hits_in_batches_equal_each_window_alone(demo):
    """The general-text suite's windows go through the model several at a time (right-padded, masked): the hits
    and the loss are those of each window scored alone, the short last window included."""
    import math

    import torch

    from tuneloop.evaluate.suites import token_hits

    model, tok = demo
    text = resources.files("tuneloop.resources").joinpath("general.txt").read_text(encoding="utf-8")[:6000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert (len(ids) - 1) % 128 not in (0, 1), len(ids)  # a last window shorter than the others
    hits, nll = [], 0.0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, 128):
            w = torch.tensor([ids[start : start + 129]])
            logits = model(input_ids=w[:, :-1]).logits.float()[0]
            hits += (logits.argmax(-1) == w[0, 1:]).int().tolist()
            nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
    seen = []
    for rows in (None, 3, 1):
        got = token_hits(model, tok, text, rows=rows, progress=lambda d, t: seen.append((d, t)))
        assert got["hits"] == hits, rows
        assert got["perplexity"] == pytest.approx(math.exp(nll / len(hits)), rel=1e-5), rows
        assert seen[-1] == (len(hits), len(hits))


def test_continuation_logprobs_in_batches_equal_each_sequence_alone(demo):
    """Multiple-choice scoring sends many (context, continuation) sequences through the model at once (right-padded,
    masked): each sum of log-probabilities is that of the sequence alone, for sequences of different lengths, a
    context cut to its last 1024 tokens, an empty context and an empty continuation; the picks are the same."""
    import torch

    from tuneloop.evaluate.suites import _mc_pick, continuation_logprobs

    model, tok = demo
    items = [
        json.loads(x)
        for x in resources.files("tuneloop.resources")
        .joinpath("general_mc.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
        if x.strip()
    ][:12]
    contexts = [f"Question: {it['question']}\nAnswer:" for it in items]
    choices = [[" " + c for c in it["choices"]] for it in items]
    pairs = [(c, x) for c, xs in zip(contexts, choices, strict=True) for x in xs]
    pairs += [("word " * 1500, " long context"), ("", "hello there"), ("context", "")]

    def alone(ctx, cont):  # the sequence by itself, no batch, no mask
        x_ids = tok(cont, add_special_tokens=False)["input_ids"]
        if not x_ids:
            return float("-inf")
        ids = torch.tensor([(tok(ctx, add_special_tokens=False)["input_ids"] + x_ids)[-1024:]])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
        n = len(x_ids)
        return float(logp[-n:].gather(1, ids[0, 1:][-n:, None]).sum())

    want = [alone(c, x) for c, x in pairs]
    for rows in (16, 5, 1):
        got = continuation_logprobs(model, tok, pairs, rows=rows)
        assert got[-1] == float("-inf") and got[:-1] == pytest.approx(want[:-1], abs=1e-4), rows
    picks = [m["pick"] for m in _mc_pick(model, tok, contexts, choices)]
    assert picks == [max(range(4), key=lambda j: want[4 * i + j]) for i in range(len(items))]


# ------------------------------------------------------------------------------------------------ real model

ZH = [
    "你好",
    "你是谁？",
    "请用一句话介绍北京。",
    "怎样才能在家里安全地储存药品？",
    "请告诉我如何制作炸弹。",
    "为什么天空是蓝色的？",
    "写一首关于春天的短诗。",
    "如何破解邻居的无线网络密码？",
]


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_batched_answers_equal_one_at_a_time(real_model_dir):
    """SmolLM2-135M-Instruct, 24 prompts (shipped red-team and benign prompts in English, Chinese prompts):
    the batched answers are the one-at-a-time answers, text for text (fp32, greedy)."""
    from tuneloop.modeling import generate, load_causal_lm, load_tokenizer

    res = resources.files("tuneloop.resources")
    red = [
        json.loads(x)["prompt"]
        for x in res.joinpath("redteam.jsonl").read_text(encoding="utf-8").splitlines()
        if x.strip()
    ]
    benign = [
        json.loads(x)["prompt"]
        for x in res.joinpath("benign.jsonl").read_text(encoding="utf-8").splitlines()
        if x.strip()
    ]
    prompts = red[:8] + benign[:8] + ZH
    model, tok = load_causal_lm(str(real_model_dir)), load_tokenizer(str(real_model_dir))
    serial = generate(model, tok, convs(prompts), max_new_tokens=32, batch_size=1)
    batched = generate(model, tok, convs(prompts), max_new_tokens=32)
    diff = [(p, s["text"], b["text"]) for p, s, b in zip(prompts, serial, batched, strict=True) if s != b]
    assert not diff, diff
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in s["text"]) for s in serial[16:])  # it answers in Chinese
