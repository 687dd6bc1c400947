"""A self-contained HTML report for one run: verdict, stages, gates, loss curve, evaluation samples.

Entry point: :func:`write_report`. It reads only what the run directory holds, so it can be regenerated any
time (``tuneloop status RUN_ID`` prints its path).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from tuneloop.fsutil import atomic_write_text, read_json
from tuneloop.report.style import CSS, fmt_number, gates_table


def _fmt(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return f"<code>{escape(json.dumps(v, default=str)[:300])}</code>"
    return escape(fmt_number(v))


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


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    status = run.get("status", "?")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>tuneloop {escape(run['run_id'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>tuneloop run <code>{escape(run['run_id'])}</code> — {escape(run['pipeline'])}</h1>",
        f"<p class='verdict {escape(status)}'>{escape(status.upper())}</p>",
        f"<p>started {escape(str(run.get('started_at')))}, ended {escape(str(run.get('ended_at')))}; "
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
        parts.append("<p>Intervals: bar = interval, dot = estimate, dashed line = threshold.</p>" + intervals_svg(ev["gates"]))

    for name, st in run.get("stages", {}).items():
        metrics = {k: v for k, v in st.get("metrics", {}).items() if k != "gates"}
        if metrics:
            parts.append(f"<h2>{escape(name)} metrics</h2><table>")
            parts += [f"<tr><th>{escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in metrics.items()]
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
            parts.append("<h2>Evaluation samples (first 25)</h2><table><tr><th>prompt</th><th>reference</th><th>base</th><th>candidate</th></tr>")
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
