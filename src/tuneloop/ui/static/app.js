// tuneloop ui: one page, hash routes, every string from static/i18n/<lang>.json, charts by Chart.js (vendored).
// The server sends data; this script lays it out. API and data-testid contract: /work/notes/ui_api.md.
"use strict";

// ------------------------------------------------------------------------------------------ i18n
const LANGS = ["en", "zh-CN"];
let STR = {}, EN = {}, LANG = "en";
let INFO = {loopback: false};  // /api/info: whether the UI is on loopback (then actions need no token)
function pickLang() {
  const saved = localStorage.getItem("tuneloop.lang");
  if (LANGS.includes(saved)) return saved;
  for (const l of navigator.languages || [navigator.language || "en"]) {
    if (/^zh/i.test(l)) return "zh-CN";
    if (/^en/i.test(l)) return "en";
  }
  return "en";
}
async function loadLang(lang) {
  const get = async l => { const r = await fetch("static/i18n/" + l + ".json", {cache: "no-store"}); return r.ok ? r.json() : {}; };
  EN = await get("en");
  STR = lang === "en" ? EN : await get(lang).catch(() => ({}));
  LANG = lang;
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach(e => { e.textContent = t(e.dataset.i18n); });
  document.getElementById("lang").value = lang;
}
function t(key, params) {
  let s = STR[key] ?? EN[key] ?? key;
  for (const [k, v] of Object.entries(params || {})) s = s.split("{" + k + "}").join(v == null ? "" : String(v));
  return s;
}

