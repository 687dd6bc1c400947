"""Preference accuracy on held-out pairs: what a DPO run is gated on.

A pair is (prompt, chosen, rejected). A model *prefers* the chosen answer when its log-likelihood of the
chosen answer after the prompt is higher than that of the rejected one. The log-likelihood is the **sum** over
the answer's tokens (not length-normalised): that is the sequence probability DPO's loss moves (its implicit
reward is ``beta * (log pi(y|x) - log pi_ref(y|x))`` with sequence sums), so the gated accuracy measures what
the training optimised. A length-normalised accuracy (mean log-probability per token) is reported beside it,
not gated, to show when a verdict rests on answer length. Ties count as not preferred.

Each answer is scored the way TRL's DPO trainer tokenizes it: the prompt rendered with the chat template and
the generation prompt, the answer as the rest of the rendered conversation (so the end-of-turn token counts),
prompt and answer tokenized apart and concatenated, and cut to ``data.max_length`` (the answer keeps its
start, the prompt its end), as in training.

Entry points: :func:`load_pairs` (the suite is built by :func:`tuneloop.evaluate.suites.preference_suite`), :func:`preference_outputs` (per model; cacheable),
:func:`score_preference` (per-item 0/1 outcomes of base and candidate for the gates, margins, audit records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneloop.errors import InputError
from tuneloop.evaluate.audit import prompt_sha256
from tuneloop.evaluate.stats import mean
from tuneloop.fsutil import iter_jsonl, sha256_json

KIND = "preference"


def _messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and "content" in value:
        return [{"role": value.get("role", role), "content": str(value["content"])}]
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", role), "content": str(m["content"])} for m in value]
    raise ValueError(f"expected a string or chat messages, got {type(value).__name__}")


def pair_item(rec: dict[str, Any], i: int, where: str) -> dict[str, Any]:
    """One held-out pair from a canonical preference record (``messages``/``chosen``/``rejected``, as data
    validation writes them) or the simple shape (``prompt``/``chosen``/``rejected`` strings)."""
    try:
        prompt = _messages(rec["messages"] if "messages" in rec else rec["prompt"], "user")
        chosen, rejected = _messages(rec["chosen"], "assistant"), _messages(rec["rejected"], "assistant")
    except (KeyError, ValueError) as exc:
        raise InputError(
            f"{where}:{rec.get('_line', rec.get('line', i + 1))}: a preference pair needs a prompt "
            f"(`messages` or `prompt`), `chosen` and `rejected` ({exc})"
        ) from None
    return {
        "id": str(rec.get("id", f"pair-{i}")),
        "line": rec.get("_line", rec.get("line")),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
    }


def load_pairs(path: Path, *, max_items: int | None = None) -> list[dict[str, Any]]:
    """The held-out pairs in ``path`` (JSONL), normalised by :func:`pair_item`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"preference pairs not found: {p}")
    items = [pair_item(rec, n - 1, str(p)) for n, rec in iter_jsonl(p, "a preference-pairs file")]
    return items[:max_items] if max_items else items


def pairs_digest(items: list[dict[str, Any]], max_length: int) -> str:
    return sha256_json(
        {
            "kind": KIND,
            "items": [{k: v for k, v in it.items() if k != "line"} for it in items],
            "max_length": max_length,
        }
    )


def _answer_text(tok, prompt: list[dict[str, str]], answer: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt text with the generation prompt, the rest of the rendered conversation: the answer turn)."""
    ctx = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + answer, tokenize=False)
    if full.startswith(ctx):
        return ctx, full[len(ctx) :]
    return ctx, "".join(m["content"] for m in answer)


@torch.inference_mode()
def answer_logprob(
    model, tok, prompt: list[dict[str, str]], answer: list[dict[str, str]], max_length: int
) -> tuple[float, int]:
    """(sum of log-probabilities of the answer's tokens after the prompt, number of those tokens)."""
    ctx, cont = _answer_text(tok, prompt, answer)
    c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    x_ids = tok(cont, add_special_tokens=False)["input_ids"][: max(max_length - 1, 1)]
    if not x_ids:
        return float("-inf"), 0
    c_ids = c_ids[-max(max_length - len(x_ids), 1) :]
    device = next(model.parameters()).device
    ids = torch.tensor([c_ids + x_ids], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
    n = len(x_ids)
    return float(logp[-n:].gather(1, ids[0, -n:, None]).sum()), n


def preference_outputs(model, tok, suite) -> dict[str, Any]:
    """Per pair: summed log-likelihood and token count of the chosen and of the rejected answer."""
    out = []
    for it in suite.items:
        lc, nc = answer_logprob(model, tok, it["prompt"], it["chosen"], suite.max_length)
        lr, nr = answer_logprob(model, tok, it["prompt"], it["rejected"], suite.max_length)
        out.append({"chosen": lc, "rejected": lr, "chosen_tokens": nc, "rejected_tokens": nr})
    return {"pairs": out}


def _prefers(p: dict[str, Any], normalised: bool = False) -> float:
    if normalised:
        return float(p["chosen"] / max(p["chosen_tokens"], 1) > p["rejected"] / max(p["rejected_tokens"], 1))
    return float(p["chosen"] > p["rejected"])


def score_preference(
    suite, base_out: dict[str, Any], cand_out: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-item 0/1 'prefers the chosen answer' of base and candidate (the gates' input), mean margins in nats
    (log-likelihood of chosen minus rejected), the length-normalised accuracies, and one audit record per pair."""
    bp, cp = base_out["pairs"], cand_out["pairs"]
    bs, cs = [_prefers(p) for p in bp], [_prefers(p) for p in cp]
    b_margin, c_margin = [p["chosen"] - p["rejected"] for p in bp], [p["chosen"] - p["rejected"] for p in cp]
    res = {
        "kind": KIND,
        "binary": True,
        "n": len(cs),
        "source": suite.source,
        "base": bs,
        "candidate": cs,
        "base_margin": mean(b_margin),
        "candidate_margin": mean(c_margin),
        "base_accuracy_norm": mean([_prefers(p, True) for p in bp]),
        "candidate_accuracy_norm": mean([_prefers(p, True) for p in cp]),
        "loglik": "sum over answer tokens (not length-normalised)",
    }
    recs = []
    for it, b, c, b1, c1 in zip(suite.items, bp, cp, bs, cs, strict=True):
        text = it["prompt"][-1]["content"]
        recs.append(
            {
                "suite": suite.name,
                "kind": KIND,
                "id": it["id"],
                "line": it.get("line"),
                "prompt_sha256": prompt_sha256(text),
                "prompt": text,
                "chosen": it["chosen"][-1]["content"],
                "rejected": it["rejected"][-1]["content"],
                "base_logprobs": [round(b["chosen"], 4), round(b["rejected"], 4)],
                "candidate_logprobs": [round(c["chosen"], 4), round(c["rejected"], 4)],
                "tokens": [c["chosen_tokens"], c["rejected_tokens"]],
                "base_score": b1,
                "candidate_score": c1,
            }
        )
    return res, recs
