"""Held-out pairwise accuracy of a reward model: what a ``train.objective: reward`` run is evaluated and gated on.

Entry point: :func:`evaluate_reward_model` -> ``(metrics, gates)``; the evaluation stage calls it instead of
:func:`tuneloop.evaluate.evaluation.evaluate_candidate` for a reward run (the objective's ``evaluates`` is
``reward``). :func:`reward_champion` is the reference under ``gates.against: champion``.

A pair (prompt, chosen, rejected) of the run's held-out preference records counts as right when the model scores
the chosen answer above the rejected one (a tie counts as wrong). ``gates.min_reward_accuracy`` is a floor on that
share, decided on its confidence interval (Wilson, or Clopper-Pearson with ``gates.interval``) as every floor is.

A reward model generates nothing, so the task, safety, over-refusal, capability, win-rate and preference
(log-likelihood) gates cannot be measured on it: each one with a threshold is reported ``NOT_APPLIED`` with the
reason (:func:`tuneloop.evaluate.gates.not_applicable`), never passed; the eval suites are not run.

A reference accuracy is reported only where it means something. The base model is a causal LM in the usual case:
its score head would be new and random, so its accuracy says nothing and is not measured (the metrics say so). A
base that is itself a reward model (a sequence-classification model with one output) is measured on the same
pairs, and so is the registry's champion under ``gates.against: champion`` when it is a reward model. The reference
is reported, not gated.

Writes ``items.jsonl`` (one audit record per pair: id, prompt sha256, both answers, both scores, right or not).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig
from tuneloop.errors import InputError, TuneloopError
from tuneloop.evaluate.audit import prompt_sha256
from tuneloop.evaluate.evaluation import ModelRef, registry_model_ref
from tuneloop.evaluate.gates import GateResult, check_gates, not_applicable
from tuneloop.evaluate.preference import load_pairs
from tuneloop.evaluate.stats import mean
from tuneloop.fsutil import atomic_write_text
from tuneloop.train.reward import RewardModel, load_reward_model, reward_dir_problem

KIND = "reward"
NOT_APPLICABLE = (
    "train.objective is reward: a reward model scores answers and generates none, so this gate cannot be "
    "measured on it; not applicable (min_reward_accuracy decides)"
)


def evaluate_reward_model(
    cfg: PipelineConfig,
    pairs_path: Path,
    model_dir: Path | str,
    out_dir: Path,
    *,
    reference: ModelRef | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, GateResult]]:
    """Score the held-out pairs in ``pairs_path`` (the preprocessing stage's ``eval_records.jsonl``, at most
    ``eval.max_eval_samples``) with the trained reward model in ``model_dir`` and, where meaningful, with a
    reference (``reference``: a champion reward model; else the base when it is a reward model); return
    (metrics, gates)."""
    say = progress or (lambda _msg: None)
    items = load_pairs(Path(pairs_path), max_items=cfg.eval.max_eval_samples)
    if not items:
        raise InputError(
            f"no held-out preference pairs in {pairs_path}; add data.eval_data or more training pairs (data.eval_split)"
        )
    say("candidate reward model")
    cand = pair_scores(load_reward_model(model_dir, base_model=cfg.base_model, max_length=cfg.data.max_length), items)
    ref_label, ref_scores, note = reference_scores(cfg, reference, items, say)

    right = [float(c > r) for c, r in cand]
    result: dict[str, Any] = {
        "kind": KIND,
        "binary": True,
        "n": len(items),
        "source": str(pairs_path),
        "candidate": right,
        "candidate_margin": mean([c - r for c, r in cand]),
    }
    gates = check_gates(cfg, {KIND: result}, seed=cfg.seed)
    gates.update(not_applicable(cfg, NOT_APPLICABLE, kinds=(KIND,)))
    metrics: dict[str, Any] = {
        "reward_accuracy": _r(mean(right)),
        "reward_pairs": len(items),
        "reward_margin": _r(result["candidate_margin"], 4),
        "reward_ties": sum(c == r for c, r in cand),
        "reward_chosen_mean": _r(mean([c for c, _ in cand]), 4),
        "reward_rejected_mean": _r(mean([r for _, r in cand]), 4),
        "against": ref_label,
    }
    if ref_scores is not None:
        metrics.update(
            reference_reward_accuracy=_r(mean([float(c > r) for c, r in ref_scores])),
            reference_reward_margin=_r(mean([c - r for c, r in ref_scores]), 4),
        )
    if note:
        metrics["reference_note"] = note
    metrics["gate_verdicts"] = {name: g.verdict for name, g in gates.items()}

    records = []
    for i, (it, (c, r)) in enumerate(zip(items, cand, strict=True)):
        text = it["prompt"][-1]["content"]
        rec = {
            "suite": KIND,
            "kind": KIND,
            "id": it["id"],
            "line": it.get("line"),
            "prompt_sha256": prompt_sha256(text),
            "prompt": text,
            "chosen": it["chosen"][-1]["content"],
            "rejected": it["rejected"][-1]["content"],
            "candidate_scores": [round(c, 6), round(r, 6)],
            "candidate_score": right[i],
        }
        if ref_scores is not None:
            rec["reference_scores"] = [round(ref_scores[i][0], 6), round(ref_scores[i][1], 6)]
        records.append(rec)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / "items.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records))
    return metrics, gates


def pair_scores(model: RewardModel, items: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(score of the chosen answer, score of the rejected one) per pair, scored in one batched pass."""
    prompts = [it["prompt"] for it in items]
    scores = model.score(prompts + prompts, [it["chosen"] for it in items] + [it["rejected"] for it in items])
    return list(zip(scores[: len(items)], scores[len(items) :], strict=True))


def reference_scores(
    cfg: PipelineConfig, reference: ModelRef | None, items: list[dict[str, Any]], say: Callable[[str], None]
) -> tuple[str | None, list[tuple[float, float]] | None, str]:
    """(label, pair scores, note) of the reference where one means something: ``reference`` (a champion reward
    model), else the base when it is a reward model itself; else (None, None, why none is measured)."""
    if reference is not None:
        say(f"{reference.label} reward model")
        if reference.adapter:
            model = load_reward_model(reference.adapter, base_model=reference.path, max_length=cfg.data.max_length)
        else:
            model = load_reward_model(reference.path, max_length=cfg.data.max_length)
        return reference.label, pair_scores(model, items), ""
    base = cfg.base_model
    if Path(base).is_dir() and reward_dir_problem(Path(base)) is None:
        say("base reward model")
        return "base", pair_scores(load_reward_model(base, max_length=cfg.data.max_length), items), ""
    return (
        None,
        None,
        (
            f"no reference accuracy: the base model {Path(base).name or base} is not a reward model, so its score head "
            "would be new and random and its accuracy would say nothing; the floor min_reward_accuracy decides alone"
        ),
    )


def reward_champion(cfg: PipelineConfig, registry: Any) -> tuple[ModelRef | None, str]:
    """The ``champion`` of ``cfg.model_name`` as the reference when it is a reward model (lineage ``kind: reward``),
    else (None, why not)."""
    try:
        version = registry.get(cfg.model_name, "champion")
    except TuneloopError:
        return None, f"no champion of {cfg.model_name} in the registry yet: no reference accuracy"
    if (version.lineage or {}).get("kind") != KIND:
        return (
            None,
            f"the champion {version.ref} is not a reward model (no `kind: reward` in its lineage): no reference accuracy",
        )
    return registry_model_ref(cfg, registry, cfg.model_name, version.version, "champion"), ""


def _r(x: float | None, nd: int = 6) -> float | None:
    return round(x, nd) if x is not None else None
