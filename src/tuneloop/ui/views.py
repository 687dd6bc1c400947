"""What each panel of the web UI shows, as plain JSON-able dicts built from the workspace and the registry API.

One function per panel (``runs_view``, ``run_view``, ``progress_view``, ``gates_view``, ``items_view``,
``compare_view``, ``data_view``, ``quarantine_view``, ``duplicates_view``, ``models_view``, ``model_view``,
``version_view``, ``feedback_view``); :mod:`tuneloop.ui.app` maps them to routes. A panel that cannot be built
raises :class:`PanelError` (code, message, HTTP status): the route answers that panel's error object and the
other panels still work.

Path safety: nothing here opens a path taken from a request. A run id is looked up among the directory names
under ``runs/`` (:func:`find_run_dir`); a data source is ``train`` or ``eval``; the files read are the run's own
(``run.json``, ``stages/``, ``eval_items.jsonl``, ``eval_progress.json``, ``data/*.report.json``) and the paths those records name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneloop.data.pii import redact_value
from tuneloop.fsutil import pid_alive
from tuneloop.registry.events import RegistryEvent
from tuneloop.registry.records import ModelVersion
from tuneloop.runs import EVAL_PROGRESS_FILE
from tuneloop.workspace import Workspace

log = logging.getLogger(__name__)

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
SOURCES = ("train", "eval")
STAGES = ("data_validation", "preprocessing", "training", "evaluation", "model_registry", "deployment")
LOG_TAIL_LINES = 40
MAX_LAUNCH_LOGS = 50  # launch logs scanned for a run's output (newest first)
MAX_TRAIN_POINTS = 2000


class PanelError(Exception):
    """A panel that cannot be shown: ``status`` (HTTP), ``code`` (stable), ``message`` (what and what to do)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ----------------------------------------------------------------------------------------------- runs


def check_workspace(ws: Workspace) -> None:
    if not ws.root.is_dir():
        raise PanelError(
            503,
            "no_workspace",
            f"the workspace {ws.root} does not exist: run `tuneloop run CONFIG` "
            "(or `tuneloop demo`) first, or start the UI with the config of an existing workspace",
        )


def run_ids(ws: Workspace) -> list[str]:
    """The names of the run directories, newest first (only names that look like run ids)."""
    check_workspace(ws)
    if not ws.runs_dir.is_dir():
        return []
    return sorted((d.name for d in ws.runs_dir.iterdir() if d.is_dir() and RUN_ID_RE.match(d.name)), reverse=True)


def find_run_dir(ws: Workspace, run_id: str) -> Path:
    """The run's directory when ``run_id`` is one of the listed runs (else 404); never a path built from input."""
    for name in run_ids(ws):
        if name == run_id:
            return ws.runs_dir / name
    raise PanelError(404, "unknown_run", f"no run {run_id!r} in {ws.root}; the Runs page lists the runs")


