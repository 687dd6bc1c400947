"""The stages of a run, one function each, in the order of :data:`STAGES`.

Each stage reads the typed result of the stage before it and returns its own (:class:`DataResult` ->
:class:`PreparedData` -> :class:`TrainedModel` -> :class:`EvalResult` -> :class:`RegisteredVersion` ->
:class:`Deployment`); a later result links to the one it was made from, so the registry stage sees the data
digests and the trained model through the evaluation result. What a cached stage reads, the inputs of its
cache key, is declared by its ``<stage>_inputs`` function, apart from the work; the runner
(:mod:`tuneloop.pipeline`) hashes them with the code version, runs the work into ``cache/<stage>/<key>/``
only when no finished result is there, and keeps the run records. Every result carries an :class:`Outcome`
(cache key, metrics, outputs, cached, error) that becomes the stage's record in ``run.json``.

| stage | reads | cache-key inputs | returns |
|---|---|---|---|
| ``data_validation`` | the config's data | data digests, format, checks, tokenizer | :class:`DataResult` |
| ``preprocessing`` | clean records | data key, tokenizer, template, max length, split, seed, source weights | :class:`PreparedData` |
| ``training`` | tokenized data | data key, base model, ``train:`` section, seed | :class:`TrainedModel` |
| ``evaluation`` | model, eval items (DPO: held-out pairs; a reward model: only those, scored) | data and model keys, ``eval:``, suite files, ``gates:``, reference | :class:`EvalResult` |
| ``model_registry`` | model, metrics, gates | (not cached: the registry de-duplicates by cache key) | :class:`RegisteredVersion` |
| ``deployment`` | version | (not cached: an alias already there is a no-op) | :class:`Deployment` |
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from tuneloop.config import PipelineConfig
from tuneloop.errors import StageError
from tuneloop.fsutil import atomic_write_json, model_fingerprint, read_json, sha256_file, sha256_json
from tuneloop.runs import EVAL_PROGRESS_FILE
from tuneloop.train.objectives import cache_tag, kto_label_problem, objective_of, uses_preferences
from tuneloop.version import code_version
from tuneloop.workspace import Workspace

log = logging.getLogger(__name__)
EVAL_PROGRESS_EVERY_S = 1.0  # how often EvalProgress rewrites the run's eval_progress.json (a small file)


class PipelineStage(str, Enum):
    DATA_VALIDATION = "data_validation"
    PREPROCESSING = "preprocessing"
    TRAINING = "training"
    EVALUATION = "evaluation"
    MODEL_REGISTRY = "model_registry"
    DEPLOYMENT = "deployment"


@dataclass
class StageResult:
    """What one stage did: ``status`` is pending | running | passed | failed | skipped."""

    stage: PipelineStage
    status: str = "pending"
    duration_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    cached: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "duration_s": round(self.duration_s, 3),
            "metrics": self.metrics,
            "error": self.error,
            "cached": self.cached,
        }


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """The record part of a stage's result: cache key (``None`` when not cached), metrics, outputs (paths for
    the run's ``stages/<stage>.json``), whether it was re-used, and the error that fails the stage."""

    key: str | None
    metrics: dict[str, Any]
    outputs: dict[str, Any]
    cached: bool = False
    error: str = ""


class StageOutput(Protocol):
    """What the runner reads from any stage's result."""

    outcome: Outcome


@dataclass
class DataResult:
    outcome: Outcome
    train_clean: Path
    eval_clean: Path | None
    train_digest: str
    eval_digest: str | None


@dataclass
class PreparedData:
    outcome: Outcome
    data: DataResult
    train_dataset: Path
    eval_items: Path
    tokenizer: Path
    train_records: Path
    eval_records: Path


@dataclass
class TrainedModel:
    outcome: Outcome
    prepared: PreparedData
    model_dir: Path
    kind: str  # adapter | model


@dataclass
class EvalResult:
    outcome: Outcome
    model: TrainedModel
    gates: dict[str, dict[str, Any]]


