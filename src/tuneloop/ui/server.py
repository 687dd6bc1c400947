"""``tuneloop ui``: serve the web UI until SIGTERM/SIGINT.

Entry point: :func:`serve_ui` (config file, workspace directory or ``None`` = the workspace found upwards). The bind
checks are the gateway's (:func:`tuneloop.serve.server.check_bind`): a port in use or a non-loopback address
without API keys is refused before anything starts (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_PORT = 8765


def serve_ui(target: Any = None, host: str | None = None, port: int | None = None, *, console=None) -> int:
    import uvicorn

    from tuneloop.config import ServeConfig
    from tuneloop.serve.server import GracefulServer, check_bind, http_stack, read_keys, resolve_target
    from tuneloop.ui.app import create_app

    cfg, root = resolve_target(target)
    sc = cfg.serve if cfg is not None else ServeConfig()
    host = host or "127.0.0.1"
    port = DEFAULT_PORT if port is None else port
    check_bind(host, port, api_keys=read_keys(sc.api_keys_env), insecure=sc.insecure, api_keys_env=sc.api_keys_env)
    config_path = Path(target).resolve() if target is not None and Path(target).is_file() else None
    app = create_app(root, cfg, host=host, config_path=config_path)
    if console is not None:
        console.print(f"tuneloop ui on http://{host}:{port}/ (workspace {root}); Ctrl-C stops")
    server = GracefulServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, **http_stack()), grace_s=2.0
    )
    server.run()
    return 0
