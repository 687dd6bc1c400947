"""Judge a file of answers, and measure a judge against labels: what ``tuneloop judge FILE`` runs.

Entry point: :func:`judge_file` (``path, judge -> JudgeReport``). The file is JSONL, one record a line:

* ``prompt`` and ``response`` (strings, required);
* ``refused`` / ``harmful`` (booleans, optional): labels; where given, the report has the judge's accuracy,
  precision and recall against them (:func:`agreement`, with Wilson intervals);
* ``kind`` (optional, ``redteam`` or ``benign``, default ``redteam``): the evaluation asks the harmful question
  of red-team prompts only; a ``benign`` record's ``harmful`` verdict is ``false`` without asking the judge
  (a benign prompt's answer is not a request for harm), and its ``harmful`` label is not scored;
* ``indicators`` (optional list of strings): the prompt's harm indicator words (the keyword judge needs them);
* ``id`` (optional): echoed in the item;
* ``split`` (optional string, e.g. ``dev`` / ``heldout``): ``judge_file(..., split="heldout")`` judges only those.

Every problem in the file (bad JSON, a missing or mistyped field) is reported at once with ``file:line``
(:class:`~tuneloop.errors.InputError`) before any record is judged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError
from tuneloop.evaluate.judges import Judge
from tuneloop.evaluate.stats import wilson

KINDS = ("redteam", "benign")


@dataclass(frozen=True)
class JudgeRecord:
    """One line of the input file."""

    line: int
    prompt: str
    response: str
    kind: str = "redteam"
    indicators: tuple[str, ...] = ()
    refused: bool | None = None
    harmful: bool | None = None
    id: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Agreement:
    """A judge's verdicts against labels on one question (``refused`` or ``harmful``); positives are ``true``."""

    n: int
    tp: int
    fp: int
    fn: int
    tn: int
    confidence: float = 0.95

    def _rate(self, k: int, n: int) -> dict[str, Any]:
        lo, hi = wilson(k, n, self.confidence)
        return {"value": k / n if n else None, "k": k, "n": n, "interval": [round(lo, 4), round(hi, 4)]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self._rate(self.tp + self.tn, self.n),
            "precision": self._rate(self.tp, self.tp + self.fp),
            "recall": self._rate(self.tp, self.tp + self.fn),
            "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
            "interval": f"Wilson {self.confidence:.0%}",
        }


def agreement(pairs: list[tuple[bool, bool]], confidence: float = 0.95) -> Agreement:
    """``pairs`` of ``(verdict, label)``."""
    tp = sum(v and g for v, g in pairs)
    fp = sum(v and not g for v, g in pairs)
    fn = sum(g and not v for v, g in pairs)
    return Agreement(n=len(pairs), tp=tp, fp=fp, fn=fn, tn=len(pairs) - tp - fp - fn, confidence=confidence)


@dataclass
class JudgeReport:
    """The verdicts in input order, and the agreement with labels where the file has them."""

    judge: str
    path: str
    items: list[dict[str, Any]] = field(default_factory=list)
    refused: Agreement | None = None
    harmful: Agreement | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"judge": self.judge, "file": self.path, "items": self.items}
        if self.refused is not None or self.harmful is not None:
            d["agreement"] = {
                "refused": self.refused.to_dict() if self.refused else None,
                "harmful": self.harmful.to_dict() if self.harmful else None,
            }
        return d


def read_records(path: Path | str, split: str | None = None) -> list[JudgeRecord]:
    """Parse and check the whole file; every problem is reported at once as ``file:line: what``. With ``split``,
    only the records whose ``split`` field equals it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    records: list[JudgeRecord] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object with prompt and response, got {type(obj).__name__}")
            continue
        bad = [
            f'{where}: missing {k!r} (each line needs "prompt" and "response" strings)'
            for k in ("prompt", "response")
            if k not in obj
        ]
        bad += [
            f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}"
            for k in ("prompt", "response")
            if k in obj and not isinstance(obj[k], str)
        ]
        bad += [
            f"{where}: {k!r} must be true or false, got {obj[k]!r}"
            for k in ("refused", "harmful")
            if obj.get(k) is not None and not isinstance(obj[k], bool)
        ]
        kind = obj.get("kind", "redteam")
        if kind not in KINDS:
            bad.append(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        ind = obj.get("indicators", [])
        if not isinstance(ind, list) or not all(isinstance(x, str) for x in ind):
            bad.append(f"{where}: 'indicators' must be a list of strings")
        if bad:
            problems += bad
            continue
        rid, rsplit = obj.get("id"), obj.get("split")
        records.append(
            JudgeRecord(
                line=n,
                prompt=obj["prompt"],
                response=obj["response"],
                kind=kind,
                indicators=tuple(ind),
                refused=obj.get("refused"),
                harmful=obj.get("harmful"),
                id=None if rid is None else str(rid),
                split=None if rsplit is None else str(rsplit),
            )
        )
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise InputError(
            "\n".join(problems[:20])
            + more
            + "\nFix these lines and run again; see `tuneloop judge --help` for the format."
        )
    if split is not None:
        found = sorted({r.split for r in records if r.split is not None})
        records = [r for r in records if r.split == split]
        if not records:
            raise InputError(
                f'{path}: no records with "split": {split!r} (splits in the file: {", ".join(found) or "none"})'
            )
    if not records:
        raise InputError(f'{path}: no records (expected JSONL lines with "prompt" and "response")')
    return records


def judge_records(records: list[JudgeRecord], judge: Judge, *, path: str = "", confidence: float = 0.95) -> JudgeReport:
    """Each record's verdicts, and the agreement with whatever labels the records carry."""
    report = JudgeReport(judge=judge.name, path=path)
    refused_pairs: list[tuple[bool, bool]] = []
    harmful_pairs: list[tuple[bool, bool]] = []
    for r in records:
        refused = bool(judge.refused(r.prompt, r.response))
        harmful = bool(judge.harmful(r.prompt, r.response, list(r.indicators))) if r.kind == "redteam" else False
        item: dict[str, Any] = {"line": r.line, "refused": refused, "harmful": harmful}
        if r.id is not None:
            item["id"] = r.id
        if r.refused is not None:
            item["label_refused"] = r.refused
            refused_pairs.append((refused, r.refused))
        if r.harmful is not None:
            item["label_harmful"] = r.harmful
            if r.kind == "redteam":
                harmful_pairs.append((harmful, r.harmful))
        report.items.append(item)
    report.refused = agreement(refused_pairs, confidence) if refused_pairs else None
    report.harmful = agreement(harmful_pairs, confidence) if harmful_pairs else None
    return report


def judge_file(path: Path | str, judge: Judge, *, split: str | None = None, confidence: float = 0.95) -> JudgeReport:
    """Read ``path`` (all problems at once, before judging), judge every record (of ``split``), measure against labels."""
    return judge_records(read_records(path, split), judge, path=str(path), confidence=confidence)


__all__ = ["Agreement", "JudgeRecord", "JudgeReport", "agreement", "judge_file", "judge_records", "read_records"]
