"""The loop: stages in order, run records, content-hash caching and resume.

``FineTunePipeline(cfg).run()`` runs each stage of :class:`PipelineStage` in order and stops at the first that
fails. Every stage's work is cached under ``cache/<stage>/<key>/`` where ``key`` hashes the stage's inputs
(data digests, the config it reads, upstream keys, the code version); a stage whose ``result.json`` exists is
not redone. Training checkpoints live in its cache directory, so a killed run resumes where it stopped.
Each run gets ``runs/<run_id>/`` with the resolved config, one JSON per stage, logs and an HTML report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import yaml

from tuneloop.config import PipelineConfig, coerce_config
from tuneloop.errors import ConfigError, InputError, StageError, TuneloopError
from tuneloop.fsutil import atomic_write_json, atomic_write_text, model_fingerprint, read_json, sha256_file, sha256_json  # noqa: F401 (model_fingerprint: re-exported)
from tuneloop.version import code_version
from tuneloop.workspace import Workspace, pid_alive, utcnow

log = logging.getLogger("tuneloop")


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


# ------------------------------------------------------------------------------------------ fingerprints


def _data_source_problem(value: str) -> str | None:
    """Why a data source cannot be used (``None`` when it looks usable; a hub name is checked when read)."""
    from tuneloop.data.validate import SUPPORTED_SUFFIXES

    p = Path(value)
    if p.is_dir():
        return None
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED_SUFFIXES:
            return f"unsupported file type {p.suffix!r} in {value}; use {', '.join(SUPPORTED_SUFFIXES)}, a directory or a dataset name"
        return None
    if os.path.isabs(value) or p.suffix.lower() in SUPPORTED_SUFFIXES:
        return f"file not found: {value}; check the path (relative paths are resolved against the config's directory)"
    return None


def _data_digest(value: str | None) -> str | None:
    """Content identity of a data source: a file's digest, a directory's file digests, or the name itself."""
    if not value:
        return None
    p = Path(value)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return sha256_json([(f.relative_to(p).as_posix(), sha256_file(f)) for f in sorted(p.rglob("*")) if f.is_file()])
    return f"name:{value}"


def _file_digest(path: str | None) -> str | None:
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


# ------------------------------------------------------------------------------------------------ pipeline


class FineTunePipeline:
    """Runs the loop for one config. ``run()`` returns the summary documented in DESIGN.md."""

    def __init__(
        self,
        config: PipelineConfig | dict[str, Any] | str | os.PathLike[str],
        *,
        use_cache: bool = True,
        console=None,
        config_path: str | None = None,
    ):
        self.cfg = coerce_config(config)
        if config_path is None and isinstance(config, (str, os.PathLike)):
            config_path = str(Path(config).resolve())
        self.config_path = config_path
        self.ws = Workspace.for_config(self.cfg)
        self.use_cache = use_cache
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self.stages = [s for s in PipelineStage if s is not PipelineStage.DEPLOYMENT or self.cfg.deploy.auto_deploy]
        self._outputs: dict[PipelineStage, dict[str, Any]] = {}
        self._keys: dict[PipelineStage, str] = {}

    # -------------------------------------------------------------------------------------------- checks

    def preflight(self) -> None:
        """Problems that can be found before any work is done (raises ConfigError, exit code 2)."""
        c = self.cfg
        problems = []
        for key, value in (
            ("data.train_data", c.data.train_data),
            ("data.eval_data", c.data.eval_data),
            ("eval.general_text", c.eval.general_text),
            ("eval.redteam_prompts", c.eval.redteam_prompts),
            ("train.accelerate_config", c.train.accelerate_config),
            ("eval.benign_prompts", c.eval.benign_prompts),
            ("eval.mc_suite", c.eval.mc_suite),
            *((f"eval.suites.{s.name}.path", s.path) for s in c.eval.suites),
        ):
            if not value:
                continue
            if key.startswith("data."):
                problem = _data_source_problem(value)
                if problem:
                    problems.append(f"{key}: {problem}")
            elif not Path(value).is_file():
                problems.append(f"{key}: file not found: {value}; check the path (relative paths are resolved against the config's directory)")
        for spec in c.eval.suites:
            if spec.kind == "lmeval":
                from tuneloop.evaluate.lmeval import preflight_problems

                problems += preflight_problems(spec)
        bm = c.base_model
        if os.path.isabs(bm) and not (Path(bm) / "config.json").is_file():
            problems.append(f"base_model: {bm} is not a model directory (no config.json); point it at a saved Hugging Face model")
        if c.train.method == "qlora":
            try:
                from tuneloop.modeling import require_cuda_for_qlora

                require_cuda_for_qlora()
            except StageError as exc:
                problems.append(f"train.method: {exc}")
        from tuneloop.registry.api import registry_problem

        if (problem := registry_problem(c)) is not None:
            problems.append(problem)
        tracker = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}.get(c.train.report_to)
        if tracker:
            import importlib.util

            if not any(importlib.util.find_spec(m) for m in tracker):
                problems.append(
                    f"train.report_to: {c.train.report_to} is not installed; `pip install {tracker[0]}` or set train.report_to: none"
                )
        if c.train.backend == "command":
            from tuneloop.train.external import command_problems

            problems += command_problems(c.train.command)
        if c.train.precision in ("bf16", "fp16"):
            import torch

            if not torch.cuda.is_available():
                problems.append(f"train.precision: {c.train.precision} needs a CUDA GPU; use `auto` or `fp32` on this machine")
        if problems:
            raise ConfigError(problems, self.config_path)

    def prepare_eval_items(self) -> Path:
        """Run (or re-use from the cache) data validation and preprocessing; return the eval items file."""
        for stage in (PipelineStage.DATA_VALIDATION, PipelineStage.PREPROCESSING):
            res = StageResult(stage)
            getattr(self, f"_stage_{stage.value}")(res, "", None)
            if res.error:
                raise InputError(f"{stage.value}: {res.error}")
        return Path(self._outputs[PipelineStage.PREPROCESSING]["eval_items"])

    # ---------------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        ws, cfg = self.ws, self.cfg
        ws.root.mkdir(parents=True, exist_ok=True)
        run_id = ws.new_run_id()
        run_dir = ws.run_dir(run_id)
        (run_dir / "stages").mkdir(parents=True)
        (run_dir / "logs").mkdir()
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        results = {s: StageResult(s) for s in self.stages}
        self._results = results
        record: dict[str, Any] = {
            "run_id": run_id,
            "pipeline": cfg.name,
            "status": "running",
            "pid": os.getpid(),
            "started_at": utcnow(),
            "ended_at": None,
            "config_path": self.config_path,
            "code_version": code_version(),
            "stages": {},
        }

        def save() -> None:
            record["stages"] = {s.value: r.to_dict() for s, r in results.items()}
            atomic_write_json(run_dir / "run.json", record)

        save()
        run_log = _attach_log(run_dir / "run.log")
        t_run = time.perf_counter()
        self.console.print(f"[bold]tuneloop[/] run [cyan]{run_id}[/] of [bold]{cfg.name}[/] -> {run_dir}")
        failed = False
        try:
            for stage in self.stages:
                res = results[stage]
                if failed:
                    res.status = "skipped"
                    continue
                res.status = "running"
                save()
                self._run_stage(stage, res, run_id, run_dir)
                atomic_write_json(run_dir / "stages" / f"{stage.value}.json", {"stage": stage.value, **res.to_dict(), "outputs": res.outputs, "key": self._keys.get(stage)})
                save()
                failed = res.status == "failed"
        except KeyboardInterrupt:
            for r in results.values():
                if r.status == "running":
                    r.status, r.error = "failed", "interrupted (Ctrl-C); run the same command again to resume"
                elif r.status == "pending":
                    r.status = "skipped"
            record.update(status="interrupted", ended_at=utcnow())
            save()
            _detach_log(run_log)
            raise
        overall = "failed" if failed else "passed"
        record.update(status=overall, ended_at=utcnow(), duration_s=round(time.perf_counter() - t_run, 3))
        summary = {
            "pipeline": cfg.name,
            "run_id": run_id,
            "overall": overall,
            "stages": {s.value: r.to_dict() for s, r in results.items()},
            "run_dir": str(run_dir),
            "duration_s": record["duration_s"],
        }
        reg = results.get(PipelineStage.MODEL_REGISTRY)
        if reg and reg.status == "passed":
            summary["model_version"] = reg.outputs.get("ref")
            record["model_version"] = summary["model_version"]
        save()
        atomic_write_json(run_dir / "summary.json", summary)
        try:
            from tuneloop.report.html import write_report

            write_report(run_dir)
        except Exception as exc:  # the report is a convenience; never fail a run over it
            log.warning("could not write the HTML report: %s", exc)
        _detach_log(run_log)
        return summary

    def _run_stage(self, stage: PipelineStage, res: StageResult, run_id: str, run_dir: Path) -> None:
        handler = _attach_log(run_dir / "logs" / f"{stage.value}.log")
        t0 = time.perf_counter()
        self.console.print(f"[bold]>[/] {stage.value}")
        try:
            fn: Callable[[StageResult, str, Path], None] = getattr(self, f"_stage_{stage.value}")
            fn(res, run_id, run_dir)
            res.status = "failed" if res.error else "passed"
        except TuneloopError as exc:
            res.status, res.error = "failed", str(exc)
        except Exception as exc:
            log.error("stage %s crashed:\n%s", stage.value, traceback.format_exc())
            res.status = "failed"
            res.error = f"{type(exc).__name__}: {exc} (traceback in {run_dir / 'logs' / (stage.value + '.log')})"
        finally:
            res.duration_s = time.perf_counter() - t0
            _detach_log(handler)
        style = {"passed": "green", "failed": "red"}.get(res.status, "yellow")
        note = " (cached)" if res.cached else ""
        self.console.print(f"  [{style}]{res.status}[/]{note} in {res.duration_s:.1f}s" + (f": {res.error}" if res.error else ""))

    # -------------------------------------------------------------------------------------------- caching

    def _cached(
        self, stage: PipelineStage, inputs: dict[str, Any], compute: Callable[[Path], tuple[dict, dict]]
    ) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Return (metrics, outputs, cached) for a stage, computing into its cache dir when needed.

        ``result.json`` is written last and atomically, so a directory without it is unfinished work
        (training resumes from its checkpoints; other stages start again).
        """
        key = sha256_json({"stage": stage.value, "inputs": inputs, "code": code_version()})[:32]
        self._keys[stage] = key
        d = self.ws.stage_cache(stage.value, key)
        marker = d / "result.json"
        with self.ws.lock(f"{stage.value}/{key}"):
            if self.use_cache and marker.is_file():
                r = read_json(marker)
                return r["metrics"], r["outputs"], True
            if not self.use_cache and d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            metrics, outputs = compute(d)
            atomic_write_json(marker, {"stage": stage.value, "key": key, "inputs": inputs, "metrics": metrics, "outputs": outputs, "at": utcnow()})
            return metrics, outputs, False

    # ---------------------------------------------------------------------------------------------- stages

    def _stage_data_validation(self, res: StageResult, run_id: str, run_dir: Path) -> None:
        from tuneloop.data.validate import checks_from_config, clean_texts, gate_failures, report_html, data_gates, validate_dataset

        c, d = self.cfg, self.cfg.data
        for key, value in (("data.train_data", d.train_data), ("data.eval_data", d.eval_data)):
            problem = _data_source_problem(value) if value else None
            if problem:
                raise StageError(f"{key}: {problem}")
        checks = checks_from_config(d)
        inputs = {
            "train": _data_digest(d.train_data),
            "eval": _data_digest(d.eval_data),
            "format": d.format,
            "checks": {k: v for k, v in vars(checks).items() if k != "num_workers"},
            "tokenizer": model_fingerprint(c.base_model),
            "chat_template": d.chat_template,
        }
        if c.train.objective == "dpo":
            inputs["objective"] = "dpo"

        def compute(out: Path) -> tuple[dict, dict]:
            tok = None
            try:
                from tuneloop.modeling import load_tokenizer

                tok = load_tokenizer(c.base_model, d.chat_template)
            except Exception as exc:  # the over-long rule is then reported as not checked
                log.warning("data validation: no tokenizer for the over-long check (%s)", exc)
            reports = {}
            eval_texts = None
            if d.eval_data:
                reports["eval"] = validate_dataset(d.eval_data, out, fmt=d.format, name="eval", checks=checks, tokenizer=tok)
                eval_texts = clean_texts(Path(reports["eval"]["clean_path"]))
            reports = {"train": validate_dataset(d.train_data, out, fmt=d.format, name="train", checks=checks, tokenizer=tok, eval_texts=eval_texts), **reports}
            metrics: dict[str, Any] = {}
            outputs: dict[str, Any] = {}
            keys = ("format", "records", "valid", "invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped",
                    "overlong_dropped", "valid_ratio", "duplicate_ratio", "contamination_ratio", "pii", "pii_records_kept", "digest", "rules")
            for split, rep in reports.items():
                p = "" if split == "train" else "eval_"
                for k in keys:
                    metrics[p + k] = rep[k]
                outputs[f"{split}_clean"] = rep["clean_path"]
                outputs[f"{split}_quarantine"] = rep["quarantine_path"]
                outputs[f"{split}_report"] = rep["report_path"]
            return metrics, outputs

        res.metrics, res.outputs, res.cached = self._cached(PipelineStage.DATA_VALIDATION, inputs, compute)
        self._outputs[PipelineStage.DATA_VALIDATION] = res.outputs
        problems = []
        for split, key, path in (("train", "data.train_data", d.train_data), ("eval", "data.eval_data", d.eval_data)):
            if not path:
                continue
            report = read_json(Path(res.outputs[f"{split}_report"]))
            # The gates are applied outside the cache (changing a threshold re-uses the checks); a run keeps a copy
            # (`tuneloop eval` passes no run directory).
            gates = data_gates(report, d)
            if run_dir is not None:
                (run_dir / "data").mkdir(exist_ok=True)
                report = {**report, "report_path": str(run_dir / "data" / f"{split}.report.json")}
                atomic_write_json(run_dir / "data" / f"{split}.report.json", {**report, "gates": [vars(g) for g in gates]})
                atomic_write_text(run_dir / "data" / f"{split}.report.html", report_html(report, gates))
            if report["records"] == 0:
                problems.append(f"{key}: {path} contains no records")
                continue
            problems += gate_failures(report, d, split=split)
            if c.train.objective == "dpo" and report["format"] != "preference":
                problems.append(
                    f"{key}: train.objective dpo needs preference data (prompt/chosen/rejected), but {path} is "
                    f"{report['format']}; set data.format: preference or point the data at preference records"
                )
        res.error = "; ".join(problems)

    def _stage_preprocessing(self, res: StageResult, run_id: str, run_dir: Path) -> None:
        c, dv = self.cfg, self._outputs[PipelineStage.DATA_VALIDATION]
        inputs = {
            "data": self._keys[PipelineStage.DATA_VALIDATION],
            "tokenizer": model_fingerprint(c.base_model),
            "chat_template": c.data.chat_template,
            "max_length": c.data.max_length,
            "eval_split": c.data.eval_split if not c.data.eval_data else None,
            "seed": c.seed,
            "train_on_inputs": c.train.train_on_inputs,
        }
        if c.train.objective == "dpo":
            inputs["objective"] = "dpo"

        def compute(out: Path) -> tuple[dict, dict]:
            from tuneloop.data.prepare import prepare_dataset, prepare_preferences
            from tuneloop.modeling import load_tokenizer

            tok = load_tokenizer(c.base_model, c.data.chat_template)
            if c.train.objective == "dpo":
                metrics = prepare_preferences(
                    Path(dv["train_clean"]), Path(dv["eval_clean"]) if dv.get("eval_clean") else None, out,
                    eval_split=c.data.eval_split, seed=c.seed,
                )
            else:
                metrics = prepare_dataset(
                    tok,
                    Path(dv["train_clean"]),
                    Path(dv["eval_clean"]) if dv.get("eval_clean") else None,
                    out,
                    max_length=c.data.max_length,
                    eval_split=c.data.eval_split,
                    seed=c.seed,
                    train_on_inputs=c.train.train_on_inputs,
                )
            tok.save_pretrained(str(out / "tokenizer"))
            return metrics, {"train_dataset": str(out / "train"), "eval_items": str(out / "eval.jsonl"), "tokenizer": str(out / "tokenizer"), "dropped": str(out / "dropped.jsonl"),
                             "train_records": str(out / "train_records.jsonl"), "eval_records": str(out / "eval_records.jsonl")}

        res.metrics, res.outputs, res.cached = self._cached(PipelineStage.PREPROCESSING, inputs, compute)
        self._outputs[PipelineStage.PREPROCESSING] = res.outputs
        if res.metrics["train_samples"] == 0:
            res.error = f"no training samples left after tokenization; see {res.outputs['dropped']}"
        elif res.metrics["eval_samples"] == 0:
            res.error = "no evaluation items (each needs a final assistant turn); add data.eval_data or more training records"

    def _stage_training(self, res: StageResult, run_id: str, run_dir: Path) -> None:
        c, prep = self.cfg, self._outputs[PipelineStage.PREPROCESSING]
        inputs = {
            "data": self._keys[PipelineStage.PREPROCESSING],
            "base_model": c.base_model,
            "base_fingerprint": model_fingerprint(c.base_model),
            "train": c.train.model_dump(mode="json", exclude={"save_steps"}),
            "seed": c.seed,
        }

        def compute(out: Path) -> tuple[dict, dict]:
            from tuneloop.modeling import load_tokenizer
            from tuneloop.train.sft import train_sft

            train = train_sft
            if c.train.objective == "dpo":
                from tuneloop.train.dpo import train_dpo as train
            tok = load_tokenizer(prep["tokenizer"])
            if c.train.backend == "command":
                from tuneloop.train.external import run_command

                metrics = run_command(c, prep, out, tok)
                return metrics, {"model_dir": str(out / "model"), "kind": metrics["kind"], "train_metrics": str(out / "train_metrics.jsonl")}
            with _TrainProgress(self.console) as bar:
                if c.train.num_processes > 1 or c.train.accelerate_config:
                    from tuneloop.train.launch import train_distributed

                    metrics = train_distributed(c, Path(prep["train_dataset"]), out, tokenizer_dir=prep["tokenizer"], progress=bar.update)
                else:
                    metrics = train(c, Path(prep["train_dataset"]), out, tokenizer=tok, progress=bar.update)
            kind = "adapter" if (out / "model" / "adapter_config.json").is_file() else "model"
            return metrics, {"model_dir": str(out / "model"), "kind": kind, "train_metrics": str(out / "train_metrics.jsonl")}

        res.metrics, res.outputs, res.cached = self._cached(PipelineStage.TRAINING, inputs, compute)
        self._outputs[PipelineStage.TRAINING] = res.outputs
        shutil.copyfile(res.outputs["train_metrics"], run_dir / "train_metrics.jsonl")

    def _stage_evaluation(self, res: StageResult, run_id: str, run_dir: Path) -> None:
        c = self.cfg
        prep, tr = self._outputs[PipelineStage.PREPROCESSING], self._outputs[PipelineStage.TRAINING]
        inputs = {
            "data": self._keys[PipelineStage.PREPROCESSING],
            "model": self._keys[PipelineStage.TRAINING],
            "eval": c.eval.model_dump(mode="json"),
            "suites": {"general": _file_digest(c.eval.general_text), "redteam": _file_digest(c.eval.redteam_prompts),
                       "benign": _file_digest(c.eval.benign_prompts), "mc": _file_digest(c.eval.mc_suite),
                       "paths": {s.name: _file_digest(s.path) for s in c.eval.suites if s.path},
                       # lm-eval task YAMLs and their data files (key only present with lmeval suites)
                       **({"lmeval": {s.name: model_fingerprint(s.include_path) for s in c.eval.suites if s.kind == "lmeval" and s.include_path}}
                          if any(s.kind == "lmeval" for s in c.eval.suites) else {})},
            "gates": c.gates.model_dump(mode="json"),
        }
        reference, note = None, ""
        if c.gates.against == "champion":
            from tuneloop.evaluate.evaluation import champion_ref

            reference, note = champion_ref(c, self.ws.root)
            inputs["against"] = reference.digest if reference else "base"

        def compute(out: Path) -> tuple[dict, dict]:
            from tuneloop.evaluate.evaluation import evaluate_candidate

            def say(what: str) -> None:
                self.console.print(f"  evaluating {what} ...")

            metrics, gates = evaluate_candidate(
                c, Path(prep["eval_items"]), Path(tr["model_dir"]), out,
                base_cache_dir=self.ws.cache_dir / "evaluation-base", progress=say, reference=reference,
            )
            if note:
                metrics["against_note"] = note
            return metrics, {"gates": gates, "items": str(out / "items.jsonl")}

        res.metrics, res.outputs, res.cached = self._cached(PipelineStage.EVALUATION, inputs, compute)
        self._outputs[PipelineStage.EVALUATION] = res.outputs
        res.metrics = {**res.metrics, "gates": res.outputs["gates"]}
        shutil.copyfile(res.outputs["items"], run_dir / "eval_items.jsonl")
        blocked = [f"{name} {g.get('verdict', 'FAIL')}: {g.get('reason', '')}" for name, g in res.outputs["gates"].items() if g["passed"] is False]
        if blocked:
            res.error = "gate blocked: " + "; ".join(blocked)

    def _stage_model_registry(self, res: StageResult, run_id: str, run_dir: Path) -> None:
        from tuneloop.registry.api import open_registry
        from tuneloop.registry.lineage import base_model_ref, git_info

        c = self.cfg
        R = self._results
        val = R[PipelineStage.DATA_VALIDATION].metrics
        tr_out = self._outputs[PipelineStage.TRAINING]
        ev_metrics = {k: v for k, v in R[PipelineStage.EVALUATION].metrics.items() if k != "gates"}
        gates = self._outputs[PipelineStage.EVALUATION]["gates"]
        lineage = {
            "run_id": run_id,
            "pipeline": c.name,
            "base_model": c.base_model,
            "base": (base := base_model_ref(c.base_model)),
            "base_model_fingerprint": base["digest"],
            "data": {"train_digest": val.get("digest"), "eval_digest": val.get("eval_digest"), "train_path": c.data.train_data, "eval_path": c.data.eval_data},
            "config_hash": sha256_json(c.to_dict()),
            "config": c.to_dict(),
            "code_version": code_version(),
            "stage_keys": {s.value: k for s, k in self._keys.items()},
            "git": git_info(Path(self.config_path).parent if self.config_path else None),
            "config_path": self.config_path,
        }
        cache_key = sha256_json([self._keys[PipelineStage.TRAINING], self._keys[PipelineStage.EVALUATION]])
        reg = open_registry(c, self.ws)
        version = reg.register(
            c.model_name,
            Path(tr_out["model_dir"]),
            artifact_kind=tr_out["kind"],
            base_model=c.base_model,
            lineage=lineage,
            metrics={"training": R[PipelineStage.TRAINING].metrics, "evaluation": ev_metrics},
            gates=gates,
            cache_key=cache_key,
            reason=f"passed gates in run {run_id}",
        )
        res.cached = bool(version.get("existing"))
        res.metrics = {"model": version["model"], "version": version["version"], "artifact_sha256": version["artifact_digest"]}
        res.outputs = {"ref": version["ref"], "version": version["version"], "artifact_path": version["artifact_path"]}
        self._outputs[PipelineStage.MODEL_REGISTRY] = res.outputs

    def _stage_deployment(self, res: StageResult, run_id: str, run_dir: Path) -> None:
        from tuneloop.registry.api import open_registry

        c = self.cfg
        reg = open_registry(c, self.ws)
        version = self._outputs[PipelineStage.MODEL_REGISTRY]["version"]
        alias = c.deploy.alias
        current = reg.get_alias(c.model_name, alias)
        if current == version:
            res.cached = True
        else:  # `previous` (or `<alias>-previous`) keeps the version it replaced, for `tuneloop models rollback`
            reg.promote(c.model_name, version, alias=alias, reason=f"auto_deploy in run {run_id}")
        res.metrics = {"alias": alias, "version": version, "previous": current}
        res.outputs = {"ref": f"{c.model_name}@{alias}", "serve": f"tuneloop serve {self.config_path or ''}".strip()}


