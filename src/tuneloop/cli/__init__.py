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
==================  ======================================================

Exit codes: 0 ok / all gates passed; 1 a stage failed or a gate blocked; 2 usage, config or input error
found before any work was done; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import typer

from tuneloop.cli import data, export, feedback, judge, models, rollout, run, serve
from tuneloop.cli.ci import ci
from tuneloop.cli.drift import drift
from tuneloop.cli.init import init
from tuneloop.cli.eval import eval_cmd
from tuneloop.cli.common import err, out

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


def main() -> None:
    app()
