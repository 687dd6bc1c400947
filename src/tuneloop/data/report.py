"""The data report as a page: counts, accounting, gate verdicts, rules, examples, personal data found.

Entry point: :func:`report_html` (a self-contained page: no scripts, no external files). The JSON report is
the dict :func:`tuneloop.data.validate.validate_dataset` returns; :func:`write_report` writes both views.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from tuneloop.data.formats import RULES
from tuneloop.data.gates import gate_records
from tuneloop.fsutil import atomic_write_json, atomic_write_text
from tuneloop.report.style import fmt_number, gates_table, page, table

_COUNTS = (
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
    "digest",
)


def report_html(report: dict, gates: list[dict[str, Any]] | None = None, *, split: str = "") -> str:
    """A page for one validation report; ``gates`` (``Gate.to_dict()`` records) adds the verdict table."""
    r = report
    parts = [
        f"<h1>Data report</h1><p><code>{escape(r['path'])}</code></p>",
        table([(k, fmt_number(r[k])) for k in _COUNTS], ("", "value")),
        f"<p>{escape(r['accounting'])}</p>",
    ]
    if r.get("sources"):  # data.train_data as a list of sources
        rows = [(s["path"], s["records"], s["valid"]) for s in r["sources"]]
        parts.append(
            "<h2>Sources</h2><p>Their weights apply in preprocessing.</p>" + table(rows, ("source", "records", "valid"))
        )
    if gates:
        records = gate_records({split or "data": gates}, {split or "data": r["records"]})
        parts.append("<h2>Gates</h2>" + gates_table(records))
        failed = [(g["name"], p) for g in gates if not g["passed"] for p in g.get("problems", [])]
        if failed:
            parts.append(
                "<h3>First problems of the failed gates</h3>" + table(failed, ("gate", "file:line: rule: reason"))
            )
    parts.append(
        "<h2>Rules</h2>"
        + table([(k, n, RULES.get(k, "")) for k, n in r["rules"].items()], ("rule", "records", "meaning"))
    )
    if r["rules_not_checked"]:
        parts.append(
            "<p>Not checked: " + escape("; ".join(f"{k}: {v}" for k, v in r["rules_not_checked"].items())) + "</p>"
        )
    ex = [(k, e.get("file", ""), e["line"], e["reason"][:300]) for k, es in r["examples"].items() for e in es]
    if ex:
        parts.append("<h2>Examples</h2>" + table(ex, ("rule", "file", r["position"], "reason")))
    parts.append("<h2>Personal data and secrets</h2>")
    parts.append(table([(k, n) for k, n in r["pii"].items()], ("type", "found")) if r["pii"] else "<p>none found</p>")
    pe = [(k, e["line"], e["masked"]) for k, es in r["pii_examples"].items() for e in es]
    if pe:
        parts.append(table(pe, ("type", r["position"], "masked")))
    parts.append(
        f"<p>policy: {escape(r['pii_policy'])}; records with PII: {r['pii_records']}, kept unredacted: {r['pii_records_kept']}</p>"
    )
    return page(f"data report: {r['path']}", parts)


def write_report(
    report: dict, json_path: Path, html_path: Path, *, gates: list[dict[str, Any]] | None = None, split: str = ""
) -> None:
    """Write a report's JSON (as given) and its HTML view, each atomically."""
    atomic_write_json(Path(json_path), report)
    atomic_write_text(Path(html_path), report_html(report, gates, split=split))
