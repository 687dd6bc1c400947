"""The README's screenshots of the web UI: the runs page and the gates page of a blocked run, in English
(docs/images/ui-runs.png, ui-gates.png, for README.md) and Chinese (ui-runs.zh-CN.png, ui-gates.zh-CN.png, for
README.zh-CN.md), 1400x900, each under 200 KB.

    python scripts/readme_ui_screenshots.py DEMO_DIR

DEMO_DIR: a directory `tuneloop demo` made, with at least one run that a gate blocked (for example
`tuneloop run tuneloop.yaml -o gates.min_accuracy=0.97 -o gates.max_capability_drop=0.001` in it). Needs
headless Chromium (Debian's `chromium`), a CJK font (`fonts-noto-cjk`) and websocket-client; it drives the
browser with tests/ui_browser.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MAX_BYTES = 200_000


def main() -> None:
    import httpx

    import ui_browser
    from tuneloop.config import load_config
    from tuneloop.serve.server import BackgroundServer
    from tuneloop.ui.app import create_app

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args()
    if ui_browser.skip_reason():
        sys.exit(ui_browser.skip_reason())
    root = args.demo_dir.resolve()
    app = create_app(root / ".tuneloop", load_config(root / "tuneloop.yaml"), config_path=root / "tuneloop.yaml")
    args.out.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(app) as server:
        runs = httpx.get(server.url + "/api/runs", timeout=30).json()["runs"]
        blocked = next((r["run_id"] for r in runs if r["status"] == "failed"), None)
        if blocked is None:
            sys.exit(
                f"{root} has no blocked run: run `tuneloop run tuneloop.yaml -o gates.min_accuracy=0.97` there first"
            )
        for lang, suffix in (("en-US", ""), ("zh-CN", ".zh-CN")):
            with ui_browser.launch(args.out / f".chromium-{lang}", lang=lang, width=1400, height=900) as page:
                for name, route, testid in (
                    ("runs", "#/runs", "runs-table"),
                    ("gates", f"#/runs/{blocked}/gates", "gate-table"),
                ):
                    page.goto(server.url + "/" + route)
                    page.wait_for(f"document.querySelector('[data-testid={testid}]')", what=testid)
                    page.eval("new Promise(r => setTimeout(r, 800))")  # charts finish drawing
                    path = page.screenshot(args.out / f"ui-{name}{suffix}.png")
                    size = path.stat().st_size
                    print(f"{path.relative_to(ROOT)}: {size / 1000:.0f} KB")
                    if size > MAX_BYTES:
                        sys.exit(f"{path} is {size} bytes, over {MAX_BYTES}")
                    if page.errors:
                        sys.exit(f"the page reported errors: {page.errors}")
            import shutil

            shutil.rmtree(args.out / f".chromium-{lang}", ignore_errors=True)


if __name__ == "__main__":
    main()