def read_record(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run; a missing or unreadable one is a ``corrupt_run_record`` panel error."""
    f = run_dir / "run.json"
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(rec, dict) or not isinstance(rec.get("stages", {}), dict):
            raise ValueError("not a run record (a JSON object with stages)")
    except (OSError, ValueError) as exc:
        raise PanelError(
            422,
            "corrupt_run_record",
            f"the run record {f} cannot be read ({type(exc).__name__}: {exc}); "
            "the rest of the workspace is unaffected, remove or repair that run",
        ) from None
    rec.setdefault("run_id", run_dir.name)
    if rec.get("status") == "running" and not pid_alive(int(rec.get("pid") or 0)):
        rec["status"] = "interrupted"
    return rec


def stage_rows(rec: dict[str, Any], *, metrics: bool = False) -> list[dict[str, Any]]:
    rows = []
    stages = rec.get("stages") or {}
    for name in [*STAGES, *(s for s in stages if s not in STAGES)]:
        if name not in stages:
            continue
        s = stages[name] or {}
        row = {
            "stage": name,
            "status": s.get("status"),
            "duration_s": s.get("duration_s"),
            "cached": bool(s.get("cached")),
            "error": s.get("error") or "",
        }
        if metrics:
            row["metrics"] = {k: v for k, v in (s.get("metrics") or {}).items() if k != "gates"}
        rows.append(row)
    return rows


def run_summary(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": rec.get("run_id"),
        "pipeline": rec.get("pipeline"),
        "status": rec.get("status"),
        "started_at": rec.get("started_at"),
        "ended_at": rec.get("ended_at"),
        "duration_s": rec.get("duration_s"),
        "code_version": rec.get("code_version"),
        "stages": stage_rows(rec),
    }


def runs_view(ws: Workspace) -> dict[str, Any]:
    runs, problems = [], []
    for rid in run_ids(ws):
        try:
            runs.append(run_summary(read_record(ws.runs_dir / rid)))
        except PanelError as exc:
            problems.append({"run_id": rid, "error": exc.message})
    return {"runs": runs, "problems": problems}


def run_view(ws: Workspace, run_id: str) -> dict[str, Any]:
    d = find_run_dir(ws, run_id)
    rec = read_record(d)
    run = {**run_summary(rec), "stages": stage_rows(rec, metrics=True)}
    return {"run": run, "has_report": (d / "report.html").is_file()}


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line being written, or a damaged one: skipped
                if isinstance(row, dict):
                    yield row
    except OSError:
        return


def tail_lines(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()][-n:]


def _train_log(ws: Workspace, run_dir: Path, rec: dict[str, Any]) -> tuple[Path | None, str]:
    """The trainer's log of this run: the run's copy when training ended; while it runs, the unfinished training
    cache entry (no result.json yet) whose log was written since the run started."""
    done = run_dir / "train_metrics.jsonl"
    if done.is_file():
        return done, "run"
    status = ((rec.get("stages") or {}).get("training") or {}).get("status")
    if status != "running" and rec.get("status") != "running":
        return None, ""
    from datetime import datetime

    try:
        started = datetime.fromisoformat(str(rec.get("started_at"))).timestamp()
    except ValueError:
        started = 0.0
    best: tuple[float, Path] | None = None
    cache = ws.cache_dir / "training"
    if cache.is_dir():
        for entry in cache.iterdir():
            f = entry / "train_metrics.jsonl"
            if (entry / "result.json").exists() or not f.is_file():
                continue
            mtime = f.stat().st_mtime
            if mtime >= started and (best is None or mtime > best[0]):
                best = (mtime, f)
    return (best[1], "cache (training in progress)") if best else (None, "")


def progress_view(ws: Workspace, run_id: str) -> dict[str, Any]:
    """Live progress: the trainer's loss and learning rate per step, evaluation items scored per suite, the log tail."""
    d = find_run_dir(ws, run_id)
    rec = read_record(d)
    running = next((s["stage"] for s in stage_rows(rec) if s["status"] == "running"), None)
    log, source = _train_log(ws, d, rec)
    points = []
    if log is not None:
        for row in _jsonl(log):
            if "step" in row and ("loss" in row or "learning_rate" in row):
                points.append({k: row.get(k) for k in ("step", "epoch", "loss", "learning_rate")})
        if len(points) > MAX_TRAIN_POINTS:  # keep the chart light: every k-th point, and the last
            k = -(-len(points) // MAX_TRAIN_POINTS)
            points = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
    suites = _eval_progress(d)
    log_file, log_source = run_log(ws, d, running)
    return {
        "status": rec.get("status"),
        "stage": running,
        "train": {"points": points, "source": source},
        "eval": {"suites": suites},
        "log_tail": tail_lines(log_file),
        "log_source": log_source,
        "log_path": log_file.relative_to(ws.root).as_posix(),
    }


def _eval_progress(run_dir: Path) -> list[dict[str, Any]]:
    """Items scored per suite: from ``eval_items.jsonl`` once the evaluation stage ended, else the counts the running
    stage writes to ``eval_progress.json`` (per model and suite, with the total: ``base: task``)."""
    items = run_dir / "eval_items.jsonl"
    if items.is_file():
        counts: dict[str, int] = {}
        for row in _jsonl(items):
            counts[str(row.get("suite"))] = counts.get(str(row.get("suite")), 0) + 1
        return [{"suite": s, "items_done": n} for s, n in counts.items()]
    try:
        live = json.loads((run_dir / EVAL_PROGRESS_FILE).read_text(encoding="utf-8"))
        return [
            {"suite": str(s["suite"]), "items_done": int(s["items_done"]), "items_total": int(s["items_total"])}
            for s in live["suites"]
        ]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a torn or foreign file: no live counts, no 500
        log.warning("%s: unreadable (%s); no live evaluation progress shown", run_dir / EVAL_PROGRESS_FILE, exc)
        return []


def _size(p: Path) -> int:
    try:
        return p.stat().st_size if p.is_file() else 0
    except OSError:
        return 0


def run_log(ws: Workspace, run_dir: Path, running: str | None) -> tuple[Path, str]:
    """Which log the run page tails: the running stage's ``logs/<stage>.log``; else ``run.log`` (the pipeline's
    log records of the whole run: warnings, errors, INFO from tuneloop.*; often empty, because the progress lines
    go to the terminal); when that is empty and the UI started the run, its launch output (``ui/launches/*.log``,
    the terminal's lines). Returns the path and ``"stage"``, ``"run"`` or ``"launch"``."""
    stage_log = run_dir / "logs" / f"{running}.log"
    if running and _size(stage_log):
        return stage_log, "stage"
    main = run_dir / "run.log"
    if _size(main):
        return main, "run"
    launches = ws.root / "ui" / "launches"
    try:
        logs = sorted(launches.glob("*.log"), reverse=True)[:MAX_LAUNCH_LOGS] if launches.is_dir() else []
    except OSError:
        logs = []
    for p in logs:  # the launch prints "tuneloop run <run_id> of ..." in its first lines
        try:
            with p.open("rb") as f:
                head = f.read(20000).decode("utf-8", errors="replace")
        except OSError:
            continue
        if f"run {run_dir.name} " in head:
            return p, "launch"
    return main, "run"


# ----------------------------------------------------------------------------------------------- gates


# A gate recorded before verdicts existed has only `passed` (True, False, or None when not applied).
_VERDICT_OF_PASSED: dict[Any, str] = {True: "PASS", False: "FAIL"}


def _gate_row(name: str, stage: str, g: dict[str, Any]) -> dict[str, Any]:
    interval = g.get("interval")
    return {
        "name": name,
        "stage": stage,
        "metric": g.get("metric"),
        "suite": g.get("suite"),
        "op": g.get("op"),
        "threshold": g.get("threshold"),
        "value": g.get("value"),
        "interval": list(interval) if isinstance(interval, (list, tuple)) and len(interval) == 2 else None,
        "verdict": g.get("verdict") or _VERDICT_OF_PASSED.get(g.get("passed"), "NOT_APPLIED"),
        "blocks": bool(g.get("blocks")),
        "reason": g.get("reason") or "",
        "n": g.get("n"),
    }


def gate_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every gate of the run: the data gates (data validation) and the evaluation gates, in the run's order."""
    rows = []
    for stage in ("data_validation", "evaluation"):
        gates = (((rec.get("stages") or {}).get(stage) or {}).get("metrics") or {}).get("gates") or {}
        if isinstance(gates, dict):
            rows += [_gate_row(str(n), stage, g) for n, g in gates.items() if isinstance(g, dict)]
    return rows


def overall(rec: dict[str, Any]) -> str:
    st = rec.get("status")
    return st if st in ("passed", "failed", "running", "interrupted") else str(st)


def gates_view(ws: Workspace, run_id: str) -> dict[str, Any]:
    rec = read_record(find_run_dir(ws, run_id))
    return {"run_id": rec.get("run_id"), "overall": overall(rec), "gates": gate_rows(rec)}


ITEM_FIELDS = (
    "suite",
    "id",
    "prompt",
    "reference",
    "base",
    "candidate",
    "base_score",
    "candidate_score",
    "base_refused",
    "candidate_refused",
    "base_harmful",
    "candidate_harmful",
    "choices",
    "answer",
    "orders",
)


def items_view(
    ws: Workspace, run_id: str, *, suite: str | None = None, only: str = "all", limit: int = 50, offset: int = 0
) -> dict[str, Any]:
    """The items behind the verdicts: both models' answers side by side with their scores and the judge's verdicts."""
    d = find_run_dir(ws, run_id)
    counts: dict[str, int] = {}
    picked: list[dict[str, Any]] = []
    total = 0
    limit, offset = max(1, min(int(limit), 500)), max(0, int(offset))
    for row in _jsonl(d / "eval_items.jsonl"):
        s = str(row.get("suite"))
        counts[s] = counts.get(s, 0) + 1
        if suite and s != suite:
            continue
        if (
            only == "differ"
            and row.get("base_score") == row.get("candidate_score")
            and row.get("base_refused") == row.get("candidate_refused")
            and row.get("base") == row.get("candidate")
        ):
            continue
        if offset <= total < offset + limit:
            picked.append({k: row[k] for k in ITEM_FIELDS if k in row})
        total += 1
    return {
        "suites": [{"suite": s, "count": n} for s, n in counts.items()],
        "total": total,
        "offset": offset,
        "items": redact_value(picked),
    }


def _flat_metrics(rec: dict[str, Any]) -> dict[tuple[str, str], Any]:
    out = {}
    for stage, s in (rec.get("stages") or {}).items():
        for k, v in ((s or {}).get("metrics") or {}).items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[(stage, k)] = v
    return out


def compare_view(ws: Workspace, a: str, b: str) -> dict[str, Any]:
    ra, rb = read_record(find_run_dir(ws, a)), read_record(find_run_dir(ws, b))
    ga = {g["name"]: g for g in gate_rows(ra)}
    gb = {g["name"]: g for g in gate_rows(rb)}
    pick = ("value", "interval", "verdict", "threshold", "op")
    gates = [
        {
            "name": n,
            "a": {k: ga[n][k] for k in pick} if n in ga else None,
            "b": {k: gb[n][k] for k in pick} if n in gb else None,
        }
        for n in [*ga, *(x for x in gb if x not in ga)]
    ]
    ma, mb = _flat_metrics(ra), _flat_metrics(rb)
    metrics = [
        {"stage": st, "key": k, "a": ma.get((st, k)), "b": mb.get((st, k))}
        for st, k in [*ma, *(x for x in mb if x not in ma)]
    ]
    return {
        "a": ra.get("run_id"),
        "b": rb.get("run_id"),
        "a_status": ra.get("status"),
        "b_status": rb.get("status"),
        "gates": gates,
        "metrics": metrics,
    }


# ----------------------------------------------------------------------------------------------- data


REPORT_FIELDS = (
    "format",
    "records",
    "valid",
    "invalid",
    "duplicates",
    "near_duplicates",
    "contaminated",
    "pii_dropped",
    "overlong_dropped",
    "accounting",
    "valid_ratio",
    "duplicate_ratio",
    "contamination_ratio",
    "near_duplicate_found",
    "near_duplicate_groups",
    "contaminated_found",
    "pii",
    "pii_records",
    "pii_records_kept",
    "pii_policy",
    "pii_examples",
    "rules",
    "rules_not_checked",
    "examples",
    "checks",
    "digest",
    "gates",
    "passed",
)


def _report(run_dir: Path, source: str) -> dict[str, Any] | None:
    if source not in SOURCES:
        raise PanelError(404, "not_found", f"data source {source!r}: use train or eval")
    f = run_dir / "data" / f"{source}.report.json"
    if not f.is_file():
        return None
    try:
        rep = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PanelError(422, "corrupt_report", f"the validation report {f} cannot be read: {exc}") from None
    return rep if isinstance(rep, dict) else None


def data_view(ws: Workspace, run_id: str) -> dict[str, Any]:
    d = find_run_dir(ws, run_id)
    sources = []
    for source in SOURCES:
        rep = _report(d, source)
        if rep is not None:
            sources.append({"source": source, **redact_value({k: rep.get(k) for k in REPORT_FIELDS if k in rep})})
    return {"run_id": run_id, "sources": sources}


def _quarantine_rows(run_dir: Path, source: str) -> Iterator[dict[str, Any]]:
    rep = _report(run_dir, source)
    q = (rep or {}).get("quarantine_path")
    if not q:
        return iter(())
    return _jsonl(Path(q))


def _record_text(record: Any) -> str:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in record["messages"] if isinstance(m, dict))
    return record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)


