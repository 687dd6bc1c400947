"""The workspace: one directory holding runs, the stage cache, the registry and the artifact store.

Layout (default ``.tuneloop/`` next to the config)::

    runs/<run_id>/      run.json, config.yaml (resolved), stages/<stage>.json, logs/, report.html
    cache/<stage>/<key>/ stage outputs keyed by a content hash of their inputs; result.json marks completion
    registry.db         the model registry (SQLite)
    artifacts/<sha256>/ content-addressed model and adapter directories

Commands find the workspace the way git finds a repository: from the config given, or from the current
directory upwards.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneloop.errors import InputError
from tuneloop.fsutil import pid_alive, utcnow  # noqa: F401 (kept importable here)

__all__ = ["DIRNAME", "Workspace", "pid_alive", "utcnow"]  # utcnow lives in fsutil; kept importable here

DIRNAME = ".tuneloop"


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        _check_not_a_file(self.root)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @classmethod
    def for_config(cls, cfg) -> Workspace:
        if cfg.workspace:
            return cls(Path(cfg.workspace))
        base = getattr(cfg, "_base_dir", None) or Path.cwd()
        return cls(Path(base) / DIRNAME)

    @classmethod
    def find(cls, start: Path | None = None) -> Workspace:
        """The nearest ``.tuneloop`` directory at or above ``start`` (default: the current directory)."""
        here = Path(start or Path.cwd()).resolve()
        for d in (here, *here.parents):
            if (d / DIRNAME).is_dir():
                return cls(d / DIRNAME)
        raise InputError(
            f"no tuneloop workspace ({DIRNAME}/) found in {here} or any parent directory; "
            "run `tuneloop run CONFIG` first, or pass the config file"
        )

    def new_run_id(self) -> str:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return f"{stamp}-{secrets.token_hex(3)}"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def stage_cache(self, stage: str, key: str) -> Path:
        return self.cache_dir / stage / key

    @contextmanager
    def lock(self, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """An exclusive advisory lock (released by the OS if the process dies). ``on_wait`` is called once, before
        blocking, when someone else (another run) holds it."""
        path = self.root / "locks" / (hashlib.sha256(name.encode()).hexdigest()[:16] + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _check_not_a_file(root: Path) -> None:
    """Refuse a workspace path that is, or lies under, something other than a directory (exit 2, not a traceback)."""
    for p in (root, *root.parents):
        if p.exists():
            if p.is_dir():
                return
            where = "is" if p == root else f"is inside {p}, which is"
            raise InputError(
                f"the workspace {root} {where} a file, not a directory; point `workspace:` in the config (or "
                "-w/--workspace) at a directory, or move the file away"
            )