@dataclass
class RegisteredVersion:
    outcome: Outcome
    model: str
    version: int
    ref: str


@dataclass
class Deployment:
    outcome: Outcome
    alias: str
    ref: str


# ------------------------------------------------------------------------------------------------ context

Compute = Callable[[Path], "tuple[dict[str, Any], dict[str, Any]]"]


@dataclass
class CacheEntry:
    key: str
    metrics: dict[str, Any]
    outputs: dict[str, Any]
    cached: bool


@dataclass
class StageContext:
    """What the runner gives every stage: the config, the workspace, this run, and its cache.

    ``cache(stage, inputs, compute)`` returns the finished :class:`CacheEntry` for ``inputs``, running
    ``compute(out_dir) -> (metrics, outputs)`` first when there is none. ``run_dir`` is ``None`` when stages
    run outside a run (``tuneloop eval`` preparing its items).
    """

    cfg: PipelineConfig
    ws: Workspace
    cache: Callable[[PipelineStage, dict[str, Any], Compute], CacheEntry]
    run_id: str = ""
    run_dir: Path | None = None
    config_path: str | None = None
    console: Any = None

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)


def _file_digest(path: str | None) -> str | None:
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


def config_dir(cfg: PipelineConfig) -> Path | None:
    """The directory the config's relative paths were resolved against (``None`` if unknown)."""
    return getattr(cfg, "_base_dir", None)  # set by tuneloop.config when it resolves paths (as Workspace reads it)


def config_relative(value: str | None, base_dir: Path | None) -> str | None:
    """``value`` for a cache key or a record: a path inside the config's directory becomes relative to it (so a
    copied or moved project keeps its keys); a hub id, or a path outside that directory, stays as given."""
    if not value or base_dir is None or not os.path.isabs(value):
        return value
    try:
        return Path(value).relative_to(Path(base_dir).resolve()).as_posix()
    except ValueError:
        return value


# -------------------------------------------------------------------------------------- data_validation


def data_validation_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    from tuneloop.data.sources import source_digest
    from tuneloop.data.validate import checks_from_config

    d = cfg.data
    inputs = {
        "train": source_digest(d.train_data, weights=False),  # weights are applied in preprocessing
        "eval": source_digest(d.eval_data),
        "format": d.format,
        "checks": {k: v for k, v in vars(checks_from_config(d)).items() if k != "num_workers"},
        "tokenizer": model_fingerprint(cfg.base_model),
        "chat_template": d.chat_template,
    }
    inputs.update(cache_tag(cfg))
    return inputs


_DATA_METRICS = (
    "format",
    "records",
    "valid",
    "invalid",
    "duplicates",
    "near_duplicates",
    "contaminated",
    "pii_dropped",
    "overlong_dropped",
    "valid_ratio",
    "duplicate_ratio",
    "contamination_ratio",
    "pii",
    "pii_records_kept",
    "digest",
    "rules",
)


