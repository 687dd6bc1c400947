"""`tuneloop ci`: the pipeline as a CI job (JUnit, Markdown, notifications; exit 0 passed, 1 blocked, 2 bad input)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tuneloop.cli.common import err, guard, out, print_json, stdout_to_stderr
from tuneloop.cli.run import summary_table


def ci(
    config: Path = typer.Argument(..., help="Pipeline YAML file."),
    override: list[str] = typer.Option(
        [], "-o", "--override", help="Override a config key: -o gates.min_accuracy=0.9 (repeatable)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the CI result as JSON on stdout (logs go to stderr)."),
) -> None:
    """Run the pipeline, write JUnit and Markdown (also into $GITHUB_STEP_SUMMARY), notify the webhooks, and
    say where the report is. Unchanged data and config do no work (stage cache)."""
    from tuneloop.ci import run_ci

    with guard(), stdout_to_stderr(json_out):
        result = run_ci(config, override, console=err)
    for n in result.notifications:
        if not n.ok:
            err.print(
                f"[yellow]warning:[/] {n.event} notification to {n.url} failed after {n.attempts} attempt(s): {n.error}"
            )
    if json_out:
        print_json(result.to_dict())
    else:
        out.print(summary_table(result.summary))
        for name in result.blocking:
            out.print(
                f"[red]blocked by {name}:[/] {escape(str(result.gates[name].get('reason', '')))}",
                soft_wrap=True,
                highlight=False,
            )
        out.print(
            f"JUnit: {result.junit_path}\nMarkdown: {result.markdown_path}\nreport: {result.report_path}",
            soft_wrap=True,
            highlight=False,
        )
    raise typer.Exit(result.exit_code)
