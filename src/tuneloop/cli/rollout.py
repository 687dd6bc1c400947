"""`tuneloop rollout ...`: start, watch, promote and abort canary rollouts (the logic is in rollout/controller.py).

Every command takes ``--config/-c``, ``--workspace/-w``, ``--registry`` and ``--json``. The gateway's ticks
decide a running rollout; these commands read and steer the state it shares through the registry.
``status --wait`` polls the registry and exits 0 when the candidate is promoted, 1 when it is rolled back or
aborted (or still running when ``--timeout`` passes), 2 for bad input.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from tuneloop.cli.common import (
    EXIT_BLOCKED,
    EXIT_OK,
    REASON_OPTION,
    RegistryOptions,
    err,
    guard,
    out,
    print_json,
    with_registry_options,
)
from tuneloop.errors import InputError

if TYPE_CHECKING:
    from tuneloop.registry.rollouts import Rollout

app = typer.Typer(
    help="Canary rollouts: a new version takes a share of traffic and is promoted or rolled back.", no_args_is_help=True
)


def _config(opts: RegistryOptions):
    if opts.config is None:
        return None
    from tuneloop.config import load_config

    return load_config(opts.config)


def _act(opts: RegistryOptions, cfg, action, target: str, **kwargs) -> Rollout:
    """Run a rollout action with the config's webhooks; queued notifications are delivered (or given up)
    before the command returns, also when the action fails."""
    from tuneloop.rollout.notify import notifier_for

    notifier = notifier_for(cfg)
    try:
        return action(opts.open(), target, notifier=notifier, **kwargs)
    finally:
        notifier.close(timeout=30)


@app.command("start")
@with_registry_options
def start(
    ref: str = typer.Argument(..., help="The candidate: NAME:VERSION, NAME@ALIAS or NAME (latest)."),
    reason: str = REASON_OPTION,
    *,
    opts: RegistryOptions,
) -> None:
    """Start a canary of REF against the champion with the config's `deploy.canary` policy (defaults without one)."""
    from tuneloop.rollout import controller

    with guard():
        cfg = _config(opts)
        policy = cfg.deploy.canary.policy_dict() if cfg is not None else None
        record = _act(opts, cfg, controller.start, ref, policy=policy, reason=reason)
        if opts.json_out:
            print_json(controller.shown(record))
            return
        out.print(
            f"[green]started[/] {record.rollout_id}: {record.candidate} takes {record.weight:.0%} of "
            f"traffic against {record.baseline}; the gateway (`tuneloop serve`) decides from here"
        )


@app.command("status")
@with_registry_options
def status(
    name: str | None = typer.Argument(None, help="Registered model name (default: every model's latest rollout)."),
    wait: bool = typer.Option(
        False, "--wait", help="Poll until the rollout ends: exit 0 promoted, 1 rolled back or aborted."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", min=0.0, help="With --wait: give up after this many seconds (exit 1)."
    ),
    interval: float = typer.Option(5.0, "--interval", min=0.01, help="With --wait: seconds between polls."),
    *,
    opts: RegistryOptions,
) -> None:
    """The running (else latest) rollout: weight, counts, recent decisions. `--wait` follows it to its end."""
    from tuneloop.rollout import controller

    with guard():
        reg = opts.open()
        if name is None:
            if wait:
                raise InputError("--wait needs a model NAME: `tuneloop rollout status NAME --wait`")
            found = [s for s in (controller.status(reg, m) for m in reg.models()) if s is not None]
            if opts.json_out:
                print_json(found)
            else:
                _print_list(found)
            return
        st = _rollout_status(reg, name)
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait and st["status"] == "running" and (deadline is None or time.monotonic() < deadline):
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            st = _rollout_status(reg, name)
        if opts.json_out:
            print_json(st)
        else:
            _print_status(st)
        if wait:
            if st["status"] == "running":
                err.print(f"{st['rollout_id']} is still running after {timeout:g} s (not promoted)")
            raise typer.Exit(EXIT_OK if st["status"] == "promoted" else EXIT_BLOCKED)


