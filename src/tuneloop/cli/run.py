"""`tuneloop run`, `tuneloop demo` and `tuneloop status`: the pipeline, the demo, and past runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tuneloop.cli.common import err, exit_for, guard, out, print_json, stdout_to_stderr, workspace_for
from tuneloop.fsutil import format_number

# The metrics each stage shows in the summary table.
_KEY_METRICS = {
    "data_validation": ("records", "valid", "invalid", "duplicates"),
    "preprocessing": ("train_samples", "eval_samples", "truncated"),
    "training": ("steps", "final_loss", "resumed_from_step"),
    "evaluation": ("accuracy", "base_accuracy", "harmful_rate", "capability_drop"),
    "model_registry": ("model", "version"),
    "deployment": ("alias", "version"),
}
_STATUS_STYLE = {"passed": "green", "failed": "red"}


def _metric_label(key: str, metrics: dict[str, Any]) -> str:
    """``base_accuracy`` measures the comparison model: say ``champion_accuracy`` when that was the champion."""
    against = str(metrics.get("against") or "base")
    if key.startswith("base_") and not against.startswith("base"):
        return against.split()[0] + key[len("base") :]
    return key


def summary_table(summary: dict[str, Any], lang: str = "en") -> Table:
    """One row per stage: status, cached, seconds, and its key metrics (or its error). ``lang``: ``en`` or ``zh``
    (:mod:`tuneloop.i18n`; stage names, metric keys and numbers are the same in both)."""
    from tuneloop.i18n import msg, word

    overall = (
        msg(lang, f"overall.{summary['overall']}")
        if summary["overall"] in ("passed", "failed")
        else summary["overall"].upper()
    )
    t = Table(title=msg(lang, "table.title", pipeline=summary["pipeline"], run_id=summary["run_id"], overall=overall))
    for key in ("table.stage", "table.status", "table.cached", "table.seconds", "table.info"):
        t.add_column(msg(lang, key))
    for name, st in summary["stages"].items():
        style = _STATUS_STYLE.get(st["status"], "dim")
        m = st.get("metrics", {})
        info = st["error"] or ", ".join(
            f"{_metric_label(k, m)}={format_number(m[k])}" for k in _KEY_METRICS.get(name, ()) if k in m
        )
        t.add_row(
            name,
            f"[{style}]{word(lang, 'status', st['status'])}[/]",
            msg(lang, "table.yes") if st.get("cached") else "",
            f"{st['duration_s']:.1f}",
            info,
        )
    return t


def print_demo_end(console, summary: dict[str, Any], *, quick: bool, lang: str = "en", table: bool = True) -> None:
    """How `tuneloop demo` ends: (``--quick``) the stage table and the champion's first answer, then the time and
    the last run's report.html. ``table``: false with ``--json`` (stdout holds the JSON alone; this goes to stderr)."""
    from tuneloop.i18n import msg

    if quick and table:
        console.print(summary_table(summary, lang))
        d = summary.get("demo", {})
        if d.get("answer") is not None:
            console.print(
                msg(
                    lang,
                    "served",
                    model=d["model"],
                    url=d["url"],
                    question=repr(d["question"]),
                    answer=repr(d["answer"]),
                )
            )
    seconds = summary["demo"]["total_seconds"] if quick else summary.get("seconds")
    report = f"{summary['run_dir']}/report.html" if quick else summary.get("report")
    console.print(msg(lang, "finished", seconds=f"{seconds:.0f}"), highlight=False)
    if report:
        console.print(msg(lang, "report", path=report), highlight=False, soft_wrap=True)  # a path stays whole


