"""Checks a user runs outside a full run: ``tuneloop data validate`` and ``tuneloop eval``.

They sit above the libraries (``data``, ``evaluate``, ``registry``) and the runner, and choose what to check:

* :func:`validate_target` -- a dataset or a config's data: the same :func:`tuneloop.data.validate.validate_splits`
  the pipeline's data_validation stage uses, with the default or the config's data settings and gates; for a
  config, first the evaluation gates' decidability (:func:`tuneloop.preflight.gate_decidability`), as a run's
  preflight does.
* :func:`run_eval` -- only the evaluation gates, for a chosen candidate against a chosen reference (the base,
  the champion or a version of the configured registry, SQLite or MLflow alike).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import DataConfig, PipelineConfig, load_config
from tuneloop.errors import ConfigError, InputError, TuneloopError
from tuneloop.fsutil import atomic_write_json, utcnow
from tuneloop.preflight import gate_decidability
from tuneloop.workspace import Workspace

# ----------------------------------------------------------------------------------------- data validate


def _target_data(
    target: str, fmt: str | None, out_dir: Path | None, eval_data: str | None
) -> tuple[Any, Path, Any, str, list[str]]:
    """(data settings, output directory, tokenizer or None, train report name, gate warnings) for a dataset or a
    config. A config whose evaluation gates no model could PASS at its suites' sizes raises ConfigError (exit 2)."""
    if Path(target).suffix.lower() not in (".yaml", ".yml"):
        fmt_kw: dict[str, Any] = {"format": fmt} if fmt else {}  # DataConfig validates the value
        data = DataConfig(train_data=target, eval_data=eval_data, **fmt_kw)
        # The whole file name: x.json and x.jsonl must not share a report.
        base = target.rstrip("/") if "://" in target else target.split(":")[0]  # s3://b/dir/ -> dir; name:split -> name
        name = re.sub(r"[^\w.-]+", "_", Path(base).name).strip(".") or "dataset"
        return data, Path("tuneloop-data-report") if out_dir is None else Path(out_dir), None, name, []
    cfg = load_config(target, [f"data.format={fmt}"] if fmt else [])
    from tuneloop.train.parent import resolve_parent

    resolve_parent(cfg, Workspace.for_config(cfg))  # base_model may name a registered version (its tokenizer)
    data = cfg.data.model_copy(update={"eval_data": eval_data}) if eval_data else cfg.data
    problems, warnings = gate_decidability(cfg.model_copy(update={"data": data}))
    if problems:
        raise ConfigError(problems, target)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    out = Workspace.for_config(cfg).root / "data-report" if out_dir is None else Path(out_dir)
    try:
        from tuneloop.modeling import load_tokenizer

        tokenizer = load_tokenizer(cfg.base_model, data.chat_template)
    except Exception:  # reported as "not checked" in the report
        tokenizer = None
    return data, out, tokenizer, "train", warnings


def validate_target(
    target: str,
    *,
    fmt: str | None = None,
    out_dir: Path | None = None,
    eval_data: str | None = None,
) -> dict[str, Any]:
    """``tuneloop data validate``: validate a dataset (file, directory, name) or the data of a pipeline config.

    A dataset is checked with the default ``data:`` settings and gates, without a tokenizer (so the
    over-long rule is reported as not checked); ``eval_data`` adds the contamination check. A config
    (``.yaml``/``.yml``) uses its own data settings, gates, eval data and base model tokenizer. Writes
    ``<name>.report.json``/``.html`` (with the gate verdicts; ``<name>`` is the dataset's whole file name, e.g.
    ``x.jsonl.report.json``, so ``x.json`` and ``x.jsonl`` do not overwrite each other; ``train``/``eval`` for a config) into ``out_dir`` (default ``./tuneloop-data-report`` for a dataset,
    ``<workspace>/data-report`` for a config). Returns the train report with ``gates``, ``passed``,
    ``failures``, ``out_dir``, when there is eval data ``eval`` (its report), and for a config whose evaluation
    gates only a large effect decides, ``gate_warnings`` (also printed on stderr).
    """
    from tuneloop.data.validate import validate_splits

    data, out, tokenizer, name, warnings = _target_data(target, fmt, out_dir, eval_data)
    verdict = validate_splits(data, out, tokenizer=tokenizer, train_name=name)
    extra: dict[str, Any] = {"eval": verdict.reports["eval"]} if "eval" in verdict.reports else {}
    if warnings:
        extra["gate_warnings"] = warnings
    return {
        **verdict.reports["train"],
        **extra,
        "failures": verdict.failures,
        "passed": verdict.passed,
        "out_dir": str(out),
    }


# ------------------------------------------------------------------------------------------------- eval


