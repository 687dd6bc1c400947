"""What every command shares: the consoles, exceptions -> exit codes, JSON output, and the registry options.

Exit codes (a public interface, listed in the README): 0 ok / all gates passed; 1 a stage failed or a gate
blocked; 2 usage, config or input error found before any work was done; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from tuneloop.errors import InputError, TuneloopError
from tuneloop.fsutil import is_disk_full

err = Console(stderr=True)
out = Console()

EXIT_OK, EXIT_BLOCKED, EXIT_INTERRUPTED = 0, 1, 130


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn tuneloop errors into a readable message and their exit code (``TuneloopError.exit_code``); an error
    that says the disk is full (``fsutil.is_disk_full``) into that message and exit 1."""
    try:
        yield
    except TuneloopError as exc:
        # escape: messages name things like `pip install 'tuneloop[lmeval]'` that rich would eat as markup
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; the workspace is consistent: run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        # A full disk is not a bug: say what and what to do, without a traceback.
        err.print(
            f"[red]error:[/] the disk is full: {escape(f'{type(exc).__name__}: {exc}')}; free space on it and "
            "run the same command again",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(EXIT_BLOCKED) from None


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With --json, stdout carries exactly one JSON document: everything else goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _json_default(obj: Any) -> Any:
    """A typed record (``ModelVersion``...) prints as its ``to_dict()``; anything else not JSON as its ``str``."""
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else str(obj)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def exit_for(overall: str) -> typer.Exit:
    """The exit of a command whose result is a verdict: 0 when ``passed``, else 1."""
    return typer.Exit(EXIT_OK if overall == "passed" else EXIT_BLOCKED)


def workspace_for(config: Path | None):
    """``(workspace, config)``: the config's workspace when one is given, else the nearest one upwards."""
    from tuneloop.workspace import Workspace

    if config is not None:
        from tuneloop.config import load_config

        cfg = load_config(config)
        return Workspace.for_config(cfg), cfg
    return Workspace.find(), None


# ------------------------------------------------------------------------------- registry options


@dataclass(frozen=True)
class RegistryOptions:
    """Which registry a `models` command talks to, and whether it prints JSON."""

    config: Path | None = None
    workspace: Path | None = None
    registry: str | None = None
    json_out: bool = False

    def open(self):
        """The registry, found like git finds a repository (workspace upwards), or as given."""
        from tuneloop.registry.api import open_registry, registry_uri
        from tuneloop.workspace import Workspace

        cfg = None
        if self.workspace is not None:
            ws = Workspace(self.workspace)
        elif self.config is not None:
            ws, cfg = workspace_for(self.config)
        else:
            try:
                ws = Workspace.find()
            except InputError:
                if registry_uri(self.registry) is None:
                    raise
                ws = None  # a remote registry needs no workspace; downloads go to the user cache
        return open_registry(self.registry or cfg, ws)

    def workspace_root(self) -> Path:
        """The workspace directory alone, without opening the registry (which refuses a lost database)."""
        from tuneloop.workspace import Workspace

        if self.workspace is not None:
            return Workspace(self.workspace).root
        return workspace_for(self.config)[0].root


_REGISTRY_PARAMETERS = [
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Path | None,
        default=typer.Option(None, "--config", "-c", help="Use this config's workspace (and its registry.uri)."),
    ),
    inspect.Parameter(
        "workspace",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Path | None,
        default=typer.Option(
            None, "--workspace", "-w", help="Workspace directory (default: search upwards for .tuneloop/)."
        ),
    ),
    inspect.Parameter(
        "registry",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=str | None,
        default=typer.Option(
            None,
            "--registry",
            help="Registry URI, e.g. http://mlflow:5000 (default: registry.uri, $TUNELOOP_REGISTRY_URI, else the local SQLite registry).",
        ),
    ),
    inspect.Parameter(
        "json_out",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=bool,
        default=typer.Option(False, "--json", help="Print exactly one JSON document on stdout."),
    ),
]


def with_registry_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command ``--config/-c``, ``--workspace/-w``, ``--registry`` and ``--json``, defined here once.

    The command declares a last parameter ``opts: RegistryOptions`` and receives them in it; Typer sees the
    four options after the command's own parameters (so ``--help`` lists them last).
    """
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "opts"]

    @functools.wraps(command)
    def wrapper(*args: Any, config=None, workspace=None, registry=None, json_out=False, **kwargs: Any) -> Any:
        return command(*args, opts=RegistryOptions(config, workspace, registry, json_out), **kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *_REGISTRY_PARAMETERS])  # type: ignore[attr-defined]
    return wrapper


REASON_OPTION = typer.Option("", "--reason", help="Why: recorded in the event log.")
