"""``GET /dashboard``: one self-contained HTML page (inline CSS, JS and SVG; no external assets) that shows the
registered models, their versions and aliases, each model's live (else latest) rollout (the weight over time
from its decision events, each arm's rates with the anytime-valid interval of the canary/baseline ratio from
the newest decision, the newest decisions and events) and refreshes itself from ``GET /dashboard.json``
every few seconds. The page itself holds no data and is served without an API key; ``/dashboard.json`` needs one
when the gateway has keys, and the page sends the key given in its URL fragment (``/dashboard#key=...``; a
fragment is never sent to a server, so it stays out of access logs).

:func:`dashboard_data` builds that JSON from the registry API only. It carries no secrets and no paths:
versions and events are reduced to named fields, and every string passes through ``scrub_paths``. What the page
shows as text comes as text (``*_text`` fields, a metric's ``cells``), formatted by :mod:`tuneloop.rollout.display`
and ``fsutil.format_time`` (UTC), the same functions ``tuneloop rollout status`` prints with: the page and the
terminal show the same numbers the same way.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

from tuneloop.fsutil import format_time
from tuneloop.registry.events import RegistryEvent
from tuneloop.rollout.display import METRIC_HEADERS, metric_cells, percent
from tuneloop.serve.errors import scrub_paths

REFRESH_S = 3
MAX_EVENTS = 25
VERSION_FIELDS = ("ref", "version", "artifact_kind", "created_at", "aliases")


def dashboard_data(reg, *, max_events: int = MAX_EVENTS) -> dict[str, Any]:
    """Models, versions, aliases and rollouts as plain JSON for the page (no paths, no secrets)."""
    models = []
    for name in reg.models():
        versions = [
            {**{k: f.get(k) for k in VERSION_FIELDS}, "created_text": format_time(f.get("created_at"))}
            for f in (v.to_dict() for v in reg.list_versions(name))
        ]
        events = [event_row(e) for e in reg.events(name)[-max_events:]][::-1]
        models.append(
            {
                "name": name,
                "aliases": reg.aliases(name),
                "versions": versions,
                "rollout": rollout_view(reg, name),
                "events": events,
            }
        )
    now = datetime.now(timezone.utc)
    return scrubbed(
        {
            "models": models,
            "refresh_s": REFRESH_S,
            "generated_at": now.isoformat(),
            "generated_text": format_time(now.isoformat()),
        }
    )


def rollout_view(reg, model: str) -> dict[str, Any] | None:
    """The running (else latest) rollout: record, weight history, the newest decision's per-metric statistics."""
    from tuneloop.rollout import controller

    st = controller.status(reg, model)
    if st is None:
        return None
    events = st.get("decisions") or []
    history = [point for e in events if (point := weight_point(e)) is not None]
    last = st.get("last_decision") or {}
    decisions = [
        {
            "at": e.get("at"),
            "at_text": format_time(e.get("at")),
            "kind": e.get("kind"),
            "action": ((e.get("details") or {}).get("decision") or {}).get("action"),
            "weight": (e.get("details") or {}).get("weight"),
            "weight_text": percent((e.get("details") or {}).get("weight")),
            "actor": e.get("actor"),
            "reason": e.get("reason") or ((e.get("details") or {}).get("decision") or {}).get("reason") or "",
        }
        for e in events[-MAX_EVENTS:]
    ][::-1]
    keys = ("rollout_id", "candidate", "baseline", "status", "weight", "started_at", "ended_at", "updated_at", "reason")
    analysis = st.get("analysis") or {}
    return {
        **{k: st.get(k) for k in keys},
        "analysis": st.get("analysis"),
        "weight_history": history,
        "weight_text": percent(st.get("weight")),
        "schedule_text": [percent(w) for w in analysis.get("weights") or []],
        "started_text": format_time(st.get("started_at")),
        "last_decision": {
            k: last.get(k) for k in ("action", "reason", "step", "weight", "canary_requests", "baseline_requests", "at")
        }
        if last
        else None,
        "metric_headers": list(METRIC_HEADERS),
        "metrics": metric_rows(last.get("metrics") or {}, running=st.get("status") == "running"),
        "decisions": decisions,
    }


def weight_point(event: dict) -> dict[str, Any] | None:
    """``{"t", "weight", "kind"}`` for one rollout event (``t``: unix seconds)."""
    details = event.get("details") or {}
    if details.get("weight") is None:
        return None
    decision = details.get("decision") or {}
    t = decision.get("at")
    if t is None:
        try:
            t = datetime.fromisoformat(str(event.get("at"))).timestamp()
        except ValueError:
            return None
    return {"t": float(t), "weight": float(details["weight"]), "kind": decision.get("action") or event.get("kind")}


