"""Gate reports: JSON, JUnit XML (one testcase per gate), a Markdown summary for a CI comment, and an inline
SVG of the intervals for the HTML report.

Entry points: :func:`report_json`, :func:`junit_xml`, :func:`markdown_summary`, :func:`intervals_svg`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from html import escape
from typing import Any

from tuneloop.evaluate.gates import GateResult, as_dicts, is_blocking
from tuneloop.report.style import fmt_number

_MARK = {"PASS": "✅", "FAIL": "❌", "INCONCLUSIVE": "⚠️", "NOT_APPLIED": "➖"}


def _interval(g: dict[str, Any]) -> str:
    iv = g.get("interval")
    return f"[{fmt_number(iv[0])}, {fmt_number(iv[1])}]" if iv else "—"


def gate_line(name: str, g: dict[str, Any]) -> str:
    """One line: verdict, value, interval, threshold, and what decides it."""
    thr = "not applied" if g.get("threshold") is None else f"{g['op']} {g['threshold']}"
    s = f"{name}: {g.get('verdict')} — {g.get('metric')} {fmt_number(g.get('value'))}, {fmt_number(g.get('interval_level', 0) * 100 if g.get('interval_level') else None)}% interval {_interval(g)}, threshold {thr}, n={g.get('n')}"
    if g.get("needed_n"):
        s += f", about {g['needed_n']} items would decide"
    return s


def report_json(
    gates: Mapping[str, GateResult | Mapping[str, Any]], metrics: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """One JSON document: overall verdict, every gate with its interval and reason (the stored records), and the
    metrics."""
    blocking = [n for n, g in gates.items() if is_blocking(g)]
    return {
        "overall": "failed" if blocking else "passed",
        "blocking": blocking,
        "gates": as_dicts(gates),
        "metrics": metrics or {},
        **extra,
    }


def junit_xml(gates: dict[str, dict[str, Any]], *, suite_name: str = "tuneloop.gates") -> str:
    """JUnit XML: one testcase per gate; a blocking gate is a failure whose message has value, interval and threshold.

    NOT_APPLIED gates are ``skipped``; an INCONCLUSIVE that does not block (policy pass/warn) passes with the
    reason in ``system-out``.
    """
    failures = sum(1 for g in gates.values() if g.get("blocks"))
    skipped = sum(1 for g in gates.values() if g.get("verdict") == "NOT_APPLIED")
    root = ET.Element("testsuites", name="tuneloop", tests=str(len(gates)), failures=str(failures))
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite_name,
        tests=str(len(gates)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
    )
    for name, g in gates.items():
        tc = ET.SubElement(ts, "testcase", classname=f"{suite_name}.{g.get('suite') or 'eval'}", name=name, time="0")
        line = gate_line(name, g)
        if g.get("verdict") == "NOT_APPLIED":
            ET.SubElement(tc, "skipped", message=line)
        elif g.get("blocks"):
            f = ET.SubElement(tc, "failure", message=line, type=str(g.get("verdict")))
            f.text = g.get("reason", "")
        else:
            out = ET.SubElement(tc, "system-out")
            out.text = g.get("reason", line)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def markdown_summary(
    gates: dict[str, dict[str, Any]], metrics: dict[str, Any] | None = None, *, title: str = "tuneloop gates"
) -> str:
    """A Markdown table fit for a CI comment, with the overall verdict first."""
    blocking = [n for n, g in gates.items() if g.get("blocks")]
    head = f"### {title}: {'❌ blocked by ' + ', '.join(blocking) if blocking else '✅ passed'}"
    metrics = metrics or {}
    against = metrics.get("against")
    lines = [head, ""]
    if against:
        lines += [
            f"Compared with: **{against}**" + (f" ({metrics['against_note']})" if metrics.get("against_note") else ""),
            "",
        ]
    lines += ["| gate | verdict | value | interval | threshold | n | needed n |", "|---|---|---|---|---|---|---|"]
    for name, g in gates.items():
        v = g.get("verdict", "")
        thr = "—" if g.get("threshold") is None else f"{g['op']} {g['threshold']}"
        blocks = " (blocks)" if g.get("blocks") else ""
        lines.append(
            f"| `{name}` | {_MARK.get(v, '')} {v}{blocks} | {fmt_number(g.get('value'))} | {_interval(g)} | {thr} | {g.get('n', '')} | {fmt_number(g.get('needed_n'))} |"
        )
    lvl = next((g.get("interval_level") for g in gates.values() if g.get("interval_level")), None)
    if lvl:
        lines += [
            "",
            f"Intervals are two-sided {lvl:.0%}: each verdict is a one-sided test at {(1 - lvl) / 2:.1%}. "
            "PASS: the whole interval is on the right side of the threshold; FAIL: the whole interval is on the wrong side; "
            "INCONCLUSIVE: it straddles the threshold (needed n: items that would decide at the observed effect).",
        ]
    return "\n".join(lines) + "\n"


def intervals_svg(gates: dict[str, dict[str, Any]], *, width: int = 640) -> str:
    """Each applied gate on its own axis: the interval as a bar, the estimate as a dot, the threshold as a line.

    A gate's name, verdict and threshold are written on a line of their own above its axis, so a long name
    (``max_mc_capability_drop[capability_mc]``) never runs into the bar; the axis takes the whole width."""
    rows = [(n, g) for n, g in gates.items() if g.get("interval") and g.get("value") is not None]
    if not rows:
        return "<p>(no gate intervals)</p>"
    h_row, left, right = 52, 12, 12
    height = h_row * len(rows) + 6
    color = {"PASS": "#137333", "FAIL": "#c5221f", "INCONCLUSIVE": "#b06000", "NOT_APPLIED": "#888"}
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="gate intervals" '
        'font-size="11" font-family="system-ui,sans-serif">'
    ]
    for i, (name, g) in enumerate(rows):
        lo, hi = g["interval"]
        thr = g.get("threshold")
        vals = [lo, hi, g["value"]] + ([thr] if thr is not None else [])
        a, b = min(vals), max(vals)
        pad = max((b - a) * 0.15, 0.01)
        a, b = a - pad, b + pad

        def sx(x: float, a: float = a, b: float = b) -> float:  # this row's scale (a, b bound now, not late)
            return left + (x - a) / (b - a) * (width - left - right)

        top = 4 + i * h_row
        y = top + 27
        c = color.get(str(g.get("verdict")), "#888")
        rule = (
            f"threshold {g.get('op', '')} {fmt_number(thr)}"
            if thr is not None
            else "no threshold: reported, not applied"
        )
        parts.append(
            f'<text x="{left}" y="{top + 12}"><tspan font-weight="600">{escape(name)}</tspan> — '
            f'<tspan fill="{c}">{escape(str(g.get("verdict")))}</tspan>; {escape(rule)}</text>'
        )
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(
            f'<line x1="{sx(lo):.1f}" x2="{sx(hi):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{c}" stroke-width="6" stroke-linecap="round"><title>interval [{fmt_number(lo)}, {fmt_number(hi)}]</title></line>'
        )
        parts.append(
            f'<circle cx="{sx(g["value"]):.1f}" cy="{y:.1f}" r="4" fill="#fff" stroke="{c}" stroke-width="2"><title>estimate {fmt_number(g["value"])}</title></circle>'
        )
        if thr is not None:
            parts.append(
                f'<line x1="{sx(thr):.1f}" x2="{sx(thr):.1f}" y1="{y - 9:.1f}" y2="{y + 9:.1f}" stroke="#222" stroke-dasharray="3,2"><title>threshold {fmt_number(thr)}</title></line>'
            )
        parts.append(
            f'<text x="{sx(lo):.1f}" y="{y + 19:.1f}" fill="#555" text-anchor="middle">{fmt_number(lo)}</text>'
        )
        parts.append(
            f'<text x="{sx(hi):.1f}" y="{y + 19:.1f}" fill="#555" text-anchor="middle">{fmt_number(hi)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
