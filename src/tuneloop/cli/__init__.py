"""The ``tuneloop`` command line: one module per command group; each command parses, calls the library and
maps exceptions to exit codes (:mod:`tuneloop.cli.common`).

==================  ======================================================
``cli/run.py``      ``run``, ``demo``, ``status``
``cli/eval.py``     ``eval``
``cli/judge.py``    ``judge``
``cli/models.py``   ``models list|show|lineage|promote|rollback|diff|tag|delete|register|export``
``cli/data.py``     ``data validate|diff``
``cli/export.py``   ``export-config``
``cli/serve.py``    ``serve``
``cli/feedback.py`` ``feedback export``
``cli/drift.py``    ``drift``
``cli/init.py``     ``init``
``cli/ci.py``       ``ci``
``cli/rollout.py``  ``rollout start|status|promote|abort``
``cli/ui.py``       ``ui``
==================  ======================================================

Exit codes: 0 ok / all gates passed; 1 a stage failed or a gate blocked; 2 usage, config or input error
found before any work was done; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import typer
from typer.core import TyperCommand, TyperGroup

from tuneloop.cli import data, export, feedback, judge, models, rollout, run, serve, ui
from tuneloop.cli.ci import ci
from tuneloop.cli.common import err, out
from tuneloop.cli.drift import drift
from tuneloop.cli.eval import eval_cmd
from tuneloop.cli.init import init

__all__ = ["app", "err", "main", "out"]

app = typer.Typer(
    name="tuneloop",
    help="Fine-tuning as a gated loop: data -> train -> evaluation gates -> registry -> deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(run.run)
app.command("demo")(run.demo)
app.command("eval")(eval_cmd)
app.command("judge")(judge.judge)
app.command("status")(run.status)
app.command("export-config")(export.export_config)
app.command("serve")(serve.serve)
app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.add_typer(feedback.app, name="feedback")
app.command("drift")(drift)
app.command("init")(init)
app.command("ci")(ci)
app.add_typer(rollout.app, name="rollout")
app.command("ui")(ui.ui)


def _flags_take_no_value(command, ctx) -> None:
    """Typer's rich help prints a boolean flag as ``--quick <bool>``, as if it took a value (typer 0.29's
    ``display_type_rich`` ignores ``is_flag``; its plain help does not): an empty metavar leaves the type blank."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class _Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        _flags_take_no_value(self, ctx)
        super().format_help(ctx, formatter)


class _Group(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        _flags_take_no_value(self, ctx)
        super().format_help(ctx, formatter)


def _use_flag_aware_help(typer_app: typer.Typer) -> None:
    """Every command and group of ``typer_app`` (and of its sub-apps) gets the help classes above."""
    typer_app.info.cls = _Group
    for command in typer_app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = _Command
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _use_flag_aware_help(group.typer_instance)


_use_flag_aware_help(app)


def main() -> None:
    app()
