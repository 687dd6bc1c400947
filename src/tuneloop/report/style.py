"""What every tuneloop report shares: one stylesheet, one number format, one gate table.

Used by the run report (:mod:`tuneloop.report.html`), the data report (:mod:`tuneloop.data.report`) and the
gate reports (:mod:`tuneloop.evaluate.reports`), so a number or a verdict reads the same everywhere. This
module imports only `fsutil` from tuneloop.
"""

from __future__ import annotations

from html import escape
from typing import Any

from tuneloop.fsutil import format_number

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6}.passed,.ok{color:#137333;font-weight:600}.failed,.bad{color:#c5221f;font-weight:600}
.skipped,.pending{color:#888}code,pre{font:12px ui-monospace,monospace;background:#f6f6f6}pre{padding:.6em;overflow:auto}
.verdict{font-size:1.3em;padding:.4em .8em;display:inline-block;border-radius:4px}
.verdict.passed{background:#e6f4ea}.verdict.failed{background:#fce8e6}
td.note{color:#555;font-size:.9em;max-width:40em}
"""


def fmt_number(x: Any, none: str = "—") -> str:
    """A number as reports show it (``fsutil.format_number``, with ``None`` as a dash)."""
    return format_number(x, none)


def page(title: str, body: list[str]) -> str:
    """A self-contained HTML page (no scripts, no external files) with the shared stylesheet."""
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{CSS}</style></head><body>"
    return head + "\n".join(body) + "</body></html>\n"


def table(rows: list[tuple], head: tuple) -> str:
    """An HTML table of escaped cells."""
    h = "".join(f"<th>{escape(str(x))}</th>" for x in head)
    rows_html = "".join("<tr>" + "".join(f"<td>{escape(str(x))}</td>" for x in row) + "</tr>" for row in rows)
    return f"<table><tr>{h}</tr>{rows_html}</table>"


def gates_table(gates: dict[str, dict[str, Any]]) -> str:
    """Gate records (name -> record with ``verdict``, ``passed``, ``value``, ``interval``, ``op``, ``threshold``,
    ``n``, ``needed_n``, ``reason``), as one table: data gates and evaluation gates look the same."""
    parts = [
        "<table><tr><th>gate</th><th>metric</th><th>value</th><th>interval</th><th>threshold</th><th>verdict</th>"
        "<th>n / needed n</th><th>reason</th></tr>"
    ]
    for name, g in gates.items():
        verdict = g.get("verdict") or {True: "PASS", False: "FAIL", None: "NOT_APPLIED"}[g.get("passed")]
        css = {True: "passed", False: "failed", None: "skipped"}[g.get("passed")]
        iv = g.get("interval")
        interval = f"[{fmt_number(iv[0])}, {fmt_number(iv[1])}]" if iv else "—"
        parts.append(
            f"<tr><td>{escape(name)}</td><td>{escape(str(g.get('metric')))}</td><td>{escape(fmt_number(g.get('value')))}</td>"
            f"<td>{escape(interval)}</td><td>{escape(str(g.get('op', '')))} {escape(fmt_number(g.get('threshold')))}</td>"
            f"<td class='{css}'>{escape(verdict)}{' (blocks)' if g.get('blocks') else ''}</td>"
            f"<td>{escape(fmt_number(g.get('n')))} / {escape(fmt_number(g.get('needed_n')))}</td><td>{escape(str(g.get('reason', '')))}</td></tr>"
        )
    parts.append("</table>")
    return "".join(parts)