// ------------------------------------------------------------------------------------------ helpers
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "testid") e.setAttribute("data-testid", v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) if (k != null) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
const num = (x, d = 4) => x == null ? "–" : typeof x === "number" ? (Number.isInteger(x) ? String(x) : String(+x.toPrecision(d)).replace(/^-0$/, "0")) : String(x);
const interval = iv => Array.isArray(iv) ? `[${num(iv[0])}, ${num(iv[1])}]` : "–";
const secs = s => s == null ? "–" : s < 60 ? `${(+s).toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
const utc = s => { if (s == null) return "–"; const d = typeof s === "number" ? new Date(s * 1000) : new Date(s); return isNaN(d) ? String(s) : d.toISOString().slice(0, 19).replace("T", " ") + " UTC"; };
const stageName = s => t("stage." + s) === "stage." + s ? s : t("stage." + s);
const statusText = s => t("status." + s) === "status." + s ? s : t("status." + s);
// a registry event kind (registered, promoted, rollout_decision, ...) and a rollout decision's action, in the UI's
// language; a kind the catalog does not know (a newer server) is shown as sent
const eventText = k => t("event." + k) === "event." + k ? k : t("event." + k);
const actionText = a => !a ? "" : t("action." + a) === "action." + a ? a : t("action." + a);
const verdictText = v => t("verdict." + v) === "verdict." + v ? v : t("verdict." + v);
const enc = encodeURIComponent;
function table(head, rows, attrs) {
  return el("table", attrs || {}, el("thead", {}, el("tr", {}, head.map(h => el("th", {}, h)))), el("tbody", {}, rows));
}
function panelError(err) { return el("div", {class: "panel-error", testid: "panel-error"}, t("app.error", {message: err.message})); }

class ApiError extends Error { constructor(status, body) { super((body && body.error && body.error.message) || ("HTTP " + status)); this.status = status; this.body = body; } }
function authHeaders(token) {
  const k = token || sessionStorage.getItem("tuneloop.key");
  return k ? {authorization: "Bearer " + k} : {};
}
async function api(path, opts) {
  opts = opts || {};
  const r = await fetch(path, {method: opts.method || "GET", cache: "no-store",
    headers: {...authHeaders(opts.token), ...(opts.body ? {"content-type": "application/json"} : {})},
    body: opts.body ? JSON.stringify(opts.body) : undefined});
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}
// A panel: a section that loads its own data; its failure shows there, the rest of the page still works.
function panel(title, loader, attrs) {
  const sec = el("section", attrs || {}, title ? el("h2", {}, title) : null, el("p", {class: "muted"}, t("app.loading")));
  Promise.resolve().then(loader).then(content => {
    sec.replaceChildren(...(title ? [el("h2", {}, title)] : []), ...[content].flat().filter(x => x != null));
  }).catch(err => {
    sec.replaceChildren(...(title ? [el("h2", {}, title)] : []), panelError(err));
  });
  return sec;
}
const charts = [];
function chart(canvas, config) {
  if (typeof Chart === "undefined") return;
  charts.push(new Chart(canvas, config));
}
let timers = [];
function every(ms, fn) { timers.push(setInterval(fn, ms)); }

// ------------------------------------------------------------------------------------------ pages
const main = () => document.getElementById("main");

function pageRuns() {
  return [el("h1", {}, t("runs.title")), panel(null, async () => {
    const data = await api("api/runs");
    const out = [];
    if (!data.runs.length) out.push(el("p", {class: "muted"}, t("runs.empty")));
    else out.push(table([t("runs.col.run"), t("runs.col.pipeline"), t("runs.col.status"), t("runs.col.started"), t("runs.col.duration"), t("runs.col.stages")],
      data.runs.map(r => el("tr", {class: "clickable", testid: "run-row", "data-run-id": r.run_id, onclick: () => { location.hash = "#/runs/" + r.run_id; }},
        el("td", {class: "mono rid"}, el("a", {href: "#/runs/" + r.run_id}, r.run_id)), el("td", {}, r.pipeline),
        el("td", {testid: "run-status", class: "nowrap s-" + r.status}, statusText(r.status)), el("td", {}, utc(r.started_at)),
        el("td", {class: "num"}, secs(r.duration_s)),
        el("td", {}, r.stages.map(s => el("span", {class: "chip s-" + s.status, title: `${s.status}${s.cached ? " (" + t("run.cached") + ")" : ""}`},
          stageName(s.stage), s.cached ? " ⟳" : ""))))), {testid: "runs-table"}));
    if (data.runs.some(r => r.status === "running")) every(5000, route);  // a running run: the list follows it
    if (data.problems.length) out.push(el("h3", {}, t("runs.problems")),
      ...data.problems.map(p => el("div", {class: "panel-error", testid: "panel-error"}, `${p.run_id}: ${p.error}`)));
    return out;
  })];
}

function pageRun(id) {
  const liveBox = el("section", {}, el("h2", {}, t("run.live")), el("p", {class: "muted"}, t("app.loading")));
  const out = [el("h1", {}, t("run.title", {id})),
    el("p", {}, el("a", {href: `#/runs/${id}/gates`}, t("run.why")), " · ", el("a", {href: `#/data/${id}`}, t("run.data")), " · ",
      el("a", {href: `api/runs/${enc(id)}/report`, target: "_blank"}, t("run.report"))),
    panel(t("run.stages"), async () => {
      const {run} = await api(`api/runs/${enc(id)}`);
      return [el("p", {}, el("span", {class: "s-" + run.status, testid: "run-status"}, statusText(run.status)), " · ", run.pipeline, " · ",
        utc(run.started_at), " · ", secs(run.duration_s)),
        table([t("run.col.stage"), t("run.col.status"), t("run.col.duration"), t("run.col.cached"), t("run.metrics"), t("run.col.error")],
          run.stages.map(s => el("tr", {testid: "stage-row", "data-stage": s.stage},
            el("td", {class: "nowrap"}, stageName(s.stage)), el("td", {class: "nowrap s-" + s.status}, statusText(s.status)), el("td", {class: "num"}, secs(s.duration_s)),
            el("td", {}, s.cached ? t("app.yes") : t("app.no")),
            el("td", {class: "mono"}, Object.entries(s.metrics || {}).filter(([, v]) => typeof v !== "object").slice(0, 8).map(([k, v]) => `${k} ${num(v)}`).join(" · ")),
            el("td", {class: "s-failed"}, s.error))))];
    }), liveBox];
  let lossChart = null, lrChart = null;
  async function live() {
    let p;
    try { p = await api(`api/runs/${enc(id)}/progress`); } catch (err) { liveBox.replaceChildren(el("h2", {}, t("run.live")), panelError(err)); return; }
    const pts = p.train.points;
    if (!lossChart) {
      const lossCanvas = el("canvas", {testid: "loss-chart"}), lrCanvas = el("canvas", {testid: "lr-chart"});
      liveBox.replaceChildren(el("h2", {}, t("run.live") + (p.stage ? ` — ${stageName(p.stage)}` : "")),
        pts.length ? el("div", {class: "row"}, el("div", {}, el("h3", {}, t("run.loss")), el("div", {class: "chart-box"}, lossCanvas)),
          el("div", {}, el("h3", {}, t("run.lr")), el("div", {class: "chart-box"}, lrCanvas))) : el("p", {class: "muted"}, t("run.no_train_log")),
        el("h3", {}, t("run.eval_progress")), el("div", {testid: "eval-progress", id: "eval-progress"}),
        el("h3", {}, t("run.log_tail")), el("pre", {class: "log", testid: "log-tail", id: "log-tail"}));
      if (pts.length) {
        const line = (label, key, color) => ({type: "line", data: {labels: pts.map(x => x.step), datasets: [{label, data: pts.map(x => x[key]), borderColor: color, pointRadius: 0, borderWidth: 1.5}]},
          options: {animation: false, maintainAspectRatio: false, plugins: {legend: {display: false}}, scales: {x: {title: {display: true, text: t("run.step")}, ticks: {maxTicksLimit: 8}}}}});
        chart(lossCanvas, line(t("run.loss"), "loss", "#2456b3")); lossChart = charts[charts.length - 1];
        chart(lrCanvas, line(t("run.lr"), "learning_rate", "#b36b00")); lrChart = charts[charts.length - 1];
      }
    } else {
      for (const [c, key] of [[lossChart, "loss"], [lrChart, "learning_rate"]]) {
        c.data.labels = pts.map(x => x.step); c.data.datasets[0].data = pts.map(x => x[key]); c.update();
      }
    }
    const ev = document.getElementById("eval-progress");
    if (ev) ev.replaceChildren(p.eval.suites.length ? el("ul", {}, p.eval.suites.map(s => el("li", {testid: "eval-suite"}, s.items_total == null ? t("run.eval_suite_done", {suite: s.suite, done: s.items_done})
      : t("run.eval_suite_progress", {suite: s.suite, done: s.items_done, total: s.items_total}))))
      : el("p", {class: "muted"}, t("run.no_eval_progress")));
    const lg = document.getElementById("log-tail");
    if (lg) lg.textContent = p.log_tail.length ? p.log_tail.join("\n") : p.log_path ? t("run.log_empty", {path: p.log_path}) : t("run.no_log");
    return p.status;
  }
  live().then(status => { if (status === "running") every(3000, live); });
  return out;
}

function gateChart(canvas, g) {
  const lo = g.interval ? g.interval[0] : g.value, hi = g.interval ? g.interval[1] : g.value;
  const xs = [lo, hi, g.threshold, g.value].filter(x => typeof x === "number" && isFinite(x));
  if (!xs.length) return;
  let min = Math.min(...xs), max = Math.max(...xs);
  const pad = (max - min) * 0.15 || Math.abs(max) * 0.1 || 0.1;
  const nonNegative = min >= 0;
  min -= pad; max += pad;
  if (nonNegative) min = Math.max(min, 0);  // counts and rates: no axis below 0
  const color = {PASS: "#9bd3ae", FAIL: "#f3b0b0", INCONCLUSIVE: "#f6d79a"}[g.verdict] || "#d5d9e0";
  const datasets = [{type: "bar", data: [[lo, hi === lo ? hi + pad * 0.04 : hi]], backgroundColor: color, borderColor: "#555", borderWidth: 1, barThickness: 12}];
  if (typeof g.threshold === "number") datasets.push({type: "scatter", data: [{x: g.threshold, y: 0}], pointStyle: "line", rotation: 90, radius: 12, borderWidth: 3, borderColor: "#1d2330"});
  if (typeof g.value === "number") datasets.push({type: "scatter", data: [{x: g.value, y: 0}], radius: 3, backgroundColor: "#1d2330"});
  chart(canvas, {type: "bar", data: {labels: [""], datasets}, options: {indexAxis: "y", animation: false, responsive: false,
    plugins: {legend: {display: false}, tooltip: {enabled: false}},
    scales: {x: {min, max, ticks: {maxTicksLimit: 5, font: {size: 10}, callback: v => num(v, 3)}}, y: {display: false}}}});
}

