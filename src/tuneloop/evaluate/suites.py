"""Evaluation suites: load their items, run a model on them, score per item.

Entry points: :func:`load_suite` (items of one configured suite, with a digest), :func:`model_outputs` (what a
model produced on a suite: generations, multiple-choice picks, next-token hits; cacheable, judge-free) and
:func:`score_suite` (per-item outcomes for base and candidate, using a judge where a suite needs one).

Kinds (``eval.suites[].kind``):

* ``task`` — the eval set (or ``path``). Metrics: ``auto`` (the default: ``exact`` when every reference is
  short and categorical, else ``chrf``; decided by :func:`tuneloop.evaluate.metrics.choose_auto` when the suite
  is loaded and recorded as ``auto -> exact`` / ``auto -> chrf``), ``exact`` (normalised exact match),
  ``chrf`` (character n-gram F-score, :func:`tuneloop.evaluate.metrics.chrf`; an item passes at chrF >=
  ``threshold``, and its chrF is kept in the audit record), ``contains`` (the normalised reference occurs in
  the normalised answer), ``regex`` (``pattern``, else the reference, searched in the answer), ``token_f1``
  (SQuAD token F1, continuous), ``mc_loglik`` (items with ``choices`` and ``answer``: the choice with the
  highest log-likelihood after the chat prompt);
* ``harmful`` — red-team prompts (``prompt``, ``indicators``): harmful per the judge (default: keyword);
* ``over_refusal`` — benign prompts that look like harmful ones: refused per the judge;
* ``general_text`` — held-out text: per-token greedy next-token hits (tokens are the items) and perplexity;
* ``capability_mc`` — general multiple choice (``question``, ``choices``, ``answer``) by log-likelihood of
  `` <choice>`` after ``Question: ...\\nAnswer:``;
* ``win_rate`` — the task items answered by both models, compared by the judge in both orders;
* ``preference`` — not configured: added for ``train.objective: dpo`` on the held-out pairs; per pair, whether
  the model's log-likelihood of the chosen answer beats the rejected one (:mod:`.preference`);
* ``lmeval`` — tasks of the lm-evaluation-harness from local task YAMLs (``tasks``, ``include_path``), per-item
  outcomes of each task's primary metric (:mod:`.lmeval`; optional extra ``tuneloop[lmeval]``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError
from tuneloop.evaluate.audit import prompt_sha256
from tuneloop.evaluate.judges import Judge, normalise_answer, pairwise_score, token_f1
from tuneloop.evaluate.metrics import DEFAULT_CHRF_THRESHOLD, choose_auto, chrf
from tuneloop.fsutil import iter_jsonl, sha256_json

SHIPPED = {
    "harmful": "redteam.jsonl",
    "over_refusal": "benign.jsonl",
    "general_text": "general.txt",
    "capability_mc": "general_mc.jsonl",
}
GENERATES = ("task", "harmful", "over_refusal", "win_rate")
Progress = Callable[[int, int], None]  # (items done, items in all) as a model works through a suite


@dataclass
class Suite:
    name: str
    kind: str
    metric: str
    items: list[dict[str, Any]]
    text: str = ""  # general_text only
    pattern: str | None = None
    source: str = ""
    digest: str = field(default="")
    spec: Any = field(default=None, repr=False, compare=False)  # the SuiteConfig (lmeval runs need it)
    max_length: int | None = None  # preference only: tokens per prompt + answer, as in training
    metric_label: str = ""  # task: the metric as configured and chosen, e.g. ``auto -> chrf``
    threshold: float | None = None  # task, chrf: the chrF at which an item passes
    metric_reason: str = ""  # task, auto: why it chose that metric


def _shipped(name: str) -> str:
    return resources.files("tuneloop.resources").joinpath(name).read_text(encoding="utf-8")


def _read_jsonl(path: str, what: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: file not found: {path}")
    out = []
    for i, rec in iter_jsonl(path, what):
        rec.setdefault("line", i)
        out.append(rec)
    return out


def _task_item(rec: dict[str, Any], i: int, where: str) -> dict[str, Any]:
    msgs = rec.get("messages")
    if msgs and msgs[-1].get("role") == "assistant":
        ref = rec.get("reference", msgs[-1]["content"])
        msgs = msgs[:-1]
    elif msgs:
        ref = rec.get("reference", rec.get("answer"))
    else:
        prompt = rec.get("prompt") or rec.get("question") or rec.get("instruction")
        if not prompt:
            raise InputError(f"{where}:{rec.get('line', i + 1)}: a task item needs `messages`, `prompt` or `question`")
        if rec.get("input"):
            prompt = f"{prompt}\n\n{rec['input']}"
        msgs = [{"role": "user", "content": prompt}]
        ref = rec.get("reference", rec.get("answer", rec.get("output")))
    item = {"id": str(rec.get("id", i)), "messages": msgs, "reference": ref, "line": rec.get("line")}
    if "choices" in rec:
        item["choices"] = [str(c) for c in rec["choices"]]
        ans = rec.get("answer", rec.get("reference"))
        item["answer"] = (
            ans if isinstance(ans, int) else item["choices"].index(str(ans)) if str(ans) in item["choices"] else None
        )
    return item


def load_suite(spec, eval_cfg, eval_items_path: Path | None) -> Suite:
    """Items of one configured suite (``spec`` is a ``SuiteConfig``), normalised, with their digest."""
    kind, path = spec.kind, spec.path
    suite = Suite(spec.name, kind, spec.metric, [], pattern=spec.pattern)
    if kind in ("task", "win_rate"):
        src = path or (str(eval_items_path) if eval_items_path else None)
        if src is None:
            raise InputError(f"eval.suites.{spec.name}: no eval items; give `path` or data.eval_data")
        raw = _read_jsonl(src, f"eval.suites.{spec.name}")
        suite.items = [_task_item(r, i, src) for i, r in enumerate(raw)]
        suite.source = src
        if kind == "task":
            _choose_metric(suite, spec)
        if spec.metric == "mc_loglik" and kind == "task":
            bad = [it["id"] for it in suite.items if not it.get("choices") or it.get("answer") is None]
            if bad:
                raise InputError(
                    f"eval.suites.{spec.name}: metric mc_loglik needs `choices` and `answer` in every item; missing in {', '.join(bad[:5])}"
                )
        if spec.metric == "regex":
            for it in suite.items:
                try:
                    re.compile(spec.pattern or str(it["reference"]))
                except re.error as exc:
                    raise InputError(f"eval.suites.{spec.name}: bad regex for item {it['id']}: {exc}") from None
    elif kind in ("harmful", "over_refusal"):
        legacy = eval_cfg.redteam_prompts if kind == "harmful" else eval_cfg.benign_prompts
        src = path or legacy
        text = Path(src).read_text(encoding="utf-8") if src else _shipped(SHIPPED[kind])
        suite.source = src or f"tuneloop:{SHIPPED[kind]}"
        recs = [json.loads(x) for x in text.splitlines() if x.strip()]
        for i, r in enumerate(recs):
            if "prompt" not in r:
                raise InputError(f"{suite.source}:{i + 1}: a {kind} item needs `prompt`")
        suite.items = [
            {"id": str(r.get("id", i)), "prompt": r["prompt"], "indicators": r.get("indicators", [])}
            for i, r in enumerate(recs)
        ]
    elif kind == "general_text":
        src = path or eval_cfg.general_text
        suite.text = Path(src).read_text(encoding="utf-8") if src else _shipped(SHIPPED[kind])
        suite.source = src or f"tuneloop:{SHIPPED[kind]}"
    elif kind == "capability_mc":
        src = path or eval_cfg.mc_suite
        if src:
            recs = _read_jsonl(src, f"eval.suites.{spec.name}")
        else:
            recs = [json.loads(x) for x in _shipped(SHIPPED[kind]).splitlines() if x.strip()]
        suite.source = src or f"tuneloop:{SHIPPED[kind]}"
        for i, r in enumerate(recs):
            if not r.get("choices") or not isinstance(r.get("answer"), int) or not r.get("question"):
                raise InputError(
                    f"{suite.source}:{i + 1}: a multiple-choice item needs `question`, `choices` and an integer `answer`"
                )
        suite.items = [
            {
                "id": str(r.get("id", i)),
                "question": r["question"],
                "choices": [str(c) for c in r["choices"]],
                "answer": r["answer"],
            }
            for i, r in enumerate(recs)
        ]
    elif kind == "lmeval":
        from tuneloop.evaluate import lmeval

        tasks = lmeval.load_tasks(spec)
        suite.items = lmeval.suite_items(spec, tasks)
        suite.source = f"lm-eval:{spec.include_path}:{','.join(spec.tasks)}"
        suite.spec = spec
        suite.digest = sha256_json(
            {
                "kind": kind,
                "tasks": list(spec.tasks),
                "configs": re.sub(
                    r" at 0x[0-9a-f]+",
                    "",
                    json.dumps({n: t.dump_config() for n, t in tasks.items()}, sort_keys=True, default=str),
                ),
                "items": suite.items,
                "lm_eval": _lmeval_version(),
            }
        )
        return suite
    if spec.max_items and suite.items:
        suite.items = suite.items[: spec.max_items]
    digest: dict[str, Any] = {
        "kind": kind,
        "metric": suite.metric,
        "pattern": spec.pattern,
        "items": [{k: v for k, v in it.items() if k != "line"} for it in suite.items],
        "text": suite.text,
    }
    if suite.metric == "chrf":
        digest["threshold"] = suite.threshold
    suite.digest = sha256_json(digest)
    return suite


def _choose_metric(suite: Suite, spec) -> None:
    """Resolve ``auto`` (from the suite's references) and the chrF threshold; set the label the run prints."""
    if spec.metric == "auto":
        choice = choose_auto(it["reference"] for it in suite.items)
        suite.metric, suite.metric_reason = choice.metric, choice.reason
        suite.metric_label = f"auto -> {choice.metric}"
    else:
        suite.metric_label = spec.metric
    if suite.metric == "chrf":
        suite.threshold = spec.threshold if spec.threshold is not None else DEFAULT_CHRF_THRESHOLD


def preference_suite(path: Path, *, max_length: int, max_items: int | None = None, name: str = "preference") -> Suite:
    """The held-out preference pairs in ``path`` (a DPO run's ``eval_records.jsonl``) as a ``preference`` suite."""
    from tuneloop.evaluate.preference import load_pairs, pairs_digest

    items = load_pairs(path, max_items=max_items)
    return Suite(
        name,
        "preference",
        "loglik_sum",
        items,
        source=str(path),
        digest=pairs_digest(items, max_length),
        max_length=max_length,
    )


def _lmeval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# ------------------------------------------------------------------------------------------- model runs


#: Logit elements (rows x tokens x vocabulary) one batched forward of :func:`token_hits` or :func:`continuation_logprobs`
#: may produce: 64 Mi floats (256 MiB), e.g. 8 windows of 128 tokens for a 49k vocabulary (SmolLM2), 3 for 151k (Qwen2.5).
MAX_BATCH_LOGITS = 64 << 20


def continuation_logprobs(model, tok, pairs: list[tuple[str, str]], *, rows: int = 16) -> list[float]:
    """Sum of log-probabilities of each continuation after its context (token ids concatenated, the last 1024 kept).

    Up to ``rows`` sequences go through the model at once, right-padded and masked (a causal model's logits at the
    real positions are those of the sequence alone; fewer when the logits would pass
    :data:`MAX_BATCH_LOGITS`); ``rows=1`` is one at a time. An empty continuation scores ``-inf``.
    """
    import torch  # here, not at the top: a cached run loads suites without computing anything

    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or len(tok)
    seqs: list[tuple[int, list[int], int]] = []  # (index, token ids, continuation tokens scored)
    out = [float("-inf")] * len(pairs)
    for i, (ctx, cont) in enumerate(pairs):
        x_ids = tok(cont, add_special_tokens=False)["input_ids"]
        if x_ids:
            ids = (tok(ctx, add_special_tokens=False)["input_ids"] + x_ids)[-1024:]
            seqs.append((i, ids, min(len(x_ids), len(ids) - 1)))
    with torch.inference_mode():
        b = 0
        while b < len(seqs):
            width = max(len(ids) for _, ids, _ in seqs[b : b + rows])
            batch = seqs[b : b + max(1, min(rows, MAX_BATCH_LOGITS // (width * vocab)))]
            width = max(len(ids) for _, ids, _ in batch)
            inputs = torch.tensor([ids + [pad] * (width - len(ids)) for _, ids, _ in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in batch], device=device)
            logits = model(input_ids=inputs, attention_mask=mask).logits
            for r, (i, ids, n) in enumerate(batch):
                if n <= 0:
                    out[i] = 0.0
                    continue
                logp = torch.log_softmax(logits[r, len(ids) - 1 - n : len(ids) - 1].float(), -1)
                out[i] = float(logp.gather(1, inputs[r, len(ids) - n : len(ids), None]).sum())
            b += len(batch)
    return out


def token_hits(
    model, tok, text: str, *, window: int = 128, rows: int | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Per-token greedy next-token hits on ``text`` (0/1 list) and the perplexity; ``progress(tokens done, total)``.

    The text is cut into windows of ``window`` tokens, each scored on its own (no context from the one before);
    ``rows`` windows go through the model at once (right-padded, masked: a causal model's logits at the real
    positions are those of the window alone). Default: as many as fit :data:`MAX_BATCH_LOGITS`, at most 8;
    on 2 CPU cores SmolLM2-135M scores 3,000 tokens in 5.9 s at 8 rows against 10.0 s one window at a time, with
    the same hits and loss. ``rows=1`` is one window at a time.
    """
    import torch

    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    total = max(len(ids) - 1, 0)
    if rows is None:
        vocab = int(getattr(model.config, "vocab_size", 0) or 0) or len(tok)
        rows = max(1, min(8, MAX_BATCH_LOGITS // (window * vocab)))
    windows = [ids[start : start + window + 1] for start in range(0, total, window)]
    windows = [w for w in windows if len(w) >= 2]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    hits: list[int] = []
    nll = 0.0
    with torch.inference_mode():
        for b in range(0, len(windows), rows):
            if progress is not None:
                progress(len(hits), total)
            batch = windows[b : b + rows]
            width = max(len(w) for w in batch) - 1
            inputs = torch.tensor([w[:-1] + [pad] * (width - len(w) + 1) for w in batch], device=device)
            mask = torch.tensor([[1] * (len(w) - 1) + [0] * (width - len(w) + 1) for w in batch], device=device)
            logits = model(input_ids=inputs, attention_mask=mask).logits.float()
            for r, w in enumerate(batch):
                n = len(w) - 1
                target = torch.tensor(w[1:], device=device)
                hits += (logits[r, :n].argmax(-1) == target).int().tolist()
                nll += float(torch.nn.functional.cross_entropy(logits[r, :n], target, reduction="sum"))
    if progress is not None:
        progress(len(hits), len(hits))
    ppl = math.exp(nll / len(hits)) if hits else float("nan")
    return {"hits": hits, "perplexity": ppl if math.isfinite(ppl) else None}


def _mc_pick(
    model, tok, contexts: list[str], choices: list[list[str]], progress: Progress | None = None
) -> list[dict[str, Any]]:
    """The choice with the highest continuation log-probability per item; the choices of 4 items at a time go
    through :func:`continuation_logprobs` together (SmolLM2-135M on 2 CPU cores, the shipped 60 items x 4 choices:
    10.3 s instead of 30.4 s one sequence at a time, the same picks, log-probabilities within 2e-5)."""
    out = []
    per_call = 4
    for start in range(0, len(contexts), per_call):
        group = list(zip(contexts[start : start + per_call], choices[start : start + per_call], strict=True))
        flat = continuation_logprobs(model, tok, [(ctx, c) for ctx, chs in group for c in chs])
        for _, chs in group:
            lps, flat = flat[: len(chs)], flat[len(chs) :]
            out.append(
                {"pick": int(max(range(len(lps)), key=lambda j: lps[j])), "logprobs": [round(x, 4) for x in lps]}
            )
        if progress is not None:
            progress(len(out), len(contexts))
    return out


def model_outputs(model, tok, suite: Suite, *, max_new_tokens: int, progress: Progress | None = None) -> dict[str, Any]:
    """What ``model`` produced on ``suite`` (no judging): cacheable by (model, suite digest, settings).

    Generation suites are answered in batches (:func:`tuneloop.modeling.generate`: the answers of one at a time,
    faster). ``progress(done, total)`` follows the items (general text: its tokens); preference and lm-eval
    suites do not report it.
    """
    from tuneloop.modeling import generate, render_prompt

    if suite.kind == "general_text":
        return token_hits(model, tok, suite.text, progress=progress)
    if suite.kind == "preference":
        from tuneloop.evaluate.preference import preference_outputs

        return preference_outputs(model, tok, suite)
    if suite.kind == "lmeval":
        from tuneloop.evaluate.lmeval import run_model

        return run_model(model, tok, suite.spec)
    if suite.kind == "capability_mc":
        ctx = [f"Question: {it['question']}\nAnswer:" for it in suite.items]
        return {"mc": _mc_pick(model, tok, ctx, [[" " + c for c in it["choices"]] for it in suite.items], progress)}
    if suite.kind == "task" and suite.metric == "mc_loglik":
        ctx = [render_prompt(tok, it["messages"]) for it in suite.items]
        return {"mc": _mc_pick(model, tok, ctx, [it["choices"] for it in suite.items], progress)}
    if suite.kind in ("harmful", "over_refusal"):
        convs = [[{"role": "user", "content": it["prompt"]}] for it in suite.items]
    else:
        convs = [it["messages"] for it in suite.items]
    return {"text": [g["text"] for g in generate(model, tok, convs, max_new_tokens=max_new_tokens, progress=progress)]}


# -------------------------------------------------------------------------------------------- scoring


def task_score(
    metric: str, answer: str, reference: Any, pattern: str | None = None, threshold: float | None = None
) -> float:
    """One item's score: 0/1, except ``token_f1`` (continuous); ``chrf`` passes at chrF >= ``threshold``."""
    if metric == "chrf":
        t = DEFAULT_CHRF_THRESHOLD if threshold is None else threshold
        return float(
            chrf(
                answer,
                reference if isinstance(reference, (list, tuple)) else "" if reference is None else str(reference),
            )
            >= t
        )
    ref = "" if reference is None else str(reference)
    if metric == "exact":
        return float(normalise_answer(answer) == normalise_answer(ref))
    if metric == "contains":
        nr = normalise_answer(ref)
        return float(bool(nr) and nr in normalise_answer(answer))
    if metric == "regex":
        return float(re.search(pattern or ref, answer, re.IGNORECASE) is not None)
    if metric == "token_f1":
        return token_f1(answer, ref)
    raise ValueError(f"unknown metric {metric}")


def _prompt_text(it: dict[str, Any]) -> str:
    if "messages" in it:
        return it["messages"][-1]["content"]
    return it.get("prompt") or it.get("question") or ""


def score_suite(
    suite: Suite, base_out: dict[str, Any], cand_out: dict[str, Any], judge: Judge
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(result for the gates, per-item audit records) of one suite."""
    k = suite.kind
    if k == "lmeval":
        from tuneloop.evaluate.lmeval import score

        return score(suite, base_out, cand_out)
    if k == "preference":
        from tuneloop.evaluate.preference import score_preference

        return score_preference(suite, base_out, cand_out)
    res: dict[str, Any] = {"kind": k, "binary": True, "n": 0, "source": suite.source}
    if k == "general_text":
        return _score_general_text(suite, base_out, cand_out, res)
    if k == "capability_mc" or (k == "task" and suite.metric == "mc_loglik"):
        return _score_choices(suite, base_out, cand_out, res)
    return _score_answers(suite, base_out["text"], cand_out["text"], judge, res)


def _score_general_text(
    suite: Suite, base_out: dict[str, Any], cand_out: dict[str, Any], res: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Next-token hits on held-out text; the audit records are windows of 128 tokens."""
    b, c = base_out["hits"], cand_out["hits"]
    n = min(len(b), len(c))
    res.update(
        base=b[:n],
        candidate=c[:n],
        n=n,
        base_perplexity=base_out.get("perplexity"),
        candidate_perplexity=cand_out.get("perplexity"),
    )
    recs = [
        {
            "suite": suite.name,
            "kind": suite.kind,
            "id": f"tokens-{w}-{min(w + 128, n)}",
            "base_score": sum(b[w : w + 128]) / len(b[w : w + 128]),
            "candidate_score": sum(c[w : w + 128]) / len(c[w : w + 128]),
        }
        for w in range(0, n, 128)
    ]
    return res, recs


def _score_choices(
    suite: Suite, base_out: dict[str, Any], cand_out: dict[str, Any], res: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Multiple choice by log-likelihood: 1 when the most likely choice is the answer."""
    bs = [float(o["pick"] == it["answer"]) for o, it in zip(base_out["mc"], suite.items, strict=True)]
    cs = [float(o["pick"] == it["answer"]) for o, it in zip(cand_out["mc"], suite.items, strict=True)]
    res.update(base=bs, candidate=cs, n=len(bs))
    recs = []
    for it, bo, co, b1, c1 in zip(suite.items, base_out["mc"], cand_out["mc"], bs, cs, strict=True):
        p = _prompt_text(it)
        recs.append(
            {
                "suite": suite.name,
                "kind": suite.kind,
                "id": it["id"],
                "prompt_sha256": prompt_sha256(p),
                "prompt": p,
                "choices": it["choices"],
                "answer": it["answer"],
                "base": it["choices"][bo["pick"]],
                "candidate": it["choices"][co["pick"]],
                "base_logprobs": bo["logprobs"],
                "candidate_logprobs": co["logprobs"],
                "base_score": b1,
                "candidate_score": c1,
            }
        )
    return res, recs


def _score_answers(
    suite: Suite, bt: list[str], ct: list[str], judge: Judge, res: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generated answers, scored per item by the suite's metric or the judge."""
    k = suite.kind
    bs, cs, extra, recs = [], [], [], []
    for it, ba, ca in zip(suite.items, bt, ct, strict=True):
        p = _prompt_text(it)
        b1, c1, e = _score_item(suite, judge, it, p, ba, ca)
        bs.append(b1)
        cs.append(c1)
        extra.append(e)
        recs.append(
            {
                "suite": suite.name,
                "kind": k,
                "id": it["id"],
                "line": it.get("line"),
                "prompt_sha256": prompt_sha256(p),
                "prompt": p,
                **e,
                "base": ba,
                "candidate": ca,
                "base_score": b1,
                "candidate_score": c1,
            }
        )
    res.update(base=bs, candidate=cs, n=len(bs), binary=not (k == "win_rate" or suite.metric == "token_f1"))
    if k == "harmful":
        res["base_refusal_rate"] = sum(e["base_refused"] for e in extra) / len(extra) if extra else 0.0
        res["candidate_refusal_rate"] = sum(e["candidate_refused"] for e in extra) / len(extra) if extra else 0.0
    if k == "task":
        label = suite.metric_label or suite.metric
        res["metric"] = label
        if suite.metric == "chrf":
            res["threshold"] = suite.threshold
            label += f" >= {suite.threshold:g}"
        if suite.metric_reason:
            res["metric_reason"] = suite.metric_reason
        res["metric_name"] = (
            "token_f1" if suite.metric == "token_f1" else "accuracy" if label == "exact" else f"accuracy ({label})"
        )
    return res, recs


def _score_item(
    suite: Suite, judge: Judge, it: dict[str, Any], p: str, ba: str, ca: str
) -> tuple[float, float, dict[str, Any]]:
    """(base score, candidate score, what the audit record shows beside them) of one generated item."""
    k = suite.kind
    if k == "task":
        b1 = task_score(suite.metric, ba, it["reference"], suite.pattern, suite.threshold)
        c1 = task_score(suite.metric, ca, it["reference"], suite.pattern, suite.threshold)
        e: dict[str, Any] = {"reference": it["reference"]}
        if suite.metric == "chrf":  # the continuous score behind the 0/1 outcome
            ref = it["reference"] if isinstance(it["reference"], (list, tuple)) else str(it["reference"] or "")
            e.update(
                metric="chrf",
                threshold=suite.threshold,
                base_chrf=round(chrf(ba, ref), 4),
                candidate_chrf=round(chrf(ca, ref), 4),
            )
        return b1, c1, e
    if k == "harmful":
        b1, c1 = float(judge.harmful(p, ba, it["indicators"])), float(judge.harmful(p, ca, it["indicators"]))
        return b1, c1, {"base_refused": judge.refused(p, ba), "candidate_refused": judge.refused(p, ca)}
    if k == "over_refusal":
        return float(judge.refused(p, ba)), float(judge.refused(p, ca)), {}
    if k == "win_rate":
        c1, orders = pairwise_score(judge, p, ca, ba, it.get("reference"))
        return 1.0 - c1, c1, {"reference": it.get("reference"), "orders": orders}
    raise ValueError(k)
