"""The ``tuneloop`` command line: parse, call the library, map exceptions to exit codes.

Exit codes: 0 ok / all gates passed; 1 a stage failed or a gate blocked; 2 usage, config or input error
found before any work was done; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.errors import TuneloopError

app = typer.Typer(
    name="tuneloop",
    help="Fine-tuning as a gated loop: data -> train -> evaluation gates -> registry -> deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model registry: registered versions, their lineage, metrics and gates.", no_args_is_help=True)
app.add_typer(models_app, name="models")

err = Console(stderr=True)
out = Console()


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Turn tuneloop errors into a readable message and the right exit code."""
    try:
        yield
    except TuneloopError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; the workspace is consistent: run the same command again to resume")
        raise typer.Exit(130) from None


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With --json, stdout carries exactly one JSON document: everything else goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"{summary['pipeline']} — run {summary['run_id']}: {summary['overall'].upper()}")
    for col in ("stage", "status", "cached", "seconds", "key metrics / error"):
        t.add_column(col)
    keys = {
        "data_validation": ("records", "valid", "invalid", "duplicates"),
        "preprocessing": ("train_samples", "eval_samples", "truncated"),
        "training": ("steps", "final_loss", "resumed_from_step"),
        "evaluation": ("accuracy", "base_accuracy", "harmful_rate", "capability_drop"),
        "model_registry": ("model", "version"),
        "deployment": ("alias", "version"),
    }
    for name, st in summary["stages"].items():
        style = {"passed": "green", "failed": "red"}.get(st["status"], "dim")
        m = st.get("metrics", {})
        info = st["error"] or ", ".join(
            f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys.get(name, ()) if k in m
        )
        t.add_row(name, f"[{style}]{st['status']}[/]", "yes" if st.get("cached") else "", f"{st['duration_s']:.1f}", info)
    return t


def _workspace(config: Optional[Path]):
    from tuneloop.workspace import Workspace

    if config is not None:
        from tuneloop.config import load_config

        cfg = load_config(config)
        return Workspace.for_config(cfg), cfg
    return Workspace.find(), None


# ------------------------------------------------------------------------------------------------- run


@app.command()
def run(
    config: Path = typer.Argument(..., help="Pipeline YAML file."),
    override: list[str] = typer.Option([], "-o", "--override", help="Override a config key: -o train.learning_rate=1e-4 (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout (logs go to stderr)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Redo every stage instead of re-using cached results."),
) -> None:
    """Run the pipeline: data validation, preprocessing, training, evaluation gates, registry, deployment."""
    from tuneloop.config import load_config
    from tuneloop.pipeline import FineTunePipeline

    with _guard(), _stdout_to_stderr(json_out):
        cfg = load_config(config, override)
        pipe = FineTunePipeline(cfg, use_cache=not no_cache, console=err, config_path=str(config.resolve()))
        pipe.preflight()
        summary = pipe.run()
    if json_out:
        _print_json(summary)
    else:
        out.print(_summary_table(summary))
        out.print(f"report: {summary['run_dir']}/report.html")
    raise typer.Exit(0 if summary["overall"] == "passed" else 1)


# ------------------------------------------------------------------------------------------------ demo


