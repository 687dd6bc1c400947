"""Data gates: thresholds on a validation report, with PASS / FAIL verdicts like the evaluation gates.

Entry points: :func:`data_gates` (the gates of a ``data:`` config applied to one report), :func:`gate_failures`
(readable messages for the failed ones) and :func:`gate_records` (the gates of several splits as records in
the shape of :func:`tuneloop.evaluate.gates.decide`, so one renderer shows both kinds in JSON, JUnit, Markdown
and HTML).

A data gate compares a count or ratio measured on the whole dataset with its threshold: there is no sampling
and so no interval, and the verdict is PASS or FAIL (never INCONCLUSIVE). Each gate record keeps its old keys
(``name``, ``value``, ``op``, ``threshold``, ``passed``, ``detail``) and adds the evaluation-gate vocabulary
(``metric``, ``kind``, ``verdict``, ``blocks``, ``reason``) and, when it fails, ``problems``: the first few
records behind the failure as ``file:line: rule: reason`` (from the report's examples).

``min_usable_records`` (on by default) fails a split with too few records left after every check, and its
detail accounts for each removed record: ``32 records: 24 exact duplicates, 8 contaminated by eval; 0 left
for training``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tuneloop.report.style import fmt_number

# gate -> (metric in the report, op)
_GATES = {
    "min_usable_records": ("valid", ">="),
    "min_valid_ratio": ("valid_ratio", ">="),
    "max_duplicate_ratio": ("duplicate_ratio", "<="),
    "max_contamination": ("contamination_ratio", "<="),
    "max_pii_records": ("pii_records_kept", "<="),
}


@dataclass
class Gate:
    """One data gate on one report."""

    name: str
    value: float
    op: str
    threshold: float
    passed: bool
    detail: str = ""
    metric: str = ""
    kind: str = ""  # floor (>=) | ceiling (<=)
    verdict: str = ""  # PASS | FAIL
    blocks: bool = False
    reason: str = ""
    problems: list[str] = field(default_factory=list)  # first records behind a failure: file:line: rule: reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_PROBLEMS = 5  # records shown per failed gate
_NOT_FORMAT = (
    "exact_duplicate",
    "near_duplicate",
    "contaminated",
    "overlong",
    "pii",
)  # every other rule is a format rule
_GATE_RULES = {"max_duplicate_ratio": ("exact_duplicate", "near_duplicate"), "max_contamination": ("contaminated",)}
# report count -> how the accounting says it
_REMOVED = (
    ("invalid", "failed the format rules"),
    ("duplicates", "exact duplicates"),
    ("near_duplicates", "near duplicates"),
    ("contaminated", "contaminated by eval"),
    ("pii_dropped", "dropped for personal data (data.pii = drop)"),
    ("overlong_dropped", "over data.max_length (data.overlong = drop)"),
)


def usable_accounting(r: dict, split: str = "train") -> str:
    """Where the records of a report went: ``32 records: 24 exact duplicates, 8 contaminated by eval; 0 left for
    training``."""
    removed = ", ".join(f"{r[k]} {what}" for k, what in _REMOVED if r.get(k))
    use = "training" if split == "train" else "evaluation"
    return f"{r['records']} records: {removed or 'none removed'}; {r['valid']} left for {use}"


def _details(r: dict, split: str) -> dict[str, str]:
    return {
        "min_usable_records": usable_accounting(r, split),
        "min_valid_ratio": f"{r['records'] - r['invalid']} of {r['records']} records pass the format rules",
        "max_duplicate_ratio": f"{r['duplicates']} exact + {r['near_duplicate_found']} near duplicates of {r['records']} records",
        "max_contamination": f"{r['contaminated_found']} of {r['records']} records overlap the eval data",
        "max_pii_records": f"{r['pii_records_kept']} kept records hold PII (policy {r['pii_policy']})",
    }


def _where(r: dict, ex: dict) -> str:
    """``file:line`` of an example (``file: record N`` where positions are record indexes). A list of sources
    names each example's source in ``file`` already."""
    if ex.get("file"):
        path = ex["file"] if r.get("sources") else f"{r['path'].rstrip('/')}/{ex['file']}"
    else:
        path = r["path"]
    return f"{path}:{ex['line']}" if r.get("position", "line") == "line" else f"{path}: record {ex['line']}"


