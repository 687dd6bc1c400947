"""Running the gateway: checks before binding, the app from a config, graceful shutdown, and a background
server for the demo and tests.

Entry points: :func:`serve` (what ``tuneloop serve`` calls), :func:`build_gateway` (config -> app),
:func:`check_bind` (port and address checks, :class:`~tuneloop.errors.InputError` with one clear line),
:func:`http_stack` (the HTTP parser and event loop uvicorn runs on), :class:`BackgroundServer`.

Shutdown (SIGTERM, SIGINT): uvicorn stops accepting connections and lets the requests in flight finish for
``serve.shutdown_grace_s``. When the grace runs out, :func:`end_grace` marks the gateway as shutting down and
the backend ends every queued and running generation (``BatchEngine.abort``): each of those calls answers 503
``shutting_down`` with ``Retry-After`` and ``x-request-id`` (a stream that had started gets that error as its
last event, then ``data: [DONE]``) and is logged with status 503. :data:`END_OF_GRACE_S` later uvicorn cancels
whatever is still open (an upstream call); the gateway answers those the same way (``serve/calls.py``). Then the
app's lifespan closes the backend and flushes the request log.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, TypedDict

from tuneloop.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: After ``serve.shutdown_grace_s``: how long the calls ended with 503 get to send it before uvicorn cancels the rest.
END_OF_GRACE_S = 2.0


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_keys(env_name: str) -> frozenset[str]:
    return frozenset(k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip())


def check_bind(host: str, port: int, *, api_keys: frozenset[str], insecure: bool, api_keys_env: str) -> None:
    """Refuse, before any model is loaded: a bad port, a port in use, or a public address without API keys."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"port {port!r} is not a valid TCP port; use 1..65535 (--port or serve.port)")
    if not is_loopback(host) and not api_keys and not insecure:
        raise InputError(
            f"refusing to listen on {host} without API keys: set ${api_keys_env} (comma-separated keys), "
            "bind 127.0.0.1, or set serve.insecure: true to accept unauthenticated clients"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InputError(
                f"port {port} on {host} is already in use; stop the other server or pick another port with --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise InputError(
                f"no permission to listen on port {port}; ports below 1024 need privileges, use e.g. --port 8000"
            ) from None
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host") from None


def resolve_target(cfg_or_workspace: Any):
    """(config or None, workspace root) from a PipelineConfig, a config file path, or a workspace directory."""
    from tuneloop.config import PipelineConfig, load_config
    from tuneloop.workspace import Workspace

    if cfg_or_workspace is None:
        return None, Workspace.find().root
    if isinstance(cfg_or_workspace, PipelineConfig):
        return cfg_or_workspace, Workspace.for_config(cfg_or_workspace).root
    p = Path(cfg_or_workspace)
    if p.is_file():
        cfg = load_config(p)
        return cfg, Workspace.for_config(cfg).root
    if p.is_dir():
        return None, Workspace(p).root
    raise InputError(f"{p} is neither a config file nor a workspace directory")


def build_gateway(cfg, workspace_root: Path, *, preload: list[str] | None = None):
    """The app for a config's ``serve:`` section (defaults without a config) over the workspace's registry; it
    decides rollouts every ``deploy.canary.tick_interval_s`` and notifies ``notify.webhooks``."""
    from tuneloop.config import ServeConfig
    from tuneloop.registry.api import open_registry
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.router import DEFAULT_ALIAS, Router

    sc = cfg.serve if cfg is not None else ServeConfig()
    reg = open_registry(cfg, workspace_root)
    from tuneloop.monitor.requestlog import default_log_url

    log_url = sc.request_log or default_log_url(workspace_root)
    request_log, recorder, metrics = open_monitoring(
        log_url,
        spool_dir=workspace_root / "spool" / "request-log",
        spool_max_bytes=int(sc.request_log_spool_mb * 2**20),
    )
    backend = make_backend(sc, reg, workspace_root, metrics)
    if preload is None:
        preload = sc.preload or [
            f"{m}@{DEFAULT_ALIAS}" if reg.get_alias(m, DEFAULT_ALIAS) is not None else m for m in reg.models()
        ]
    canary = cfg.deploy.canary if cfg is not None else None
    settings = GatewaySettings(
        api_keys=read_keys(sc.api_keys_env),
        admin_token=os.environ.get(sc.admin_token_env) or None,
        max_body_bytes=sc.max_body_bytes,
        docs=sc.docs,
        preload=preload,
        retention_days=sc.retention_days,
        rollout_tick_s=canary.tick_interval_s if canary is not None else 5.0,
        rollout_policy=canary.policy_dict() if canary is not None else None,
    )
    notifier = None
    if cfg is not None:
        from tuneloop.rollout.notify import notifier_for

        notifier = notifier_for(cfg)
    router = Router(reg, ttl_s=1.0 if reg.backend == "sqlite" else 5.0)  # MLflow: each read is HTTP to a shared server
    return create_app(
        backend, router, settings, recorder=recorder, metrics=metrics, request_log=request_log, notifier=notifier
    )


def make_backend(sc, reg, workspace_root: Path, metrics):
    def depth(model: str, n: int) -> None:
        if metrics is not None:
            metrics.queue_depth.labels(model=model).set(n)

    if sc.backend == "openai":
        from tuneloop.serve.backends.upstream import UpstreamBackend

        if not sc.upstream:
            raise ConfigError(
                "serve.upstream: backend openai needs the upstream base URL, e.g. http://127.0.0.1:8001/v1"
            )
        return UpstreamBackend(sc.upstream, reg, timeout_s=sc.upstream_timeout_s)
    from tuneloop.serve.backends.local import LocalBackend

    if sc.torch_threads is not None:
        import torch

        torch.set_num_threads(sc.torch_threads)
        log.info("torch uses %d thread(s) for forward passes (serve.torch_threads)", sc.torch_threads)
    return LocalBackend(
        reg,
        workspace_root,
        max_batch_size=sc.max_batch_size,
        max_queue=sc.max_queue,
        default_max_tokens=sc.default_max_tokens,
        probes=sc.probes,
        queue_depth=depth,
    )


def open_monitoring(url: str, *, spool_dir: Path | None = None, spool_max_bytes: int = 2**30):
    """(request log, recorder, metrics) from tuneloop.monitor (the app purges the log by age, hourly). With
    ``spool_dir``, records wait there while the store is unavailable (``monitor/spool.py``); what an earlier
    gateway left there is replayed first."""
    from tuneloop.monitor.metrics import GatewayMetrics
    from tuneloop.monitor.requestlog import AsyncRecorder, open_request_log
    from tuneloop.monitor.spool import open_spool

    request_log = open_request_log(url)
    spool = open_spool(spool_dir, max_bytes=spool_max_bytes) if spool_dir is not None else None
    if spool is not None and not spool.empty:
        log.info(
            "request log: %d records left in the spool %s by an earlier gateway; replaying them",
            spool.records,
            spool.dir,
        )
    recorder = AsyncRecorder(request_log, spool=spool)
    metrics = GatewayMetrics()
    metrics.watch_request_log(recorder)
    return request_log, recorder, metrics


class HttpStack(TypedDict):
    """uvicorn's ``http`` and ``loop`` settings, typed so ``uvicorn.Config(..., **http_stack())`` type-checks."""

    http: str
    loop: str


def http_stack() -> HttpStack:
    """The HTTP parser and event loop the gateway runs on: httptools and uvloop (core dependencies; uvloop is
    not built for Windows) when they import, else uvicorn's pure-Python h11 parser and the asyncio loop, the
    same choice as uvicorn's ``auto``. The C pair takes ~0.3-0.5 ms less per request (docs/benchmarks.md)."""
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return HttpStack(http=http, loop=loop)


def serve(cfg_or_workspace: Any = None, host: str | None = None, port: int | None = None, *, console=None) -> int:
    """Run the gateway until SIGTERM/SIGINT; in-flight requests get ``serve.shutdown_grace_s`` to finish.

    Raises InputError/ConfigError (exit 2) for a bad port, a port in use, or a public address without keys,
    before any model is loaded. Returns 0 after a clean shutdown.
    """
    import uvicorn

    from tuneloop.config import ServeConfig

    cfg, root = resolve_target(cfg_or_workspace)
    sc = cfg.serve if cfg is not None else ServeConfig()
    host, port = host or sc.host, port if port is not None else sc.port
    check_bind(host, port, api_keys=read_keys(sc.api_keys_env), insecure=sc.insecure, api_keys_env=sc.api_keys_env)
    configure_logging()
    app = build_gateway(cfg, root)
    stack = http_stack()
    log.info("HTTP stack: %s parser, %s event loop", stack["http"], stack["loop"])
    if console is not None:
        console.print(
            f"tuneloop gateway on http://{host}:{port}/v1 ({sc.backend} backend, {stack['http']} + "
            f"{stack['loop']}); SIGTERM or Ctrl-C stops"
        )
    if stack["http"] == "h11":
        log.warning(
            "httptools is not installed: serving with the slower pure-Python h11 parser (pip install httptools)"
        )
    # keep-alive longer than uvicorn's 5 s: a client (or load balancer) that reuses an idle connection just as the
    # server closes it sees a reset; 75 s outlasts the usual proxy idle timeouts (60 s)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        # uvicorn annotates this int | None but only passes it to asyncio.timeout (a float): keep fractional graces
        timeout_graceful_shutdown=sc.shutdown_grace_s + END_OF_GRACE_S,  # type: ignore[arg-type]
        access_log=False,
        timeout_keep_alive=75,
        **stack,
    )
    server = GracefulServer(config, grace_s=sc.shutdown_grace_s)
    server.run()
    if not server.started:
        raise InputError(f"the gateway could not start on {host}:{port}; see the messages above")
    return 0


