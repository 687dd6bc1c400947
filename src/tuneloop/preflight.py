"""What a run checks before any work is done (``tuneloop run``'s preflight; ``tuneloop data validate`` and
``tuneloop eval`` use the gate part).

Entry points: :func:`preflight_report` (problems that stop the run with exit 2, and warnings) and
:func:`preflight_problems`; :func:`gate_decidability` and :func:`suite_sizes`: whether each evaluation gate can be
decided at the size its suite will have, known from the config and the data before anything is trained. The
rest are the single checks: paths, the vLLM and QLoRA requirements, trackers, precision, and the inputs of the
chosen objective and backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig, path_values
from tuneloop.errors import StageError
from tuneloop.train.objectives import data_problems, objective_of, uses_preferences


def _path_problems(cfg: PipelineConfig) -> list[str]:
    from tuneloop.data.sources import source_problem

    problems = []
    for key, value in path_values(cfg):
        if not value:
            continue
        if key.startswith("data."):
            if problem := source_problem(value):
                problems.append(f"{key}: {problem}")
        elif not Path(value).is_file():
            problems.append(
                f"{key}: file not found: {value}; check the path (relative paths are resolved against the config's directory)"
            )
    return problems


def _vllm_problems(cfg: PipelineConfig) -> list[str]:
    """``train.use_vllm``: only for grpo, and only where CUDA and the vllm package are present."""
    if not cfg.train.use_vllm:
        return []
    if cfg.train.objective != "grpo":
        return [
            f"train.use_vllm: generates GRPO's completions; train.objective is {cfg.train.objective}, which generates "
            "none; remove it"
        ]
    import importlib.util

    import torch

    problems = []
    if not torch.cuda.is_available():
        problems.append(
            "train.use_vllm: needs a CUDA GPU (vLLM runs on it next to training), and none is available here; "
            "set train.use_vllm: false to generate with transformers"
        )
    if importlib.util.find_spec("vllm") is None:
        problems.append("train.use_vllm: the vllm package is not installed (pip install vllm, on the GPU machine)")
    return problems


def _qlora_problems(cfg: PipelineConfig) -> list[str]:
    if cfg.train.method != "qlora":
        return []
    from tuneloop.modeling import require_cuda_for_qlora

    try:
        require_cuda_for_qlora()
    except StageError as exc:
        return [f"train.method: {exc}"]
    return []


def _tracker_problems(cfg: PipelineConfig) -> list[str]:
    import importlib.util

    tracker = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}.get(
        cfg.train.report_to
    )
    if tracker and not any(importlib.util.find_spec(m) for m in tracker):
        return [
            f"train.report_to: {cfg.train.report_to} is not installed; `pip install {tracker[0]}` or set train.report_to: none"
        ]
    return []


def _precision_problems(cfg: PipelineConfig) -> list[str]:
    if cfg.train.precision not in ("bf16", "fp16"):
        return []
    from tuneloop.train.sft import precision_problem

    problem = precision_problem(cfg.train.precision)
    return [problem] if problem else []


def _count_records(source: Any, limit: int | None = None) -> int:
    """Readable records of a data source (format detected, nothing parsed or validated), up to ``limit``."""
    from tuneloop.data.sources import open_detected

    items, _, _ = open_detected(source)
    n = 0
    for item in items:
        if item.kind != 2:
            n += 1
            if limit is not None and n >= limit:
                break
    return n


def _eval_record_count(cfg: PipelineConfig, cap: int | None) -> tuple[int, str]:
    """(eval records, where they come from): ``data.eval_data``'s records, else the ``eval_split`` share of the
    training records that preprocessing holds out; at most ``cap``."""
    d = cfg.data
    if d.eval_data:
        return _count_records(d.eval_data, cap), "data.eval_data / eval.max_eval_samples"
    limit = math.ceil(cap / d.eval_split) + 2 if cap else None
    n_train = _count_records(d.train_sources if isinstance(d.train_data, list) else d.train_data, limit)
    n_eval = max(1, round(n_train * d.eval_split))
    n_eval = 0 if n_train - n_eval < 1 else n_eval
    return (
        min(n_eval, cap) if cap else n_eval
    ), f"data.eval_data, or data.eval_split ({d.eval_split:g} of the training records held out)"


def suite_sizes(cfg: PipelineConfig) -> dict[str, Any]:
    """How many items each configured suite will have, before any work (for :func:`tuneloop.evaluate.gates.decidability`).

    Task and win-rate items: ``path``'s records, else the eval data's records, else the ``eval_split`` share of
    the training records, capped by ``max_items`` / ``eval.max_eval_samples``: records counted, not validated,
    so an upper bound (data validation may drop some; fewer items only make a gate harder to decide). DPO runs
    add the held-out pairs (``preference``). Shipped or configured red-team, benign and multiple-choice suites:
    their items. General text: its tokens with the base model's tokenizer (loaded, not the model). A size that
    cannot be known cheaply (an ``lmeval`` suite, a tokenizer that does not load) is ``None`` with a note.
    A reward model runs no suite: its only size is the held-out pairs (``reward``, gated by ``min_reward_accuracy``).
    """
    from tuneloop.evaluate.gates import SuiteSize
    from tuneloop.evaluate.suites import load_suite

    ev = cfg.eval
    if objective_of(cfg).evaluates == "reward":
        try:
            n, grow = _eval_record_count(cfg, ev.max_eval_samples)
            return {"reward": SuiteSize("reward", n, grow, unit="pairs")}
        except Exception as exc:
            return {
                "reward": SuiteSize(
                    "reward",
                    None,
                    note=f"cannot count the held-out pairs before the run ({type(exc).__name__}: {str(exc)[:200]})",
                )
            }
    sizes: dict[str, SuiteSize] = {}
    dpo = uses_preferences(cfg)
    eval_count: tuple[int, str] | None = None
    tokenizer: list[Any] = []  # loaded once, on first use

    def tok() -> Any:
        if not tokenizer:
            from tuneloop.modeling import load_tokenizer

            # from the local cache only: a check before any work never waits on the network (offline, a hub id's
            # lookups retried for ~46 s before a bad config could exit 2)
            tokenizer.append(load_tokenizer(cfg.base_model, cfg.data.chat_template, local_files_only=True))
        return tokenizer[0]

    for spec in ev.suites:
        kind = spec.kind
        grow = {
            "harmful": "eval.redteam_prompts / eval.suites[].path",
            "over_refusal": "eval.benign_prompts / eval.suites[].path",
            "general_text": "eval.general_text / eval.suites[].path",
            "capability_mc": "eval.mc_suite / eval.suites[].path",
        }.get(kind, "eval.suites[].path")
        try:
            if kind == "lmeval":
                sizes[spec.name] = SuiteSize(
                    kind, None, note="an lm-eval suite's items are counted when its tasks load"
                )
                continue
            if kind in ("task", "win_rate") and not spec.path:
                cap = min((c for c in (spec.max_items, ev.max_eval_samples) if c), default=None)
                n, grow = _eval_record_count(cfg, cap)
                eval_count = eval_count or _eval_record_count(cfg, ev.max_eval_samples)
                size = SuiteSize(kind, n, grow, binary=spec.metric != "token_f1", gated=not (dpo and kind == "task"))
                if kind == "task" and cfg.data.eval_data and spec.metric in ("auto", "chrf"):
                    size = _cut_references(size, spec, _eval_references(cfg.data.eval_data, n), ev.max_new_tokens, tok)
                sizes[spec.name] = size
                continue
            suite = load_suite(spec, ev, None)
            if kind == "general_text":
                n = max(len(tok()(suite.text, add_special_tokens=False, verbose=False)["input_ids"]) - 1, 0)
                sizes[spec.name] = SuiteSize(kind, n, grow, unit="tokens")
            else:
                size = SuiteSize(kind, len(suite.items), grow, binary=spec.metric != "token_f1")
                if kind == "task" and spec.metric in ("auto", "chrf"):
                    size = _cut_references(size, spec, [it["reference"] for it in suite.items], ev.max_new_tokens, tok)
                sizes[spec.name] = size
        except Exception as exc:  # the file's own problem is reported by the path checks or when it loads
            sizes[spec.name] = SuiteSize(
                kind, None, note=f"cannot count its items before the run ({type(exc).__name__}: {str(exc)[:200]})"
            )
    if dpo:
        try:
            n, grow = eval_count or _eval_record_count(cfg, ev.max_eval_samples)
            sizes["preference"] = SuiteSize("preference", n, grow, unit="pairs")
        except Exception as exc:
            sizes["preference"] = SuiteSize(
                "preference",
                None,
                note=f"cannot count the held-out pairs before the run ({type(exc).__name__}: {str(exc)[:200]})",
            )
    return sizes


def _eval_references(source: Any, limit: int) -> list[Any]:
    """The final assistant answers of the first ``limit`` eval records (the references of the task suite)."""
    from tuneloop.data.sources import normalised_records

    refs: list[Any] = []
    for rec in normalised_records(source):
        if len(refs) >= limit:
            break
        msgs = rec.get("messages") or []
        if msgs and msgs[-1].get("role") == "assistant":
            refs.append(rec.get("reference", msgs[-1].get("content")))
    return refs


def _cut_references(size: Any, spec: Any, refs: list[Any], budget: int, tok: Callable[[], Any]) -> Any:
    """``size`` with ``unreachable``: the items whose reference a verbatim answer cut at ``budget`` tokens (as
    generation cuts it) fails at the chrF threshold, when the suite's metric is (or ``auto`` picks) chrF."""
    from dataclasses import replace

    from tuneloop.evaluate.metrics import DEFAULT_CHRF_THRESHOLD, choose_auto, chrf

    if not refs or (spec.metric == "auto" and choose_auto(refs).metric != "chrf"):
        return size
    threshold = spec.threshold if spec.threshold is not None else DEFAULT_CHRF_THRESHOLD
    lost, longest = 0, 0
    for ref in refs:
        text = (
            ref if isinstance(ref, str) else str(ref[0]) if isinstance(ref, (list, tuple)) and ref else str(ref or "")
        )
        ids = tok()(text, add_special_tokens=False, verbose=False)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) > budget:
            verbatim = tok().decode(ids[:budget], skip_special_tokens=True).strip().rstrip("\ufffd")
            lost += chrf(verbatim, ref if isinstance(ref, (list, tuple)) else text) < threshold
    if not lost:
        return size
    why = (
        f"with eval.max_new_tokens {budget}, a verbatim answer is cut short and scores chrF below {threshold:g} on {lost} of "
        f"{len(refs)} references (the longest is {longest} tokens); raise eval.max_new_tokens to at least {longest}"
    )
    return replace(size, unreachable=lost, unreachable_why=why)


