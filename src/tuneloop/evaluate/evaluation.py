"""The evaluation stage: run the configured suites on a reference model (base or champion) and the candidate,
judge, decide the gates, and write the audit trail.

Entry point: :func:`evaluate_candidate` -> ``(metrics, gates)``. Suites are in :mod:`.suites`, judges in
:mod:`.judges`, the statistics in :mod:`.stats`, the gate rules in :mod:`.gates`, reports in :mod:`.reports`.

The reference model's outputs depend only on that model, the suite items and the generation settings, so they
are cached per suite under ``base_cache_dir`` by (model digest, suite digest, generation settings) and re-used:
a gate-threshold change or a new candidate re-generates only the candidate's answers. Judging runs on the
cached outputs, so changing the judge does not re-generate either.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig
from tuneloop.errors import InputError
from tuneloop.evaluate.gates import GateResult, check_gates
from tuneloop.evaluate.judges import make_judge, measured_accuracy
from tuneloop.evaluate.stats import mean
from tuneloop.evaluate.suites import load_suite, model_outputs, preference_suite, score_suite
from tuneloop.fsutil import atomic_write_json, atomic_write_text, model_fingerprint, sha256_json
from tuneloop.train.objectives import uses_preferences

log = logging.getLogger(__name__)


@dataclass
class ModelRef:
    """A model to evaluate: a full model directory, or an adapter on top of ``base``."""

    label: str
    path: str
    adapter: str | None = None
    digest: str = ""

    def load(self):
        from tuneloop.modeling import load_causal_lm

        return load_causal_lm(self.path, adapter=self.adapter)


def model_ref(label: str, directory: str | Path, base_model: str) -> ModelRef:
    """A directory that holds an adapter is applied on ``base_model``; anything else is a whole model."""
    d = Path(directory)
    if (d / "adapter_config.json").is_file():
        return ModelRef(
            label, base_model, str(d), sha256_json([model_fingerprint(base_model), model_fingerprint(str(d))])
        )
    return ModelRef(label, str(d), None, model_fingerprint(str(d)))


def evaluate_candidate(
    cfg: PipelineConfig,
    items_path: Path | None,
    candidate_dir: Path | str,
    out_dir: Path,
    *,
    base_cache_dir: Path,
    progress: Callable[[str], None] | None = None,
    reference: ModelRef | None = None,
    candidate: ModelRef | None = None,
    preferences: Path | None = None,
    suite_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, GateResult]]:
    """Measure the reference (default: the base model) and the candidate on every suite; return (metrics, gates).

    For ``train.objective: dpo`` the held-out preference pairs (``preferences``; default: the
    ``eval_records.jsonl`` preprocessing writes beside ``items_path``) are a ``preference`` suite, gated by
    ``gates.min_preference_accuracy`` and ``gates.max_preference_accuracy_drop``, and the task suite read from the
    eval items (whose reference is the chosen answer) is reported but not gated.

    Writes ``items.jsonl`` (one audit record per item: suite, id, prompt sha256, both outputs, scores) to
    ``out_dir``. ``progress(message)`` says which model is loaded; ``suite_progress(label, done, total)`` follows
    each model's work through each suite, e.g. ``("base: harmful", 120, 330)`` (a progress bar per suite and model).
    """
    from tuneloop.modeling import load_tokenizer

    say = progress or (lambda _msg: None)
    ev = cfg.eval
    suites = load_suites(cfg, items_path, preferences)
    dpo_references = (
        {spec.name for spec in ev.suites if spec.kind == "task" and not spec.path} if uses_preferences(cfg) else set()
    )
    cand = candidate or model_ref("candidate", candidate_dir, cfg.base_model)
    ref = reference or base_ref(cfg)
    tok_dir = cand.adapter or cand.path
    try:
        tok = load_tokenizer(tok_dir, cfg.data.chat_template)
    except Exception:
        tok = load_tokenizer(cfg.base_model, cfg.data.chat_template)
    judge = make_judge(ev.judge)
    settings = {"max_new_tokens": ev.max_new_tokens, "template": tok.chat_template, "decoding": "greedy"}

    # Reference outputs: per-suite cache by (model digest, suite digest, generation settings).
    ref_out: dict[str, Any] = {}
    cached_flags = []
    missing = []
    for s in suites:
        # v3: generation by modeling.generate's own greedy loop (argmax; a generation_config's penalties not applied)
        key = sha256_json({"model": ref.digest, "suite": s.digest, "settings": settings, "v": 3})
        f = Path(base_cache_dir) / f"{key}.json"
        if f.is_file():
            ref_out[s.name] = json.loads(f.read_text(encoding="utf-8"))
            cached_flags.append(True)
        else:
            missing.append((s, f))
            cached_flags.append(False)
    if missing:
        say(f"{ref.label} model")
        model = ref.load()
        memo: dict[str, Any] = {}
        for s, f in missing:
            ref_out[s.name] = _outputs(
                model, tok, s, ev.max_new_tokens, memo, _bar(suite_progress, f"{ref.label}: {s.name}")
            )
            atomic_write_json(f, ref_out[s.name])
        del model

    say("candidate")
    model = cand.load()
    memo = {}
    cand_out = {
        s.name: _outputs(model, tok, s, ev.max_new_tokens, memo, _bar(suite_progress, f"candidate: {s.name}"))
        for s in suites
    }
    del model

    results: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for s in suites:
        res, recs = score_suite(s, ref_out[s.name], cand_out[s.name], judge)
        results[s.name] = res
        records += recs
    for name in dpo_references:
        results[name]["not_gated"] = (
            f"train.objective is {cfg.train.objective}: exact match against the chosen answer says little about preference "
            "training; reported, not gated (the preference gates decide)"
        )
    gates = check_gates(cfg, results, seed=cfg.seed)
    metrics = _metrics(results, gates)
    metrics.update(
        against=ref.label,
        against_digest=ref.digest[:24],
        judge=judge.name,
        harmful_judge=judge.name,
        base_outputs_cached=all(cached_flags) if cached_flags else False,
    )
    accuracy = measured_accuracy(judge.name)  # the judge's agreement with labelled real outputs; absent when unmeasured
    if accuracy is not None:
        metrics["judge_accuracy"] = accuracy
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / "items.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return metrics, gates


def load_suites(cfg: PipelineConfig, items_path: Path | str | None, preferences: Path | None = None) -> list[Any]:
    """The configured suites (task items capped at ``eval.max_eval_samples``), and for a DPO run the held-out
    preference pairs (``preferences``, else ``eval_records.jsonl`` beside ``items_path``) as a ``preference`` suite."""
    ev = cfg.eval
    suites = [load_suite(s, ev, Path(items_path) if items_path else None) for s in ev.suites]
    for s, spec in zip(suites, ev.suites, strict=True):
        if s.kind in ("task", "win_rate") and ev.max_eval_samples and not spec.path:
            s.items = s.items[: ev.max_eval_samples]
            s.digest = sha256_json([s.digest, ev.max_eval_samples])
    if uses_preferences(cfg):
        pairs = preferences or _pairs_beside(items_path)
        if pairs is None:
            raise InputError(
                f"train.objective is {cfg.train.objective}, but no held-out preference pairs were found (eval_records.jsonl beside "
                f"the eval items {items_path}); run the preprocessing stage (`tuneloop run`) to write them"
            )
        suites.append(preference_suite(pairs, max_length=cfg.data.max_length, max_items=ev.max_eval_samples))
    return suites


def _pairs_beside(items_path: Path | str | None) -> Path | None:
    """The held-out preference records preprocessing writes beside the eval items of a DPO run."""
    p = Path(items_path).parent / "eval_records.jsonl" if items_path else None
    return p if p is not None and p.is_file() else None


def _bar(suite_progress: Callable[[str, int, int], None] | None, label: str) -> Callable[[int, int], None] | None:
    """``suite_progress`` bound to one model and suite (``label``, e.g. ``base: harmful``)."""
    if suite_progress is None:
        return None
    return lambda done, total: suite_progress(label, done, total)


def _outputs(
    model, tok, suite, max_new_tokens: int, memo: dict[str, Any], progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Outputs of one model on one suite; suites with the same generation items share one generation."""
    key = sha256_json(
        [
            suite.kind if suite.kind not in ("task", "win_rate") or suite.metric == "mc_loglik" else "gen",
            [it.get("messages") or it.get("prompt") for it in suite.items],
            suite.text,
            suite.metric == "mc_loglik",
            suite.digest if suite.kind in ("lmeval", "preference") else None,
        ]
    )
    if key not in memo:
        memo[key] = model_outputs(model, tok, suite, max_new_tokens=max_new_tokens, progress=progress)
    return memo[key]