function pageGates(id) {
  return [el("h1", {}, t("gates.title", {id})), el("p", {}, el("a", {href: "#/runs/" + id}, "← " + t("app.back"))),
    panel(null, async () => {
      const d = await api(`api/runs/${enc(id)}/gates`);
      if (!d.gates.length) return el("p", {class: "muted"}, t("gates.empty"));
      const rows = d.gates.map(g => {
        const canvas = el("canvas", {class: "gate-chart", testid: "gate-chart", width: 280, height: 44});
        setTimeout(() => gateChart(canvas, g), 0);
        return el("tr", {testid: "gate-row", "data-gate": g.name, class: g.stage === "evaluation" ? "clickable" : null,
          title: g.stage === "evaluation" ? t("items.title") : null, onclick: () => { if (g.stage === "evaluation" && showSuite) showSuite(g.suite); }},
          el("td", {testid: "gate-name", class: "mono gate-name"}, g.name), el("td", {class: "nowrap"}, stageName(g.stage)),
          el("td", {class: "num"}, num(g.value)), el("td", {class: "num", testid: "gate-interval"}, interval(g.interval)),
          el("td", {class: "num"}, `${g.op || ""} ${num(g.threshold)}`), el("td", {}, canvas),
          el("td", {testid: "gate-verdict", class: "nowrap v-" + g.verdict}, verdictText(g.verdict), g.blocks ? ` (${t("gates.blocks")})` : ""),
          el("td", {class: "muted reason"}, g.reason));
      });
      return [el("p", {}, t("gates.overall", {overall: statusText(d.overall)})), el("p", {class: "muted"}, t("gates.chart_note")),
        table([t("gates.col.gate"), t("gates.col.stage"), t("gates.col.value"), t("gates.col.interval"), t("gates.col.threshold"), t("gates.chart"),
          t("gates.col.verdict"), t("gates.col.reason")], rows, {testid: "gate-table", class: "gates"})];
    }),
    panel(t("compare.title"), async () => {
      const d = await api("api/runs");
      const sel = el("select", {testid: "compare-select"}, d.runs.filter(r => r.run_id !== id).map(r => el("option", {value: r.run_id}, `${r.run_id} (${statusText(r.status)})`)));
      return el("form", {class: "inline", onsubmit: e => { e.preventDefault(); location.hash = `#/compare/${id}/${sel.value}`; }},
        el("label", {}, t("compare.with"), sel), el("button", {testid: "compare-go", type: "submit"}, t("compare.go")));
    }),
    itemsPanel(id)];
}

let showSuite = null;  // set by the items panel: a click on an evaluation gate shows that suite's items
function itemsPanel(id) {
  const box = el("div");
  const state = {suite: "", only: "differ", limit: 50};
  showSuite = suite => { state.suite = suite || ""; load().then(() => box.scrollIntoView({behavior: "smooth"})).catch(() => {}); };
  async function load() {
    const d = await api(`api/runs/${enc(id)}/items?only=${state.only}&limit=${state.limit}` + (state.suite ? `&suite=${enc(state.suite)}` : ""));
    if (!d.suites.length) return box.replaceChildren(el("p", {class: "muted"}, t("items.empty")));
    const sel = el("select", {testid: "items-suite", onchange: e => { state.suite = e.target.value; load(); }},
      el("option", {value: ""}, "*"), d.suites.map(s => el("option", {value: s.suite, selected: s.suite === state.suite}, `${s.suite} (${s.count})`)));
    const only = el("input", {type: "checkbox", testid: "items-only-differ", checked: state.only === "differ", onchange: e => { state.only = e.target.checked ? "differ" : "all"; load(); }});
    const judge = it => {
      const parts = [];
      if ("candidate_refused" in it || "base_refused" in it) parts.push(`${t("items.col.base")}: ${it.base_refused ? t("items.refused") : t("items.answered")}; ${t("items.col.candidate")}: ${it.candidate_refused ? t("items.refused") : t("items.answered")}`);
      if ("candidate_score" in it) parts.push(`${t("items.col.base")} ${num(it.base_score)} / ${t("items.col.candidate")} ${num(it.candidate_score)}`);
      return parts.join(" · ");
    };
    box.replaceChildren(el("form", {class: "inline"}, el("label", {}, t("items.suite"), sel), el("label", {}, el("span", {}, only, " ", t("items.only_differ")))),
      el("p", {class: "muted"}, t("items.count", {shown: d.items.length, total: d.total})),
      table([t("items.col.id"), t("items.col.prompt"), t("items.col.reference"), t("items.col.base"), t("items.col.candidate"), t("items.col.judge")],
        d.items.map(it => el("tr", {testid: "item-row"}, el("td", {class: "mono"}, `${it.suite}/${it.id}`), el("td", {class: "prompt"}, it.prompt ?? ""),
          el("td", {}, it.reference ?? (it.choices ? it.choices[it.answer] : "")), el("td", {class: "answer"}, it.base ?? ""), el("td", {class: "answer"}, it.candidate ?? ""),
          el("td", {}, judge(it)))), {testid: "items-table"}),
      d.total > d.items.length ? el("button", {class: "secondary", onclick: () => { state.limit += 100; load(); }}, t("items.more")) : null);
  }
  return panel(t("items.title"), async () => { await load(); return box; });
}

