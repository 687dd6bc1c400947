"""The ``lmeval`` suite kind: tasks of EleutherAI's lm-evaluation-harness, run on tuneloop's models offline.

Optional: ``pip install 'tuneloop[lmeval]'``; ``lm_eval`` is imported only when such a suite is configured.

* Tasks come from local task YAMLs under ``include_path`` (``lm_eval.tasks.TaskManager(include_path=...)``,
  without lm-eval's built-in task tree) and must read local data files, e.g. ``dataset_path: json`` with
  ``dataset_kwargs: {data_files: {test: items.jsonl}}``. Relative ``data_files`` are relative to
  ``include_path`` (tasks are built with that directory as the working directory). The Hugging Face hub is
  switched off (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``).
* The already-loaded model and tokenizer are wrapped as ``lm_eval.models.huggingface.HFLM`` and run through
  ``lm_eval.evaluator.evaluate(..., log_samples=True)``, for the reference and for the candidate.
* The logged samples become per-item outcomes: the task's primary metric (the first of its ``metric_list``,
  e.g. ``acc``) per ``doc_id``. They feed the same paired statistics as ``capability_mc``: the gate
  ``max_mc_capability_drop`` applies (one gate per suite), and every item is an audit record in the eval's
  ``items.jsonl``. lm-eval's own aggregate for the metric is kept next to the per-item mean.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneloop.data.sources import hf_offline
from tuneloop.errors import ConfigError, InputError
from tuneloop.evaluate.audit import prompt_sha256

INSTALL_HINT = "pip install 'tuneloop[lmeval]'"


def lmeval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


@contextlib.contextmanager
def _chdir(path: str | Path) -> Iterator[None]:
    """``contextlib.chdir`` (Python 3.11+) for 3.10, which ``requires-python`` still promises (found by mypy, issue 25)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def lmeval_problems(spec) -> list[str]:
    """Problems of one ``lmeval`` suite that can be found without loading anything (for preflight)."""
    where = f"eval.suites.{spec.name}"
    problems = []
    if not lmeval_available():
        problems.append(
            f"{where}: kind lmeval needs the lm-evaluation-harness, which is not installed; run `{INSTALL_HINT}`"
        )
    if not spec.tasks:
        problems.append(f"{where}: kind lmeval needs `tasks` (names of lm-eval tasks defined under `include_path`)")
    if not spec.include_path:
        problems.append(f"{where}: kind lmeval needs `include_path` (a directory of local lm-eval task YAMLs)")
    elif not Path(spec.include_path).is_dir():
        problems.append(
            f"{where}.include_path: directory not found: {spec.include_path}; relative paths are resolved against the config's directory"
        )
    return problems


def load_tasks(spec) -> dict[str, Any]:
    """``{task name: lm_eval Task}`` of the suite, built from ``include_path`` offline (InputError if unknown)."""
    problems = lmeval_problems(spec)
    if problems:
        raise ConfigError("; ".join(problems))
    import logging
    import warnings

    from lm_eval.tasks import TaskManager, get_task_dict

    include = str(Path(spec.include_path).resolve())
    try:
        tm = TaskManager(include_path=include, include_defaults=False)
    except TypeError:  # older lm-eval 0.4.x: no include_defaults (the built-in tasks are indexed too)
        tm = TaskManager(include_path=include)
    unknown = [t for t in spec.tasks if t not in tm.all_tasks]
    if unknown:
        known = ", ".join(tm.all_tasks[:20]) or "none"
        raise InputError(
            f"eval.suites.{spec.name}: lm-eval task(s) {', '.join(unknown)} not found under {include} (tasks there: {known})"
        )
    with hf_offline(), _chdir(include), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        try:
            tasks = get_task_dict(list(spec.tasks), tm)
        except Exception as exc:  # dataset files missing, bad YAML, hub access while offline ...
            raise InputError(
                f"eval.suites.{spec.name}: cannot build lm-eval task(s) {', '.join(spec.tasks)} from {include}: {type(exc).__name__}: {exc}; "
                "tuneloop runs lm-eval offline: tasks must read local files (`dataset_path: json` with `dataset_kwargs.data_files`, relative to include_path)"
            ) from None
    flat: dict[str, Any] = {}

    def walk(d: dict) -> None:  # groups nest their tasks; tuneloop pairs items per task
        for v in d.values():
            if isinstance(v, dict):
                walk(v)
            else:
                flat[v.config.task] = v

    walk(tasks)
    return flat


