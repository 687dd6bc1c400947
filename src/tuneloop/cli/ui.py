"""`tuneloop ui`: the web UI over the workspace (loopback by default; English and Chinese)."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import err, guard


def ui(
    config: Path | None = typer.Argument(
        None, help="Pipeline YAML or workspace directory. Default: the workspace found upwards."
    ),
    host: str | None = typer.Option(
        None, "--host", help="Address to bind (default 127.0.0.1; elsewhere API keys are needed, as for the gateway)."
    ),
    port: int | None = typer.Option(None, "--port", help="Port (default 8765)."),
) -> None:
    """The web UI: runs, why a gate blocked, data, registry and lineage, rollouts, feedback and drift, start a run."""
    from tuneloop.ui.server import serve_ui

    with guard():
        code = serve_ui(config, host, port, console=err)
    raise typer.Exit(code)
