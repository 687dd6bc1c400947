"""The web UI (`tuneloop ui`) driven as a person would, in headless Chromium over the DevTools protocol
(tests/ui_browser.py), on a workspace made by the demo: `tuneloop demo --quick` (the session fixture
`quick_demo_pristine`, shared with tests/test_demo.py) plus one run blocked by its gates
(`-o gates.min_accuracy=0.97 -o gates.max_capability_drop=0.001`: only the gates change, so the stage cache
re-uses the demo's training). Skips with a message when Chromium or websocket-client is absent.

Every page is opened in English and in Chinese and saved as a screenshot under test-artifacts/ui/ at the
repository root (git-ignored) to be looked at: `<page>.en.png`, `<page>.zh-CN.png` (the whole page)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import ui_browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
I18N = ROOT / "src" / "tuneloop" / "ui" / "static" / "i18n"
MODEL = "support-router"
CJK = re.compile(r"[\u4e00-\u9fff]")

needs_browser = pytest.mark.skipif(ui_browser.skip_reason() is not None, reason=ui_browser.skip_reason() or "")

_HARNESS_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>harness</title></head><body>
<input id="name" data-testid="name"><button data-testid="go" onclick="
  document.getElementById('out').textContent = 'hello ' + document.getElementById('name').value + ' ' + navigator.language">go</button>
<p id="out"></p><p id="lang"></p></body></html>"""


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def harness_server():
    """A one-page server on loopback for the driver's own test."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = _HARNESS_PAGE if self.path == "/" else b"not found"
            self.send_response(200 if self.path == "/" else 404)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def cli(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def ui_workspace(quick_demo_pristine, tmp_path_factory):
    """A copy of the quick demo's directory with one more run, blocked by its gates: (root, blocked summary)."""
    if ui_browser.skip_reason():
        pytest.skip(ui_browser.skip_reason())
    root = tmp_path_factory.mktemp("ui") / "demo"
    shutil.copytree(quick_demo_pristine, root, symlinks=True)
    r = cli(
        root, "run", "tuneloop.yaml", "-o", "gates.min_accuracy=0.97", "-o", "gates.max_capability_drop=0.001", "--json"
    )
    assert r.returncode == 1, r.stderr[-3000:]
    blocked = json.loads(r.stdout)
    assert blocked["stages"]["evaluation"]["status"] == "failed", blocked["stages"]["evaluation"]
    return root, blocked


@pytest.fixture(scope="module")
def ui_url(ui_workspace):
    """`tuneloop ui` over that workspace (the app it serves, on loopback): the page's URL."""
    from tuneloop.config import load_config
    from tuneloop.serve.server import BackgroundServer
    from tuneloop.ui.app import create_app

    root, _ = ui_workspace
    app = create_app(root / ".tuneloop", load_config(root / "tuneloop.yaml"), config_path=root / "tuneloop.yaml")
    with BackgroundServer(app) as server:
        yield server.url + "/"


@pytest.fixture(scope="module")
def page(ui_url, tmp_path_factory):
    """One browser (English to start with) for the module's tests; each test opens the pages it needs."""
    with ui_browser.launch(tmp_path_factory.mktemp("chromium"), lang="en-US") as p:
        yield p


# ------------------------------------------------------------------------------------------ helpers
def catalog(lang: str) -> dict[str, str]:
    return json.loads((I18N / f"{'zh-CN' if lang.startswith('zh') else 'en'}.json").read_text(encoding="utf-8"))


def settle(page: ui_browser.Page, testid: str | None = None, timeout: float = 20) -> None:
    """Wait until the page has drawn: no panel still says Loading (in either language), and ``testid`` is there."""
    loading = json.dumps([catalog("en")["app.loading"], catalog("zh")["app.loading"]])
    page.wait_for(
        f"document.querySelector('main') && !Array.from(document.querySelectorAll('main p')).some("
        f"p => {loading}.includes(p.textContent.trim()))",
        timeout=timeout,
        what="every panel to load",
    )
    if testid:
        page.wait_for(
            f"document.querySelector('[data-testid=\"{testid}\"]')", timeout=timeout, what=f"[data-testid={testid}]"
        )


def open_page(page: ui_browser.Page, url: str, route: str, testid: str | None = None) -> None:
    page.goto(url + route)
    page.eval("new Promise(r => setTimeout(r, 50))")
    settle(page, testid)


def set_language(page: ui_browser.Page, lang: str) -> None:
    """Pick a language in the header's switch, as a person does; wait until the navigation speaks it."""
    page.select("[data-testid=lang-switch]", lang)
    want = catalog(lang)["nav.runs"]
    page.wait_for(
        f"document.querySelector('[data-testid=nav-runs]').textContent.trim() === {json.dumps(want)}",
        what=f"the navigation in {lang}",
    )
    settle(page)