@app.command("promote")
@with_registry_options
def promote(
    name: str = typer.Argument(..., help="Registered model name."),
    reason: str = REASON_OPTION,
    *,
    opts: RegistryOptions,
) -> None:
    """Promote the running canary now (champion -> candidate, `previous` keeps the old champion)."""
    from tuneloop.rollout import controller

    with guard():
        record = _act(opts, _config(opts), controller.promote, name, reason=reason)
        if opts.json_out:
            print_json(controller.shown(record))
        else:
            out.print(
                f"[green]promoted[/] {record.candidate} to champion ({record.rollout_id}); "
                f"{record.baseline} is `previous`"
            )


@app.command("abort")
@with_registry_options
def abort(
    name: str = typer.Argument(..., help="Registered model name."),
    reason: str = typer.Option("", "--reason", help="Why (required): recorded and sent with the notification."),
    *,
    opts: RegistryOptions,
) -> None:
    """Stop the running canary now: the `canary` alias goes, the champion stays."""
    from tuneloop.rollout import controller

    with guard():
        record = _act(opts, _config(opts), controller.abort, name, reason=reason)
        if opts.json_out:
            print_json(controller.shown(record))
        else:
            out.print(f"[yellow]aborted[/] {record.rollout_id}: {record.baseline} stays champion")


def _print_list(found: list[dict]) -> None:
    from tuneloop.cli.tables import Col, print_table
    from tuneloop.fsutil import format_time
    from tuneloop.rollout.display import percent

    cols = [
        Col("rollout", whole=True),
        Col("candidate", whole=True),
        Col("baseline", drop=3, whole=True),
        Col("status"),
        Col("weight"),
        Col("canary requests", drop=2),
        Col("updated", drop=1),
    ]
    rows = [
        [
            s["rollout_id"],
            s["candidate"],
            s["baseline"],
            s["status"],
            percent(s["weight"]),
            str(s["analysis"]["canary_requests"]),
            format_time(s["updated_at"]),
        ]
        for s in found
    ]
    print_table(out, "rollouts", cols, rows, more="`tuneloop rollout status NAME` or --json")


def _rollout_status(reg, name: str) -> dict:
    from tuneloop.rollout import controller

    st = controller.status(reg, name)
    if st is None:
        raise InputError(f"{name} has never had a rollout; start one with `tuneloop rollout start {name}:VERSION`")
    return st


def _print_status(st: dict) -> None:
    """The rollout in words, its last decision's metrics (the same texts as the dashboard's, rollout/display.py)
    and its newest decisions."""
    from tuneloop.cli.tables import Col, fits_unwrapped, print_table
    from tuneloop.fsutil import format_time
    from tuneloop.rollout.display import METRIC_HEADERS, metric_cells, percent

    a = st["analysis"]
    out.print(
        f"[bold]{st['rollout_id']}[/]: {st['candidate']} against {st['baseline']}, [bold]{st['status']}[/], "
        f"weight {percent(st['weight'])} (steps {', '.join(percent(w) for w in a['weights'])}), alpha {a['alpha']}",
        highlight=False,
    )
    out.print(
        f"canary requests {a['canary_requests']}, baseline requests {a['baseline_requests']}, "
        f"{a['active_s']:.0f} s with traffic; started {format_time(st['started_at'])} by {st['actor']}",
        highlight=False,
    )
    last = st.get("last_decision")
    if last:
        out.print(f"last decision ({last['action']}): {last['reason']}", highlight=False)
        running = st["status"] == "running"
        rows = [metric_cells(m, s, running=running) for m, s in (last.get("metrics") or {}).items()]
        title = "metrics at the last decision"
        if fits_unwrapped(out, [Col(h) for h in METRIC_HEADERS], rows):
            print_table(out, title, [Col(h) for h in METRIC_HEADERS], rows)
        else:  # narrow (80 columns): one column per metric, one row per figure, so no number is split
            cols = [Col(""), *(Col(r[0], whole=True) for r in rows)]
            print_table(out, title, cols, [[h, *(r[i] for r in rows)] for i, h in enumerate(METRIC_HEADERS) if i])
    recent = st["decisions"][-5:]
    for e in recent:
        action = ((e["details"] or {}).get("decision") or {}).get("action", "")
        out.print(
            f"  {format_time(e['at'])}  {e['kind']:<17} {action:<9} {e['actor']}: {e['reason'] or '-'}", highlight=False
        )