async def end_grace(app) -> int:
    """``serve.shutdown_grace_s`` ran out: mark the gateway as shutting down and have its backend end every queued
    and running generation (their calls answer 503 ``shutting_down``); returns how many were ended."""
    gw = getattr(getattr(app, "state", None), "gateway", None)
    if gw is None:
        return 0
    gw.shutting_down = True
    abort = getattr(gw.backend, "abort", None)
    ended = abort("the gateway is shutting down (serve.shutdown_grace_s ran out)") if abort is not None else 0
    log.warning(
        "shutdown grace period over: %d queued or running generation(s) end with 503 shutting_down; "
        "calls still open in %.0f s are ended the same way",
        ended,
        END_OF_GRACE_S,
    )
    return ended


def configure_logging(level: int = logging.INFO) -> None:
    """The gateway's own lines (``tuneloop.*``: versions loaded, each rollout decision, the shutdown) on stderr at
    INFO, formatted like uvicorn's. A program that configured logging itself (handlers on the root or the
    ``tuneloop`` logger) keeps its handlers; the ``tuneloop`` logger only gets INFO if it had no level."""
    logger = logging.getLogger("tuneloop")
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    if logger.handlers or logging.getLogger().handlers:
        return
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logger.addHandler(handler)


def graceful_server_class():
    """uvicorn's Server, but a handled SIGTERM/SIGINT ends with exit 0 instead of re-raising the signal, and the
    end of the grace period ends the gateway's open calls with 503 (:func:`end_grace`) before uvicorn cancels
    them (its ``timeout_graceful_shutdown`` is the grace plus :data:`END_OF_GRACE_S`)."""
    import asyncio
    import contextlib
    import signal

    import uvicorn

    class _GracefulServer(uvicorn.Server):
        def __init__(self, config, grace_s: float | None = None):
            super().__init__(config)
            self.grace_s = grace_s

        async def shutdown(self, sockets=None):
            ender = None
            if self.grace_s is not None:
                ender = asyncio.get_running_loop().create_task(self.end_grace_after(self.grace_s))
            try:
                await super().shutdown(sockets)
            finally:
                if ender is not None:
                    ender.cancel()

        async def end_grace_after(self, grace_s: float) -> None:
            await asyncio.sleep(grace_s)
            if self.server_state.tasks:  # requests still open: end them with 503 rather than have them cancelled
                await end_grace(self.config.app)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _GracefulServer


def GracefulServer(config, grace_s: float | None = None):  # noqa: N802 - reads like the class it builds
    return graceful_server_class()(config, grace_s)


class BackgroundServer:
    """Runs uvicorn in a thread on a free loopback port (used by the demo and tests)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, grace_s: float = 5.0):
        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = GracefulServer(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                # uvicorn annotates this int | None but only passes it to asyncio.timeout: keep fractional graces
                timeout_graceful_shutdown=grace_s + END_OF_GRACE_S,  # type: ignore[arg-type]
                **http_stack(),
            ),
            grace_s=grace_s,
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
