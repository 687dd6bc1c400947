"""Exceptions and the exit codes the CLI maps them to.

Exit codes (a public interface, listed in the README and docs/architecture.md): 0 ok, 1 a stage failed or a gate
blocked, 2 usage/config/input error found before any work was done.
"""

from __future__ import annotations

import reprlib
from typing import Any


class TuneloopError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with when this escapes a command."""

    exit_code = 1


class ConfigError(TuneloopError):
    """The configuration is invalid. Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid configuration{where} ({len(self.problems)} problem(s)):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class InputError(TuneloopError):
    """Bad input (a missing or unreadable file, a malformed record) found before any work was done."""

    exit_code = 2


class StageError(TuneloopError):
    """A pipeline stage could not complete; the message says why and what to do."""

    exit_code = 1


class IntegrityError(TuneloopError):
    """A stored artifact does not match its recorded digest (tampered or corrupted)."""

    exit_code = 1


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr`` of a value for an error message, never longer than about ``limit`` characters."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 10, 10, 3
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value):,} characters)"
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