function pageCompare(a, b) {
  return [el("h1", {}, t("compare.title")), panel(null, async () => {
    const d = await api(`api/compare?a=${enc(a)}&b=${enc(b)}`);
    const cell = x => x ? el("td", {}, el("span", {class: "v-" + x.verdict}, verdictText(x.verdict)), " ", num(x.value), " ", interval(x.interval)) : el("td", {}, "–");
    return [el("h2", {}, t("compare.gates")),
      table([t("compare.col.gate"), `${d.a} (${statusText(d.a_status)})`, `${d.b} (${statusText(d.b_status)})`],
        d.gates.map(g => el("tr", {testid: "compare-row", "data-gate": g.name}, el("td", {class: "mono"}, g.name), cell(g.a), cell(g.b))), {testid: "compare-table"}),
      el("h2", {}, t("compare.metrics")),
      table([t("compare.col.stage"), t("compare.col.metric"), d.a, d.b],
        d.metrics.filter(m => m.a !== m.b).map(m => el("tr", {}, el("td", {}, stageName(m.stage)), el("td", {class: "mono"}, m.key), el("td", {class: "num"}, num(m.a)), el("td", {class: "num"}, num(m.b)))))];
  })];
}

function pageData(id) {
  return [el("h1", {}, t("data.title", {id})), el("p", {}, el("a", {href: "#/runs/" + id}, "← " + t("app.back"))), panel(null, async () => {
    const d = await api(`api/runs/${enc(id)}/data`);
    if (!d.sources.length) return el("p", {class: "muted"}, t("data.empty"));
    return d.sources.map(s => {
      const rules = Object.entries(s.rules || {});
      const pii = Object.entries(s.pii || {});
      return el("div", {testid: "data-source", "data-source": s.source},
        el("h2", {}, t("data.source", {source: s.source})),
        el("dl", {class: "kv"}, ["records", "valid", "invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped", "overlong_dropped"]
          .flatMap(k => [el("dt", {}, k), el("dd", {class: "num"}, num(s[k]))]), el("dt", {}, t("data.accounting")), el("dd", {class: "mono"}, s.accounting || "")),
        el("h3", {}, t("data.rules")),
        rules.length ? table([t("data.col.rule"), t("data.col.count"), t("data.col.examples")], rules.map(([r, n]) => el("tr", {testid: "rule-row", "data-rule": r},
          el("td", {class: "mono"}, r), el("td", {class: "num"}, num(n)), el("td", {class: "muted"}, ((s.examples || {})[r] || []).slice(0, 3).map(x => `${x.line}: ${x.reason}`).join(" · ")))))
          : el("p", {class: "muted"}, t("app.none")),
        el("h3", {}, t("data.gates")),
        table([t("gates.col.gate"), t("gates.col.value"), t("gates.col.threshold"), t("gates.col.verdict"), t("gates.col.reason")],
          (s.gates || []).map(g => el("tr", {}, el("td", {class: "mono"}, g.name), el("td", {class: "num"}, num(g.value)), el("td", {class: "num"}, `${g.op || ""} ${num(g.threshold)}`),
            el("td", {class: "v-" + g.verdict}, verdictText(g.verdict)), el("td", {class: "muted"}, g.reason || "")))),
        el("h3", {}, t("data.pii")),
        pii.length ? table(["type", t("data.col.count"), t("data.col.examples")], pii.map(([k, n]) => el("tr", {}, el("td", {}, k), el("td", {class: "num"}, num(n)),
          el("td", {class: "mono"}, JSON.stringify((s.pii_examples || {})[k] || ""))))) : el("p", {class: "muted"}, t("data.no_pii")),
        quarantinePanel(id, s.source), duplicatesPanel(id, s.source));
    });
  })];
}
function quarantinePanel(id, source) {
  return panel(t("data.quarantine"), async () => {
    const q = await api(`api/runs/${enc(id)}/data/${source}/quarantine?limit=50`);
    if (!q.total) return el("p", {class: "muted"}, t("data.no_quarantine"));
    return [el("p", {class: "muted"}, t("items.count", {shown: q.records.length, total: q.total})),
      table([t("data.col.line"), t("data.col.reasons"), t("data.col.record")], q.records.map(r => el("tr", {testid: "quarantine-row"},
        el("td", {class: "num"}, r.line), el("td", {}, r.reasons.join("; ")), el("td", {class: "prompt"}, r.text))), {testid: "quarantine-table"})];
  });
}
function duplicatesPanel(id, source) {
  return panel(t("data.duplicates"), async () => {
    const d = await api(`api/runs/${enc(id)}/data/${source}/duplicates`);
    if (!d.groups.length) return el("p", {class: "muted"}, t("data.no_duplicates"));
    return el("ul", {}, d.groups.slice(0, 100).map(g => el("li", {testid: "dup-group"}, t("data.group", {lines: g.lines.join(", ")}), " ", el("span", {class: "muted"}, g.reason))));
  });
}

function pageModels() {
  return [el("h1", {}, t("models.title")), panel(null, async () => {
    const d = await api("api/models");
    if (!d.models.length) return [el("p", {class: "muted"}, t("models.backend", {backend: d.backend, location: d.location})), el("p", {class: "muted"}, t("models.empty"))];
    return [el("p", {class: "muted"}, t("models.backend", {backend: d.backend, location: d.location})),
      table([t("models.col.model"), t("models.col.versions"), t("models.col.aliases"), t("models.col.latest")], d.models.map(m =>
        el("tr", {class: "clickable", testid: "model-row", "data-model": m.name, onclick: () => { location.hash = "#/models/" + enc(m.name); }},
          el("td", {}, el("a", {href: "#/models/" + enc(m.name)}, m.name)), el("td", {class: "num"}, m.versions.length),
          el("td", {}, Object.entries(m.aliases).map(([a, v]) => el("span", {class: "alias", testid: "alias-badge"}, `${a} → ${v}`))), el("td", {}, m.latest))), {testid: "models-table"})];
  })];
}

// An action's outcome in its result line; on success `after` redraws what the action changed (no page reload).
function actionResult(box, promise, what, after) {
  box.className = ""; box.textContent = t("app.loading");
  return promise.then(r => { box.className = "ok"; box.textContent = t("model.done", {what: what(r)}); if (after) return after(); })
    .catch(err => { box.className = "panel-error"; box.textContent = t("model.failed", {message: err.message}); });
}