def _check_data(cfg: PipelineConfig, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cached work: validate eval, then train against the eval texts (no gates: they are applied after)."""
    from tuneloop.data.validate import check_splits

    tok = None
    try:
        from tuneloop.modeling import load_tokenizer

        tok = load_tokenizer(cfg.base_model, cfg.data.chat_template)
    except Exception as exc:  # the over-long rule is then reported as not checked
        log.warning("data validation: no tokenizer for the over-long check (%s)", exc)
    metrics: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for split, rep in check_splits(cfg.data, out, tokenizer=tok).items():
        p = "" if split == "train" else "eval_"
        metrics.update({p + k: rep[k] for k in _DATA_METRICS})
        if "sources" in rep:  # data.train_data as a list: per source its records read and kept
            metrics[p + "sources"] = rep["sources"]
        outputs.update(
            {
                # data.engine ray: preprocessing streams the kept records from the Parquet shards (data/stream.py)
                f"{split}_clean": rep.get("clean_shards", rep["clean_path"]),
                f"{split}_quarantine": rep["quarantine_path"],
                f"{split}_report": rep["report_path"],
            }
        )
    return metrics, outputs


def data_validation(ctx: StageContext, _upstream: None = None) -> DataResult:
    """Validate the data (cached), then apply the data gates: a threshold change re-uses the checks.

    The run keeps ``data/<split>.report.{json,html}`` with the gate verdicts.
    """
    from tuneloop.data.gates import gate_records
    from tuneloop.data.sources import source_problem
    from tuneloop.data.validate import SplitReports, gate_splits

    c, d = ctx.cfg, ctx.cfg.data
    for key, value in (("data.train_data", d.train_data), ("data.eval_data", d.eval_data)):
        if value and (problem := source_problem(value)):
            raise StageError(f"{key}: {problem}")
    entry = ctx.cache(PipelineStage.DATA_VALIDATION, data_validation_inputs(c), lambda out: _check_data(c, out))
    out = entry.outputs
    checked = SplitReports(
        read_json(Path(out["train_report"])), read_json(Path(out["eval_report"])) if "eval_report" in out else None
    )
    verdict = gate_splits(checked, d, report_dir=ctx.run_dir / "data" if ctx.run_dir is not None else None)
    problems = list(verdict.failures)
    objective = objective_of(c)
    for split, report in checked.items():
        path = report["path"] if split == "train" else d.eval_data
        if report["records"] and (problem := objective.format_problem(split, report["format"], path)):
            problems.append(problem)
        elif split == "train" and objective.data == "kto" and report["valid"]:
            from tuneloop.data.prepare import kto_label_counts

            problems += filter(
                None, [kto_label_problem(f"{path} (after validation)", *kto_label_counts(Path(out["train_clean"])))]
            )
    gates = gate_records(
        {s: r["gates"] for s, r in verdict.reports.items()}, {s: r["records"] for s, r in verdict.reports.items()}
    )
    outcome = Outcome(entry.key, {**entry.metrics, "gates": gates}, out, entry.cached, "; ".join(problems))
    return DataResult(
        outcome,
        Path(out["train_clean"]),
        Path(out["eval_clean"]) if out.get("eval_clean") else None,
        entry.metrics["digest"],
        entry.metrics.get("eval_digest"),
    )


# ---------------------------------------------------------------------------------------- preprocessing


def preprocessing_inputs(cfg: PipelineConfig, data: DataResult) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "data": data.outcome.key,
        "tokenizer": model_fingerprint(cfg.base_model),
        "chat_template": cfg.data.chat_template,
        "max_length": cfg.data.max_length,
        "eval_split": cfg.data.eval_split if not cfg.data.eval_data else None,
        "seed": cfg.seed,
        "train_on_inputs": cfg.train.train_on_inputs,
    }
    if isinstance(cfg.data.train_data, list):  # applied here, so a weight change re-uses the validated data
        inputs["weights"] = [s.weight for s in cfg.data.train_sources]
    inputs.update(cache_tag(cfg))
    return inputs


def _prepare(cfg: PipelineConfig, data: DataResult, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from tuneloop.data.prepare import prepare_dataset, prepare_kto, prepare_preferences
    from tuneloop.modeling import load_tokenizer, save_tokenizer

    tok = load_tokenizer(cfg.base_model, cfg.data.chat_template)
    sources = cfg.data.train_sources if isinstance(cfg.data.train_data, list) else None
    if uses_preferences(cfg):
        metrics = prepare_preferences(
            data.train_clean,
            data.eval_clean,
            out,
            eval_split=cfg.data.eval_split,
            seed=cfg.seed,
            sources=sources,
            objective=cfg.train.objective,
        )
    elif objective_of(cfg).data == "kto":
        metrics = prepare_kto(
            data.train_clean, data.eval_clean, out, eval_split=cfg.data.eval_split, seed=cfg.seed, sources=sources
        )
    elif objective_of(cfg).data == "prompts":
        from tuneloop.data.prepare import prepare_prompts

        metrics = prepare_prompts(
            tok,
            data.train_clean,
            data.eval_clean,
            out,
            max_length=cfg.data.max_length,
            eval_split=cfg.data.eval_split,
            seed=cfg.seed,
            sources=sources,
        )
    else:
        metrics = prepare_dataset(
            tok,
            data.train_clean,
            data.eval_clean,
            out,
            max_length=cfg.data.max_length,
            eval_split=cfg.data.eval_split,
            seed=cfg.seed,
            train_on_inputs=cfg.train.train_on_inputs,
            sources=sources,
        )
    save_tokenizer(tok, out / "tokenizer")
    outputs = {
        "train_dataset": "train",
        "eval_items": "eval.jsonl",
        "tokenizer": "tokenizer",
        "dropped": "dropped.jsonl",
        "train_records": "train_records.jsonl",
        "eval_records": "eval_records.jsonl",
    }
    return metrics, {k: str(out / v) for k, v in outputs.items()}


def preprocessing(ctx: StageContext, data: DataResult) -> PreparedData:
    """Chat template, tokenization (prompt masked), max length, eval split; preference pairs for DPO."""
    entry = ctx.cache(
        PipelineStage.PREPROCESSING, preprocessing_inputs(ctx.cfg, data), lambda out: _prepare(ctx.cfg, data, out)
    )
    out, error = entry.outputs, ""
    if entry.metrics["train_samples"] == 0:
        error = f"no training samples left after tokenization; see {out['dropped']}"
    elif entry.metrics["eval_samples"] == 0:
        error = "no evaluation items (each needs a final assistant turn); add data.eval_data or more training records"
    return PreparedData(
        Outcome(entry.key, entry.metrics, out, entry.cached, error),
        data,
        Path(out["train_dataset"]),
        Path(out["eval_items"]),
        Path(out["tokenizer"]),
        Path(out["train_records"]),
        Path(out["eval_records"]),
    )


# --------------------------------------------------------------------------------------------- training


def training_inputs(cfg: PipelineConfig, prepared: PreparedData) -> dict[str, Any]:
    """Content digests, and paths relative to the config's directory: a copied project re-uses the model."""
    base_dir = config_dir(cfg)
    train = cfg.train.model_dump(mode="json", exclude={"save_steps"})
    train["accelerate_config"] = config_relative(train.get("accelerate_config"), base_dir)
    if cfg.train.rewards:  # a reward function by its path as written and its file's sha256
        from tuneloop.train.rewards import reward_inputs

        train["rewards"] = reward_inputs(cfg)
    return {
        "data": prepared.outcome.key,
        "base_model": config_relative(cfg.base_model, base_dir),
        "base_fingerprint": model_fingerprint(cfg.base_model),
        "train": train,
        "accelerate_config": _file_digest(cfg.train.accelerate_config),
        "seed": cfg.seed,
    }


def _train(ctx: StageContext, prep: PreparedData, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from tuneloop.modeling import load_tokenizer

    c = ctx.cfg
    tok = load_tokenizer(str(prep.tokenizer))
    outputs = {"model_dir": str(out / "model"), "train_metrics": str(out / "train_metrics.jsonl")}
    if c.train.backend == "command":
        from tuneloop.train.external import run_command

        metrics = run_command(
            c, {"train_records": str(prep.train_records), "eval_records": str(prep.eval_records)}, out, tok
        )
        return metrics, {**outputs, "kind": metrics["kind"]}
    if c.train.backend == "mlx":
        from tuneloop.train.mlx_backend import train_mlx

        with TrainProgress(ctx.console) as bar:
            metrics = train_mlx(c, prep.train_dataset, out, tokenizer=tok, progress=bar.update)
        return metrics, {**outputs, "kind": metrics["kind"]}
    if c.train.backend == "unsloth":
        from tuneloop.train.unsloth_backend import train_unsloth

        with TrainProgress(ctx.console) as bar:
            metrics = train_unsloth(c, prep.train_dataset, out, tokenizer=tok, progress=bar.update)
        return metrics, {**outputs, "kind": metrics["kind"]}
    _say_resume(ctx, out / "checkpoints")
    with TrainProgress(ctx.console) as bar:
        if c.train.num_processes > 1 or c.train.accelerate_config:
            from tuneloop.train.launch import train_distributed

            metrics = train_distributed(
                c, prep.train_dataset, out, tokenizer_dir=str(prep.tokenizer), progress=bar.update
            )
        else:
            train = objective_of(c).load_trainer()
            metrics = train(c, prep.train_dataset, out, tokenizer=tok, progress=bar.update)
    kind = "adapter" if (out / "model" / "adapter_config.json").is_file() else "model"
    return metrics, {"model_dir": outputs["model_dir"], "kind": kind, "train_metrics": outputs["train_metrics"]}


def _say_resume(ctx: StageContext, ckpt_dir: Path) -> None:
    """Validate the checkpoints a killed or failed run left (removing those that cannot be resumed from) and say
    which one training resumes from, before the workers start."""
    from rich.markup import escape

    from tuneloop.train.checkpoints import resume_plan

    plan = resume_plan(ckpt_dir)
    warn = len(plan.notes) > 1 or plan.checkpoint is None  # something was removed, or nothing could be used
    for note in plan.notes:
        log.log(logging.WARNING if warn else logging.INFO, note)
        ctx.say(f"  [yellow]{escape(note)}[/]" if warn else f"  {escape(note)}")


def training(ctx: StageContext, prepared: PreparedData) -> TrainedModel:
    """Train (SFT or DPO; LoRA, QLoRA or full; in process, distributed or an external command); resumable."""
    entry = ctx.cache(
        PipelineStage.TRAINING, training_inputs(ctx.cfg, prepared), lambda out: _train(ctx, prepared, out)
    )
    if ctx.run_dir is not None:
        shutil.copyfile(entry.outputs["train_metrics"], ctx.run_dir / "train_metrics.jsonl")
    return TrainedModel(
        Outcome(entry.key, entry.metrics, entry.outputs, entry.cached),
        prepared,
        Path(entry.outputs["model_dir"]),
        entry.outputs["kind"],
    )


# ------------------------------------------------------------------------------------------- evaluation


def evaluation_inputs(cfg: PipelineConfig, model: TrainedModel, against: str | None) -> dict[str, Any]:
    """``against``: the reference's digest (``"base"`` without a champion), ``None`` unless ``gates.against: champion``."""
    ev = cfg.eval
    suites: dict[str, Any] = {
        "general": _file_digest(ev.general_text),
        "redteam": _file_digest(ev.redteam_prompts),
        "benign": _file_digest(ev.benign_prompts),
        "mc": _file_digest(ev.mc_suite),
        "paths": {s.name: _file_digest(s.path) for s in ev.suites if s.path},
    }
    if any(s.kind == "lmeval" for s in ev.suites):  # lm-eval task YAMLs and their data files
        suites["lmeval"] = {
            s.name: model_fingerprint(s.include_path) for s in ev.suites if s.kind == "lmeval" and s.include_path
        }
    if ev.judge.path:
        suites["judge"] = (
            model_fingerprint(ev.judge.path) if Path(ev.judge.path).is_dir() else _file_digest(ev.judge.path)
        )
    inputs = {
        "data": model.prepared.outcome.key,
        "model": model.outcome.key,
        "eval": _portable_eval(cfg),
        "suites": suites,
        "gates": cfg.gates.model_dump(mode="json"),
    }
    inputs.update(cache_tag(cfg))  # e.g. the held-out preference pairs are evaluated too
    if against is not None:
        inputs["against"] = against
    return inputs


def _portable_eval(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``eval:`` section with its paths relative to the config's directory (their contents are digested)."""
    base_dir = config_dir(cfg)
    ev = cfg.eval.model_dump(mode="json")
    for key in ("general_text", "redteam_prompts", "benign_prompts", "mc_suite"):
        ev[key] = config_relative(ev.get(key), base_dir)
    for suite in ev["suites"]:
        suite["path"] = config_relative(suite.get("path"), base_dir)
        suite["include_path"] = config_relative(suite.get("include_path"), base_dir)
    ev["judge"]["path"] = config_relative(ev["judge"].get("path"), base_dir)
    return ev


def evaluation(ctx: StageContext, model: TrainedModel) -> EvalResult:
    """Base (or champion) vs candidate on every suite, then the gates; a blocking gate fails the stage. A reward
    model is scored on the held-out pairs instead (:mod:`tuneloop.evaluate.reward`)."""
    from tuneloop.evaluate.evaluation import champion_ref, evaluate_candidate
    from tuneloop.evaluate.gates import as_dicts

    c = ctx.cfg
    reward = objective_of(c).evaluates == "reward"  # a reward model: it scores the held-out pairs, it answers no suite
    reference, note, against = None, "", None
    if c.gates.against == "champion":
        from tuneloop.evaluate.reward import reward_champion
        from tuneloop.registry.api import open_registry

        reference, note = (reward_champion if reward else champion_ref)(c, open_registry(c, ctx.ws))
        against = reference.digest if reference else "base"

    def compute(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        if reward:
            return _evaluate_reward_model(ctx, model, reference, note, out)
        live = ctx.run_dir / EVAL_PROGRESS_FILE if ctx.run_dir is not None else None
        with EvalProgress(ctx.console, live) as bars:
            metrics, gates = evaluate_candidate(
                c,
                model.prepared.eval_items,
                model.model_dir,
                out,
                base_cache_dir=ctx.ws.cache_dir / "evaluation-base",
                progress=lambda what: ctx.say(f"  evaluating {what} ..."),
                reference=reference,
                preferences=model.prepared.eval_records if uses_preferences(c) else None,
                suite_progress=bars.update,
            )
        if note:
            metrics["against_note"] = note
        return metrics, {"gates": as_dicts(gates), "items": str(out / "items.jsonl")}  # stored: the JSON records

    entry = ctx.cache(PipelineStage.EVALUATION, evaluation_inputs(c, model, against), compute)
    gates = entry.outputs["gates"]
    if ctx.run_dir is not None:
        shutil.copyfile(entry.outputs["items"], ctx.run_dir / "eval_items.jsonl")
    blocked = [
        f"{name} {g.get('verdict', 'FAIL')}: {g.get('reason', '')}" for name, g in gates.items() if g["passed"] is False
    ]
    error = "gate blocked: " + "; ".join(blocked) if blocked else ""
    return EvalResult(
        Outcome(entry.key, {**entry.metrics, "gates": gates}, entry.outputs, entry.cached, error), model, gates
    )


def _evaluate_reward_model(
    ctx: StageContext, model: TrainedModel, reference: Any, note: str, out: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation's work for a reward model: held-out pairwise accuracy (:mod:`tuneloop.evaluate.reward`)."""
    from tuneloop.evaluate.gates import as_dicts
    from tuneloop.evaluate.reward import evaluate_reward_model

    metrics, gates = evaluate_reward_model(
        ctx.cfg,
        model.prepared.eval_records,
        model.model_dir,
        out,
        reference=reference,
        progress=lambda what: ctx.say(f"  evaluating {what} ..."),
    )
    if note:
        metrics["against_note"] = note
    return metrics, {"gates": as_dicts(gates), "items": str(out / "items.jsonl")}  # stored: the JSON records


# --------------------------------------------------------------------------------------- model_registry


def stage_keys(evaluated: EvalResult) -> dict[str, str | None]:
    """The cache keys of the evaluation and of every stage before it (the registry keeps them as lineage)."""
    trained = evaluated.model
    prepared = trained.prepared
    return {
        PipelineStage.DATA_VALIDATION.value: prepared.data.outcome.key,
        PipelineStage.PREPROCESSING.value: prepared.outcome.key,
        PipelineStage.TRAINING.value: trained.outcome.key,
        PipelineStage.EVALUATION.value: evaluated.outcome.key,
    }


def model_registry(ctx: StageContext, evaluated: EvalResult) -> RegisteredVersion:
    """Register the model that passed the gates, with its lineage, metrics and gate results."""
    from tuneloop.registry.api import open_registry
    from tuneloop.registry.lineage import base_model_ref, git_info

    c, trained = ctx.cfg, evaluated.model
    data = trained.prepared.data
    lineage = {
        "run_id": ctx.run_id,
        "pipeline": c.name,
        "base_model": c.base_model,
        "base_model_given": config_relative(c.base_model, config_dir(c)),
        "base": (base := base_model_ref(c.base_model)),
        "base_model_fingerprint": base["digest"],
        "data": {
            "train_digest": data.train_digest,
            "eval_digest": data.eval_digest,
            "train_path": c.to_dict()["data"]["train_data"],
            "eval_path": c.data.eval_data,
        },
        "config_hash": sha256_json(c.to_dict()),
        "config": c.to_dict(),
        "code_version": code_version(),
        "stage_keys": stage_keys(evaluated),
        "git": git_info(Path(ctx.config_path).parent if ctx.config_path else None),
        "config_path": ctx.config_path,
        "objective": c.train.objective,
    }
    if (
        objective_of(c).evaluates == "reward"
    ):  # a reward model: it scores answers; the gateway does not serve it as a chat model
        lineage["kind"] = "reward"
    if c._parent is not None:  # base_model named a registered version (train/parent.py)
        lineage["parent"] = c._parent.lineage()
    if c.train.rewards:  # grpo: each reward; a function with its file's sha256 (part of the training cache key)
        from tuneloop.train.rewards import reward_inputs

        lineage["rewards"] = reward_inputs(c)
    ev_metrics = {k: v for k, v in evaluated.outcome.metrics.items() if k != "gates"}
    version = open_registry(c, ctx.ws).register(
        c.model_name,
        trained.model_dir,
        artifact_kind=trained.kind,
        base_model=c.base_model,
        lineage=lineage,
        metrics={"training": trained.outcome.metrics, "evaluation": ev_metrics},
        gates=evaluated.gates,
        cache_key=sha256_json([trained.outcome.key, evaluated.outcome.key]),
        reason=f"passed gates in run {ctx.run_id}",
    )
    # The stage's metric keeps its public name `artifact_sha256` (run summaries, --json); the value is the digest.
    metrics = {"model": version.model, "version": version.version, "artifact_sha256": version.artifact_digest}
    outputs = {"ref": version.ref, "version": version.version, "artifact_path": version.artifact_path}
    return RegisteredVersion(
        Outcome(None, metrics, outputs, version.existing), version.model, version.version, version.ref
    )


# ------------------------------------------------------------------------------------------- deployment


def deployment(ctx: StageContext, registered: RegisteredVersion) -> Deployment:
    """Point ``deploy.alias`` at the new version; the one it replaced stays as ``previous`` for a rollback.

    With ``deploy.strategy: canary`` and a champion to compare against, start a canary rollout instead and
    return at once: the gateway's analysis promotes or rolls it back (``tuneloop rollout status --wait``).
    """
    from tuneloop.registry.api import open_registry

    c = ctx.cfg
    reg = open_registry(c, ctx.ws)
    champion = reg.get_alias(c.model_name, "champion")
    if c.deploy.strategy == "canary" and champion not in (None, registered.version):
        return canary_deployment(ctx, reg, registered)
    alias = c.deploy.alias
    current = reg.get_alias(c.model_name, alias)
    if current != registered.version:
        reg.promote(c.model_name, registered.version, alias=alias, reason=f"auto_deploy in run {ctx.run_id}")
        previous = current
    else:  # deployed already (an earlier run, or the one this run waited for): the registry's previous version
        from tuneloop.registry.names import previous_alias

        previous = reg.get_alias(c.model_name, previous_alias(alias))
    ref = f"{c.model_name}@{alias}"
    outputs = {"ref": ref, "serve": f"tuneloop serve {ctx.config_path or ''}".strip()}
    metrics = {"alias": alias, "version": registered.version, "previous": previous}
    return Deployment(Outcome(None, metrics, outputs, current == registered.version), alias, ref)


def canary_deployment(ctx: StageContext, reg: Any, registered: RegisteredVersion) -> Deployment:
    """Start (or, on a re-run, find) the canary rollout of the registered version against the champion."""
    from tuneloop.rollout import controller
    from tuneloop.rollout.notify import notifier_for

    c = ctx.cfg
    running = reg.get_rollout(c.model_name)
    cached = running is not None and running.status == "running" and running.candidate_version == registered.version
    if cached and running is not None:
        record = running
    else:
        notifier = notifier_for(c)
        try:
            record = controller.start(
                reg,
                f"{c.model_name}:{registered.version}",
                policy=c.deploy.canary.policy_dict(),
                notifier=notifier,
                reason=f"canary from run {ctx.run_id}",
            )
        finally:
            notifier.close(timeout=10.0)
    ref = f"{c.model_name}@canary"
    metrics = {
        "strategy": "canary",
        "rollout_id": record.rollout_id,
        "candidate": record.candidate,
        "baseline": record.baseline,
        "weight": record.weight,
    }
    outputs = {
        "ref": ref,
        "serve": f"tuneloop serve {ctx.config_path or ''}".strip(),
        "wait": f"tuneloop rollout status {c.model_name} --wait",
    }
    return Deployment(Outcome(None, metrics, outputs, cached), "canary", ref)


# ------------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class StageSpec:
    """One row of the stage table: which stage, the function that runs it on the previous stage's result,
    and whether a config runs it at all."""

    stage: PipelineStage
    run: Callable[[StageContext, Any], StageOutput]
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True


STAGES: tuple[StageSpec, ...] = (
    StageSpec(PipelineStage.DATA_VALIDATION, data_validation),
    StageSpec(PipelineStage.PREPROCESSING, preprocessing),
    StageSpec(PipelineStage.TRAINING, training),
    StageSpec(PipelineStage.EVALUATION, evaluation),
    StageSpec(PipelineStage.MODEL_REGISTRY, model_registry),
    StageSpec(PipelineStage.DEPLOYMENT, deployment, enabled=lambda cfg: cfg.deploy.auto_deploy),
)


# ---------------------------------------------------------------------------------------------- progress


class TrainProgress:
    """A Rich progress bar (with ETA and the latest loss) for training steps, on the run's console."""

    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("  training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, step: int, total: int, row: dict[str, Any]) -> None:
        loss = f"{row['loss']:.4f}" if row.get("loss") is not None else "-"
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, completed=step, loss=loss)
        self.progress.update(self.task, completed=step, total=total, loss=loss)


class EvalProgress:
    """Rich progress bars (with ETA) for the evaluation: one per model and suite (``base: harmful 120/330``), on
    the run's console; a bar appears when its model starts on its suite.

    With ``path`` (the run's ``eval_progress.json``), the same counts are also written there, at most every
    ``EVAL_PROGRESS_EVERY_S`` and when a suite finishes, for the web UI's run page while the stage runs (the scored
    items themselves reach the run directory only when the stage ends)."""

    def __init__(self, console, path: Path | None = None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.path = path
        self.counts: dict[str, dict[str, int]] = {}
        self.written = 0.0

    def __enter__(self) -> EvalProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
        self._write()

    def update(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total, completed=done)
        self.progress.update(self.tasks[label], completed=done, total=total)
        self.counts[label] = {"done": int(done), "total": int(total)}
        if done >= total or time.monotonic() - self.written >= EVAL_PROGRESS_EVERY_S:
            self._write()

    def _write(self) -> None:
        if self.path is None or not self.counts:
            return
        suites = [
            {"suite": label, "items_done": c["done"], "items_total": c["total"]} for label, c in self.counts.items()
        ]
        try:
            atomic_write_json(self.path, {"suites": suites})
        except OSError as exc:  # the console bars are the progress; the UI's copy is a convenience
            log.warning("could not write %s: %s", self.path, exc)
        self.written = time.monotonic()
