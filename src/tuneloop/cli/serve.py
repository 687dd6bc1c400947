"""`tuneloop serve`: a registered version on an OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tuneloop.cli.common import err, guard, workspace_for


def serve(
    config: Optional[Path] = typer.Argument(None, help="Pipeline YAML (its workspace and model name). Default: search upwards."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: deploy.port from the config, else 8000)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default: deploy.host, else 127.0.0.1)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registered model name (default: the config's, or the only one)."),
    version: str = typer.Option("champion", "--version", help="Version number or alias to serve."),
) -> None:
    """Serve a registered version (default: the champion) on an OpenAI-compatible API."""
    import uvicorn

    from tuneloop.registry.api import open_registry
    from tuneloop.serve.app import create_app, load_served_model

    with guard():
        ws, cfg = workspace_for(config)
        reg = open_registry(cfg, ws)
        served = load_served_model(reg, model or _only_model(reg, cfg), version)
        host = host or (cfg.deploy.host if cfg else "127.0.0.1")
        port = port or (cfg.deploy.port if cfg else 8000)
        err.print(f"serving [bold]{served.model_id}[/] on http://{host}:{port}/v1 (OpenAI-compatible); Ctrl-C stops")
        uvicorn.run(create_app(served), host=host, port=port, log_level="info")


def _only_model(reg, cfg) -> str:
    """The config's model name, else the registry's only model."""
    from tuneloop.errors import InputError

    if cfg is not None and cfg.model_name:
        return cfg.model_name
    names = reg.models()
    if len(names) != 1:
        raise InputError(f"say which model to serve with --model; registered: {', '.join(names) or 'none'}")
    return names[0]