def quarantine_view(ws: Workspace, run_id: str, source: str, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """Quarantined records with their reasons, PII masked (``data.pii.redact``)."""
    d = find_run_dir(ws, run_id)
    limit, offset = max(1, min(int(limit), 500)), max(0, int(offset))
    rows, total = [], 0
    for row in _quarantine_rows(d, source):
        if offset <= total < offset + limit:
            rows.append(
                {
                    "line": row.get("line"),
                    "reasons": [str(r) for r in row.get("reasons") or []],
                    "text": redact_value(_record_text(row.get("record")))[:2000],
                }
            )
        total += 1
    return {"source": source, "total": total, "offset": offset, "records": rows}


_SIMILAR = re.compile(r"(?:similar to|duplicate of|same as) line (\d+)")


def duplicates_view(ws: Workspace, run_id: str, source: str) -> dict[str, Any]:
    """Duplicate groups: each quarantined duplicate with the line it repeats, grouped by that line."""
    d = find_run_dir(ws, run_id)
    groups: dict[int, dict[str, Any]] = {}
    for row in _quarantine_rows(d, source):
        for reason in row.get("reasons") or []:
            m = _SIMILAR.search(str(reason))
            if m and ("duplicate" in str(reason)):
                g = groups.setdefault(
                    int(m.group(1)), {"lines": [int(m.group(1))], "reason": str(reason).split(":")[0]}
                )
                if row.get("line") is not None:
                    g["lines"].append(row["line"])
    return {"source": source, "groups": sorted(groups.values(), key=lambda g: g["lines"][0])}


# ----------------------------------------------------------------------------------------------- registry


def _accuracy(v: ModelVersion) -> Any:
    return ((v.metrics or {}).get("evaluation") or {}).get("accuracy")


def version_row(v: ModelVersion) -> dict[str, Any]:
    return {
        "ref": v.ref,
        "version": v.version,
        "created_at": v.created_at,
        "artifact_kind": v.artifact_kind,
        "aliases": list(v.aliases),
        "tags": dict(v.tags),
        "accuracy": _accuracy(v),
        "run_id": (v.lineage or {}).get("run_id"),
    }


def models_view(reg) -> dict[str, Any]:
    models = []
    for name in reg.models():
        versions = [version_row(v) for v in reg.list_versions(name)]
        models.append(
            {
                "name": name,
                "aliases": reg.aliases(name),
                "versions": versions,
                "latest": versions[-1]["ref"] if versions else None,
            }
        )
    return {"backend": reg.backend, "location": str(reg.location), "models": models}


def check_model(reg, name: str) -> str:
    """``name`` when it is one of the registry's models (else 404)."""
    for known in reg.models():
        if known == name:
            return known
    raise PanelError(404, "unknown_model", f"no registered model {name!r}; the Registry page lists them")


def check_version(reg, name: str, version: str | int) -> ModelVersion:
    """The version ``version`` (a number or an alias) of a known model (else 404)."""
    name = check_model(reg, name)
    text = str(version)
    for v in reg.list_versions(name):
        if str(v.version) == text or text in v.aliases:
            return v
    raise PanelError(404, "unknown_version", f"{name} has no version or alias {text!r}")


def event_row(e: RegistryEvent) -> dict[str, Any]:
    return {
        "at": e.at,
        "kind": e.kind,
        "version": e.version,
        "actor": e.actor,
        "reason": e.reason or "",
        "details": e.details or {},
    }


def model_view(reg, name: str) -> dict[str, Any]:
    name = check_model(reg, name)
    return {
        "name": name,
        "aliases": reg.aliases(name),
        "versions": [version_row(v) for v in reg.list_versions(name)],
        "events": [event_row(e) for e in reg.events(name)][::-1],
        "rollouts": len(reg.list_rollouts(name)),
    }


def _paths(data: Any) -> list[str]:
    """Every ``*_path`` string (and ``path`` of a list of sources) in a version's ``lineage.data``."""
    out: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, str) and (k.endswith("_path") or k == "path"):
                out.append(v)
            elif isinstance(v, (dict, list)):
                out += _paths(v)
    elif isinstance(data, list):
        for v in data:
            out += _paths(v)
    return out


