"""OpenMP threads must not spin-wait on shared CPUs (issue 14.25; figures from benchmarks/training_contention.py)."""

from __future__ import annotations

import os
import subprocess
import sys


def _policy_after_import(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import os, tuneloop; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_import_sets_a_passive_wait_policy():
    # OpenMP reads the policy when torch loads it; `import tuneloop` sets it first thing (see tuneloop/__init__.py)
    assert _policy_after_import(None) == "PASSIVE"


def test_a_users_own_wait_policy_is_kept():
    assert _policy_after_import("ACTIVE") == "ACTIVE"
