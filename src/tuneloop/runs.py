"""Run history: the records of past runs in a workspace (``tuneloop status``).

Entry points: :func:`list_runs` and :func:`load_run`. A run record is ``runs/<run_id>/run.json``, written by
the runner (:mod:`tuneloop.pipeline`) as the run goes; a run whose process died mid-way reads as
``interrupted``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError
from tuneloop.fsutil import read_json
from tuneloop.workspace import Workspace, pid_alive

#: Written in the run directory while the evaluation stage scores items (per model and suite: done and total), for
#: the web UI's run page; the scored items (``eval_items.jsonl``) are copied there when the stage ends.
EVAL_PROGRESS_FILE = "eval_progress.json"


def list_runs(ws: Workspace) -> list[dict[str, Any]]:
    """Every run record, newest first; a run whose process died mid-way reads as ``interrupted``."""
    runs: list[dict[str, Any]] = []
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
    """The one run whose id is ``run_id`` or starts with it (InputError when none or several match)."""
    runs = list_runs(ws)
    matches = [r for r in runs if r["run_id"] == run_id or r["run_id"].startswith(run_id)]
    if len(matches) != 1:
        known = ", ".join(r["run_id"] for r in runs[:10]) or "none"
        what = "no run" if not matches else "more than one run"
        raise InputError(f"{what} matches {run_id!r} in {ws.root}; recent runs: {known}")
    return matches[0]


def trained_model_dir(ws: Workspace, run: dict[str, Any]) -> str | None:
    """The model directory a run's training stage produced, when it still exists."""
    f = ws.run_dir(run["run_id"]) / "stages" / "training.json"
    if not f.is_file():
        return None
    model_dir = read_json(f).get("outputs", {}).get("model_dir")
    return model_dir if model_dir and Path(model_dir).is_dir() else None
