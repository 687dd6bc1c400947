"""`tuneloop eval`: only the evaluation gates, for a candidate against a reference."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import err, exit_for, guard, out, print_json, stdout_to_stderr

_VERDICT_STYLE = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow"}


def eval_cmd(
    config: Path = typer.Argument(..., help="Pipeline YAML file (its eval data, suites, gates and workspace)."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Candidate: a model/adapter directory or a registry version (3, name:3, name@alias). Default: the latest candidate of the config's runs.",
    ),
    against: str | None = typer.Option(
        None, "--against", help="base, champion, or a registry version (default: gates.against)."
    ),
    override: list[str] = typer.Option([], "-o", "--override", help="Override a config key (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print the gate report as JSON on stdout (logs go to stderr)."),
    junit: Path | None = typer.Option(None, "--junit", help="Write a JUnit XML file (one testcase per gate)."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Write a Markdown summary (for a CI comment)."),
) -> None:
    """Run only the evaluation gates: exit 0 when all pass, 1 when one blocks, 2 on bad input."""
    from tuneloop.checks import run_eval  # chooses candidate and reference
    from tuneloop.config import load_config
    from tuneloop.evaluate.reports import gate_line, junit_xml, markdown_summary
    from tuneloop.fsutil import atomic_write_text

    with guard(), stdout_to_stderr(json_out):
        report = run_eval(load_config(config, override), model=model, against=against, console=err)
        if junit:
            atomic_write_text(junit, junit_xml(report["gates"]))
        if markdown:
            atomic_write_text(markdown, markdown_summary(report["gates"], report["metrics"]))
    if json_out:
        print_json(report)
    else:
        out.print(f"{report['model']} vs {report['against']}: [bold]{report['overall'].upper()}[/]")
        for name, g in report["gates"].items():
            out.print(f"[{_VERDICT_STYLE.get(g.get('verdict'), 'dim')}]{gate_line(name, g)}[/]", highlight=False)
        out.print(f"audit records: {report['eval_dir']}/items.jsonl")
    raise exit_for(report["overall"])