function pageModel(name) {
  const out = [el("h1", {}, t("model.title", {name})), el("p", {}, el("a", {href: `#/rollouts/${enc(name)}`, testid: "rollout-link"}, t("model.rollouts")))];
  out.push(panel(t("model.versions"), async () => {
    const d = await api(`api/models/${enc(name)}`);
    const versions = d.versions;
    const versionsTable = vs => table([t("model.col.version"), t("model.col.created"), t("model.col.kind"), t("model.col.accuracy"), t("model.col.aliases"), t("model.col.tags"), t("version.run")],
      vs.map(v => el("tr", {class: "clickable", testid: "version-row", "data-version": v.version, onclick: () => { location.hash = `#/models/${enc(name)}/${v.version}`; }},
        el("td", {}, el("a", {href: `#/models/${enc(name)}/${v.version}`}, v.ref)), el("td", {}, utc(v.created_at)), el("td", {}, v.artifact_kind),
        el("td", {class: "num"}, num(v.accuracy)), el("td", {}, v.aliases.map(a => el("span", {class: "alias", testid: "alias-badge"}, a))),
        el("td", {}, Object.entries(v.tags).map(([k, x]) => `${k}=${x}`).join(", ")), el("td", {class: "mono"}, v.run_id ? el("a", {href: "#/runs/" + v.run_id}, v.run_id) : ""))).reverse(), {testid: "versions-table"});
    const versionsBox = el("div", {}, versionsTable(versions)), eventsBox = el("div", {}, eventsTable(d.events));
    // after promote / rollback / tag: the versions (aliases, tags) and the events redrawn in place
    const refresh = async () => {
      try { const n = await api(`api/models/${enc(name)}`); versionsBox.replaceChildren(versionsTable(n.versions)); eventsBox.replaceChildren(eventsTable(n.events)); }
      catch (err) { eventsBox.replaceChildren(panelError(err)); }
    };
    const tokenField = id => el("input", {type: "password", testid: id, placeholder: t("model.token_placeholder"), autocomplete: "off"});
    const tokenLabel = input => el("label", {style: INFO.loopback ? "display:none" : null}, t("model.token"), input);  // loopback: no token needed
    // promote
    const pv = el("select", {testid: "promote-version"}, versions.map(v => el("option", {value: v.version}, v.ref)).reverse());
    const pa = el("input", {type: "text", testid: "promote-alias", value: "champion", size: 10});
    const pr = el("input", {type: "text", testid: "promote-reason", size: 30});
    const pt = tokenField("promote-token");
    const pres = el("div", {testid: "promote-result"});
    const promote = el("form", {class: "inline", onsubmit: e => { e.preventDefault();
      actionResult(pres, api(`api/models/${enc(name)}/promote`, {method: "POST", token: pt.value, body: {version: pv.value, alias: pa.value, reason: pr.value}}), r => `${r.ref} → ${pa.value}`, refresh); }},
      el("label", {}, t("model.promote_version"), pv), el("label", {}, t("model.promote_alias"), pa), el("label", {}, t("model.reason"), pr),
      tokenLabel(pt), el("button", {type: "submit", testid: "promote-submit"}, t("model.promote_submit")));
    // rollback
    const rr = el("input", {type: "text", testid: "rollback-reason", size: 30}), rt = tokenField("rollback-token"), rres = el("div", {testid: "rollback-result"});
    const rollback = el("form", {class: "inline", onsubmit: e => { e.preventDefault();
      actionResult(rres, api(`api/models/${enc(name)}/rollback`, {method: "POST", token: rt.value, body: {reason: rr.value}}), r => `${r.ref}`, refresh); }},
      el("label", {}, t("model.reason"), rr), tokenLabel(rt), el("button", {type: "submit", testid: "rollback-submit", class: "secondary"}, t("model.rollback_submit")));
    // tag
    const tv = el("select", {testid: "tag-version"}, versions.map(v => el("option", {value: v.version}, v.ref)).reverse());
    const tk = el("input", {type: "text", testid: "tag-key", size: 10}), tval = el("input", {type: "text", testid: "tag-value", size: 10});
    const trm = el("input", {type: "checkbox", testid: "tag-remove"}), tr = el("input", {type: "text", testid: "tag-reason", size: 24}), tt = tokenField("tag-token");
    const tres = el("div", {testid: "tag-result"});
    const tag = el("form", {class: "inline", onsubmit: e => { e.preventDefault();
      actionResult(tres, api(`api/models/${enc(name)}/${enc(tv.value)}/tag`, {method: "POST", token: tt.value, body: {key: tk.value, value: tval.value, remove: trm.checked, reason: tr.value}}),
        r => `${r.ref} ${Object.entries(r.tags).map(([k, v]) => k + "=" + v).join(", ")}`, refresh); }},
      el("label", {}, t("model.promote_version"), tv), el("label", {}, t("model.tag_key"), tk), el("label", {}, t("model.tag_value"), tval),
      el("label", {}, t("model.tag_remove"), trm), el("label", {}, t("model.reason"), tr), tokenLabel(tt),
      el("button", {type: "submit", testid: "tag-submit"}, t("model.tag_submit")));
    // diff
    const da = el("select", {testid: "diff-a"}, versions.map(v => el("option", {value: v.version}, v.ref)));
    const db = el("select", {testid: "diff-b"}, versions.map(v => el("option", {value: v.version}, v.ref)).reverse());
    const dres = el("div");
    const diff = el("form", {class: "inline", onsubmit: async e => { e.preventDefault();
      try {
        const r = await api(`api/models/${enc(name)}/diff?a=${enc(da.value)}&b=${enc(db.value)}`);
        const rows = [...r.config.map(c => ["config." + c.key, c.a, c.b]), ...r.data.map(c => ["data." + c.key, c.a, c.b]),
          ...r.metrics.filter(m => m.a !== m.b).map(m => ["metrics." + m.key, m.a, m.b]),
          ...Object.entries(r.gates).filter(([, g]) => g.a !== g.b).map(([k, g]) => ["gates." + k, g.a, g.b])];
        if (!r.artifact.same) rows.unshift(["artifact", r.artifact.a.slice(0, 16), r.artifact.b.slice(0, 16)]);
        dres.replaceChildren(rows.length ? table([t("model.col.key"), r.a, r.b], rows.map(([k, a, b]) => el("tr", {}, el("td", {class: "mono"}, k),
          el("td", {class: "mono"}, typeof a === "object" ? JSON.stringify(a) : num(a)), el("td", {class: "mono"}, typeof b === "object" ? JSON.stringify(b) : num(b)))), {testid: "diff-table"})
          : el("p", {class: "muted"}, t("model.diff_none")));
      } catch (err) { dres.replaceChildren(panelError(err)); }
    }}, el("label", {}, "A", da), el("label", {}, "B", db), el("button", {type: "submit", testid: "diff-go"}, t("model.diff_go")));
    return [versionsBox,
      el("h3", {}, t("model.promote")), promote, pres, el("h3", {}, t("model.rollback")), rollback, rres, el("h3", {}, t("model.tag")), tag, tres,
      el("h3", {}, t("model.diff")), diff, dres,
      el("h3", {}, t("model.events")), eventsBox];
  }));
  return out;
}
function eventsTable(events) {
  return table([t("model.col.at"), t("model.col.event"), t("model.col.version"), t("model.col.actor"), t("model.col.reason")],
    events.slice(0, 100).map(e => el("tr", {testid: "event-row", "data-kind": e.kind}, el("td", {}, utc(e.at)), el("td", {testid: "event-kind"}, eventText(e.kind)), el("td", {class: "num"}, e.version),
      el("td", {}, e.actor), el("td", {}, e.reason))), {testid: "events-table"});
}