def metric_rows(metrics: dict[str, Any], *, running: bool = True) -> list[dict[str, Any]]:
    """One row per metric: each arm's requests, events and rate; the ratio, its interval, e-value and threshold;
    ``cells``: the texts under ``METRIC_HEADERS`` (``rollout.display.metric_cells``, as `rollout status` prints them)."""
    rows = []
    for name, m in metrics.items():
        interval = m.get("interval") or [None, None]
        rows.append(
            {
                "metric": name,
                "canary": m.get("canary"),
                "baseline": m.get("baseline"),
                "estimate": m.get("estimate"),
                "lower": interval[0],
                "upper": interval[1],
                "max_ratio": m.get("max_ratio"),
                "log_evalue": m.get("log_evalue"),
                "threshold": m.get("threshold"),
                "non_inferior": m.get("non_inferior"),
                "requests_needed": m.get("requests_needed"),
                "needed_for": m.get("needed_for"),
                "cells": metric_cells(name, m, running=running),
            }
        )
    return rows


def event_row(e: RegistryEvent) -> dict[str, Any]:
    details = e.details or {}
    return {
        "at": e.at,
        "at_text": format_time(e.at),
        "kind": e.kind,
        "version": e.version,
        "actor": e.actor,
        "reason": e.reason or "",
        "rollout_id": details.get("rollout_id"),
        "alias": details.get("alias"),
    }


def scrubbed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrubbed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrubbed(v) for v in value]
    if isinstance(value, str):
        return scrub_paths(value)
    return value


def add_dashboard_routes(app, gw) -> None:
    from fastapi.responses import HTMLResponse

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(
            DASHBOARD_HTML.replace("__REFRESH_MS__", str(REFRESH_S * 1000)), headers={"cache-control": "no-store"}
        )

    @app.get("/dashboard.json")
    async def dashboard_json() -> dict[str, Any]:
        return await asyncio.to_thread(dashboard_data, gw.router.registry)


