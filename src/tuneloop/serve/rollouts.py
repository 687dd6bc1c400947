"""The gateway's part in canary rollouts: the loop that decides them and the admin API that steers them.

* :func:`rollout_loop` runs in the app's background: about once per router TTL it looks for running rollouts
  (started by the CLI, the pipeline or another replica); every ``watch_s`` it loads and probes the candidates
  of running rollouts (:meth:`Router.pending`) and marks them ready, so a candidate takes traffic only once the
  backend accepted it (a candidate the backend refuses is aborted, with the reason); every
  ``settings.rollout_tick_s`` (``deploy.canary.tick_interval_s``) it flushes the request recorder and calls
  ``rollout.controller.tick_running`` over the registry and the request log, then drops the router's cache of
  every model it decided, so a step, promote or rollback is routed at once. Several replicas sharing the
  registry and the request log (PostgreSQL) all tick; the registry's compare-and-set stores one decision.
* :func:`add_rollout_routes`: ``POST /admin/rollouts`` ``{"ref", "reason"}``, ``GET /admin/rollouts/{model}``,
  ``POST /admin/rollouts/{model}/promote`` ``{"reason"}`` and ``POST /admin/rollouts/{model}/abort``
  ``{"reason"}`` (required), thin over ``rollout.controller``; the admin token guards them (middleware).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import Request

from tuneloop.errors import InputError
from tuneloop.serve.errors import APIError, scrub_paths

log = logging.getLogger(__name__)

GATEWAY_ACTOR = "tuneloop-gateway"
ADMIN_ACTOR = "admin-api"


async def rollout_loop(gw, *, watch_s: float = 0.25) -> None:
    """Prepare waiting candidates every ``watch_s``; decide running rollouts every ``rollout_tick_s``."""
    preparing: dict[str, asyncio.Task] = {}
    last_tick = last_look = time.monotonic()
    try:
        while True:
            if time.monotonic() - last_look >= max(gw.router.ttl_s, watch_s):  # rollouts started elsewhere
                last_look = time.monotonic()
                await look_for_rollouts(gw)
            for ref in gw.router.pending():
                if ref not in preparing or preparing[ref].done():
                    preparing[ref] = asyncio.create_task(prepare_candidate(gw, ref))
            tick_s = gw.settings.rollout_tick_s
            if tick_s and gw.request_log is not None and time.monotonic() - last_tick >= tick_s:
                last_tick = time.monotonic()
                await run_tick(gw)
            await asyncio.sleep(watch_s)
    finally:
        for task in preparing.values():
            task.cancel()


async def run_tick(gw) -> dict:
    """One controller tick over every running rollout (the recorder flushed first, so counts are current)."""
    from tuneloop.rollout import controller

    try:
        incomplete = None
        if gw.recorder is not None:
            flushed = await asyncio.to_thread(gw.recorder.flush, 5.0)
            incomplete = gw.recorder.incomplete() or (
                None if flushed else "the request recorder's queue did not drain in 5 s"
            )
        decisions = await asyncio.to_thread(
            controller.tick_running, gw.router.registry, gw.request_log, notifier=gw.notifier, incomplete=incomplete
        )
    except Exception:  # a tick that failed (database down) is tried again next time; serving goes on
        log.exception("rollout tick failed")
        return {}
    for model, decision in decisions.items():
        if decision is None or decision.action != "continue":  # changed here or by another replica: at once
            gw.router.invalidate(model)  # (each decision is logged at INFO by rollout.controller.tick)
    await asyncio.to_thread(note_candidates, gw, decisions)  # reads the registry: never on the event loop
    return decisions


async def look_for_rollouts(gw) -> None:
    try:
        models = await asyncio.to_thread(gw.router.registry.models)
        await asyncio.to_thread(note_candidates, gw, models)
    except Exception:
        log.exception("looking for running rollouts failed")


def note_candidates(gw, models) -> None:
    """Ask the router to prepare the candidate of every listed model's running rollout."""
    for model in models:
        gw.router.watch(model)