const LINEAGE_COLUMNS = [["data", "base"], ["run"], ["version"], ["rollout"], ["export"], ["next"]];
function lineageGraph(graph, self) {
  if (!graph.nodes.length) return el("p", {class: "muted"}, t("lineage.empty"));
  const incoming = {};
  for (const e of graph.edges) (incoming[e.to] = incoming[e.to] || []).push(e.from);
  const label = id => (graph.nodes.find(n => n.id === id) || {label: id}).label;
  const cols = [];
  LINEAGE_COLUMNS.forEach((kinds, i) => {
    // parent versions (continued from) sit with the inputs, the version itself in its own column
    const nodes = graph.nodes.filter(n => (i === 0 && (kinds.includes(n.kind) || (n.kind === "version" && n.id !== self))) ||
      (i > 0 && kinds.includes(n.kind) && !(n.kind === "version" && n.id !== self)));
    if (!nodes.length) return;
    if (cols.length) cols.push(el("div", {class: "arrow"}, "→"));
    cols.push(el("div", {class: "col"}, el("h4", {}, kinds.map(k => t("lineage." + k)).join(" / ")), nodes.map(n => {
      const href = n.kind === "run" ? "#/runs/" + n.run_id : (n.kind === "version" || n.kind === "next") && n.model ? `#/models/${enc(n.model)}/${n.version}` : null;
      return el("div", {class: "node k-" + n.kind, testid: "lineage-node", "data-kind": n.kind, "data-digest": n.digest || null, title: n.digest || n.detail || ""},
        el("span", {class: "muted"}, t("lineage." + n.kind)), el("b", {}, href ? el("a", {href}, n.label) : n.label), n.detail ? el("div", {class: "mono"}, n.detail) : null,
        incoming[n.id] && i > 0 ? el("div", {class: "edges"}, "← " + incoming[n.id].map(label).join(", ")) : null);
    })));
  });
  return el("div", {class: "lineage", testid: "lineage-graph"}, cols);
}

function pageVersion(name, version) {
  return [panel(null, async () => {
    const d = await api(`api/models/${enc(name)}/${enc(version)}`);
    const v = d.version, lin = v.lineage || {};
    return [el("h1", {}, t("version.title", {ref: v.ref}), " ", (v.aliases || []).map(a => el("span", {class: "alias", testid: "alias-badge"}, a))),
      el("p", {}, el("a", {href: "#/models/" + enc(name)}, "← " + t("app.back"))),
      el("dl", {class: "kv"}, el("dt", {}, t("version.base_model")), el("dd", {class: "mono"}, v.base_model),
        el("dt", {}, t("version.artifact")), el("dd", {class: "mono"}, `${v.artifact_kind} sha256 ${v.artifact_digest}`),
        el("dt", {}, t("version.run")), el("dd", {class: "mono"}, lin.run_id ? el("a", {href: "#/runs/" + lin.run_id}, lin.run_id) : "–"),
        el("dt", {}, t("model.col.created")), el("dd", {}, utc(v.created_at)),
        el("dt", {}, t("model.col.tags")), el("dd", {}, Object.entries(v.tags || {}).map(([k, x]) => `${k}=${x}`).join(", ") || "–")),
      el("h2", {}, t("version.lineage")), el("p", {class: "muted"}, t("version.lineage_note")), lineageGraph(d.graph, "version:" + v.ref),
      el("h2", {}, t("version.gates")),
      table([t("gates.col.gate"), t("gates.col.value"), t("gates.col.interval"), t("gates.col.threshold"), t("gates.col.verdict")],
        d.gates.map(g => el("tr", {testid: "gate-row", "data-gate": g.name}, el("td", {class: "mono", testid: "gate-name"}, g.name), el("td", {class: "num"}, num(g.value)),
          el("td", {class: "num", testid: "gate-interval"}, interval(g.interval)), el("td", {class: "num"}, `${g.op || ""} ${num(g.threshold)}`),
          el("td", {class: "v-" + g.verdict, testid: "gate-verdict"}, verdictText(g.verdict))))),
      el("h2", {}, t("model.events")), eventsTable(d.events)];
  })];
}

// the gateway dashboard's metric headers (rollout/display.py METRIC_HEADERS, English) -> catalog keys; unknown ones as sent
const ROLLOUT_HEADS = {"metric": "rollouts.col.metric", "canary rate": "rollouts.col.canary_rate", "baseline rate": "rollouts.col.baseline_rate",
  "ratio": "rollouts.col.ratio", "anytime-valid interval": "rollouts.col.interval", "e-value / rollback at": "rollouts.col.evalue",
  "non-inferior": "rollouts.col.non_inferior", "needed": "rollouts.col.needed"};
