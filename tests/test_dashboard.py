"""GET /dashboard: the JSON behind it (no paths, the rollout's statistics) and the page rendered in a real
headless Chromium (DOM after the page's own fetch, and a screenshot). Skips when Chromium is absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from rollout_gateway_helpers import MODEL, ScriptedBackend, chat, make_app, make_registry
from tuneloop.rollout import controller
from tuneloop.serve.server import BackgroundServer

POLICY = {
    "weights": [0.05, 0.5, 1.0],
    "min_requests_per_step": 8,
    "max_active_s": None,
    "metrics": [{"name": "errors", "max_ratio": 3.0}, {"name": "negative_feedback", "max_ratio": 3.0}],
    "guards": [{"metric": "errors", "max_rate": 0.5, "min_requests": 5}],
}


@pytest.fixture
def stepped_gateway(tmp_path):
    """A gateway whose rollout of support-bot:2 stepped up from 5 % to 50 % on live traffic."""
    reg = make_registry(tmp_path)
    app, log, recorder = make_app(reg, tmp_path / "requests.db", ScriptedBackend(), tick_s=0.2)
    rid = controller.start(reg, f"{MODEL}:2", policy=POLICY, reason="nightly retrain").rollout_id
    with BackgroundServer(app) as server, httpx.Client() as c:
        i = 0
        while reg.get_rollout(MODEL).weight < 0.5:
            assert chat(c, server.url, f"user-{i}").status_code == 200
            i += 1
            assert i < 3000
        yield server, rid, tmp_path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def run_chromium(binary: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(profile)})


def test_dashboard_json_has_the_rollout_and_no_paths(stepped_gateway):
    server, rid, tmp_path = stepped_gateway
    r = httpx.get(f"{server.url}/dashboard.json", timeout=30)
    assert r.status_code == 200
    text = r.text
    assert str(tmp_path) not in text and "/tmp/" not in text and "state_json" not in text
    model = r.json()["models"][0]
    assert model["name"] == MODEL and model["aliases"]["champion"] == 1 and model["aliases"]["canary"] == 2
    assert [v["ref"] for v in model["versions"]] == [f"{MODEL}:1", f"{MODEL}:2", f"{MODEL}:3"]
    ro = model["rollout"]
    assert ro["rollout_id"] == rid and ro["status"] == "running" and ro["weight"] == 0.5
    assert [p["weight"] for p in ro["weight_history"]][:1] == [0.05] and ro["weight_history"][-1]["weight"] == 0.5
    rows = {m["metric"]: m for m in ro["metrics"]}
    assert set(rows) == {"errors", "negative_feedback"}
    assert rows["errors"]["canary"]["requests"] >= 8 and rows["errors"]["baseline"]["requests"] > 0
    assert "step_up" in [d["action"] for d in ro["decisions"]]
    page = httpx.get(f"{server.url}/dashboard", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"(https?:)?//(?!www\.w3\.org/2000/svg\b)[\w.-]+\.[a-z]", page.text)  # no outside URL
    assert not re.search(r"\b(src|href)=|<link|@import|url\(", page.text)  # self-contained: no assets


def test_dashboard_renders_in_headless_chromium(stepped_gateway, tmp_path_factory):
    binary = chromium()
    if binary is None:
        pytest.skip(
            "Chromium is not installed (apt-get install -y chromium; .ci/run installs it): the dashboard was not rendered"
        )
    server, rid, _ = stepped_gateway
    profile = tmp_path_factory.mktemp("chromium-profile")
    done = run_chromium(binary, f"{server.url}/dashboard", profile, "--dump-dom")
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'data-rollout="{rid}"' in dom  # rendered by the page's script from /dashboard.json
    assert 'class="rollout-weight">50%<' in dom
    assert 'data-metric="errors"' in dom and 'data-metric="negative_feedback"' in dom
    assert 'class="weight-chart"' in dom and "<path" in dom
    assert "step_up" in dom and "nightly retrain" in dom and f"{MODEL}:3" in dom
    assert '<span id="updated">updated ' in dom and "loading…</p>" not in dom  # the fetch succeeded
    png = profile / "dashboard.png"
    shot = run_chromium(binary, f"{server.url}/dashboard", profile, f"--screenshot={png}", "--window-size=1200,900")
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert not blank(png)


def test_with_api_keys_the_page_takes_the_key_from_its_fragment(tmp_path, tmp_path_factory):
    reg = make_registry(tmp_path)
    app, *_ = make_app(reg, tmp_path / "requests.db", ScriptedBackend(), api_keys=frozenset({"k-123"}))
    with BackgroundServer(app) as server:
        assert httpx.get(f"{server.url}/dashboard.json").status_code == 401
        assert httpx.get(f"{server.url}/dashboard.json", headers={"authorization": "Bearer k-123"}).status_code == 200
        page = httpx.get(f"{server.url}/dashboard")
        assert page.status_code == 200 and MODEL not in page.text  # the page is open but holds no data
        binary = chromium()
        if binary is None:
            pytest.skip("Chromium is not installed (apt-get install -y chromium): the page was not rendered")
        profile = tmp_path_factory.mktemp("chromium-keys")
        without = run_chromium(binary, f"{server.url}/dashboard", profile, "--dump-dom").stdout
        assert "needs an API key" in without.split("</header>")[0] and f'data-model="{MODEL}"' not in without
        with_key = run_chromium(binary, f"{server.url}/dashboard#key=k-123", profile, "--dump-dom").stdout
        assert f'data-model="{MODEL}"' in with_key


def blank(png: Path) -> bool:
    """True when every pixel has the same colour (a page that did not render): the PNG decoded with zlib."""
    import struct
    import zlib

    data = png.read_bytes()
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format (depth {depth}, colour type {colour})"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p_ = a + b - c
                pa, pb, pc = abs(p_ - a), abs(p_ - b), abs(p_ - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 7))
        prev = line
    return len(colours) <= 1
