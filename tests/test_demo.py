"""`tuneloop demo --json` end to end: the main job a newcomer runs first (about 2-4 minutes on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_fine_tuning_clearly_helps(tmp_path):
    workdir = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "demo", "--workdir", str(workdir), "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert summary["overall"] == "passed"
    assert [s["status"] for s in summary["stages"].values()] == ["passed"] * 6
    ev = summary["stages"]["evaluation"]["metrics"]
    assert ev["accuracy"] >= 0.85 and ev["base_accuracy"] <= 0.3, ev
    demo = summary["demo"]
    assert demo["model"] == "support-router:1" and demo["answer"].strip()
    assert (workdir / "tuneloop.yaml").is_file() and (workdir / "base-model" / "config.json").is_file()
    assert "demo finished in" in r.stderr

    # Unchanged re-run of the same demo: the base model is re-used and every stage is cached.
    again = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "run", str(workdir / "tuneloop.yaml"), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0
    assert all(s["cached"] for s in json.loads(again.stdout)["stages"].values())
