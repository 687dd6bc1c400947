"""Known-answer probes: before a loaded version takes traffic, it must reproduce a few of its own evaluation
answers (greedy decoding), taken from the run that registered it.

The probes come from ``runs/<run_id>/eval_items.jsonl`` in the workspace (the evaluation stage's per-item
records: prompt and the candidate's output). Safety and over-refusal items are single user turns; task items
are rebuilt from the run's eval data file (matched on the last user turn). Where none is reachable (another
workspace, an MLflow registry without the run directory), probing is skipped and the reason is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.fsutil import read_jsonl
from tuneloop.registry.records import ModelVersion


@dataclass
class Probe:
    messages: list[dict[str, str]]
    expected: str
    item: str  # "suite/id" for the message


@dataclass
class ProbePlan:
    probes: list[Probe]
    max_new_tokens: int
    skipped_reason: str | None = None


def plan_probes(workspace_root: Path | None, version: ModelVersion, limit: int = 4) -> ProbePlan:
    lineage = version.lineage or {}
    cfg = lineage.get("config") or {}
    max_new = int((cfg.get("eval") or {}).get("max_new_tokens") or 32)
    run_id = lineage.get("run_id")
    if workspace_root is None or not run_id:
        return ProbePlan([], max_new, "the version records no run in this workspace (registered by hand or elsewhere)")
    items_path = Path(workspace_root) / "runs" / str(run_id) / "eval_items.jsonl"
    if not items_path.is_file():
        return ProbePlan([], max_new, f"run {run_id} has no eval_items.jsonl in this workspace")
    records = read_jsonl(items_path, "the run's eval_items.jsonl")
    task_prompts = _task_prompts(lineage, cfg)
    probes: list[Probe] = []
    for rec in records:
        if not isinstance(rec.get("candidate"), str):
            continue
        if rec.get("kind") in ("harmful", "over_refusal"):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        elif rec.get("kind") == "task" and rec.get("prompt") in task_prompts:
            msgs = task_prompts[rec["prompt"]]
        else:
            continue
        probes.append(Probe(msgs, rec["candidate"], f"{rec.get('suite')}/{rec.get('id')}"))
    if not probes:
        return ProbePlan([], max_new, f"run {run_id} recorded no generated answers to probe with")
    # a spread of items: every k-th, so the probes are not all from one suite
    step = max(1, len(probes) // limit)
    return ProbePlan(probes[::step][:limit], max_new)


def _task_prompts(lineage: dict[str, Any], cfg: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """Last user turn -> the prompt messages, from the run's eval data file (if it is still there)."""
    path = (lineage.get("data") or {}).get("eval_path") or (cfg.get("data") or {}).get("eval_data")
    out: dict[str, list[dict[str, str]]] = {}
    if not path or not Path(path).is_file() or Path(path).suffix != ".jsonl":
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():  # tolerant: a probe plan skips what it cannot read
        try:
            msgs = json.loads(line).get("messages")
        except (ValueError, AttributeError):
            continue
        if not isinstance(msgs, list) or not msgs:
            continue
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if msgs and msgs[-1].get("role") == "user":
            out[msgs[-1]["content"]] = msgs
    return out


class ProbeMismatch(Exception):
    """A version did not reproduce its own evaluation answers: it is refused."""