def _registry_version(cfg: PipelineConfig, registry: Callable[[], Any], ref: str, label: str):
    """``3``, ``latest``, ``champion``, ``previous`` (of the config's model), ``name:3`` or ``name@alias``."""
    from tuneloop.evaluate.evaluation import registry_model_ref
    from tuneloop.registry.lineage import version_kind

    reg = registry()
    name, version = (
        (cfg.model_name, ref) if ref.isdigit() or ref in ("latest", "champion", "previous") else reg.parse_ref(ref)
    )
    v = reg.get(name, version)
    if version_kind(v) == "reward":
        raise InputError(
            f"{v.ref} is a reward model (its lineage has kind: reward): it scores answers and generates none, so "
            "`tuneloop eval`'s chat gates cannot run on it; a reward model's gates (pair accuracy on held-out "
            "preferences) run in its own pipeline: `tuneloop run` with train.objective: reward"
        )
    return registry_model_ref(cfg, reg, name, version, label)


def latest_candidate(cfg: PipelineConfig, ws: Workspace, registry: Callable[[], Any]):
    """The model trained by the config's most recent run, else the registry's latest version."""
    from tuneloop.evaluate.evaluation import model_ref
    from tuneloop.runs import list_runs, trained_model_dir

    for run in list_runs(ws):
        if run.get("pipeline") == cfg.name and (model_dir := trained_model_dir(ws, run)):
            return model_ref(f"candidate of run {run['run_id']}", model_dir, cfg.base_model)
    try:
        return _registry_version(cfg, registry, "latest", "candidate")
    except TuneloopError:
        raise InputError(
            f"no candidate model: no run of {cfg.name} in {ws.root} trained one and the registry has no version; "
            "give --model PATH (a model or adapter directory) or --model VERSION, or run `tuneloop run` first"
        ) from None


def choose_candidate(cfg: PipelineConfig, ws: Workspace, registry: Callable[[], Any], model: str | None):
    """``model``: a model/adapter directory, a registry version, or None for the latest candidate."""
    from tuneloop.evaluate.evaluation import model_ref

    if model is None:
        return latest_candidate(cfg, ws, registry)
    if Path(model).expanduser().is_dir():
        p = Path(model).expanduser().resolve()
        if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
            raise InputError(f"--model {model}: not a model directory (no config.json or adapter_config.json)")
        return model_ref(f"candidate {p}", p, cfg.base_model)
    return _registry_version(cfg, registry, model, "candidate")


def choose_reference(cfg: PipelineConfig, registry: Callable[[], Any], against: str | None) -> tuple[Any, str]:
    """(reference model, note): ``base``, ``champion`` (the base when there is none yet, with a note) or a version."""
    from tuneloop.evaluate.evaluation import base_ref, champion_ref

    against = against or cfg.gates.against
    if against == "base":
        return base_ref(cfg), ""
    if against == "champion":
        ref, note = champion_ref(cfg, registry())
        return ref or base_ref(cfg), note
    return _registry_version(cfg, registry, against, "version"), ""


def _check_suites(cfg: PipelineConfig) -> None:
    """Bad suites or judge settings are input errors: find them before any model work."""
    from tuneloop.evaluate.judges import make_judge
    from tuneloop.evaluate.suites import load_suite

    make_judge(cfg.eval.judge)
    for spec in cfg.eval.suites:
        if spec.kind not in ("task", "win_rate") or spec.path:
            load_suite(spec, cfg.eval, None)


def run_eval(
    cfg: PipelineConfig, *, model: str | None = None, against: str | None = None, console=None
) -> dict[str, Any]:
    """``tuneloop eval``: only the gates, for one candidate against the base, the champion or a version.

    ``model``: a model/adapter directory, a registry version (``3``, ``name:3``, ``name@alias``), or None for the
    latest candidate of the config's runs. ``against``: ``base``, ``champion`` or a version (default:
    ``gates.against``), looked up in the configured registry. Returns the JSON report
    (:func:`tuneloop.evaluate.reports.report_json`) with ``eval_dir``.
    """
    from tuneloop.evaluate.evaluation import evaluate_candidate
    from tuneloop.evaluate.reports import report_json
    from tuneloop.pipeline import FineTunePipeline
    from tuneloop.registry.api import open_registry

    pipe = FineTunePipeline(cfg, console=console)
    pipe.preflight()
    ws = pipe.ws
    registry = functools.cache(lambda: open_registry(cfg, ws))  # opened only when a version is named
    cand = choose_candidate(cfg, ws, registry, model)
    ref, note = choose_reference(cfg, registry, against)
    _check_suites(cfg)
    items = pipe.prepare_eval_items()
    eval_id = ws.new_run_id()
    out_dir = ws.root / "evals" / eval_id
    say = (lambda what: console.print(f"  evaluating {what} ...")) if console is not None else None
    metrics, gates = evaluate_candidate(
        cfg,
        items,
        cand.adapter or cand.path,
        out_dir,
        base_cache_dir=ws.cache_dir / "evaluation-base",
        progress=say,
        reference=ref,
        candidate=cand,
    )
    if note:
        metrics["against_note"] = note
    report = report_json(
        gates,
        metrics,
        eval_id=eval_id,
        eval_dir=str(out_dir),
        model=cand.label,
        against=ref.label,
        at=utcnow(),
        **({"warnings": pipe.warnings} if pipe.warnings else {}),
    )
    atomic_write_json(out_dir / "report.json", report)
    return report