DASHBOARD_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tuneloop gateway</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;justify-content:space-between;align-items:center}
header h1{font-size:18px;margin:0} #updated{font-size:12px;opacity:.8}
main{padding:16px 20px;max-width:1200px} section.model{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:0 0 16px;padding:12px 16px}
h2{margin:0 0 8px;font-size:17px} h3{margin:14px 0 6px;font-size:14px;color:#444}
table{border-collapse:collapse;width:100%;margin:4px 0} th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
th{font-weight:600;color:#555;font-size:12px} .alias{display:inline-block;background:#e7eefc;color:#2456b3;border-radius:3px;padding:0 5px;margin-right:3px;font-size:12px}
.status-running{color:#b36b00;font-weight:600}.status-promoted{color:#1a7f37;font-weight:600}.status-rolled_back,.status-aborted{color:#c62828;font-weight:600}
.bad{color:#c62828}.good{color:#1a7f37} .muted{color:#777} .err{color:#c62828;padding:8px}
svg text{font-size:11px;fill:#555} table.decisions td:first-child,table.events td:first-child,table.versions td:nth-child(3){white-space:nowrap}
</style></head>
<body><header><h1>tuneloop gateway</h1><span id="updated">loading…</span></header>
<main id="root"><p class="muted">loading…</p></main>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}
// Every number and time shown as text arrives as text (rollout/display.py, fsutil.format_time: the same as
// `tuneloop rollout status`); the script only lays it out. The chart's axis labels are the exception: UTC too.
const pct = x => x == null ? "–" : Math.round(100 * x) + "%";
const utc = t => new Date(t * 1000).toISOString().slice(11, 19) + " UTC";
function table(head, rows, cls) {
  const t = el("table", cls ? {class: cls} : {});
  t.append(el("tr", {}, ...head.map(h => el("th", {}, h))));
  for (const r of rows) t.append(el("tr", {}, ...r.map(c => el("td", {}, c))));
  return t;
}
function weightChart(points, endedAt) {
  const W = 560, H = 150, L = 40, B = 22, T = 8, R = 10;
  const s = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "weight-chart", role: "img"});
  s.append(svg("title", {}, "canary weight over time"));
  for (const y of [0, 0.5, 1]) {
    const py = T + (1 - y) * (H - T - B);
    s.append(svg("line", {x1: L, x2: W - R, y1: py, y2: py, stroke: "#e3e6eb"}));
    s.append(svg("text", {x: 4, y: py + 4}, pct(y)));
  }
  if (!points.length) return s;
  // an ended rollout's line stops at its end; a running one's runs to now
  const end = endedAt ? Date.parse(endedAt) / 1000 : Date.now() / 1000;
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, isNaN(end) ? 0 : end), span = Math.max(t1 - t0, 1);
  const px = t => L + (t - t0) / span * (W - L - R), py = w => T + (1 - w) * (H - T - B);
  let d = "", prev = null;
  for (const p of points) {
    d += prev === null ? `M${px(p.t)},${py(p.weight)}` : `H${px(p.t)}V${py(p.weight)}`;
    prev = p;
  }
  d += `H${px(t1)}`;
  s.append(svg("path", {d, fill: "none", stroke: "#2456b3", "stroke-width": 2}));
  for (const p of points) s.append(svg("circle", {cx: px(p.t), cy: py(p.weight), r: 3, fill: p.kind === "rollback" ? "#c62828" : "#2456b3"}));
  s.append(svg("text", {x: L, y: H - 6}, utc(t0)));
  s.append(svg("text", {x: W - R, y: H - 6, "text-anchor": "end"}, utc(t1)));
  return s;
}
function intervalBar(m) {
  // the ratio canary/baseline on a log axis from 1/8 to 8: its anytime-valid interval, the estimate, 1 and the margin
  const W = 220, H = 22, lo = Math.log(1 / 8), hi = Math.log(8);
  const x = r => 4 + (Math.log(Math.min(Math.max(r, 1 / 8), 8)) - lo) / (hi - lo) * (W - 8);
  const s = svg("svg", {width: W, height: H, class: "interval"});
  s.append(svg("line", {x1: x(1), x2: x(1), y1: 0, y2: H, stroke: "#999"}));
  if (m.max_ratio) s.append(svg("line", {x1: x(m.max_ratio), x2: x(m.max_ratio), y1: 0, y2: H, stroke: "#e0a000", "stroke-dasharray": "3,2"}));
  if (m.lower != null) {
    const a = x(m.lower || 1 / 8), b = x(m.upper == null ? 8 : m.upper);
    s.append(svg("rect", {x: a, y: 7, width: Math.max(b - a, 1), height: 8, fill: m.non_inferior ? "#9bd3ae" : "#f3b0b0"}));
  }
  if (m.estimate != null) s.append(svg("circle", {cx: x(m.estimate), cy: 11, r: 3, fill: "#1d2330"}));
  return s;
}
function rolloutSection(r) {
  const box = el("div", {class: "rollout", "data-rollout": r.rollout_id});
  box.append(el("h3", {}, "Rollout ", el("span", {class: "rollout-id"}, r.rollout_id), ": ", r.candidate, " vs ", r.baseline, " — ",
    el("span", {class: "status-" + r.status + " rollout-status"}, r.status), " — weight ", el("span", {class: "rollout-weight"}, r.weight_text)));
  const a = r.analysis || {};
  box.append(el("div", {class: "muted"}, `schedule ${(r.schedule_text || []).join(" → ")}, α = ${a.alpha}, ` +
    `${a.canary_requests || 0} canary / ${a.baseline_requests || 0} baseline requests; started ${r.started_text}`));
  box.append(weightChart(r.weight_history || [], r.ended_at));
  if (r.last_decision) box.append(el("div", {class: "last-decision"}, el("b", {}, "Latest decision: "), `${r.last_decision.action}: ${r.last_decision.reason}`));
  // the cells after the interval's text get its bar on a log axis
  const AFTER = (r.metric_headers || []).indexOf("anytime-valid interval") + 1;
  const rows = (r.metrics || []).map(m => {
    const tr = el("tr", {class: "metric-row", "data-metric": m.metric});
    const cells = [...m.cells];
    cells.splice(AFTER, 0, intervalBar(m));
    for (const c of cells) tr.append(el("td", {}, c));
    return tr;
  });
  const t = el("table", {class: "arms"});
  const heads = [...(r.metric_headers || [])];
  heads.splice(AFTER, 0, "1/8 … 1 … 8");
  t.append(el("tr", {}, ...heads.map(h => el("th", {}, h))));
  rows.forEach(tr => t.append(tr));
  box.append(t);
  box.append(el("h3", {}, "Decisions"));
  box.append(table(["at", "event", "action", "weight", "by", "reason"],
    (r.decisions || []).map(d => [d.at_text, d.kind, d.action || "", d.weight_text, d.actor, d.reason]), "decisions"));
  return box;
}
function render(data) {
  const root = document.getElementById("root");
  root.replaceChildren();
  if (!data.models.length) root.append(el("p", {class: "muted"}, "No models registered yet."));
  for (const m of data.models) {
    const sec = el("section", {class: "model", "data-model": m.name});
    sec.append(el("h2", {}, m.name, " ", ...Object.entries(m.aliases).map(([a, v]) => el("span", {class: "alias"}, `${a} → ${v}`))));
    sec.append(table(["version", "kind", "registered", "aliases"],
      m.versions.map(v => [v.ref, v.artifact_kind || "", v.created_text || "", (v.aliases || []).join(", ")]), "versions"));
    if (m.rollout) sec.append(rolloutSection(m.rollout));
    sec.append(el("h3", {}, "Recent events"));
    sec.append(table(["at", "event", "version", "by", "reason"], m.events.map(e => [e.at_text, e.kind, e.version, e.actor, e.reason]), "events"));
    root.append(sec);
  }
  document.getElementById("updated").textContent = "updated " + data.generated_text;
}
// With API keys on the gateway, open the page as /dashboard#key=<API key>: the fragment never leaves the browser.
const KEY = new URLSearchParams(location.hash.slice(1)).get("key");
async function refresh() {
  try {
    const resp = await fetch("dashboard.json", {cache: "no-store", headers: KEY ? {authorization: "Bearer " + KEY} : {}});
    if (resp.status === 401) throw new Error("this gateway needs an API key: open the page as /dashboard#key=<key>");
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (e) {
    document.getElementById("updated").textContent = "refresh failed: " + e.message;
  }
}
refresh();
setInterval(refresh, __REFRESH_MS__);
</script></body></html>
"""
