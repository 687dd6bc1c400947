"""A run that waits on another run's stage lock says so (and how long) and reuses that run's result; a re-run
whose version is deployed already reports the registry's previous version, not the version itself."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from rich.console import Console

from tuneloop.pipeline import FineTunePipeline
from tuneloop.workspace import Workspace


def run(path, **kw):
    out = io.StringIO()
    summary = FineTunePipeline(str(path), console=Console(file=out, width=300, color_system=None), **kw).run()
    return summary, out.getvalue()


def test_waiting_on_another_runs_stage_lock_is_said_and_previous_is_the_registrys(make_config):
    first, _ = run(make_config())
    assert first["overall"] == "passed" and first["stages"]["deployment"]["metrics"]["previous"] is None

    path = make_config(train__learning_rate=2e-3)  # a second version: champion 2, previous 1
    second, _ = run(path)
    assert second["stages"]["deployment"]["metrics"] == {"alias": "champion", "version": 2, "previous": 1}

    # Another run holds the training stage's lock (as a run of the same config still training would) for 1.5 s.
    ws = Workspace.for_config(FineTunePipeline(str(path)).cfg)
    key = json.loads((Path(second["run_dir"]) / "stages" / "training.json").read_text())["key"]
    held, release = threading.Event(), threading.Event()

    def other_run():
        with ws.lock(f"training/{key}"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=other_run)
    t.start()
    assert held.wait(10)
    threading.Timer(1.5, release.set).start()
    t0 = time.monotonic()
    third, console = run(path)
    t.join(10)
    assert time.monotonic() - t0 >= 1.5
    assert third["overall"] == "passed"
    assert "waiting for another run that is doing this training stage" in console
    line = next(ln for ln in console.splitlines() if "passed (cached: waited" in ln)
    waited = float(line.split("waited ")[1].split("s for the other run")[0])
    assert 1.3 <= waited < 10 and "reused its result" in line, line
    assert third["stages"]["training"]["cached"] is True
    # deployed already by the run it waited for: the registry's previous (1), not this version (2)
    assert third["stages"]["deployment"]["metrics"] == {"alias": "champion", "version": 2, "previous": 1}
    assert third["stages"]["deployment"]["cached"] is True
