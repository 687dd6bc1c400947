"""Data gates: thresholds on a validation report, with PASS / FAIL verdicts like the evaluation gates.

Entry points: :func:`data_gates` (the gates of a ``data:`` config applied to one report), :func:`gate_failures`
(readable messages for the failed ones) and :func:`gate_records` (the gates of several splits as records in
the shape of :func:`tuneloop.evaluate.gates.decide`, so one renderer shows both kinds in JSON, JUnit, Markdown
and HTML).

A data gate compares a count or ratio measured on the whole dataset with its threshold: there is no sampling
and so no interval, and the verdict is PASS or FAIL (never INCONCLUSIVE). Each gate record keeps its old keys
(``name``, ``value``, ``op``, ``threshold``, ``passed``, ``detail``) and adds the evaluation-gate vocabulary
(``metric``, ``kind``, ``verdict``, ``blocks``, ``reason``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tuneloop.report.style import fmt_number

# gate -> (metric in the report, op)
_GATES = {
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _details(r: dict) -> dict[str, str]:
    return {
        "min_valid_ratio": f"{r['records'] - r['invalid']} of {r['records']} records pass the format rules",
        "max_duplicate_ratio": f"{r['duplicates']} exact + {r['near_duplicate_found']} near duplicates of {r['records']} records",
        "max_contamination": f"{r['contaminated_found']} of {r['records']} records overlap the eval data",
        "max_pii_records": f"{r['pii_records_kept']} kept records hold PII (policy {r['pii_policy']})",
    }


def data_gates(report: dict, data_cfg: Any) -> list[Gate]:
    """The data gates of ``data_cfg`` (``min_valid_ratio``, ``max_duplicate_ratio``, ``max_contamination``,
    ``max_pii_records``) applied to one report; a gate set to ``None`` is left out."""
    gates = []
    details = _details(report)
    for name, (metric, op) in _GATES.items():
        threshold = getattr(data_cfg, name, None)
        if threshold is None:
            continue
        value = report[metric]
        ok = value >= threshold if op == ">=" else value <= threshold
        reason = f"{metric} {fmt_number(value)} ({details[name]}) is {'' if ok else 'not '}{op} {threshold}"
        gates.append(Gate(name, value, op, threshold, ok, details[name], metric=metric, kind="floor" if op == ">=" else "ceiling",
                          verdict="PASS" if ok else "FAIL", blocks=not ok, reason=reason))
    return gates


def gate_failures(report: dict, data_cfg: Any, *, split: str = "train") -> list[str]:
    """Readable messages for the failed gates of one report (empty when all pass)."""
    return [
        f"data gate {g.name} failed on {split}: {fmt_number(g.value)} is not {g.op} {g.threshold} "
        f"({g.detail}); report: {report['report_path']}; removed records with reasons: {report['quarantine_path']}"
        for g in data_gates(report, data_cfg)
        if not g.passed
    ]


def gate_records(gates_by_split: dict[str, list[dict[str, Any]]], records_by_split: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Data gates of each split (``Gate.to_dict()`` lists) as evaluation-shaped records, named ``gate[split]``.

    The result renders with :func:`tuneloop.evaluate.reports.junit_xml`, ``markdown_summary`` and the HTML
    gate table like evaluation gates (suite ``data.<split>``, no interval, ``n`` = the split's records).
    """
    out: dict[str, dict[str, Any]] = {}
    for split, gates in gates_by_split.items():
        for g in gates:
            out[f"{g['name']}[{split}]"] = {
                "metric": g.get("metric") or g["name"], "suite": f"data.{split}", "kind": g.get("kind", ""), "op": g["op"],
                "threshold": g["threshold"], "n": (records_by_split or {}).get(split), "value": g["value"], "interval": None,
                "verdict": g.get("verdict") or ("PASS" if g["passed"] else "FAIL"), "passed": g["passed"],
                "blocks": not g["passed"], "needed_n": None, "reason": g.get("reason") or g.get("detail", ""),
            }
    return out
