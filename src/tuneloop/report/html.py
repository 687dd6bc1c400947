"""A self-contained HTML report for one run: verdict, stages, gates, loss curve, evaluation samples.

Entry point: :func:`write_run_report`. It reads only what the run directory holds, so it can be regenerated any
time (``tuneloop status RUN_ID`` prints its path).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from tuneloop.fsutil import atomic_write_text, format_time, read_json
from tuneloop.report.style import CSS, fmt_number, gates_table


def _fmt(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return f"<code>{escape(json.dumps(v, default=str)[:300])}</code>"
    return escape(fmt_number(v))


# What the confusing counts of the data_validation stage count (the same for eval_* on the eval data). Every
# removed record is counted once, under the first reason; `rules` counts every flag, so the two can differ.
_DATA_NOTES = {
    "records": "records read",
    "valid": "kept: records = valid + invalid + duplicates + near_duplicates + contaminated + pii_dropped + overlong_dropped",
    "invalid": "removed: failed a format rule",
    "duplicates": "removed: an exact duplicate of an earlier record",
    "near_duplicates": "removed: a near duplicate of an earlier record (also when it is contaminated as well)",
    "contaminated": "removed for contamination alone (too many n-grams shared with the eval data); a contaminated "
    "record that is also a near duplicate is counted under near_duplicates",
    "rules": "records each rule flagged, removed or not: a record flagged by two rules counts under both, so "
    "rules.contaminated (every contaminated record found) can exceed contaminated (removed for it alone)",
    "contamination_ratio": "contaminated records found (rules.contaminated) / records",
    "duplicate_ratio": "(exact duplicates + near duplicates found) / records",
}


def _data_note(key: str, metrics: dict[str, Any]) -> str:
    """What a data_validation count counts; for ``contaminated``, why it differs from ``rules.contaminated`` here."""
    prefix = "eval_" if key.startswith("eval_") else ""
    note = _DATA_NOTES.get(key[len(prefix) :], "")
    if key[len(prefix) :] == "contaminated":
        found = (metrics.get(f"{prefix}rules") or {}).get("contaminated")
        removed = metrics.get(key)
        if isinstance(found, int) and isinstance(removed, int) and found > removed:
            note += (
                f". Here {found} records were found contaminated: {removed} removed for that alone, the other "
                f"{found - removed} also near duplicates (counted there) or kept (data.contamination_action: report)"
            )
    return note


def _compared_with(evaluation: dict[str, Any]) -> str:
    """The model the candidate was compared with: ``base model``, or ``champion support-router:1`` (gates.against)."""
    against = str(evaluation.get("against") or "base")
    return "base model" if against == "base" else against


def _eval_note(key: str, evaluation: dict[str, Any]) -> str:
    """For the ``base_*`` metrics of a run compared with another model than its base: which model they measure."""
    compared = _compared_with(evaluation)
    if compared != "base model" and ("base_" in key) and key != "base_outputs_cached":
        return f"measured on the {compared} (the comparison model; named base_* in the JSON)"
    if key == "base_outputs_cached" and compared != "base model":
        return f"the {compared}'s outputs came from the cache"
    return ""


def _loss_svg(rows: list[dict[str, Any]], w: int = 640, h: int = 200) -> str:
    pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if len(pts) < 2:
        return "<p>(fewer than two logged steps)</p>"
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: 40 + (x - x0) / max(x1 - x0, 1e-9) * (w - 50)  # noqa: E731
    sy = lambda y: 10 + (y1 - y) / max(y1 - y0, 1e-9) * (h - 30)  # noqa: E731
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    return (
        f'<svg width="{w}" height="{h}" role="img" aria-label="training loss per step">'
        f'<polyline fill="none" stroke="#1a73e8" stroke-width="1.5" points="{path}"/>'
        f'<text x="2" y="14" font-size="11">{y1:.3g}</text><text x="2" y="{h - 20}" font-size="11">{y0:.3g}</text>'
        f'<text x="40" y="{h - 4}" font-size="11">step {x0}</text><text x="{w - 70}" y="{h - 4}" font-size="11">step {x1}</text>'
        "</svg>"
    )


def write_run_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    status = run.get("status", "?")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>tuneloop {escape(run['run_id'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>tuneloop run <code>{escape(run['run_id'])}</code> — {escape(run['pipeline'])}</h1>",
        f"<p class='verdict {escape(status)}'>{escape(status.upper())}</p>",
        f"<p>started {escape(format_time(run.get('started_at')))}, ended {escape(format_time(run.get('ended_at')))}; "
        f"code {escape(str(run.get('code_version')))}; model version {escape(str(run.get('model_version') or '—'))}</p>",
        "<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>cached</th><th>seconds</th><th>error</th></tr>",
    ]
    for name, st in run.get("stages", {}).items():
        parts.append(
            f"<tr><td>{escape(name)}</td><td class='{escape(st['status'])}'>{escape(st['status'])}</td>"
            f"<td>{'yes' if st.get('cached') else 'no'}</td><td>{st.get('duration_s', 0):.2f}</td><td>{escape(st.get('error') or '')}</td></tr>"
        )
    parts.append("</table>")

    stages = run.get("stages", {})
    data_gates = stages.get("data_validation", {}).get("metrics", {}).get("gates")
    if data_gates:
        parts.append("<h2>Data gates</h2>" + gates_table(data_gates))
    ev = stages.get("evaluation", {}).get("metrics", {})
    if ev.get("gates"):
        from tuneloop.evaluate.reports import intervals_svg

        parts.append("<h2>Gates</h2>" + gates_table(ev["gates"]))
        parts.append(
            "<p>Intervals: bar = interval, dot = estimate, dashed line = threshold.</p>" + intervals_svg(ev["gates"])
        )

    for name, st in run.get("stages", {}).items():
        metrics = {k: v for k, v in st.get("metrics", {}).items() if k != "gates"}
        if metrics:
            note = {"data_validation": _data_note, "evaluation": _eval_note}.get(name)
            parts.append(f"<h2>{escape(name)} metrics</h2>")
            if name == "evaluation":
                parts.append(f"<p>The candidate was compared with the <b>{escape(_compared_with(metrics))}</b>.</p>")
            parts.append("<table>")
            for k, v in metrics.items():
                says = note(k, metrics) if note else ""
                parts.append(
                    f"<tr><th>{escape(k)}</th><td>{_fmt(v)}</td>"
                    + (f"<td class='note'>{escape(says)}</td>" if says else "")
                    + "</tr>"
                )
            parts.append("</table>")

    tm = run_dir / "train_metrics.jsonl"
    if tm.is_file():
        rows = [json.loads(x) for x in tm.read_text().splitlines() if x.strip()]
        parts.append("<h2>Training loss</h2>" + _loss_svg(rows))
        from tuneloop.report.rewards import rewards_section

        parts.append(rewards_section(rows, stages))  # GRPO runs: rewards, completion length, reward-hacking flags

    items = run_dir / "eval_items.jsonl"
    if items.is_file():
        recs = [json.loads(x) for x in items.read_text(encoding="utf-8").splitlines() if x.strip()]
        task = [r for r in recs if r.get("kind", r["suite"]) == "task" and "reference" in r][:25]
        if task:
            compared = escape(_compared_with(ev))
            parts.append(
                f"<h2>Evaluation samples (first 25)</h2><table><tr><th>prompt</th><th>reference</th><th>{compared}</th><th>candidate</th></tr>"
            )
            for r in task:
                mark = lambda ok: "passed" if ok else "failed"  # noqa: E731
                parts.append(
                    f"<tr><td>{escape(str(r['prompt'])[:200])}</td><td>{escape(str(r['reference']))}</td>"
                    f"<td class='{mark(r.get('base_score', r.get('base_correct')))}'>{escape(str(r['base'])[:120])}</td>"
                    f"<td class='{mark(r.get('candidate_score', r.get('candidate_correct')))}'>{escape(str(r['candidate'])[:120])}</td></tr>"
                )
            parts.append("</table>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out
