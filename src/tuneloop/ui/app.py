"""The web UI's HTTP app: the single page and its JSON API over a workspace and its registry.

Entry point: :func:`create_app` (``workspace_dir``, optional config) -> a FastAPI app; ``tuneloop ui`` serves it
(:mod:`tuneloop.ui.server`), tests run it in :class:`tuneloop.serve.server.BackgroundServer`. The routes and
the page's ``data-testid`` hooks are listed in the module docstrings here and in ``views.py``.

Auth, the gateway's rules (its ``bearer``/``constant_time_in``/``is_loopback``): bound to loopback everything is
open; elsewhere every ``/api/*`` route needs ``Authorization: Bearer <API key>`` (``serve.api_keys_env``) or the
admin token, and every action (POST) needs the admin token (``serve.admin_token_env``): 401 without it, 403 when
no admin token is configured; nothing is changed either way. The page and its assets (no data) are open.

Errors: every failure is ``{"error": {"message", "code", "panel"}}`` with a 4xx/503 status (a panel that cannot
be built says why; the others still work); an unexpected exception is a 500 with that shape, never a stack.
No route opens a file path taken from the URL: run ids, model names, versions, configs and assets are looked up
in listings.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tuneloop.errors import TuneloopError
from tuneloop.ui import views
from tuneloop.ui.launch import Launcher, check_overrides, config_by_id, list_configs, override_items
from tuneloop.ui.views import PanelError
from tuneloop.workspace import Workspace

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def static_files() -> dict[str, Path]:
    """``{"app.js": path, "vendor/chart.umd.js": path, "i18n/en.json": path, ...}``: the assets the page may load,
    listed once from the package; a request names one of these keys or gets 404."""
    return {
        p.relative_to(STATIC).as_posix(): p
        for p in STATIC.rglob("*")
        if p.is_file() and p.suffix in CONTENT_TYPES and "__pycache__" not in p.parts
    }


def create_app(
    workspace_dir: str | os.PathLike,
    cfg: Any = None,
    *,
    host: str = "127.0.0.1",
    api_keys: frozenset[str] | None = None,
    admin_token: str | None = None,
    config_path: str | os.PathLike | None = None,
):
    """The UI app over the workspace at ``workspace_dir`` (its ``.tuneloop`` directory; it need not exist: the
    panels then say so). ``cfg``: the PipelineConfig (registry URI, request log, drift settings, serve keys);
    ``host``: the address the server binds (the auth rules apply when it is not loopback); ``api_keys`` and
    ``admin_token`` default to the environment variables named by ``serve.api_keys_env`` /
    ``serve.admin_token_env``."""
    from tuneloop.serve.server import is_loopback, read_keys

    ws = Workspace(Path(workspace_dir))
    sc = getattr(cfg, "serve", None)
    keys_env = getattr(sc, "api_keys_env", "TUNELOOP_API_KEYS")
    admin_env = getattr(sc, "admin_token_env", "TUNELOOP_ADMIN_TOKEN")
    auth = Auth(
        loopback=is_loopback(host),
        api_keys=read_keys(keys_env) if api_keys is None else frozenset(api_keys),
        admin_token=(os.environ.get(admin_env) or None) if admin_token is None else admin_token,
        keys_env=keys_env,
        admin_env=admin_env,
        insecure=bool(getattr(sc, "insecure", False)),
    )
    assets = static_files()
    launcher = Launcher(ws.root)
    lock = threading.Lock()
    state = UiState(ws, cfg, Path(config_path).resolve() if config_path else _config_of(cfg))

    app = FastAPI(title="tuneloop ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = state
    app.router.redirect_slashes = False  # "/api/runs/.." (normalised by clients to "/api/") is a 404, not a redirect

    add_error_handling(app, auth)
    add_page_routes(app, assets)
    add_run_routes(app, state, auth)
    add_registry_routes(app, state, lock)
    add_loop_routes(app, state)
    add_launch_routes(app, state, launcher)

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])  # last: after every route
    def unknown_api(rest: str) -> dict[str, Any]:
        raise PanelError(404, "not_found", f"no API route /api/{rest}")

    return app


def add_error_handling(app: FastAPI, auth: Auth) -> None:
    """The auth check on every request, and every failure as ``{"error": {...}}`` (never a stack)."""

    @app.middleware("http")
    async def check_auth(request: Request, call_next):
        denied = auth.check(request.url.path, request.method, request.headers.get("authorization", ""))
        if denied is not None:
            return JSONResponse(denied[2], status_code=denied[0])
        response = await call_next(request)
        response.headers.setdefault("cache-control", "no-store")
        return response

    @app.exception_handler(PanelError)
    async def panel_error(request: Request, exc: PanelError):
        return JSONResponse(error_body(exc.code, exc.message, panel_of(request.url.path)), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("ui: %s %s failed", request.method, request.url.path)
        return JSONResponse(
            error_body("internal", f"{type(exc).__name__}: {exc}", panel_of(request.url.path)), status_code=500
        )

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception):
        return JSONResponse(error_body("not_found", f"no route {request.url.path}", None), status_code=404)


def add_page_routes(app: FastAPI, assets: dict[str, Path]) -> None:
    """The single page and its assets (looked up in :func:`static_files`, never a path from the URL)."""

    @app.get("/")
    def index() -> Response:
        return HTMLResponse(assets["index.html"].read_text(encoding="utf-8"))

    @app.get("/static/{name:path}")
    def asset(name: str) -> Response:
        p = assets.get(name)
        if p is None:
            raise PanelError(404, "not_found", f"no asset {name!r}")
        return Response(p.read_bytes(), media_type=CONTENT_TYPES[p.suffix])


def add_run_routes(app: FastAPI, state: UiState, auth: Auth) -> None:
    """``/api/info``, the runs (stages, progress, gates, items, report, data) and the comparison of two runs."""
    ws = state.ws

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        from tuneloop.version import __version__

        try:
            reg = state.registry()
            registry: dict[str, Any] = {"backend": reg.backend, "location": str(reg.location)}
        except PanelError as exc:
            registry = {"error": exc.message}
        return {
            "version": __version__,
            "workspace": str(ws.root),
            "workspace_ok": ws.root.is_dir(),
            "registry": registry,
            "loopback": auth.loopback,
            "auth": {"api_key": not (auth.loopback or auth.open_reads), "admin": not auth.loopback},
        }

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return views.runs_view(ws)

    @app.get("/api/runs/{run_id}")
    def run(run_id: str) -> dict[str, Any]:
        return views.run_view(ws, run_id)

    @app.get("/api/runs/{run_id}/progress")
    def progress(run_id: str) -> dict[str, Any]:
        return views.progress_view(ws, run_id)

    @app.get("/api/runs/{run_id}/gates")
    def gates(run_id: str) -> dict[str, Any]:
        return views.gates_view(ws, run_id)

    @app.get("/api/runs/{run_id}/items")
    def items(
        run_id: str, suite: str | None = None, only: str = "all", limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        return views.items_view(ws, run_id, suite=suite, only=only, limit=limit, offset=offset)

    @app.get("/api/runs/{run_id}/report")
    def report(run_id: str) -> Response:
        f = views.find_run_dir(ws, run_id) / "report.html"
        if not f.is_file():
            raise PanelError(404, "not_found", f"run {run_id} has no report.html (it is written when the run ends)")
        return HTMLResponse(f.read_text(encoding="utf-8", errors="replace"))

    @app.get("/api/runs/{run_id}/data")
    def data(run_id: str) -> dict[str, Any]:
        return views.data_view(ws, run_id)

    @app.get("/api/runs/{run_id}/data/{source}/quarantine")
    def quarantine(run_id: str, source: str, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return views.quarantine_view(ws, run_id, source, limit=limit, offset=offset)

    @app.get("/api/runs/{run_id}/data/{source}/duplicates")
    def duplicates(run_id: str, source: str) -> dict[str, Any]:
        return views.duplicates_view(ws, run_id, source)

    @app.get("/api/compare")
    def compare(a: str, b: str) -> dict[str, Any]:
        return views.compare_view(ws, a, b)


def add_registry_routes(app: FastAPI, state: UiState, lock: threading.Lock) -> None:
    """The registry: models, versions, diff, promote/rollback/tag (recorded as the CLI records them), rollouts."""
    ws = state.ws

    @app.get("/api/models")
    def models() -> dict[str, Any]:
        return state.with_registry(views.models_view)

    @app.get("/api/models/{name}")
    def model(name: str) -> dict[str, Any]:
        return state.with_registry(lambda reg: views.model_view(reg, name))

    @app.get("/api/models/{name}/diff")
    def diff(name: str, a: str, b: str) -> dict[str, Any]:
        from tuneloop.registry.ops import diff_versions

        def build(reg):
            va, vb = views.check_version(reg, name, a), views.check_version(reg, name, b)
            return diff_versions(reg, va.ref, vb.ref)

        return state.with_registry(build)

    @app.get("/api/models/{name}/{version}")
    def version(name: str, version: str) -> dict[str, Any]:
        return state.with_registry(lambda reg: views.version_view(reg, ws, name, version))

    @app.post("/api/models/{name}/promote")
    async def promote(name: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        reason, alias = need_reason(body), str(body.get("alias") or "champion")

        def act(reg):
            v = views.check_version(reg, name, body.get("version", ""))
            with lock:
                done = reg.promote(v.model, v.version, alias=alias, reason=reason)
            return {
                "ok": True,
                "ref": done.ref,
                "aliases": reg.aliases(v.model),
                "event": views.event_row(reg.events(v.model)[-1]),
            }

        return await run_sync(lambda: state.with_registry(act, action=True))

    @app.post("/api/models/{name}/rollback")
    async def rollback(name: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        reason, alias = need_reason(body), str(body.get("alias") or "champion")

        def act(reg):
            model_name = views.check_model(reg, name)
            with lock:
                done = reg.rollback(model_name, alias=alias, reason=reason)
            return {
                "ok": True,
                "ref": done.ref,
                "aliases": reg.aliases(model_name),
                "event": views.event_row(reg.events(model_name)[-1]),
            }

        return await run_sync(lambda: state.with_registry(act, action=True))

    @app.post("/api/models/{name}/{version}/tag")
    async def tag(name: str, version: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        reason, key = need_reason(body), str(body.get("key") or "").strip()
        if not key or "=" in key:
            raise PanelError(400, "bad_request", "a tag needs a key (without '=')")

        def act(reg):
            v = views.check_version(reg, name, version)
            with lock:
                if body.get("remove"):
                    reg.remove_tag(v.model, v.version, key, reason=reason)
                else:
                    reg.set_tag(v.model, v.version, key, str(body.get("value") or ""), reason=reason)
            return {"ok": True, "ref": v.ref, "tags": dict(reg.get(v.model, v.version).tags)}

        return await run_sync(lambda: state.with_registry(act, action=True))

    @app.get("/api/rollouts/{name}")
    def rollouts(name: str) -> dict[str, Any]:
        from tuneloop.serve.dashboard import dashboard_data

        def build(reg):
            known = views.check_model(reg, name)
            data = dashboard_data(reg)
            entry = next((m for m in data["models"] if m["name"] == known), None)
            return {**(entry or {"name": known}), "generated_text": data.get("generated_text")}

        return state.with_registry(build)


def add_loop_routes(app: FastAPI, state: UiState) -> None:
    """Feedback, drift and feedback export."""

    @app.get("/api/feedback")
    def feedback(limit: int = 50) -> dict[str, Any]:
        try:
            rlog = state.request_log()
        except PanelError as exc:
            if exc.code != "request_log_missing":
                raise
            return {"feedback": [], "request_log": False}  # nothing served yet: an empty state, not an error
        with rlog:
            return {**views.feedback_view(rlog, limit=limit), "request_log": True}

    @app.get("/api/drift")
    def drift() -> dict[str, Any]:
        return state.last_drift()

    @app.post("/api/drift")
    async def drift_now() -> dict[str, Any]:
        return await run_sync(state.run_drift)

    @app.post("/api/feedback/export")
    async def export_now() -> dict[str, Any]:
        return await run_sync(state.run_export)


def add_launch_routes(app: FastAPI, state: UiState, launcher: Launcher) -> None:
    """Start a run: the configs, override checks, launches and their progress."""

    @app.get("/api/configs")
    def configs() -> dict[str, Any]:
        return {"configs": state.configs()}

    @app.post("/api/runs/validate")
    async def validate(request: Request) -> Response:
        config, overrides = await start_body(request, state)
        problems = await run_sync(lambda: check_overrides(config, overrides))
        if problems:
            return invalid(problems)
        return JSONResponse({"ok": True})

    @app.post("/api/runs/start")
    async def start(request: Request) -> Response:
        config, overrides = await start_body(request, state)
        problems = await run_sync(lambda: check_overrides(config, overrides))
        if problems:
            return invalid(problems)
        items_, _ = override_items(overrides)
        launch = launcher.start(config, items_)
        return JSONResponse({"ok": True, "launch_id": launch.launch_id, "pid": launch.pid})

    @app.get("/api/launches")
    def launches() -> dict[str, Any]:
        return {"launches": launcher.list()}

    @app.get("/api/launches/{launch_id}")
    def launch(launch_id: str) -> dict[str, Any]:
        found = launcher.get(launch_id)
        if found is None:
            raise PanelError(404, "not_found", f"no launch {launch_id!r} in this UI session")
        return launcher.view(found)


# ------------------------------------------------------------------------------------------------ pieces


def error_body(code: str, message: str, panel: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "code": code, "panel": panel}}


def panel_of(path: str) -> str | None:
    parts = [p for p in path.split("/") if p]
    return parts[1] if len(parts) > 1 and parts[0] == "api" else None


def invalid(problems: dict[str, str]):
    from fastapi.responses import JSONResponse

    body = error_body("invalid_overrides", "the config with these overrides is not valid; nothing was started", "start")
    body["error"]["fields"] = problems
    return JSONResponse(body, status_code=422)


async def run_sync(fn: Callable[[], Any]) -> Any:
    import anyio

    return await anyio.to_thread.run_sync(fn)


async def json_body(request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise PanelError(400, "bad_request", "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise PanelError(400, "bad_request", "the request body must be a JSON object")
    return body


def need_reason(body: dict[str, Any]) -> str:
    reason = str(body.get("reason") or "").strip()
    if not reason:
        raise PanelError(400, "bad_request", "give a reason: it is recorded in the registry's event log")
    return reason[:2000]


async def start_body(request, state: UiState) -> tuple[Path, dict[str, Any]]:
    body = await json_body(request)
    config = config_by_id(state.configs(), str(body.get("config", "")))
    if config is None:
        raise PanelError(404, "unknown_config", f"no config {body.get('config')!r}; pick one from the list")
    overrides = body.get("overrides") or {}
    if isinstance(overrides, list):  # [{"key", "value"}] as the form sends them
        overrides = {str(o.get("key", "")): o.get("value") for o in overrides if isinstance(o, dict)}
    if not isinstance(overrides, dict):
        raise PanelError(400, "bad_request", "overrides: an object {key: value}")
    return config, overrides


def _config_of(cfg: Any) -> Path | None:
    source = getattr(cfg, "_source", None) or getattr(cfg, "_config_path", None)
    return Path(source).resolve() if source else None


class Auth:
    """The gateway's rules for the UI (see the module docstring)."""

    def __init__(
        self,
        *,
        loopback: bool,
        api_keys: frozenset[str],
        admin_token: str | None,
        keys_env: str,
        admin_env: str,
        insecure: bool = False,
    ):
        self.loopback, self.api_keys, self.admin_token = loopback, api_keys, admin_token
        self.keys_env, self.admin_env = keys_env, admin_env
        self.open_reads = (
            insecure and not api_keys
        )  # serve.insecure without keys: reads open, as the gateway; actions still need the token

    def check(self, path: str, method: str, authorization: str) -> tuple[int, str, dict] | None:
        from tuneloop.serve.app import bearer, constant_time_in

        if self.loopback or not path.startswith("/api/"):
            return None
        token = bearer(authorization)
        if method not in ("GET", "HEAD"):
            if not self.admin_token:
                return (
                    403,
                    "admin_disabled",
                    error_body(
                        "admin_disabled",
                        "actions are off on a UI that is not on loopback until "
                        f"an admin token is set in ${self.admin_env}",
                        None,
                    ),
                )
            if not token or not constant_time_in(token, {self.admin_token}):
                return (
                    401,
                    "invalid_admin_token",
                    error_body(
                        "invalid_admin_token",
                        "this action needs the admin token "
                        "('Authorization: Bearer <admin token>'); nothing was changed",
                        None,
                    ),
                )
            return None
        if self.open_reads:
            return None
        allowed = self.api_keys | ({self.admin_token} if self.admin_token else set())
        if not token or not constant_time_in(token, allowed):
            return (
                401,
                "invalid_api_key",
                error_body(
                    "invalid_api_key",
                    f"missing or invalid API key; enter a key from ${self.keys_env} in the page's API key box",
                    None,
                ),
            )
        return None