def _digests(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, str) and k.endswith("digest"):
                out.append((f"{prefix}{k}", v))
            elif isinstance(v, (dict, list)):
                out += _digests(v, f"{prefix}{k}.")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _digests(v, f"{prefix}{i}.")
    return out


def export_dirs(ws: Workspace) -> list[Path]:
    root = ws.root / "feedback-exports"
    return sorted(d for d in root.iterdir() if (d / "manifest.json").is_file()) if root.is_dir() else []


def _export_of(path: str) -> Path | None:
    """The feedback export a training file came from: its directory holds the export's manifest.json."""
    p = Path(path).parent
    return p if (p / "manifest.json").is_file() else None


def lineage_graph(reg, ws: Workspace, v: ModelVersion) -> dict[str, Any]:
    """data digests -> run -> version -> rollouts -> feedback export -> next version, as nodes and edges."""
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []
    lin = v.lineage or {}
    vid = f"version:{v.ref}"

    def node(nid: str, kind: str, label: str, detail: str = "", **extra: Any) -> str:
        if all(n["id"] != nid for n in nodes):
            nodes.append({"id": nid, "kind": kind, "label": label, "detail": detail, **extra})
        return nid

    run_id = lin.get("run_id")
    run = node(f"run:{run_id}", "run", str(run_id), lin.get("pipeline") or "", run_id=run_id) if run_id else None
    for key, digest in _digests(lin.get("data")):
        dn = node(
            f"data:{key}:{digest}",
            "data",
            key.replace("_digest", "").replace("digest", "data"),
            digest[:16],
            digest=digest,
        )
        edges.append({"from": dn, "to": run or vid})
    parent = lin.get("parent")
    if isinstance(parent, dict) and parent.get("ref"):
        pn = node(
            f"version:{parent.get('model')}:{parent.get('version')}",
            "version",
            f"{parent.get('model')}:{parent.get('version')}",
            str(parent.get("ref")),
            model=parent.get("model"),
            version=parent.get("version"),
        )
        edges.append({"from": pn, "to": run or vid})
    else:
        bn = node("base", "base", str(v.base_model or ""), str(lin.get("base_model_fingerprint") or "")[:24])
        edges.append({"from": bn, "to": run or vid})
    node(vid, "version", v.ref, ", ".join(v.aliases), model=v.model, version=v.version)
    if run:
        edges.append({"from": run, "to": vid})
    for r in reg.list_rollouts(v.model):
        if r.candidate_version == v.version:
            rn = node(f"rollout:{r.rollout_id}", "rollout", r.rollout_id, r.status or "")
            edges.append({"from": vid, "to": rn})
    # feedback exports made after this version, and the versions trained on them or continued from this one
    exports = {}
    for d in export_dirs(ws):
        try:
            m = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if m.get("model") not in (None, v.model):
            continue
        exports[str(d)] = m
    created = _ts(v.created_at)
    later = [x for x in reg.list_versions(v.model) if x.version > v.version]
    for x in later:
        xl = x.lineage or {}
        via = [e for e in (_export_of(p) for p in _paths(xl.get("data"))) if e is not None]
        continued = isinstance(xl.get("parent"), dict) and str(xl["parent"].get("version")) == str(v.version)
        if not via and not continued:
            continue
        xn = node(
            f"version:{x.ref}",
            "next",
            x.ref,
            ", ".join(x.aliases),
            model=x.model,
            version=x.version,
        )
        for e in via:
            m = exports.get(str(e))
            if m is None:
                try:
                    m = json.loads((e / "manifest.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
            en = node(f"export:{e.name}", "export", e.name, _export_detail(m))
            if not any(ed["from"] == vid and ed["to"] == en for ed in edges):
                edges.append({"from": vid, "to": en})
            edges.append({"from": en, "to": xn})
        if continued and not via:
            edges.append({"from": vid, "to": xn})
    for path, m in exports.items():  # exports after this version that no later version used yet
        if (
            created is not None
            and (m.get("created_at") or 0) >= created
            and not any(n["id"] == f"export:{Path(path).name}" for n in nodes)
        ):
            en = node(f"export:{Path(path).name}", "export", Path(path).name, _export_detail(m))
            edges.append({"from": vid, "to": en})
    return {"nodes": nodes, "edges": edges}


def _export_detail(m: dict[str, Any]) -> str:
    c = m.get("counts") or {}
    return f"sft {(c.get('sft') or {}).get('kept', 0)}, dpo {(c.get('dpo') or {}).get('kept', 0)}, kto {(c.get('kto') or {}).get('kept', 0)}"


def _ts(text: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


VERSION_FIELDS = (
    "model",
    "ref",
    "version",
    "created_at",
    "base_model",
    "artifact_kind",
    "artifact_digest",
    "aliases",
    "tags",
    "metrics",
    "gates",
    "deleted",
)


def version_view(reg, ws: Workspace, name: str, version: str) -> dict[str, Any]:
    v = check_version(reg, name, version)
    lin = dict(v.lineage or {})
    lin.pop("config", None)  # shown by the diff; large
    gates = [_gate_row(str(n), "evaluation", g) for n, g in (v.gates or {}).items() if isinstance(g, dict)]
    fields = v.to_dict()
    return {
        "version": {**{k: fields.get(k) for k in VERSION_FIELDS}, "lineage": lin},
        "gates": gates,
        "events": [event_row(e) for e in reg.events(v.model, v.version)][::-1],
        "graph": lineage_graph(reg, ws, v),
    }


# ----------------------------------------------------------------------------------------------- feedback


def feedback_view(log, *, limit: int = 50) -> dict[str, Any]:
    """The newest feedback with its request (prompt masked by the request log; answers as logged)."""
    fb = log.feedback()[-max(1, min(int(limit), 500)) :][::-1]
    rows = []
    for f in fb:
        req = log.get(f.request_id)
        rows.append(
            {
                "request_id": f.request_id,
                "at": f.updated_at or f.created_at,
                "source": f.source,
                "rating": f.rating,
                "score": f.score,
                "correction": f.correction,
                "comment": f.comment,
                "model": req.model if req else None,
                "version": req.version if req else None,
                "prompt": _prompt_text(req.prompt) if req else None,
                "response": req.response if req else None,
            }
        )
    return {"feedback": redact_value(rows)}


def _prompt_text(prompt: str) -> str:
    from tuneloop.monitor.drift import user_prompt

    try:
        return user_prompt(prompt)
    except Exception:  # a prompt the drift reader cannot split: shown as logged (already redacted)
        return prompt
