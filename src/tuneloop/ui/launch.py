"""Start a run from the web UI: the workspace's configs, ``-o`` overrides checked per field against the schema
before anything starts, and ``tuneloop run CONFIG -o ...`` launched as a subprocess that the page watches.

Entry points: :func:`list_configs`, :func:`check_overrides` (``{key: message}``, empty when valid),
:class:`Launcher` (``start``, ``list``, ``get``).

A config is picked by its id in :func:`list_configs` (the config given to ``tuneloop ui`` and the YAML files next to
the workspace), never by a path from the request. The subprocess's output goes to
``<workspace>/ui/launches/<launch_id>.log``; the run id is read from that output (``run <id>``) or from the run
directory that appeared after the launch.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import load_config, parse_override
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.ui.views import tail_lines

MAX_CONFIG_FILES = 50
KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def list_configs(config_path: Path | None, workspace_root: Path) -> list[dict[str, str]]:
    """The configs the Start page offers: the one given to ``tuneloop ui`` first, then the ``*.yaml``/``*.yml`` files
    in the directory that holds the workspace (``.tuneloop/``'s parent) that look like pipeline configs."""
    found: list[Path] = []
    if config_path is not None and Path(config_path).is_file():
        found.append(Path(config_path).resolve())
    parent = Path(workspace_root).resolve().parent
    if parent.is_dir():
        for p in sorted([*parent.glob("*.yaml"), *parent.glob("*.yml")])[:MAX_CONFIG_FILES]:
            p = p.resolve()
            if p not in found and _looks_like_config(p):
                found.append(p)
    return [{"id": str(i), "name": p.name, "path": str(p)} for i, p in enumerate(found)]


def _looks_like_config(p: Path) -> bool:
    try:
        head = p.read_text(encoding="utf-8", errors="replace")[:20000]
    except OSError:
        return False
    return bool(re.search(r"^(base_model|name|train_data|data)\s*:", head, re.M))


def config_by_id(configs: list[dict[str, str]], config_id: str) -> Path | None:
    for c in configs:
        if c["id"] == str(config_id):
            return Path(c["path"])
    return None


def override_items(overrides: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """``{"train.learning_rate": "1e-4"}`` -> (``["train.learning_rate=1e-4"]``, problems by key for malformed keys)."""
    items, problems = [], {}
    for key, value in overrides.items():
        key = str(key).strip()
        if not KEY_RE.match(key):
            problems[key or "(empty)"] = (
                f"{key!r} is not a config key path (letters, digits, _ and dots, e.g. train.learning_rate)"
            )
            continue
        text = "" if value is None else str(value)
        if "\n" in text:
            problems[key] = "a value is one line"
            continue
        items.append(f"{key}={text}")
    return items, problems


def check_overrides(config: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """Every problem of the config with these overrides, by the override key it belongs to (``_config`` for the
    config's own problems). Empty when the config loads. Nothing is started or written."""
    items, problems = override_items(overrides)
    for item in items:  # each override alone: its own problems are attributed to its field
        key = item.partition("=")[0]
        try:
            parse_override(item)
            load_config(config, [item])
        except ConfigError as exc:
            mine = [p for p in exc.problems if _names(p, key)]
            if mine:
                problems[key] = "; ".join(mine)
            elif not _config_problems(config):
                problems[key] = "; ".join(exc.problems)
        except TuneloopError as exc:
            problems[key] = str(exc)
    if problems:
        return problems
    try:
        load_config(config, items)
    except ConfigError as exc:
        problems["_config"] = "; ".join(exc.problems)
    except TuneloopError as exc:
        problems["_config"] = str(exc)
    return problems


def _names(problem: str, key: str) -> bool:
    head = problem.split(":", 1)[0].strip()
    last = key.split(".")[-1]
    return (
        head == key or head.endswith("." + last) or head == last or f"override {key}" in problem or f"'{key}" in problem
    )


def _config_problems(config: Path) -> list[str]:
    try:
        load_config(config)
    except TuneloopError as exc:
        return getattr(exc, "problems", [str(exc)])
    return []


@dataclass
class Launch:
    launch_id: str
    config: str
    overrides: list[str]
    pid: int
    started_at: float
    log_path: Path
    runs_before: set[str]
    process: subprocess.Popen = field(repr=False)
    run_id: str | None = None


_RUN_IN_OUTPUT = re.compile(r"\b(\d{8}-\d{6}-[0-9a-f]{6})\b")


class Launcher:
    """Runs started from the page: ``tuneloop run CONFIG -o ...`` subprocesses and their output."""

    def __init__(self, workspace_root: Path):
        self.root = Path(workspace_root)
        self.launches: dict[str, Launch] = {}

    def start(self, config: Path, items: list[str]) -> Launch:
        log_dir = self.root / "ui" / "launches"
        log_dir.mkdir(parents=True, exist_ok=True)
        launch_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        log_path = log_dir / f"{launch_id}.log"
        runs_dir = self.root / "runs"
        before = {d.name for d in runs_dir.iterdir()} if runs_dir.is_dir() else set()
        cmd = [sys.executable, "-m", "tuneloop.cli", "run", str(config)]
        for item in items:
            cmd += ["-o", item]
        env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(Path(config).parent),
                env=env,
                start_new_session=True,
            )
        launch = Launch(launch_id, Path(config).name, items, proc.pid, time.time(), log_path, before, proc)
        self.launches[launch_id] = launch
        return launch

    def _run_id(self, launch: Launch) -> str | None:
        if launch.run_id:
            return launch.run_id
        runs_dir = self.root / "runs"
        new = (
            sorted(d.name for d in runs_dir.iterdir() if d.name not in launch.runs_before) if runs_dir.is_dir() else []
        )
        if len(new) == 1:
            launch.run_id = new[0]
        else:
            try:
                m = _RUN_IN_OUTPUT.search(launch.log_path.read_text(encoding="utf-8", errors="replace")[:20000])
            except OSError:
                m = None
            if m and (runs_dir / m.group(1)).is_dir():
                launch.run_id = m.group(1)
        return launch.run_id

    def view(self, launch: Launch) -> dict[str, Any]:
        code = launch.process.poll()
        return {
            "launch_id": launch.launch_id,
            "config": launch.config,
            "overrides": launch.overrides,
            "pid": launch.pid,
            "status": "running" if code is None else "exited",
            "returncode": code,
            "run_id": self._run_id(launch),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(launch.started_at)),
            "log_tail": tail_lines(launch.log_path, 30),
        }

    def list(self) -> list[dict[str, Any]]:
        return [
            self.view(launch) for launch in sorted(self.launches.values(), key=lambda x: x.started_at, reverse=True)
        ]

    def get(self, launch_id: str) -> Launch | None:
        return self.launches.get(launch_id)
