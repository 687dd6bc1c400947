"""`tuneloop serve`: the gateway, every registered model of the workspace on one OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import err, guard


def serve(
    config: Path | None = typer.Argument(
        None, help="Pipeline YAML (workspace, serve: section). Default: the workspace found upwards."
    ),
    host: str | None = typer.Option(None, "--host", help="Address to bind (default serve.host, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default serve.port, 8000)."),
) -> None:
    """The gateway: every registered model of the workspace on one OpenAI-compatible API."""
    from tuneloop.serve.server import serve as run_gateway

    with guard():
        code = run_gateway(config, host, port, console=err)
    raise typer.Exit(code)
