"""A small headless-Chromium driver for the UI tests, over the Chrome DevTools Protocol (CDP).

Entry point: :func:`launch` (a context manager yielding a :class:`Page`). It starts Debian's ``chromium``
(``.ci/run`` installs it) with ``--remote-debugging-port=0``, reads the port Chromium picked from
``DevToolsActivePort`` in its profile directory, and talks CDP to the first page target over a websocket
(``websocket-client``, in the ``dev`` extra). No Playwright or Selenium: they download their own browsers.

The page methods are what a person does: :meth:`Page.goto`, :meth:`Page.wait_for` (a JavaScript expression
becomes truthy), :meth:`Page.eval`, :meth:`Page.click` (a real mouse press and release at the element's centre),
:meth:`Page.type` (focus, then text inserted as typed), :meth:`Page.screenshot`. JavaScript exceptions and
``console.error`` calls of the page are collected in :attr:`Page.errors`, so a test can assert there were none;
requests answered with an HTTP error in :attr:`Page.http_errors`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Why a browser test skipped, when it does.
NO_CHROMIUM = (
    "Chromium is not installed (apt-get install -y chromium; .ci/run installs it): the UI was not driven in a browser"
)
NO_WEBSOCKET = "websocket-client is not installed (pip install -e '.[dev]'): the UI was not driven in a browser"


def chromium_binary() -> str | None:
    """Debian's ``chromium`` (or another Chromium/Chrome on PATH); None when there is none."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def skip_reason() -> str | None:
    """Why the browser cannot be driven here (None when it can)."""
    if chromium_binary() is None:
        return NO_CHROMIUM
    try:
        import websocket  # noqa: F401  (websocket-client)
    except ImportError:
        return NO_WEBSOCKET
    return None


class BrowserError(RuntimeError):
    """A CDP command failed, a page threw, or something waited for never happened."""