const rolloutHead = h => ROLLOUT_HEADS[h] ? t(ROLLOUT_HEADS[h]) : h;
function pageRollouts(name) {
  const box = panel(null, async () => {
    const m = await api(`api/rollouts/${enc(name)}`);
    const r = m.rollout;
    const out = [el("p", {class: "muted"}, t("rollouts.open_dashboard"))];
    if (!r) return [...out, el("p", {class: "muted"}, t("rollouts.none"))];
    const canvas = el("canvas");
    const pts = r.weight_history || [];
    setTimeout(() => chart(canvas, {type: "line", data: {labels: pts.map(p => new Date(p.t * 1000).toISOString().slice(11, 19)),
      datasets: [{data: pts.map(p => p.weight), stepped: true, borderColor: "#2456b3", pointRadius: 3}]},
      options: {animation: false, maintainAspectRatio: false, plugins: {legend: {display: false}}, scales: {y: {min: 0, max: 1}, x: {title: {display: true, text: "UTC"}}}}}), 0);
    return [...out,
      el("dl", {class: "kv"}, el("dt", {}, t("rollouts.status")), el("dd", {class: "s-" + r.status, testid: "rollout-status"}, statusText(r.status)),
        el("dt", {}, t("rollouts.candidate")), el("dd", {}, r.candidate), el("dt", {}, t("rollouts.baseline")), el("dd", {}, r.baseline),
        el("dt", {}, t("rollouts.weight")), el("dd", {}, r.weight_text)),
      el("h3", {}, t("rollouts.weight_chart")), el("div", {class: "chart-box"}, canvas),
      el("h3", {}, t("rollouts.metrics")),
      table((r.metric_headers || []).map(rolloutHead), (r.metrics || []).map(x => el("tr", {}, x.cells.map(c => el("td", {}, c))))),
      el("h3", {}, t("rollouts.decisions")),
      table([t("model.col.at"), t("model.col.event"), t("rollouts.col.action"), t("rollouts.weight"), t("model.col.actor"), t("model.col.reason")],
        (r.decisions || []).map(x => el("tr", {}, el("td", {}, x.at_text), el("td", {}, eventText(x.kind)), el("td", {}, actionText(x.action)), el("td", {}, x.weight_text), el("td", {}, x.actor), el("td", {}, x.reason))))];
  }, {testid: "rollout-panel"});
  return [el("h1", {}, t("rollouts.title", {name})), el("p", {}, el("a", {href: "#/models/" + enc(name)}, "← " + t("app.back"))), box];
}

function pageFeedback() {
  const driftBox = el("div"), exportBox = el("div", {testid: "export-manifest"});
  const showDrift = d => {
    if (!d.result) return driftBox.replaceChildren(el("p", {class: "muted"}, t("drift.none")));
    const r = d.result;
    driftBox.replaceChildren(el("p", {}, el("b", {class: r.drifted ? "s-failed" : "s-passed"}, r.drifted ? t("drift.drifted") : t("drift.not_drifted")), " · ",
      t("drift.result", {at: utc(d.at), summary: r.summary || ""})),
      el("h3", {}, t("drift.examples")),
      table([t("drift.col.score"), t("drift.col.prompt")], (r.examples || []).slice(0, 10).map(x => el("tr", {}, el("td", {class: "num"}, num(x.score, 3)), el("td", {class: "prompt"}, x.prompt)))));
  };
  return [el("h1", {}, t("feedback.title")),
    panel(t("feedback.recent"), async () => {
      const d = await api("api/feedback?limit=50");
      if (d.request_log === false) return el("p", {class: "muted", testid: "feedback-empty"}, t("feedback.no_request_log"));
      if (!d.feedback.length) return el("p", {class: "muted", testid: "feedback-empty"}, t("feedback.empty"));
      return table([t("feedback.col.at"), t("feedback.col.model"), t("feedback.col.rating"), t("feedback.col.score"), t("feedback.col.prompt"), t("feedback.col.response"),
        t("feedback.col.correction"), t("feedback.col.comment")], d.feedback.map(f => el("tr", {testid: "feedback-row"}, el("td", {}, utc(f.at)),
          el("td", {}, f.model ? `${f.model}:${f.version ?? "?"}` : "–"), el("td", {class: f.rating > 0 ? "s-passed" : f.rating < 0 ? "s-failed" : ""}, f.rating == null ? "–" : f.rating > 0 ? "▲ +1" : "▼ −1"),
          el("td", {class: "num"}, num(f.score)), el("td", {class: "prompt"}, f.prompt ?? ""), el("td", {class: "answer"}, f.response ?? ""),
          el("td", {class: "answer"}, f.correction ?? ""), el("td", {}, f.comment ?? ""))), {testid: "feedback-table"});
    }),
    panel(t("drift.title"), async () => {
      showDrift(await api("api/drift"));
      return [el("button", {testid: "drift-run", onclick: async e => { e.target.disabled = true; driftBox.replaceChildren(el("p", {class: "muted"}, t("app.loading")));
        try { showDrift(await api("api/drift", {method: "POST", token: sessionStorage.getItem("tuneloop.key")})); } catch (err) { driftBox.replaceChildren(panelError(err)); }
        e.target.disabled = false; }}, t("drift.run")), driftBox];
    }, {testid: "drift-panel"}),
    el("section", {}, el("h2", {}, t("export.title")), el("p", {class: "muted"}, t("export.note")),
      el("button", {testid: "export-run", onclick: async e => { e.target.disabled = true; exportBox.replaceChildren(el("p", {class: "muted"}, t("app.loading")));
        try {
          const r = await api("api/feedback/export", {method: "POST"});
          exportBox.replaceChildren(el("p", {class: "ok"}, t("export.done", {sft: r.sft_records, dpo: r.dpo_records, kto: r.kto_records, dir: r.out_dir})),
            el("h3", {}, t("export.manifest")), el("pre", {class: "log"}, JSON.stringify(r.manifest, null, 2)));
        } catch (err) { exportBox.replaceChildren(panelError(err)); }
        e.target.disabled = false; }}, t("export.run")), exportBox)];
}

