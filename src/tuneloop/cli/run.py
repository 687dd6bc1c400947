"""`tuneloop run`, `tuneloop demo` and `tuneloop status`: the pipeline, the demo, and past runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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
_STATUS_MARK = {"passed": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]", "running": "[yellow]…[/]"}


def summary_table(summary: dict[str, Any]) -> Table:
    """One row per stage: status, cached, seconds, and its key metrics (or its error)."""
    t = Table(title=f"{summary['pipeline']} — run {summary['run_id']}: {summary['overall'].upper()}")
    for col in ("stage", "status", "cached", "seconds", "key metrics / error"):
        t.add_column(col)
    for name, st in summary["stages"].items():
        style = _STATUS_STYLE.get(st["status"], "dim")
        m = st.get("metrics", {})
        info = st["error"] or ", ".join(f"{k}={format_number(m[k])}" for k in _KEY_METRICS.get(name, ()) if k in m)
        t.add_row(name, f"[{style}]{st['status']}[/]", "yes" if st.get("cached") else "", f"{st['duration_s']:.1f}", info)
    return t


def _print_summary(summary: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(summary)
        return
    out.print(summary_table(summary))
    d = summary.get("demo", {})
    if d.get("answer") is not None:
        out.print(f"served [bold]{d['model']}[/] at {d['url']}: asked {d['question']!r} -> [bold]{d['answer']!r}[/]")
    out.print(f"report: {summary['run_dir']}/report.html")


def run(
    config: Path = typer.Argument(..., help="Pipeline YAML file."),
    override: list[str] = typer.Option([], "-o", "--override", help="Override a config key: -o train.learning_rate=1e-4 (repeatable)."),
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
    quick: bool = typer.Option(False, "--quick", help="Iteration 1 only: train, gate, register, deploy and ask the gateway."),
    objective: str = typer.Option("sft", "--objective", help="Iteration 2's objective: sft (original data + the feedback's "
                                  "SFT records) or kto (the thumbs alone, continuing from iteration 1)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (logs go to stderr)."),
) -> None:
    """The closed loop on a tiny model made locally: iteration 1, simulated users with feedback on the gateway,
    drift, feedback export, iteration 2 on the original data plus the feedback, a 5% canary the analysis decides."""
    from tuneloop.demo import run_demo
    from tuneloop.demo_loop import run_loop

    with guard(), stdout_to_stderr(json_out):
        summary = run_demo(workdir, console=err) if quick else run_loop(workdir, console=err, objective=objective)
    if quick or json_out:
        _print_summary(summary, json_out)
    raise exit_for(summary["overall"])


def status(
    run_id: Optional[str] = typer.Argument(None, help="A run id (or a unique prefix). Default: list recent runs."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Use this config's workspace instead of searching upwards."),
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
                out.print(_runs_table(runs, ws.root))
            return
        rec = load_run(ws, run_id)
        if json_out:
            print_json(rec)
            return
        out.print(summary_table({"pipeline": rec["pipeline"], "run_id": rec["run_id"], "overall": rec["status"], "stages": rec["stages"]}))
        out.print(f"run dir: {ws.run_dir(rec['run_id'])}")


def _runs_table(runs: list[dict[str, Any]], root: Path) -> Table:
    t = Table(title=f"runs in {root}")
    for col in ("run", "pipeline", "status", "started", "model version", "stages"):
        t.add_column(col)
    for r in runs:
        stages = " ".join(_STATUS_MARK.get(s["status"], "·") for s in r["stages"].values())
        t.add_row(r["run_id"], r["pipeline"], r["status"], str(r["started_at"]), str(r.get("model_version") or ""), stages)
    return t