async def prepare_candidate(gw, ref: str) -> None:
    """Load and probe a candidate before it takes traffic; abort its rollout when the backend refuses it."""
    from tuneloop.rollout import controller

    reg = gw.router.registry
    try:
        model, number = reg.parse_ref(ref)
        version = await asyncio.to_thread(reg.get, model, number)
        status = await gw.backend.prepare(version)
    except APIError as exc:
        reason = f"the gateway could not serve the candidate {ref}: {exc.message}"
        log.error("%s; aborting its rollout", reason)
        try:
            await asyncio.to_thread(
                controller.abort, reg, model, reason=reason, actor=GATEWAY_ACTOR, notifier=gw.notifier
            )
        except InputError:  # another replica ended it first
            pass
        gw.router.invalidate(model)
        return
    except Exception:
        log.exception("preparing the candidate %s failed; trying again", ref)
        return
    log.info("candidate %s ready (probes: %s); it takes its share of traffic now", ref, status.get("status"))
    gw.router.mark_ready(ref)


# ------------------------------------------------------------------------------------------------ admin API


def add_rollout_routes(app, gw) -> None:
    from fastapi.responses import JSONResponse

    from tuneloop.rollout import controller
    from tuneloop.serve.schemas import read_body

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await read_body(request.receive, gw.settings.max_body_bytes)
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise APIError(400, "the body must be a JSON object", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_value")
        return data

    @app.post("/admin/rollouts")
    async def start_rollout(request: Request):
        data = await body_of(request)
        ref = data.get("ref")
        if not isinstance(ref, str) or not ref.strip():
            raise APIError(400, 'give the candidate as {"ref": "name:3"}', code="invalid_value", param="ref")
        record = await steer(
            gw,
            lambda: controller.start(
                gw.router.registry,
                ref,
                policy=gw.settings.rollout_policy,
                notifier=gw.notifier,
                actor=ADMIN_ACTOR,
                reason=str(data.get("reason") or ""),
            ),
        )
        gw.router.invalidate(record.model)
        return JSONResponse(controller.shown(record), status_code=201)

    @app.get("/admin/rollouts/{model}")
    async def rollout_status(model: str) -> dict[str, Any]:
        st = await steer(gw, lambda: controller.status(gw.router.registry, model))
        if st is None:
            raise APIError(
                404, f"{model} has never had a rollout; start one with POST /admin/rollouts", code="no_rollout"
            )
        return st

    @app.post("/admin/rollouts/{model}/promote")
    async def promote_rollout(model: str, request: Request) -> dict[str, Any]:
        data = await body_of(request)
        record = await steer(
            gw,
            lambda: controller.promote(
                gw.router.registry, model, actor=ADMIN_ACTOR, reason=str(data.get("reason") or ""), notifier=gw.notifier
            ),
        )
        gw.router.invalidate(model)
        return controller.shown(record)

    @app.post("/admin/rollouts/{model}/abort")
    async def abort_rollout(model: str, request: Request) -> dict[str, Any]:
        data = await body_of(request)
        record = await steer(
            gw,
            lambda: controller.abort(
                gw.router.registry, model, reason=str(data.get("reason") or ""), actor=ADMIN_ACTOR, notifier=gw.notifier
            ),
        )
        gw.router.invalidate(model)
        return controller.shown(record)


async def steer(gw, action):
    """Run a controller action off the event loop; its refusals become API errors with its message."""
    from tuneloop.registry.rollouts import RolloutConflict

    try:
        return await asyncio.to_thread(action)
    except RolloutConflict as exc:
        raise APIError(409, scrub_paths(str(exc)), code="rollout_conflict") from None
    except InputError as exc:
        raise APIError(409 if "running" in str(exc) else 400, scrub_paths(str(exc)), code="rollout_refused") from None