@dataclass
class Page:
    """One browser tab driven over CDP. Made by :func:`launch`."""

    ws: Any
    width: int = 1400
    height: int = 900
    default_timeout: float = 20.0
    errors: list[str] = field(default_factory=list)
    #: Requests answered with an HTTP error (4xx/5xx), as the browser's log reports them.
    http_errors: list[str] = field(default_factory=list)
    _next_id: int = 0

    # -- the protocol -------------------------------------------------------------------------------------
    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send one CDP command and return its result (events that arrive meanwhile are recorded)."""
        self._next_id += 1
        msg_id = self._next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + (timeout or self.default_timeout)
        while True:
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                raw = self.ws.recv()
            except Exception as exc:  # websocket timeout or closed socket
                raise BrowserError(
                    f"no answer to CDP {method} within {timeout or self.default_timeout:.0f} s: {exc!r}"
                ) from exc
            msg = json.loads(raw)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"CDP {method} failed: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.errors.append(
                f"exception: {d.get('exception', {}).get('description') or d.get('text')} at {d.get('url')}:{d.get('lineNumber')}"
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(
                "console.error: "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            if "favicon.ico" in e.get("url", ""):  # the browser asks for one on its own; no page links it
                return
            text = f"{e.get('text')} {e.get('url', '')}".strip()
            # an HTTP error answer is the app's business (a 422 for a bad override is right); scripts failing is not
            (self.http_errors if e.get("source") == "network" else self.errors).append(f"log: {text}")

    # -- what a person does -------------------------------------------------------------------------------
    def goto(self, url: str, *, timeout: float | None = None) -> None:
        """Open ``url`` and wait until the document has loaded."""
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"could not open {url}: {result['errorText']}")
        self.wait_for(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            timeout=timeout,
            what=f"{url} to load",
        )

    def reload(self, *, timeout: float | None = None) -> None:
        """Reload the page (as F5 does) and wait until it has loaded."""
        self.eval("window.__reloading = true")
        self.send("Page.reload", {"ignoreCache": True})
        self.wait_for("!window.__reloading && document.readyState === 'complete'", timeout=timeout, what="the reload")

    def eval(self, expression: str, *, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited; values come back as JSON)."""
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, timeout=timeout
        )
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise BrowserError(
                f"{expression[:200]!r} threw: {d.get('exception', {}).get('description') or d.get('text')}"
            )
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float | None = None, what: str | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value (``True`` for an element, which does
        not travel as JSON). Fails with the page's text."""
        deadline = time.monotonic() + (timeout or self.default_timeout)
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = self.eval(f"(v => v instanceof Node ? true : v)({expression})")
                if value:
                    return value
            except BrowserError as exc:  # e.g. an element not there yet
                last_exc = exc
            time.sleep(0.1)
        text = ""
        with contextlib.suppress(Exception):
            text = self.eval("document.body ? document.body.innerText.slice(0, 1500) : ''") or ""
        raise BrowserError(
            f"waited {timeout or self.default_timeout:.0f} s for {what or expression!r}"
            + (f" (last error: {last_exc})" if last_exc else "")
            + f"; the page shows:\n{text}"
        )

    def text(self, selector: str = "body") -> str:
        """The visible text of the first element matching ``selector`` ('' when there is none)."""
        return self.eval(f"(e => e ? e.innerText : '')(document.querySelector({json.dumps(selector)}))") or ""

    def exists(self, selector: str) -> bool:
        return bool(self.eval(f"!!document.querySelector({json.dumps(selector)})"))

    def _centre(self, selector: str, timeout: float | None) -> tuple[float, float]:
        sel = json.dumps(selector)
        box = self.wait_for(
            f"(e => {{ if (!e) return null; e.scrollIntoView({{block: 'center', inline: 'center'}});"
            f" const r = e.getBoundingClientRect(); return (r.width > 0 && r.height > 0)"
            f" ? {{x: r.left + r.width / 2, y: r.top + r.height / 2}} : null; }})(document.querySelector({sel}))",
            timeout=timeout,
            what=f"{selector} to be visible",
        )
        return box["x"], box["y"]

    def click(self, selector: str, *, timeout: float | None = None) -> None:
        """A left click (mouse press and release) at the centre of the first visible element matching ``selector``."""
        x, y = self._centre(selector, timeout)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def type(self, selector: str, text: str, *, clear: bool = True, timeout: float | None = None) -> None:
        """Click into the field matching ``selector`` (emptied first unless ``clear`` is false) and type ``text``."""
        self.click(selector, timeout=timeout)
        if clear:
            self.eval(
                f"(e => {{ e.focus(); if ('value' in e) {{ e.value = ''; e.dispatchEvent(new Event('input', {{bubbles: true}})); }} }})"
                f"(document.querySelector({json.dumps(selector)}))"
            )
        self.send("Input.insertText", {"text": text})
        self.eval(
            f"(e => e.dispatchEvent(new Event('change', {{bubbles: true}})))(document.querySelector({json.dumps(selector)}))"
        )

    def select(self, selector: str, value: str) -> None:
        """Choose ``value`` in a ``<select>`` (as a person picking an option does: the change event fires)."""
        self.eval(
            f"(e => {{ e.value = {json.dumps(value)}; e.dispatchEvent(new Event('change', {{bubbles: true}})); }})"
            f"(document.querySelector({json.dumps(selector)}))"
        )

    def screenshot(self, path: Path | str, *, full_page: bool = False) -> Path:
        """A PNG of the viewport (``width`` x ``height``), or of the whole page with ``full_page``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.eval("({w: document.documentElement.scrollWidth, h: document.documentElement.scrollHeight})")
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": max(self.width, size["w"]), "height": size["h"], "scale": 1},
            )
        data = self.send("Page.captureScreenshot", params, timeout=60)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def set_language(self, accept_language: str) -> None:
        """What the browser says its language is (``navigator.language(s)`` and the Accept-Language header)."""
        primary = accept_language.split(",")[0]
        self.send("Emulation.setLocaleOverride", {"locale": primary.replace("-", "_")})
        self.send(
            "Network.setUserAgentOverride",
            {"userAgent": self.eval("navigator.userAgent"), "acceptLanguage": accept_language},
        )


def _wait_for_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrowserError(f"chromium exited with {proc.returncode} before opening its DevTools port")
        if port_file.is_file():
            first = port_file.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        time.sleep(0.05)
    raise BrowserError(f"chromium did not write {port_file} within {timeout:.0f} s")


@contextlib.contextmanager
def launch(
    profile: Path,
    *,
    width: int = 1400,
    height: int = 900,
    lang: str = "en-US",
    binary: str | None = None,
    timeout: float = 30.0,
) -> Iterator[Page]:
    """Start headless Chromium with a fresh profile in ``profile`` and yield its first tab as a :class:`Page`.

    ``lang``: the browser's language (``--lang``, ``navigator.language``, Accept-Language). The browser is
    stopped (and waited for) on exit."""
    import websocket  # websocket-client

    binary = binary or chromium_binary()
    if binary is None:
        raise BrowserError(NO_CHROMIUM)
    profile = Path(profile)
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a previous browser's port, in a re-used profile
    args = [
        binary,
        "--headless",
        "--no-sandbox",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
        f"--lang={lang}",
        "about:blank",
    ]
    env = {**os.environ, "HOME": str(profile), "LANGUAGE": lang.replace("-", "_")}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ws = None
    try:
        port = _wait_for_port(profile, proc, timeout)
        deadline = time.monotonic() + timeout
        target = None
        while target is None and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                target = next((t for t in json.load(r) if t.get("type") == "page"), None)
            if target is None:
                time.sleep(0.1)
        if target is None:
            raise BrowserError(f"chromium on port {port} has no page target")
        ws = websocket.create_connection(
            target["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True, enable_multithread=False
        )
        page = Page(ws, width=width, height=height)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.send(f"{domain}.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        page.set_language(lang if "," in lang else f"{lang},{lang.split('-')[0]}")
        yield page
    finally:
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