class UiState:
    """The workspace, config and registry the routes share, and the actions' results kept in the workspace."""

    def __init__(self, ws: Workspace, cfg: Any, config_path: Path | None):
        self.ws, self.cfg, self.config_path = ws, cfg, config_path

    def configs(self) -> list[dict[str, str]]:
        return list_configs(self.config_path, self.ws.root)

    def registry(self):
        from tuneloop.registry.api import open_registry, registry_uri

        remote = registry_uri(self.cfg) not in (None, "local", "sqlite")
        if not remote:
            views.check_workspace(self.ws)
        try:
            return open_registry(self.cfg, self.ws.root)
        except Exception as exc:  # an unreadable database, an MLflow server that does not answer
            raise PanelError(503, "registry_unavailable", f"the registry cannot be read: {exc}") from None

    def with_registry(self, fn: Callable[[Any], Any], *, action: bool = False) -> Any:
        reg = self.registry()
        try:
            return fn(reg)
        except PanelError:
            raise
        except TuneloopError as exc:
            raise PanelError(409 if action else 400, "refused" if action else "bad_request", str(exc)) from None
        except Exception as exc:
            if action:
                raise
            raise PanelError(
                503, "registry_unavailable", f"the registry cannot be read: {type(exc).__name__}: {exc}"
            ) from None

    def loop_config(self):
        """The config given, else the resolved config of the newest run (as `tuneloop feedback export` does)."""
        if self.cfg is not None:
            return self.cfg
        from tuneloop.config import load_config

        for rid in views.run_ids(self.ws):
            f = self.ws.runs_dir / rid / "config.yaml"
            if f.is_file():
                try:
                    return load_config(f)
                except TuneloopError:
                    continue
        return None

    def request_log(self):
        from tuneloop.monitor.requestlog import default_log_url, open_request_log

        views.check_workspace(self.ws)
        cfg = self.cfg
        url = cfg.serve.request_log if cfg is not None and cfg.serve.request_log else default_log_url(self.ws.root)
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise PanelError(
                404, "request_log_missing", "no request log yet: `tuneloop serve` writes it as it answers requests"
            )
        try:
            return open_request_log(url)
        except Exception as exc:
            raise PanelError(503, "request_log_unavailable", f"the request log cannot be read: {exc}") from None

    def drift_file(self) -> Path:
        return self.ws.root / "ui" / "drift.json"

    def last_drift(self) -> dict[str, Any]:
        views.check_workspace(self.ws)
        f = self.drift_file()
        if not f.is_file():
            return {"result": None, "at": None}
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PanelError(422, "corrupt_drift_result", f"{f} cannot be read: {exc}; run the check again") from None

    def run_drift(self) -> dict[str, Any]:
        from tuneloop.fsutil import atomic_write_json, utcnow
        from tuneloop.monitor.drift import drift_from_log, training_prompts

        cfg = self.loop_config()
        if cfg is None:
            raise PanelError(
                400,
                "no_config",
                "no config: start the UI with the pipeline YAML (its data.train_data is the reference)",
            )
        d = cfg.drift
        with self.request_log() as rlog:
            try:
                result = drift_from_log(
                    rlog,
                    training_prompts(cfg.data.train_data),
                    alpha=d.alpha,
                    permutations=d.permutations,
                    min_auc=d.min_auc,
                    features=d.features,
                    max_per_side=d.max_per_side,
                )
            except TuneloopError as exc:
                raise PanelError(400, "drift_failed", str(exc)) from None
        out = {"result": {**result.to_dict(), "summary": result.summary()}, "at": utcnow()}
        self.drift_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.drift_file(), out)
        return out

    def run_export(self) -> dict[str, Any]:
        from tuneloop.feedback.export import eval_texts_for_config, export_feedback

        cfg = self.loop_config()
        out_dir = self.ws.root / "feedback-exports" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        with self.request_log() as rlog:
            try:
                result = export_feedback(
                    rlog, out_dir, eval_texts=eval_texts_for_config(cfg) if cfg is not None else None
                )
            except TuneloopError as exc:
                raise PanelError(400, "export_failed", str(exc)) from None
        return {
            "out_dir": str(result.out_dir),
            "sft_records": result.sft_records,
            "dpo_records": result.dpo_records,
            "kto_records": result.kto_records,
            "manifest": result.manifest,
        }
