"""The runner: stages in order, run records, content-hash caching, locks, resume and interruption.

``FineTunePipeline(cfg).run()`` runs the stages of :data:`tuneloop.stages.STAGES` in order, each on the result
of the one before, and stops at the first that fails (later stages are ``skipped``). A stage's work is cached
under ``cache/<stage>/<key>/`` where ``key`` hashes the inputs the stage declares (its ``<stage>_inputs``
function) and the code version; a stage whose ``result.json`` exists is not redone. Training checkpoints live
in its cache directory, so a killed run resumes where it stopped. Each run gets ``runs/<run_id>/`` with the
resolved config, one JSON per stage, logs, a summary and an HTML report. The stages themselves are in
:mod:`tuneloop.stages`, the run history (``tuneloop status``) in :mod:`tuneloop.runs`.

A stage's own error is what a run reports, whatever fails while keeping its records: a log file that cannot be
written or closed, a ``run.json`` or ``stages/<stage>.json`` that cannot be saved (a full disk) are warnings on the
console, never exceptions that replace it. Each run keeps a small reserve file (``runs/<run_id>/.reserve``) that it
gives up when a record cannot be written for lack of space, so that ``run.json`` can still say ``failed``; when
even that fails, the console says so, and the record left ``running`` reads as ``interrupted`` once the process is
gone (:mod:`tuneloop.runs`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from tuneloop.config import PipelineConfig, coerce_config
from tuneloop.errors import ConfigError, InputError, StageError, TuneloopError
from tuneloop.fsutil import (
    LOW_SPACE_BYTES,
    atomic_write_json,
    atomic_write_text,
    free_bytes,
    is_disk_full,
    read_json,
    sha256_json,
    utcnow,
)
from tuneloop.preflight import preflight_report
from tuneloop.runs import list_runs, load_run  # noqa: F401 (re-exported: `tuneloop.pipeline.list_runs` keeps working)
from tuneloop.stages import (
    STAGES,
    CacheEntry,
    Compute,
    PipelineStage,
    StageContext,
    StageResult,
    StageSpec,
)
from tuneloop.train.parent import resolve_parent
from tuneloop.version import code_version
from tuneloop.workspace import Workspace

__all__ = ["FineTunePipeline", "PipelineStage", "StageResult"]

log = logging.getLogger(__name__)


class FineTunePipeline:
    """Runs the loop for one config. ``run()`` returns the run summary (what `tuneloop run --json` prints)."""

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
        resolve_parent(self.cfg, self.ws)  # base_model: "bot@champion" -> that version as a local model
        self.use_cache = use_cache
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self.specs: tuple[StageSpec, ...] = tuple(s for s in STAGES if s.enabled(self.cfg))
        self.warnings: list[str] = []  # from preflight(): gates that only a large effect decides
        self.stages = [s.stage for s in self.specs]
        self.lock_waits: dict[PipelineStage, str] = {}  # a stage whose lock another run held: what came of the wait

    # -------------------------------------------------------------------------------------------- checks

    def preflight(self) -> None:
        """Problems that can be found before any work is done (raises ConfigError, exit code 2), the gates'
        decidability included; its warnings are printed on the console and kept in ``warnings`` (a run records
        them in ``run.json``)."""
        problems, self.warnings = preflight_report(self.cfg)
        if problems:
            raise ConfigError(problems, self.config_path)
        for w in self.warnings:
            self.console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)

    def prepare_eval_items(self) -> Path:
        """Run (or re-use from the cache) data validation and preprocessing; return the eval items file."""
        ctx = self._context("", None)
        upstream: Any = None
        for spec in STAGES[:2]:
            upstream = spec.run(ctx, upstream)
            if upstream.outcome.error:
                raise InputError(f"{spec.stage.value}: {upstream.outcome.error}")
        return upstream.eval_items

    # ---------------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        ws, cfg = self.ws, self.cfg
        run_id = ws.new_run_id()
        run_dir = ws.run_dir(run_id)
        results = {s: StageResult(s) for s in self.stages}
        record = _RunRecord(
            run_dir,
            results,
            {
                "run_id": run_id,
                "pipeline": cfg.name,
                "status": "running",
                "pid": os.getpid(),
                "started_at": utcnow(),
                "ended_at": None,
                "config_path": self.config_path,
                "code_version": code_version(),
                "stages": {},
                **({"warnings": list(self.warnings)} if self.warnings else {}),
            },
            self.console,
        )
        record.start(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run_log = _attach_log(run_dir / "run.log")
        t_run = time.perf_counter()
        self.console.print(f"[bold]tuneloop[/] run [cyan]{run_id}[/] of [bold]{cfg.name}[/] -> {run_dir}")
        try:
            failed = self._run_stages(self._context(run_id, run_dir), results, record)
            return self._finish(record, failed, time.perf_counter() - t_run)
        except KeyboardInterrupt:
            record.interrupted()
            raise
        finally:
            _detach_log(run_log, self.console)
            record.release_reserve()

    def _context(self, run_id: str, run_dir: Path | None) -> StageContext:
        return StageContext(
            self.cfg,
            self.ws,
            self._cached,
            run_id=run_id,
            run_dir=run_dir,
            config_path=self.config_path,
            console=self.console,
        )

    def _run_stages(self, ctx: StageContext, results: dict[PipelineStage, StageResult], record: _RunRecord) -> bool:
        """Each stage on the previous one's result, until one fails; True when one did."""
        run_dir = ctx.run_dir
        assert run_dir is not None  # a run's context (prepare_eval_items' has none and never gets here)
        upstream: Any = None
        for spec in self.specs:
            res = results[spec.stage]
            res.status = "running"
            record.save()
            upstream, key = self._run_stage(spec, ctx, upstream, res)
            record.write_json(
                run_dir / "stages" / f"{spec.stage.value}.json",
                {"stage": spec.stage.value, **res.to_dict(), "outputs": res.outputs, "key": key},
            )
            record.save()
            if res.status == "failed":
                for later in self.specs[self.specs.index(spec) + 1 :]:
                    results[later.stage].status = "skipped"
                return True
        return False

    def _run_stage(self, spec: StageSpec, ctx: StageContext, upstream: Any, res: StageResult) -> tuple[Any, str | None]:
        """Run one stage into ``res`` (status, metrics, outputs, error, duration); return (its result, its cache key)."""
        stage = spec.stage
        assert ctx.run_dir is not None  # a run's context (prepare_eval_items' has none and never gets here)
        log_path = ctx.run_dir / "logs" / f"{stage.value}.log"
        handler = _attach_log(log_path)
        t0 = time.perf_counter()
        self.console.print(f"[bold]>[/] {stage.value}")
        result, key = None, None
        try:
            result = spec.run(ctx, upstream)
            out = result.outcome
            key = out.key
            res.metrics, res.outputs, res.cached, res.error = out.metrics, out.outputs, out.cached, out.error
            res.status = "failed" if out.error else "passed"
        except TuneloopError as exc:
            res.status, res.error = "failed", str(exc)
        except Exception as exc:
            log.error("stage %s crashed:\n%s", stage.value, traceback.format_exc())
            res.status = "failed"
            res.error = _crash_message(exc, stage, log_path, handler, self.ws.root)
        finally:
            res.duration_s = time.perf_counter() - t0
            _detach_log(handler, self.console)
        style = {"passed": "green", "failed": "red"}.get(res.status, "yellow")
        note = " (cached)" if res.cached else ""
        if stage in self.lock_waits:
            note = f" ({self.lock_waits.pop(stage)})"
        self.console.print(
            f"  [{style}]{res.status}[/]{note} in {res.duration_s:.1f}s" + (f": {res.error}" if res.error else "")
        )
        return result, key

    def _finish(self, record: _RunRecord, failed: bool, duration_s: float) -> dict[str, Any]:
        """Close the run record; write the summary and the HTML report; return the summary."""
        cfg, results, run_dir = self.cfg, record.results, record.run_dir
        overall = "failed" if failed else "passed"
        record.fields.update(status=overall, ended_at=utcnow(), duration_s=round(duration_s, 3))
        summary = {
            "pipeline": cfg.name,
            "run_id": record.fields["run_id"],
            "overall": overall,
            "stages": {s.value: r.to_dict() for s, r in results.items()},
            "run_dir": str(run_dir),
            "duration_s": record.fields["duration_s"],
        }
        reg = results.get(PipelineStage.MODEL_REGISTRY)
        if reg and reg.status == "passed":
            summary["model_version"] = reg.outputs.get("ref")
            record.fields["model_version"] = summary["model_version"]
        record.save()
        record.write_json(run_dir / "summary.json", summary)
        try:
            from tuneloop.report.html import write_run_report

            write_run_report(run_dir)
        except Exception as exc:  # the report is a convenience; never fail a run over it
            log.warning("could not write the HTML report: %s", exc)
            if is_disk_full(exc):
                self.console.print(
                    f"[yellow]warning:[/] could not write the HTML report in {escape(str(run_dir))}: {escape(str(exc))}",
                    highlight=False,
                )
        record.report_unsaved()
        return summary

    # -------------------------------------------------------------------------------------------- caching

    def _cached(self, stage: PipelineStage, inputs: dict[str, Any], compute: Compute) -> CacheEntry:
        """The finished cache entry of a stage for ``inputs``, computing into its cache dir when needed.

        ``result.json`` is written last and atomically, so a directory without it is unfinished work
        (training resumes from its checkpoints; other stages start again). A file lock keeps two runs of the
        same config from writing one directory at once.
        """
        key = sha256_json({"stage": stage.value, "inputs": inputs, "code": code_version()})[:32]
        d = self.ws.stage_cache(stage.value, key)
        marker = d / "result.json"
        waiting: list[float] = []

        def on_wait() -> None:  # another run (same stage inputs) holds the lock: say so before blocking
            waiting.append(time.perf_counter())
            self.console.print(
                f"  waiting for another run that is doing this {stage.value} stage (it holds the "
                "stage's lock in the workspace)" + ("; its result will be reused" if self.use_cache else "") + " ..."
            )

        with self.ws.lock(f"{stage.value}/{key}", on_wait=on_wait):
            waited = f"{time.perf_counter() - waiting[0]:.1f}s" if waiting else ""
            if self.use_cache and marker.is_file():
                r = read_json(marker)
                old, new = r.get("workspace"), str(self.ws.root)
                if old and old != new:  # a copied or moved workspace: its paths are under the new root
                    r = relocate(r, old, new)
                if waited:
                    self.lock_waits[stage] = f"cached: waited {waited} for the other run and reused its result"
                return CacheEntry(key, r["metrics"], r["outputs"], True)
            if waited:
                self.lock_waits[stage] = f"waited {waited} for another run; " + (
                    "it left no result, so this run did the work" if self.use_cache else "done again here (--no-cache)"
                )
            if not self.use_cache and d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            metrics, outputs = compute(d)
            atomic_write_json(
                marker,
                {
                    "stage": stage.value,
                    "key": key,
                    "inputs": inputs,
                    "metrics": metrics,
                    "outputs": outputs,
                    "workspace": str(self.ws.root),
                    "at": utcnow(),
                },
            )
            return CacheEntry(key, metrics, outputs, False)