def _behind(r: dict, gate: str, rule: str) -> bool:
    """Whether records flagged by ``rule`` count towards ``gate``'s value."""
    if gate == "min_valid_ratio":
        return rule not in _NOT_FORMAT
    if gate == "min_usable_records":  # every rule that removed records (not those only reported)
        checks = r.get("checks", {})
        action = {
            "near_duplicate": checks.get("near_dup_action"),
            "contaminated": checks.get("contamination_action"),
            "overlong": checks.get("overlong"),
        }.get(rule, "drop")
        return action == "drop"
    return rule in _GATE_RULES.get(gate, ())


def gate_problems(r: dict, gate: str) -> list[str]:
    """The first few records behind ``gate``'s count as ``file:line: rule: reason``, in file and line order."""
    if gate == "max_pii_records":
        found = [
            (ex.get("file") or "", ex["line"], f"{_where(r, ex)}: pii: {kind} {ex['masked']}")
            for kind, exs in r.get("pii_examples", {}).items()
            for ex in exs
        ]
    else:
        found = [
            (ex.get("file") or "", ex["line"], f"{_where(r, ex)}: {ex['reason'][:200]}")
            for rule, exs in r.get("examples", {}).items()
            if _behind(r, gate, rule)
            for ex in exs
        ]
    return [text for *_, text in sorted(found)[:MAX_PROBLEMS]]


def data_gates(report: dict, data_cfg: Any, *, split: str = "train") -> list[Gate]:
    """The data gates of ``data_cfg`` (``min_usable_records``, ``min_valid_ratio``, ``max_duplicate_ratio``,
    ``max_contamination``, ``max_pii_records``) applied to one report of ``split``; a gate set to ``None`` is
    left out. A failed gate lists its first problems."""
    gates = []
    details = _details(report, split)
    for name, (metric, op) in _GATES.items():
        threshold = getattr(data_cfg, name, None)
        if threshold is None:
            continue
        value = report[metric]
        ok = value >= threshold if op == ">=" else value <= threshold
        reason = f"{metric} {fmt_number(value)} ({details[name]}) is {'' if ok else 'not '}{op} {threshold}"
        gates.append(
            Gate(
                name,
                value,
                op,
                threshold,
                ok,
                details[name],
                metric=metric,
                kind="floor" if op == ">=" else "ceiling",
                verdict="PASS" if ok else "FAIL",
                blocks=not ok,
                reason=reason,
                problems=[] if ok else gate_problems(report, name),
            )
        )
    return gates


def gate_failures(report: dict, data_cfg: Any, *, split: str = "train") -> list[str]:
    """Readable messages for the failed gates of one report (empty when all pass), each followed by its first
    problems, one per line (``  file:line: rule: reason``)."""
    return [
        f"data gate {g.name} failed on {split}: {fmt_number(g.value)} is not {g.op} {g.threshold} "
        f"({g.detail}); report: {report['report_path']}; removed records with reasons: {report['quarantine_path']}"
        + "".join(f"\n  {p}" for p in g.problems)
        for g in data_gates(report, data_cfg, split=split)
        if not g.passed
    ]


def gate_records(
    gates_by_split: dict[str, list[dict[str, Any]]], records_by_split: dict[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """Data gates of each split (``Gate.to_dict()`` lists) as evaluation-shaped records, named ``gate[split]``.

    The result renders with :func:`tuneloop.evaluate.reports.junit_xml`, ``markdown_summary`` and the HTML
    gate table like evaluation gates (suite ``data.<split>``, no interval, ``n`` = the split's records).
    """
    out: dict[str, dict[str, Any]] = {}
    for split, gates in gates_by_split.items():
        for g in gates:
            out[f"{g['name']}[{split}]"] = {
                "metric": g.get("metric") or g["name"],
                "suite": f"data.{split}",
                "kind": g.get("kind", ""),
                "op": g["op"],
                "threshold": g["threshold"],
                "n": (records_by_split or {}).get(split),
                "value": g["value"],
                "interval": None,
                "verdict": g.get("verdict") or ("PASS" if g["passed"] else "FAIL"),
                "passed": g["passed"],
                "blocks": not g["passed"],
                "needed_n": None,
                "reason": g.get("reason") or g.get("detail", ""),
            }
    return out