def gate_decidability(cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the gates at the suites' sizes: a gate no model could PASS is a problem (exit 2 before
    any work); one only a large effect decides, or one whose suite size is unknown, is a warning."""
    from tuneloop.evaluate.gates import decidability

    checks = decidability(cfg, suite_sizes(cfg))
    problems = [c.message for c in checks if c.status == "undecidable"]
    warnings = [c.message for c in checks if c.status in ("warn", "skipped")]
    return problems, warnings


def preflight_report(cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """(problems, warnings) found before any work is done: missing files, unusable settings, the registry, and
    the gates' decidability (:func:`gate_decidability`)."""
    problems = _input_problems(cfg)
    gate_problems, warnings = gate_decidability(cfg)
    return problems + gate_problems, warnings


def preflight_problems(cfg: PipelineConfig) -> list[str]:
    """Problems every stage's inputs can be checked for before any work is done (each with its config key),
    the gates' decidability included."""
    return preflight_report(cfg)[0]


def _input_problems(cfg: PipelineConfig) -> list[str]:
    from tuneloop.registry.api import registry_problem

    problems = _path_problems(cfg)
    problems += data_problems(cfg)  # the formats the objective needs (kto: both labels)
    if cfg.data.engine == "ray":  # Ray installed, a cluster named and reachable (exit 2 before any work)
        from tuneloop.data.ray_engine import ray_problems

        problems += ray_problems(cfg.data)
    for spec in cfg.eval.suites:
        if spec.kind == "lmeval":
            from tuneloop.evaluate.lmeval import lmeval_problems

            problems += lmeval_problems(spec)
    bm = cfg.base_model
    if os.path.isabs(bm) and not (Path(bm) / "config.json").is_file():
        problems.append(
            f"base_model: {bm} is not a model directory (no config.json); point it at a saved Hugging Face model"
        )
    problems += _qlora_problems(cfg)
    problems += _vllm_problems(cfg)
    if (problem := registry_problem(cfg)) is not None:
        problems.append(problem)
    problems += _tracker_problems(cfg)
    if cfg.train.rewards:
        from tuneloop.train.rewards import reward_problems

        problems += reward_problems(cfg)
    if cfg.train.backend == "command":
        from tuneloop.train.external import command_problems

        problems += command_problems(cfg.train.command)
    if cfg.train.backend == "mlx":
        from tuneloop.train.mlx_backend import mlx_problems

        problems += mlx_problems(cfg)
    if cfg.train.backend == "unsloth":
        from tuneloop.train.unsloth_backend import unsloth_problems

        problems += unsloth_problems(cfg)
    return problems + _precision_problems(cfg)