def relocate(value: Any, old_root: str, new_root: str) -> Any:
    """``value`` with every string path under ``old_root`` moved under ``new_root`` (dicts and lists too)."""
    if isinstance(value, str):
        if value == old_root or value.startswith(old_root.rstrip(os.sep) + os.sep):
            return new_root + value[len(old_root) :]
        return value
    if isinstance(value, dict):
        return {k: relocate(v, old_root, new_root) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old_root, new_root) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- helpers


RESERVE_BYTES = 256 << 10  # room kept for the run's last records on a disk that fills during the run


class _RunRecord:
    """``runs/<run_id>/run.json``: the run's fields and its stages' results, saved atomically after each change.

    Saving never raises: a record that cannot be written (a full disk) is a warning on ``console``, and the run
    goes on to report its stages' own errors. ``.reserve`` holds :data:`RESERVE_BYTES` that are given back to the
    disk the first time a write fails for lack of space, and the write is tried again.
    """

    def __init__(self, run_dir: Path, results: dict[PipelineStage, StageResult], fields: dict[str, Any], console):
        self.run_dir, self.results, self.fields, self.console = run_dir, results, fields, console
        self.reserve = run_dir / ".reserve"
        self.unsaved: dict[str, OSError] = {}  # file name -> the error of its last failed write

    def start(self, config_yaml: str) -> None:
        """Create the run directory, its reserve, config and first record; a disk too full for these stops the
        run before any stage (StageError, exit 1) and leaves nothing behind."""
        try:
            (self.run_dir / "stages").mkdir(parents=True)
            (self.run_dir / "logs").mkdir()
            with open(self.reserve, "wb") as f:
                f.write(os.urandom(RESERVE_BYTES))  # random: a compressing filesystem cannot make it free
            atomic_write_text(self.run_dir / "config.yaml", config_yaml)
            self.fields["stages"] = {s.value: r.to_dict() for s, r in self.results.items()}
            atomic_write_json(self.run_dir / "run.json", self.fields)
        except OSError as exc:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise StageError(f"cannot start the run: {exc}{_disk_full_hint(exc, self.run_dir)}") from exc

    def save(self) -> bool:
        self.fields["stages"] = {s.value: r.to_dict() for s, r in self.results.items()}
        return self.write_json(self.run_dir / "run.json", self.fields)

    def write_json(self, path: Path, obj: Any) -> bool:
        """Write one of the run's JSON files atomically; on failure warn (once per file) and return False."""
        try:
            try:
                atomic_write_json(path, obj)
            except OSError as exc:
                if not (is_disk_full(exc) and self.release_reserve()):
                    raise
                atomic_write_json(path, obj)  # again, in the room the reserve gave back
        except OSError as exc:
            if path.name not in self.unsaved:
                self.console.print(
                    f"[yellow]warning:[/] could not write {escape(str(path))}: {escape(str(exc))}", highlight=False
                )
            self.unsaved[path.name] = exc
            return False
        self.unsaved.pop(path.name, None)
        return True

    def release_reserve(self) -> bool:
        """Give the reserve's space back to the disk; True when there was one."""
        try:
            self.reserve.unlink()
            return True
        except OSError:
            return False

    def report_unsaved(self) -> None:
        """At the end: say plainly when run.json could not record how the run ended."""
        exc = self.unsaved.get("run.json")
        if exc is None:
            return
        status = self.fields.get("status")
        self.console.print(
            f"[red]error:[/] {escape(str(self.run_dir / 'run.json'))} could not record that this run {status}: "
            f"{escape(str(exc))}{_disk_full_hint(exc, self.run_dir)}. The record still says `running`; "
            "`tuneloop status` reads it as interrupted once this process has ended, and nothing waits on it.",
            highlight=False,
        )

    def interrupted(self) -> None:
        """Ctrl-C: the running stage failed, the rest skipped; the next run of the same command resumes."""
        for r in self.results.values():
            if r.status == "running":
                r.status, r.error = "failed", "interrupted (Ctrl-C); run the same command again to resume"
            elif r.status == "pending":
                r.status = "skipped"
        self.fields.update(status="interrupted", ended_at=utcnow())
        self.save()