@app.command()
def demo(
    workdir: Path = typer.Option(Path("tuneloop-demo"), "--workdir", help="Where to build the demo workspace."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout (logs go to stderr)."),
) -> None:
    """Build a self-contained demo (tiny base model made locally, data, config) and run the whole loop."""
    from tuneloop.demo import run_demo

    with _guard(), _stdout_to_stderr(json_out):
        summary = run_demo(workdir, console=err)
    if json_out:
        _print_json(summary)
    else:
        out.print(_summary_table(summary))
        d = summary.get("demo", {})
        if d.get("answer") is not None:
            out.print(f"served [bold]{d['model']}[/] at {d['url']}: asked {d['question']!r} -> [bold]{d['answer']!r}[/]")
        out.print(f"report: {summary['run_dir']}/report.html")
    raise typer.Exit(0 if summary["overall"] == "passed" else 1)


# ------------------------------------------------------------------------------------------------ eval


@app.command("eval")
def eval_cmd(
    config: Path = typer.Argument(..., help="Pipeline YAML file (its eval data, suites, gates and workspace)."),
    model: Optional[str] = typer.Option(None, "--model", help="Candidate: a model/adapter directory or a registry version (3, name:3, name@alias). Default: the latest candidate of the config's runs."),
    against: Optional[str] = typer.Option(None, "--against", help="base, champion, or a registry version (default: gates.against)."),
    override: list[str] = typer.Option([], "-o", "--override", help="Override a config key (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print the gate report as JSON on stdout (logs go to stderr)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML file (one testcase per gate)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown summary (for a CI comment)."),
) -> None:
    """Run only the evaluation gates: exit 0 when all pass, 1 when one blocks, 2 on bad input."""
    from tuneloop.config import load_config
    from tuneloop.evaluate.evaluation import run_eval
    from tuneloop.evaluate.reports import gate_line, junit_xml, markdown_summary
    from tuneloop.fsutil import atomic_write_text

    with _guard(), _stdout_to_stderr(json_out):
        cfg = load_config(config, override)
        report = run_eval(cfg, model=model, against=against, console=err)
        if junit:
            atomic_write_text(junit, junit_xml(report["gates"]))
        if markdown:
            atomic_write_text(markdown, markdown_summary(report["gates"], report["metrics"]))
    if json_out:
        _print_json(report)
    else:
        out.print(f"{report['model']} vs {report['against']}: [bold]{report['overall'].upper()}[/]")
        for name, g in report["gates"].items():
            style = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow"}.get(g.get("verdict"), "dim")
            out.print(f"[{style}]{gate_line(name, g)}[/]", highlight=False)
        out.print(f"audit records: {report['eval_dir']}/items.jsonl")
    raise typer.Exit(0 if report["overall"] == "passed" else 1)


# ---------------------------------------------------------------------------------------------- status


@app.command()
def status(
    run_id: Optional[str] = typer.Argument(None, help="A run id (or a unique prefix). Default: list recent runs."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Use this config's workspace instead of searching upwards."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Past runs, stage by stage."""
    from tuneloop.pipeline import list_runs, load_run

    with _guard():
        ws, _ = _workspace(config)
        if run_id is None:
            runs = list_runs(ws)
            if json_out:
                _print_json(runs)
                return
            t = Table(title=f"runs in {ws.root}")
            for col in ("run", "pipeline", "status", "started", "model version", "stages"):
                t.add_column(col)
            for r in runs:
                stages = " ".join(
                    {"passed": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]", "running": "[yellow]…[/]"}.get(s["status"], "·")
                    for s in r["stages"].values()
                )
                t.add_row(r["run_id"], r["pipeline"], r["status"], str(r["started_at"]), str(r.get("model_version") or ""), stages)
            out.print(t)
            return
        rec = load_run(ws, run_id)
        if json_out:
            _print_json(rec)
            return
        out.print(_summary_table({"pipeline": rec["pipeline"], "run_id": rec["run_id"], "overall": rec["status"], "stages": rec["stages"]}))
        out.print(f"run dir: {ws.run_dir(rec['run_id'])}")


# ---------------------------------------------------------------------------------------------- models


def _registry(config: Optional[Path]):
    from tuneloop.registry.db import Registry

    ws, _ = _workspace(config)
    return Registry(ws.root)


@models_app.command("list")
def models_list(
    name: Optional[str] = typer.Argument(None, help="Only this registered model."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Use this config's workspace."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Registered versions, newest first."""
    with _guard():
        versions = _registry(config).list_versions(name)
        if json_out:
            _print_json(versions)
            return
        t = Table(title="registered model versions")
        for col in ("version", "aliases", "created", "kind", "accuracy", "base", "artifact sha256"):
            t.add_column(col)
        for v in versions:
            acc = v.get("metrics", {}).get("evaluation", {}).get("accuracy")
            t.add_row(
                v["ref"], ", ".join(v.get("aliases", [])), v["created_at"], v["artifact_kind"],
                f"{acc:.3f}" if isinstance(acc, float) else "", v["base_model"], v["artifact_digest"][:16],
            )
        out.print(t)


@models_app.command("show")
def models_show(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS, or NAME (latest)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Use this config's workspace."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One version: lineage, metrics, gate results, artifact."""
    with _guard():
        reg = _registry(config)
        model, ref = reg.parse_ref(version)
        v = reg.get(model, ref)
        if json_out:
            _print_json(v)
            return
        out.print(f"[bold]{v['ref']}[/]  aliases: {', '.join(v.get('aliases', [])) or '-'}  created {v['created_at']}")
        out.print(f"artifact: {v['artifact_kind']} sha256 {v['artifact_digest']} at {v['artifact_path']}")
        lin = v["lineage"]
        out.print(f"base model: {v['base_model']}  ({lin.get('base_model_fingerprint', '')[:24]})")
        out.print(f"data: train {str(lin.get('data', {}).get('train_digest'))[:16]}  eval {str(lin.get('data', {}).get('eval_digest'))[:16]}")
        out.print(f"config hash {lin.get('config_hash', '')[:16]}  code {lin.get('code_version')}  run {lin.get('run_id')}")
        t = Table(title="gates")
        for col in ("gate", "value", "threshold", "verdict"):
            t.add_column(col)
        for name, g in v.get("gates", {}).items():
            verdict = {True: "[green]passed[/]", False: "[red]failed[/]", None: "not applied"}[g["passed"]]
            value = f"{g['value']:.4g}" if isinstance(g.get("value"), (int, float)) else "—"
            t.add_row(name, value, f"{g['op']} {g['threshold']}", g.get("verdict", verdict) if g["passed"] is not None else verdict)
        out.print(t)


# ----------------------------------------------------------------------------------------------- serve


@app.command()
def serve(
    config: Optional[Path] = typer.Argument(None, help="Pipeline YAML (its workspace and model name). Default: search upwards."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: deploy.port from the config, else 8000)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default: deploy.host, else 127.0.0.1)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registered model name (default: the config's, or the only one)."),
    version: str = typer.Option("champion", "--version", help="Version number or alias to serve."),
) -> None:
    """Serve a registered version (default: the champion) on an OpenAI-compatible API."""
    import uvicorn

    from tuneloop.errors import InputError
    from tuneloop.registry.db import Registry
    from tuneloop.serve.app import create_app, load_served_model

    with _guard():
        ws, cfg = _workspace(config)
        reg = Registry(ws.root)
        name = model or (cfg.model_name if cfg else None)
        if name is None:
            names = reg.models()
            if len(names) != 1:
                raise InputError(f"say which model to serve with --model; registered: {', '.join(names) or 'none'}")
            name = names[0]
        served = load_served_model(reg, name, version)
        host = host or (cfg.deploy.host if cfg else "127.0.0.1")
        port = port or (cfg.deploy.port if cfg else 8000)
        err.print(f"serving [bold]{served.model_id}[/] on http://{host}:{port}/v1 (OpenAI-compatible); Ctrl-C stops")
        uvicorn.run(create_app(served), host=host, port=port, log_level="info")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
