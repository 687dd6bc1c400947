"""`tuneloop data validate` and `tuneloop data diff`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import JustifyMethod
from rich.markup import escape
from rich.table import Table

from tuneloop.cli.common import exit_for, guard, out, print_json, stdout_to_stderr
from tuneloop.fsutil import format_number

app = typer.Typer(
    help="Datasets: validate (formats, rules, duplicates, contamination, PII, gates) and diff versions.",
    no_args_is_help=True,
)

_COUNTS = (
    "records",
    "valid",
    "invalid",
    "duplicates",
    "near_duplicates",
    "contaminated",
    "pii_dropped",
    "overlong_dropped",
)


@app.command("validate")
def validate(
    target: str = typer.Argument(
        ..., help="A dataset (file, directory, saved or named Hugging Face dataset) or a pipeline YAML."
    ),
    fmt: str | None = typer.Option(
        None,
        "--format",
        help="Record format instead of auto-detection: alpaca, sharegpt, messages, preference, kto, text.",
    ),
    eval_data: str | None = typer.Option(
        None, "--eval", help="Evaluation data to check the training data against (contamination)."
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Where to write the report JSON/HTML and the clean/quarantine files."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Check a dataset: format, per-record rules, duplicates, contamination, PII, data gates. Exit 1 when a gate fails."""
    from tuneloop.checks import validate_target  # train + eval splits of a config

    with guard(), stdout_to_stderr(json_out):
        rep = validate_target(target, fmt=fmt, out_dir=out_dir, eval_data=eval_data)
    if json_out:
        print_json(rep)
    else:
        _print_validation(rep)
    raise exit_for("passed" if rep["passed"] else "failed")


def _print_validation(rep: dict[str, Any]) -> None:
    for t in report_tables(rep, "train" if "eval" in rep else "dataset"):
        out.print(t)
    if "eval" in rep:
        for t in report_tables(rep["eval"], "eval"):
            out.print(t)
    if rep["rules_not_checked"]:
        out.print("not checked: " + "; ".join(f"{k} ({v})" for k, v in rep["rules_not_checked"].items()))
    out.print(rep["accounting"])
    for failure in rep["failures"]:  # first line: the gate; its problems are in the gates table above
        out.print(f"[red]{escape(failure.splitlines()[0])}[/]", highlight=False)
    out.print(f"report: {rep['html_path']}")


def report_tables(rep: dict[str, Any], title: str) -> list[Table]:
    """The counts, then (when there are any) rule findings, PII findings and data gates of one split."""
    t = Table(title=f"{title}: {rep['path']} ({rep['format']})")
    t.add_column("")
    t.add_column("records", justify="right")
    for k in _COUNTS:
        t.add_row(k, str(rep[k]))
    t.add_row("digest", rep["digest"][:16])
    tables = [t]
    if rep.get("sources"):  # data.train_data as a list of sources
        src = Table(title="sources (their weights apply in preprocessing)")
        columns: tuple[tuple[str, JustifyMethod], ...] = (("source", "left"), ("records", "right"), ("valid", "right"))
        for col, justify in columns:
            src.add_column(col, justify=justify)
        for row in rep["sources"]:
            src.add_row(escape(row["path"]), str(row["records"]), str(row["valid"]))
        tables.append(src)
    if rep["rules"]:
        r = Table(title="rules (records flagged; first examples)")
        for col in ("rule", "records", "examples"):
            r.add_column(col)
        for rule, n in rep["rules"].items():
            ex = "; ".join(
                f"{e['file'] + ' ' if e.get('file') else ''}{rep['position']} {e['line']}: {e['reason'][:70]}"
                for e in rep["examples"].get(rule, [])[:2]
            )
            r.add_row(rule, str(n), ex)
        tables.append(r)
    if rep["pii"]:
        p = Table(
            title=f"PII and secrets (policy {rep['pii_policy']}; {rep['pii_records']} records, {rep['pii_records_kept']} kept unredacted)"
        )
        for col in ("type", "found", "examples (masked)"):
            p.add_column(col)
        for kind, n in rep["pii"].items():
            p.add_row(kind, str(n), ", ".join(f"{e['line']}: {e['masked']}" for e in rep["pii_examples"].get(kind, [])))
        tables.append(p)
    if rep.get("gates"):
        tables.append(_gates_table(rep["gates"]))
    return tables


def _gates_table(gates: list[dict[str, Any]]) -> Table:
    """Data gates; reads both shapes: ``passed: bool`` today, ``verdict: PASS | FAIL`` (issue 10, item 5)."""
    g = Table(title="data gates")
    for col in ("gate", "value", "threshold", "verdict", "first problems (file:line: rule: reason)"):
        g.add_column(col)
    for gate in gates:
        passed = gate["verdict"] == "PASS" if "verdict" in gate else gate["passed"]
        verdict = "[green]passed[/]" if passed else "[red]failed[/]"
        shown = "" if passed else "\n".join(gate.get("problems") or [gate.get("detail", "")])
        g.add_row(
            gate["name"],
            format_number(float(gate["value"])),
            f"{gate['op']} {gate['threshold']}",
            verdict,
            escape(shown),
        )
    return g


@app.command("diff")
def diff(
    a: str = typer.Argument(..., help="The old dataset version."),
    b: str = typer.Argument(..., help="The new dataset version."),
    fmt: str = typer.Option("auto", "--format", help="Record format of both (default: detect)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Records added, removed and changed between two versions of a dataset (matched by id, else by prompt)."""
    from tuneloop.data.diff import diff_datasets

    with guard(), stdout_to_stderr(json_out):
        d = diff_datasets(a, b, fmt=fmt)
    if json_out:
        print_json(d)
        return
    out.print(
        f"{a} -> {b} (matched by {d['match']}): [green]+{d['added']} added[/], [red]-{d['removed']} removed[/], "
        f"[yellow]~{d['changed']} changed[/], {d['unchanged']} unchanged",
        soft_wrap=True,
        highlight=False,
    )
    for kind in ("added", "removed", "changed"):
        for e in d["examples"][kind]:
            if kind == "changed":
                out.print(f"  ~ {e['prompt'][:80]!r}: {e['before'][:60]!r} -> {e['after'][:60]!r}", highlight=False)
            else:
                out.print(
                    f"  {'+' if kind == 'added' else '-'} {e['prompt'][:80]!r} -> {e['answer'][:60]!r}", highlight=False
                )
