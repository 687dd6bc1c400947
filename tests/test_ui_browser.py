"""The web UI (`tuneloop ui`) driven as a person would, in headless Chromium over the DevTools protocol
(tests/ui_browser.py). Skips with a message when Chromium or websocket-client is absent.

Screenshots of the pages go to test-artifacts/ui/ at the repository root (git-ignored), to be looked at."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import ui_browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"

needs_browser = pytest.mark.skipif(ui_browser.skip_reason() is not None, reason=ui_browser.skip_reason() or "")

_HARNESS_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>harness</title></head><body>
<input id="name" data-testid="name"><button data-testid="go" onclick="
  document.getElementById('out').textContent = 'hello ' + document.getElementById('name').value + ' ' + navigator.language">go</button>
<p id="out"></p><p id="lang"></p></body></html>"""


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


@needs_browser
def test_the_driver_types_clicks_reads_and_takes_screenshots(harness_server, tmp_path):
    with ui_browser.launch(tmp_path / "profile", lang="zh-CN") as page:
        page.goto(harness_server + "/")
        page.type("[data-testid=name]", "世界")
        page.click("[data-testid=go]")
        assert page.wait_for("document.getElementById('out').textContent") == "hello 世界 zh-CN"
        assert page.eval("navigator.languages") == ["zh-CN", "zh"]
        png = page.screenshot(tmp_path / "shot.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        with pytest.raises(ui_browser.BrowserError, match="never-there"):
            page.wait_for("document.querySelector('#never-there')", timeout=0.5)
        page.eval("setTimeout(() => { throw new Error('boom from the page') }, 0)")
        page.wait_for("true")
        page.eval("new Promise(r => setTimeout(r, 100))")
        assert any("boom from the page" in e for e in page.errors), page.errors