function pageStart() {
  const rowsBox = el("div"), result = el("div", {testid: "start-result"}), launchBox = el("div");
  const addRow = (k, v) => {
    const key = el("input", {type: "text", testid: "override-key", placeholder: t("start.key"), size: 28, value: k || ""});
    const val = el("input", {type: "text", testid: "override-value", placeholder: t("start.value"), size: 20, value: v || ""});
    const errEl = el("span", {class: "field-error", testid: "override-error"});
    const row = el("div", {class: "override-row", testid: "override-row"}, el("form", {class: "inline", onsubmit: e => e.preventDefault()}, key, val,
      el("button", {type: "button", class: "secondary", onclick: () => row.remove()}, t("start.remove"))), errEl);
    row._get = () => ({key: key.value.trim(), value: val.value});
    row._err = errEl;
    rowsBox.append(row);
  };
  let configSel = null;
  async function send(path) {
    const rows = [...rowsBox.children].filter(r => r._get().key);
    for (const r of [...rowsBox.children]) { r._err.textContent = ""; r._err.removeAttribute("data-key"); }
    result.className = ""; result.textContent = t("app.loading");
    try {
      const r = await api(path, {method: "POST", body: {config: configSel.value, overrides: rows.map(x => x._get())}});
      result.className = "ok";
      result.textContent = r.pid ? t("start.started", {pid: r.pid}) : t("start.valid");
      if (r.pid) loadLaunches();
    } catch (err) {
      result.className = "panel-error";
      const fields = (err.body && err.body.error && err.body.error.fields) || {};
      result.textContent = Object.keys(fields).length ? t("start.invalid") : t("app.error", {message: err.message});
      for (const [k, msg] of Object.entries(fields)) {
        const row = rows.find(r => r._get().key === k);
        if (row) { row._err.textContent = msg; row._err.setAttribute("data-key", k); }
        else result.append(el("div", {class: "field-error"}, `${k === "_config" ? "" : k + ": "}${msg}`));
      }
    }
  }
  async function loadLaunches() {
    try {
      const d = await api("api/launches");
      launchBox.replaceChildren(d.launches.length ? table([t("start.col.started"), t("start.col.config"), t("start.col.overrides"), t("start.col.status"), t("start.col.exit"), t("start.col.run"), t("start.log")],
        d.launches.map(l => el("tr", {testid: "launch-row"}, el("td", {}, utc(l.started_at)), el("td", {}, l.config), el("td", {class: "mono"}, l.overrides.join(" ")),
          el("td", {class: "s-" + l.status}, statusText(l.status)), el("td", {class: "num"}, l.returncode ?? "–"),
          el("td", {class: "mono"}, l.run_id ? el("a", {href: "#/runs/" + l.run_id}, l.run_id) : "–"),
          el("td", {}, el("pre", {class: "log"}, l.log_tail.slice(-12).join("\n")))))) : el("p", {class: "muted"}, t("app.none")));
    } catch (err) { launchBox.replaceChildren(panelError(err)); }
  }
  const form = panel(null, async () => {
    const d = await api("api/configs");
    if (!d.configs.length) return el("p", {class: "muted"}, t("start.no_configs"));
    configSel = el("select", {testid: "start-config"}, d.configs.map(c => el("option", {value: c.id, title: c.path}, c.name)));
    addRow();
    return [el("form", {class: "inline", onsubmit: e => e.preventDefault()}, el("label", {}, t("start.config"), configSel)),
      el("h3", {}, t("start.overrides")), rowsBox,
      el("p", {}, el("button", {type: "button", class: "secondary", testid: "override-add", onclick: () => addRow()}, t("start.add")), " ",
        el("button", {type: "button", class: "secondary", testid: "start-validate", onclick: () => send("api/runs/validate")}, t("start.validate")), " ",
        el("button", {type: "button", testid: "start-submit", onclick: () => send("api/runs/start")}, t("start.submit"))), result];
  });
  loadLaunches();
  every(3000, loadLaunches);
  return [el("h1", {}, t("start.title")), form, el("section", {}, el("h2", {}, t("start.launches")), launchBox)];
}

// ------------------------------------------------------------------------------------------ router
const ROUTES = [
  [/^#\/runs\/([^/]+)\/gates$/, pageGates, "nav-runs"], [/^#\/runs\/([^/]+)$/, pageRun, "nav-runs"], [/^#\/compare\/([^/]+)\/([^/]+)$/, pageCompare, "nav-runs"],
  [/^#\/data\/([^/]+)$/, pageData, "nav-runs"], [/^#\/models\/([^/]+)\/([^/]+)$/, pageVersion, "nav-models"], [/^#\/models\/([^/]+)$/, pageModel, "nav-models"],
  [/^#\/models$/, pageModels, "nav-models"], [/^#\/rollouts\/([^/]+)$/, pageRollouts, "nav-models"], [/^#\/feedback$/, pageFeedback, "nav-feedback"],
  [/^#\/start$/, pageStart, "nav-start"], [/^#\/runs$/, pageRuns, "nav-runs"], [/^#?\/?$/, pageRuns, "nav-runs"],
];
function route() {
  timers.forEach(clearInterval); timers = [];
  charts.splice(0).forEach(c => c.destroy());
  const hash = location.hash || "#/runs";
  for (const [re, page, nav] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    document.querySelectorAll("header nav a").forEach(a => a.classList.toggle("active", a.dataset.testid === nav));
    main().replaceChildren(...[page(...m.slice(1).map(decodeURIComponent))].flat());
    return;
  }
  main().replaceChildren(el("p", {}, t("app.not_found")));
}

async function start() {
  const key = document.getElementById("api-key");
  key.value = sessionStorage.getItem("tuneloop.key") || "";
  key.addEventListener("change", () => { sessionStorage.setItem("tuneloop.key", key.value); route(); });
  document.getElementById("lang").addEventListener("change", async e => {
    localStorage.setItem("tuneloop.lang", e.target.value);
    await loadLang(e.target.value); route();
  });
  await loadLang(pickLang());
  try { INFO = await api("api/info"); document.getElementById("ws").textContent = INFO.workspace; } catch (e) { /* shown by the panels */ }
  window.addEventListener("hashchange", route);
  route();
}
start();