def primary_metric(task) -> str:
    ml = getattr(task.config, "metric_list", None) or []
    if ml and isinstance(ml[0], dict) and ml[0].get("metric"):
        m = ml[0]["metric"]
        return m if isinstance(m, str) else getattr(m, "__name__", str(m))
    return "acc"


def suite_items(spec, tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """One item per evaluated document: ``id`` = ``task/doc_id`` (the first ``max_items`` docs of each task)."""
    items = []
    for name, task in tasks.items():
        docs = list(task.eval_docs)
        if spec.max_items:
            docs = docs[: spec.max_items]
        for i, doc in enumerate(docs):
            items.append(
                {"id": f"{name}/{i}", "task": name, "doc_id": i, "doc": dict(doc) if isinstance(doc, dict) else doc}
            )
    if not items:
        raise InputError(
            f"eval.suites.{spec.name}: the lm-eval task(s) {', '.join(tasks)} have no documents to evaluate"
        )
    return items


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def _prompt(sample: dict[str, Any]) -> str:
    """The context of the sample's first request (lm-eval logs arguments as tuples or ``{arg_0: ...}`` dicts)."""
    args = sample.get("arguments")
    first = None
    if isinstance(args, dict) and args:
        first = next(iter(args.values()))
    elif isinstance(args, (list, tuple)) and args:
        first = args[0]
    if isinstance(first, dict):
        first = first.get("arg_0", next(iter(first.values()), ""))
    elif isinstance(first, (list, tuple)) and first:
        first = first[0]
    return first if isinstance(first, str) else ""


def run_model(model, tok, spec, *, batch_size: int = 8) -> dict[str, Any]:
    """Run the suite's tasks on ``model``: per-item scores (by task and doc_id) and lm-eval's aggregates."""
    import logging
    import warnings

    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    tasks = load_tasks(spec)
    device = next(model.parameters()).device
    with hf_offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(device))
        out = evaluator.evaluate(lm=lm, task_dict=tasks, limit=spec.max_items, log_samples=True)
    items: list[dict[str, Any]] = []
    aggregate: dict[str, Any] = {}
    for name, task in tasks.items():
        metric = primary_metric(task)
        samples = out["samples"].get(name, [])
        filters = [s.get("filter", "none") for s in samples]
        keep = "none" if "none" in filters else (filters[0] if filters else "none")
        res = out["results"].get(name, {})
        aggregate[name] = {"metric": metric, "filter": keep, "value": res.get(f"{metric},{keep}")}
        for s in sorted((s for s in samples if s.get("filter", "none") == keep), key=lambda s: s["doc_id"]):
            if metric not in s:
                raise InputError(
                    f"eval.suites.{spec.name}: lm-eval task {name} logged no per-item `{metric}` (metrics: {', '.join(s.get('metrics', []))})"
                )
            p = _prompt(s)
            items.append(
                {
                    "id": f"{name}/{s['doc_id']}",
                    "task": name,
                    "doc_id": s["doc_id"],
                    "target": _jsonable(s.get("target")),
                    "prompt": p,
                    "score": float(s[metric]),
                    "resps": _jsonable(s.get("filtered_resps")),
                }
            )
    return {"lmeval": items, "aggregate": aggregate}


def score(suite, base_out: dict[str, Any], cand_out: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(result for the gates, audit records): paired per-item outcomes matched by ``task/doc_id``."""
    b = {it["id"]: it for it in base_out["lmeval"]}
    c = {it["id"]: it for it in cand_out["lmeval"]}
    ids = [it["id"] for it in suite.items if it["id"] in b and it["id"] in c]
    bs = [b[i]["score"] for i in ids]
    cs = [c[i]["score"] for i in ids]
    binary = all(x in (0.0, 1.0) for x in bs + cs)
    res: dict[str, Any] = {
        "kind": "lmeval",
        "binary": binary,
        "n": len(ids),
        "source": suite.source,
        "base": bs,
        "candidate": cs,
        "base_aggregate": base_out["aggregate"],
        "candidate_aggregate": cand_out["aggregate"],
    }
    recs = []
    for i in ids:
        bi, ci = b[i], c[i]
        recs.append(
            {
                "suite": suite.name,
                "kind": "lmeval",
                "id": i,
                "task": bi["task"],
                "doc_id": bi["doc_id"],
                "metric": base_out["aggregate"][bi["task"]]["metric"],
                "prompt_sha256": prompt_sha256(bi["prompt"]),
                "prompt": bi["prompt"],
                "target": bi["target"],
                "base": bi["resps"],
                "candidate": ci["resps"],
                "base_score": bi["score"],
                "candidate_score": ci["score"],
            }
        )
    return res, recs