def untranslated_labels(page: ui_browser.Page) -> list[str]:
    """Headings, table heads, buttons, labels and links of the page with no Chinese in them (names aside)."""
    texts = page.eval("""[
        ...Array.from(document.querySelectorAll('h1, h2, h3, th, button, nav a, summary')).map(e => e.textContent),
        ...Array.from(document.querySelectorAll('label')).map(l => Array.from(l.childNodes)
            .map(n => n.nodeType === 3 ? n.textContent : (n.tagName === 'SPAN' ? n.textContent : '')).join(''))
      ].map(s => s.trim()).filter(s => s)""")
    names = {"tuneloop", "n", "A", "B", "English", "report.html"}  # names, the diff's two sides, the language option
    ident = re.compile(
        r"^(?=.*[\d:_@/.\[\]-])[\w.:@/\[\]()-]+$"
    )  # a ref, run id, gate or metric name: data, not a label
    return [s for s in texts if not CJK.search(s) and s not in names and not ident.match(s) and MODEL not in s]


# ------------------------------------------------------------------------------------------ tests
@needs_browser
def test_the_driver_types_clicks_reads_and_takes_screenshots(harness_server, tmp_path):
    with ui_browser.launch(tmp_path / "profile", lang="zh-CN") as p:
        p.goto(harness_server + "/")
        p.type("[data-testid=name]", "世界")
        p.click("[data-testid=go]")
        assert p.wait_for("document.getElementById('out').textContent") == "hello 世界 zh-CN"
        assert p.eval("navigator.languages") == ["zh-CN", "zh"]
        png = p.screenshot(tmp_path / "shot.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        with pytest.raises(ui_browser.BrowserError, match="never-there"):
            p.wait_for("document.querySelector('#never-there')", timeout=0.5)
        p.eval("setTimeout(() => { throw new Error('boom from the page') }, 0)")
        p.eval("new Promise(r => setTimeout(r, 100))")
        assert any("boom from the page" in e for e in p.errors), p.errors


@needs_browser
def test_the_gate_table_of_a_blocked_run_names_each_gate_with_its_interval(page, ui_url, ui_workspace):
    _, blocked = ui_workspace
    error = blocked["stages"]["evaluation"][
        "error"
    ]  # the pipeline's own words: "max_capability_drop FAIL: ... [lo, hi]"
    open_page(page, ui_url, f"#/runs/{blocked['run_id']}/gates", "gate-table")
    for gate, verdict in (("max_capability_drop", "FAIL"), ("min_accuracy", "INCONCLUSIVE")):
        lo, hi = re.search(rf"{gate} {verdict}: .*?interval \[([\d.e-]+), ([\d.e-]+)\]", error).groups()
        row = f'[data-testid=gate-row][data-gate="{gate}"]'
        assert page.text(f"{row} [data-testid=gate-name]").strip() == gate
        shown = page.text(f"{row} [data-testid=gate-interval]")
        assert [float(x) for x in re.findall(r"[\d.]+(?:e-?\d+)?", shown)] == pytest.approx(
            [float(lo), float(hi)], rel=1e-3
        ), shown
        assert verdict in page.text(f"{row} [data-testid=gate-verdict]")
    assert page.exists("[data-testid=gate-chart]")
    assert not page.errors, page.errors


@needs_browser
def test_the_lineage_graph_has_the_versions_data_digest(page, ui_url, ui_workspace):
    root, _ = ui_workspace
    shown = json.loads(cli(root, "models", "show", f"{MODEL}:1", "--json").stdout)
    digests = {shown["lineage"]["data"]["train_digest"], shown["lineage"]["data"]["eval_digest"]}
    open_page(page, ui_url, f"#/models/{MODEL}/1", "lineage-graph")
    on_page = set(
        page.eval(
            "Array.from(document.querySelectorAll('[data-testid=lineage-node][data-kind=data]'))"
            ".map(e => e.getAttribute('data-digest'))"
        )
    )
    assert digests <= on_page, (digests, on_page)
    kinds = page.eval("Array.from(document.querySelectorAll('[data-testid=lineage-node]')).map(e => e.dataset.kind)")
    assert {"data", "run", "version"} <= set(kinds), kinds


@needs_browser
def test_promote_with_a_reason_is_an_event_in_models_lineage(page, ui_url, ui_workspace):
    root, _ = ui_workspace
    reason = "checked in the browser by a person"
    open_page(page, ui_url, f"#/models/{MODEL}", "promote-submit")
    page.select("[data-testid=promote-version]", "1")
    page.type("[data-testid=promote-alias]", "staging")
    page.type("[data-testid=promote-reason]", reason)
    page.click("[data-testid=promote-submit]")
    loading = json.dumps([catalog("en")["app.loading"], catalog("zh")["app.loading"]])
    page.wait_for(
        f"(s => s && !{loading}.includes(s))(document.querySelector('[data-testid=promote-result]').textContent.trim())",
        what="the promote result",
    )
    assert "staging" in page.text("[data-testid=promote-result]")
    events = json.loads(cli(root, "models", "lineage", f"{MODEL}:1", "--json").stdout)["events"]
    promoted = [e for e in events if e["kind"] == "promoted" and e["reason"] == reason]
    assert promoted and promoted[-1]["details"]["alias"] == "staging", events[-3:]
    # the page's own event table shows it too, redrawn after the action without a reload
    page.wait_for(
        f"(document.querySelector('[data-testid=events-table]') || {{}}).textContent?.includes({json.dumps(reason)})",
        what="the promote event in the events table (no reload)",
    )
    assert "staging" in page.text("[data-testid=promote-result]")  # the result line stays


@needs_browser
def test_a_bad_override_is_shown_at_its_field_and_nothing_starts(page, ui_url, ui_workspace):
    import httpx

    open_page(page, ui_url, "#/start", "start-config")
    page.type("[data-testid=override-key]", "train.learning_rate")
    page.type("[data-testid=override-value]", "fast")
    page.click("[data-testid=start-submit]")
    field = '[data-testid=override-error][data-key="train.learning_rate"]'
    message = page.wait_for(
        f"(e => e && e.textContent.trim())(document.querySelector('{field}'))", what="the field's error"
    )
    assert "fast" in message or "number" in message.lower() or "float" in message.lower(), message
    assert httpx.get(ui_url + "api/launches", timeout=10).json()["launches"] == []  # nothing was started


PAGES = {  # name: (route, a data-testid the page has once drawn)
    "runs": ("#/runs", "runs-table"),
    "run": ("#/runs/{blocked}", "stage-row"),
    "gates": ("#/runs/{blocked}/gates", "gate-table"),
    "compare": ("#/compare/{passed}/{blocked}", "compare-table"),
    "data": ("#/data/{passed}", "data-source"),
    "models": ("#/models", "models-table"),
    "model": (f"#/models/{MODEL}", "version-row"),
    "version": (f"#/models/{MODEL}/1", "lineage-graph"),
    "rollouts": (f"#/rollouts/{MODEL}", None),
    "feedback": ("#/feedback", "drift-panel"),
    "start": ("#/start", "start-config"),
}


@needs_browser
def test_every_page_in_english_and_chinese_with_screenshots(page, ui_url, ui_workspace):
    """Each page drawn without a script error, in English then (switched in the header) in Chinese, with no
    heading, column, button or label left in English; a screenshot of each in each language."""
    _, blocked = ui_workspace
    runs = json.loads(cli(ui_workspace[0], "status", "--json").stdout)
    passed = next(r["run_id"] for r in runs if r["status"] == "passed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems = []
    for lang, suffix in (("en", "en"), ("zh-CN", "zh-CN")):
        open_page(page, ui_url, "#/runs", "runs-table")
        set_language(page, lang)
        assert page.eval("document.documentElement.lang") == lang
        for name, (route, testid) in PAGES.items():
            open_page(page, ui_url, route.format(blocked=blocked["run_id"], passed=passed), testid)
            page.screenshot(ARTIFACTS / f"{name}.{suffix}.png", full_page=True)
            if page.exists("[data-testid=panel-error]"):
                # (the quick demo's gateway kept no request log: the feedback page shows an empty state, no error)
                problems.append(f"{name} ({lang}): {page.text('[data-testid=panel-error]')}")
            if lang == "zh-CN":
                left = untranslated_labels(page)
                if left:
                    problems.append(f"{name} (zh-CN) labels in English: {left}")
    assert not page.errors, page.errors
    assert not problems, "\n".join(problems)
    # the choice is remembered: a reload stays in Chinese
    page.goto(ui_url + "#/runs")
    settle(page, "runs-table")
    assert page.text("[data-testid=nav-runs]").strip() == catalog("zh")["nav.runs"]
    set_language(page, "en")


@needs_browser
def test_event_kinds_are_shown_in_the_pages_language(page, ui_url):
    """The events table names each registry event (registered, promoted, ...) from the catalog, not as the API's
    identifier; the row keeps the identifier in data-kind."""
    for lang in ("zh-CN", "en"):  # ends in English, as the other tests expect
        open_page(page, ui_url, f"#/models/{MODEL}", "event-row")
        set_language(page, lang)
        settle(page, "event-row")
        rows = page.eval(
            "Array.from(document.querySelectorAll('[data-testid=event-row]'))"
            ".map(r => [r.dataset.kind, r.querySelector('[data-testid=event-kind]').textContent])"
        )
        cat = catalog(lang)
        assert rows and all(text == cat[f"event.{kind}"] for kind, text in rows), (lang, rows)
    assert not page.errors, page.errors


@needs_browser
def test_the_page_follows_the_browsers_language(ui_url, tmp_path):
    with ui_browser.launch(tmp_path / "zh-profile", lang="zh-CN") as p:
        open_page(p, ui_url, "#/runs", "runs-table")
        assert p.text("[data-testid=nav-runs]").strip() == catalog("zh")["nav.runs"]
        assert CJK.search(p.text("[data-testid=runs-table]"))
        assert not p.errors, p.errors
