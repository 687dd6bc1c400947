"""Canary rollouts live, end to end (scripts/rollout_live.py): a real gateway with a tiny model, simulated users
with user keys and feedback, the gateway's own controller loop. A bad candidate at 5 % is rolled back with 0
failed client requests and the champion unchanged; a good one is promoted through every step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rollout_live.py"


def load_script():
    spec = importlib.util.spec_from_file_location("rollout_live", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bad_candidate_rolled_back_good_one_promoted_live(tiny_model, tmp_path):
    live = load_script()
    lines: list[str] = []
    result = live.run_live(tiny_model, tmp_path, seed=3, timeout_s=100, say=lines.append)
    print("\n".join(lines))

    bad = result["bad"]
    assert bad["status"] == "rolled_back", bad["milestones"]
    assert bad["champion_after"] == "support-bot:1"  # the champion is unchanged
    assert bad["failed"] == 0  # the crashing canary's failures were retried on the baseline
    assert [m["weight"] for m in bad["milestones"]] == [0.05, 0.0]  # rolled back from 5 %, never stepped up
    decision = bad["ended_event"]["details"]["decision"]
    assert decision["action"] == "rollback" and decision["canary_requests"] > 0 and decision["baseline_requests"] > 0
    stats = decision["metrics"]
    assert set(stats) == {"errors", "negative_feedback"}
    worst = max(stats.values(), key=lambda m: m["log_evalue"])
    assert worst["log_evalue"] >= worst["threshold"] and worst["estimate"] > 1.0
    assert worst["canary"]["events"] > 0 and worst["interval"][0] > 1.0  # the anytime-valid interval excludes 1

    good = result["good"]
    assert good["status"] == "promoted", good["milestones"]
    assert good["failed"] == 0 and good["champion_after"] == "support-bot:3"
    assert [m["weight"] for m in good["milestones"]] == [0.05, 0.5, 1.0]  # through every step
    assert good["ended_event"]["details"]["decision"]["action"] == "promote"
    assert result["notifications"] == ["start", "rollback", "start", "step", "promote"]
    assert bad["seconds"] + good["seconds"] < 120