_LOGGERS = ("tuneloop", "transformers", "peft", "accelerate")


class _LogFile(logging.FileHandler):
    """A run or stage log file that never raises into the run: the first error writing it (a full disk) is kept in
    ``error``, later records are dropped, and :func:`_detach_log` reports it."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)
        self.error: BaseException | None = None
        try:
            self.stream = self._open()
        except OSError as exc:
            self.error = exc

    def emit(self, record: logging.LogRecord) -> None:
        if self.error is not None:
            return
        try:
            super().emit(record)
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.error = self.error or sys.exc_info()[1]


def _attach_log(path: Path) -> _LogFile:
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(handler)  # third-party loggers keep their own level (warnings)
    logging.getLogger("tuneloop").setLevel(logging.INFO)  # the package logger: every tuneloop.* module logs at INFO
    return handler


def _detach_log(handler: _LogFile, console=None) -> None:
    """Stop logging to ``handler`` and close its file; an error doing so (or earlier) is a warning, never raised."""
    for name in _LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    try:
        handler.close()
    except OSError as exc:
        handler.error = handler.error or exc
    if handler.error is not None and console is not None:
        console.print(
            f"[yellow]warning:[/] the log {escape(handler.baseFilename)} is incomplete: {escape(str(handler.error))}",
            highlight=False,
        )


def _crash_message(exc: Exception, stage: PipelineStage, log_path: Path, handler: _LogFile, root: Path) -> str:
    """A stage's unexpected exception as its error: type and message, what to do when the disk is full, and where
    its traceback is (or that the log could not take it)."""
    where = (
        f"traceback in {log_path}"
        if handler.error is None
        else f"its traceback could not be written to {log_path}: {handler.error}"
    )
    hint = _disk_full_hint(exc, root)
    if hint and stage == PipelineStage.TRAINING:
        hint += "; training resumes from its last complete checkpoint"
    return f"{type(exc).__name__}: {exc}{hint} ({where})"


def _disk_full_hint(exc: BaseException, path: Path) -> str:
    """``"; the disk holding PATH is full (N bytes free now): ..."`` when ``exc`` says the disk is full or the disk
    under ``path`` has under :data:`~tuneloop.fsutil.LOW_SPACE_BYTES` free, else ``""``."""
    free = free_bytes(path)
    if not (is_disk_full(exc) or (free is not None and free < LOW_SPACE_BYTES)):
        return ""
    left = f" ({free} bytes free now)" if free is not None else ""
    return f"; the disk holding {path} is full{left}: free space there and run the same command again"