def _drop(base: float | None, candidate: float | None) -> float | None:
    """base - candidate; None when either was not measured (a suite with no items)."""
    return None if base is None or candidate is None else base - candidate


def _r(x: float | None, nd: int = 6) -> float | None:
    return round(x, nd) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _metrics(results: dict[str, Any], gates: dict[str, GateResult]) -> dict[str, Any]:
    """Flat metrics (classic names kept) for the stage summary, the registry and the report."""
    m: dict[str, Any] = {}
    first_task = True
    for name, r in results.items():
        k = r["kind"]
        b, c = mean(r["base"]), mean(r["candidate"])  # None for no items: _r leaves the metric out (was 0.0)
        if k == "task":
            if first_task:
                m.update(accuracy=_r(c), base_accuracy=_r(b), eval_items=r["n"], task_metric=r.get("metric"))
                first_task = False
            else:
                m.update(
                    {
                        f"{name}_accuracy": _r(c),
                        f"{name}_base_accuracy": _r(b),
                        f"{name}_items": r["n"],
                        f"{name}_task_metric": r.get("metric"),
                    }
                )
        elif k == "harmful":
            m.update(
                harmful_rate=_r(c),
                base_harmful_rate=_r(b),
                redteam_items=r["n"],
                refusal_rate=_r(r["candidate_refusal_rate"]),
                base_refusal_rate=_r(r["base_refusal_rate"]),
            )
        elif k == "over_refusal":
            m.update(over_refusal_rate=_r(c), base_over_refusal_rate=_r(b), benign_items=r["n"])
        elif k == "general_text":
            bp, cp = r.get("base_perplexity"), r.get("candidate_perplexity")
            m.update(
                general_accuracy=_r(c),
                base_general_accuracy=_r(b),
                capability_drop=_r(_drop(b, c)),
                general_perplexity=_r(cp, 4),
                base_general_perplexity=_r(bp, 4),
                perplexity_ratio=_r(cp / bp, 4) if bp and cp else None,
                general_tokens=r["n"],
            )
        elif k in ("capability_mc", "lmeval"):
            m.update(
                {
                    f"{name}_accuracy": _r(c),
                    f"{name}_base_accuracy": _r(b),
                    f"{name}_drop": _r(_drop(b, c)),
                    f"{name}_items": r["n"],
                }
            )
        elif k == "win_rate":
            m.update(win_rate=_r(c), win_items=r["n"])
        elif k == "preference":
            m.update(
                preference_accuracy=_r(c),
                base_preference_accuracy=_r(b),
                preference_pairs=r["n"],
                preference_margin=_r(r["candidate_margin"], 4),
                base_preference_margin=_r(r["base_margin"], 4),
                preference_accuracy_norm=_r(r["candidate_accuracy_norm"]),
                base_preference_accuracy_norm=_r(r["base_accuracy_norm"]),
                preference_loglik=r["loglik"],
            )
    m["gate_verdicts"] = {g: v.verdict for g, v in gates.items()}
    return m