# ---------------------------------------------------------------------------------------------- helpers


class _TrainProgress:
    """A Rich progress bar (with ETA and the latest loss) for training steps, on stderr."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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

    def __enter__(self) -> "_TrainProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, step: int, total: int, row: dict[str, Any]) -> None:
        loss = f"{row['loss']:.4f}" if row.get("loss") is not None else "-"
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, completed=step, loss=loss)
        self.progress.update(self.task, completed=step, total=total, loss=loss)


_LOGGERS = ("tuneloop", "transformers", "peft", "accelerate")


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(handler)  # third-party loggers keep their own level (warnings)
    log.setLevel(logging.INFO)
    return handler


def _detach_log(handler: logging.Handler) -> None:
    for name in _LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


# ------------------------------------------------------------------------------------------------ status


def list_runs(ws: Workspace) -> list[dict[str, Any]]:
    """Every run record, newest first; a run whose process died mid-way reads as ``interrupted``."""
    runs = []
    if not ws.runs_dir.is_dir():
        return runs
    for d in sorted(ws.runs_dir.iterdir(), reverse=True):
        f = d / "run.json"
        if not f.is_file():
            continue
        try:
            rec = read_json(f)
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("status") == "running" and not pid_alive(int(rec.get("pid") or 0)):
            rec["status"] = "interrupted"
        runs.append(rec)
    return runs


def load_run(ws: Workspace, run_id: str) -> dict[str, Any]:
    matches = [r for r in list_runs(ws) if r["run_id"] == run_id or r["run_id"].startswith(run_id)]
    if len(matches) != 1:
        from tuneloop.errors import InputError

        known = ", ".join(r["run_id"] for r in list_runs(ws)[:10]) or "none"
        what = "no run" if not matches else "more than one run"
        raise InputError(f"{what} matches {run_id!r} in {ws.root}; recent runs: {known}")
    return matches[0]