def _print_summary(summary: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(summary)
        return
    out.print(summary_table(summary))
    d = summary.get("demo", {})
    if d.get("answer") is not None:
        out.print(f"served [bold]{d['model']}[/] at {d['url']}: asked {d['question']!r} -> [bold]{d['answer']!r}[/]")
    out.print(f"report: {summary['run_dir']}/report.html", highlight=False, soft_wrap=True)  # a path stays whole


def run(
    config: Path = typer.Argument(..., help="Pipeline YAML file."),
    override: list[str] = typer.Option(
        [], "-o", "--override", help="Override a config key: -o train.learning_rate=1e-4 (repeatable)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout (logs go to stderr)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Redo every stage instead of re-using cached results."),
) -> None:
    """Run the pipeline: data validation, preprocessing, training, evaluation gates, registry, deployment."""
    from tuneloop.config import load_config
    from tuneloop.pipeline import FineTunePipeline

    with guard(), stdout_to_stderr(json_out):
        cfg = load_config(config, override)
        pipe = FineTunePipeline(cfg, use_cache=not no_cache, console=err, config_path=str(config.resolve()))
        pipe.preflight()
        summary = pipe.run()
    _print_summary(summary, json_out)
    raise exit_for(summary["overall"])


def demo(
    workdir: Path = typer.Option(Path("tuneloop-demo"), "--workdir", help="Where to build the demo workspace."),
    quick: bool = typer.Option(
        False, "--quick", help="Iteration 1 only: train, gate, register, deploy and ask the gateway."
    ),
    objective: str = typer.Option(
        "sft",
        "--objective",
        help="Iteration 2's objective: sft (original data + the feedback's "
        "SFT records) or kto (the thumbs alone, continuing from iteration 1).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (logs go to stderr)."),
    lang: str | None = typer.Option(
        None,
        "--lang",
        help="Language of the printed summary: en or zh (Simplified "
        "Chinese). Default: zh when LC_ALL / LC_MESSAGES / LANG starts with zh, else en. "
        "Logs, errors and the --json document stay in English.",
    ),
) -> None:
    """The closed loop on a tiny model shipped in the package: iteration 1, simulated users with feedback on the
    gateway, drift, feedback export, iteration 2 on the original data plus the feedback, a 5% canary the analysis
    decides. Ends with the time and the last run's report.html."""
    from tuneloop.demo.loop import run_loop
    from tuneloop.demo.quick import run_demo
    from tuneloop.errors import InputError
    from tuneloop.i18n import resolve_lang

    with guard(), stdout_to_stderr(json_out):
        try:
            language = resolve_lang(lang)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        summary = (
            run_demo(workdir, console=err, lang=language)
            if quick
            else run_loop(workdir, console=err, objective=objective, lang=language)
        )
    if json_out:
        print_json(summary)
    end = err if json_out else out  # with --json, stdout holds the JSON document alone
    print_demo_end(end, summary, quick=quick, lang=language, table=not json_out)
    raise exit_for(summary["overall"])


def status(
    run_id: str | None = typer.Argument(None, help="A run id (or a unique prefix). Default: list recent runs."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Use this config's workspace instead of searching upwards."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Past runs, stage by stage."""
    from tuneloop.runs import list_runs, load_run

    with guard():
        ws, _ = workspace_for(config)
        if run_id is None:
            runs = list_runs(ws)
            if json_out:
                print_json(runs)
            else:
                print_runs(runs, ws.root)
            return
        rec = load_run(ws, run_id)
        if json_out:
            print_json(rec)
            return
        out.print(
            summary_table(
                {
                    "pipeline": rec["pipeline"],
                    "run_id": rec["run_id"],
                    "overall": rec["status"],
                    "stages": rec["stages"],
                }
            )
        )
        out.print(f"run dir: {ws.run_dir(rec['run_id'])}", highlight=False, soft_wrap=True)


_STAGE_SHORT = {
    "data_validation": "data",
    "preprocessing": "prep",
    "training": "train",
    "evaluation": "eval",
    "model_registry": "registry",
    "deployment": "deploy",
}
_PLAIN_MARK = {"passed": "✓", "failed": "✗", "skipped": "-", "running": "▶", "pending": "·"}
_MARK_STYLE = {"passed": "green", "failed": "red", "running": "yellow"}
STAGE_LEGEND = (
    "stages: data = data_validation, prep = preprocessing, train = training, eval = evaluation, registry = "
    "model_registry, deploy = deployment; ✓ passed, ✗ failed, - skipped, ▶ running, · pending"
)


def stages_cell(stages: dict[str, Any]) -> str:
    """A run's stages with their short names, grouped by status: ``✓ all 6 passed``, or
    ``✓ data prep train ✗ eval - registry deploy``."""
    statuses = [st.get("status", "pending") for st in stages.values()]
    if statuses and all(s == "passed" for s in statuses):
        return f"[green]✓[/] all {len(statuses)} passed"
    groups: list[tuple[str, list[str]]] = []
    for name, status in zip(stages, statuses, strict=True):
        if not groups or groups[-1][0] != status:
            groups.append((status, []))
        groups[-1][1].append(_STAGE_SHORT.get(name, name))
    parts = []
    for status, names in groups:
        mark = _PLAIN_MARK.get(status, "·")
        style = _MARK_STYLE.get(status)
        parts.append((f"[{style}]{mark}[/]" if style else mark) + " " + " ".join(names))
    return " ".join(parts)


def print_runs(runs: list[dict[str, Any]], root: Path) -> None:
    """The runs of a workspace, newest first; run ids and model versions whole at any width (CI logs: 80 columns)."""
    from tuneloop.cli.tables import Col, print_table
    from tuneloop.fsutil import format_time

    cols = [
        Col("run", whole=True),
        Col("pipeline", drop=2, whole=True),
        Col("status"),
        Col("started", drop=1),
        Col("model version", whole=True),
        Col("stages", want=len("✓ all 6 passed")),
    ]
    rows = [
        [
            r["run_id"],
            r["pipeline"],
            r["status"],
            format_time(r.get("started_at")),
            str(r.get("model_version") or ""),
            stages_cell(r["stages"]),
        ]
        for r in runs
    ]
    every_passed = all(all(st.get("status") == "passed" for st in r["stages"].values()) for r in runs)
    print_table(
        out, f"runs in {root}, newest first", cols, rows, caption=None if every_passed else STAGE_LEGEND, more="--json"
    )