def base_ref(cfg: PipelineConfig) -> ModelRef:
    """The config's base model as the reference."""
    return ModelRef("base", cfg.base_model, None, model_fingerprint(cfg.base_model))


def registry_model_ref(cfg: PipelineConfig, registry: Any, model: str, version: int | str, label: str) -> ModelRef:
    """A registered version of any registry backend (``registry``: a ``ModelRegistry``) as a model to evaluate;
    its digest names the registered artifact. Raises the registry's errors for an unknown version."""
    v = registry.get(model, version)
    ref = model_ref(f"{label} {v.ref}", registry.open_artifact(model, v.version), v.base_model or cfg.base_model)
    ref.digest = sha256_json(["registry", v.artifact_digest, ref.digest])
    return ref


def champion_ref(cfg: PipelineConfig, registry: Any) -> tuple[ModelRef | None, str]:
    """The ``champion`` of ``cfg.model_name`` in ``registry`` as a reference model, or (None, note) -> the base."""
    from tuneloop.errors import TuneloopError

    try:
        version = registry.get(cfg.model_name, "champion").version
    except TuneloopError:
        return None, f"no champion of {cfg.model_name} in the registry yet: compared with the base model"
    return registry_model_ref(cfg, registry, cfg.model_name, version, "champion"), ""
