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
from rich.markup import escape
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
data_app = typer.Typer(help="Datasets: validate (formats, rules, duplicates, contamination, PII, gates) and diff versions.", no_args_is_help=True)
app.add_typer(data_app, name="data")

err = Console(stderr=True)
out = Console()


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Turn tuneloop errors into a readable message and the right exit code."""
    try:
        yield
    except TuneloopError as exc:
        # escape: messages name things like `pip install 'tuneloop[lmeval]'` that rich would eat as markup
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
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


_CONFIG_OPT = typer.Option(None, "--config", "-c", help="Use this config's workspace (and its registry.uri).")
_WS_OPT = typer.Option(None, "--workspace", "-w", help="Workspace directory (default: search upwards for .tuneloop/).")
_REG_OPT = typer.Option(None, "--registry", help="Registry URI, e.g. http://mlflow:5000 (default: registry.uri, $TUNELOOP_REGISTRY_URI, else the local SQLite registry).")
_JSON_OPT = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")
_REASON_OPT = typer.Option("", "--reason", help="Why: recorded in the event log.")


def _registry(config: Optional[Path], workspace: Optional[Path] = None, registry: Optional[str] = None):
    """The registry a `models` command talks to: found like git finds a repository, or as given."""
    from tuneloop.errors import InputError
    from tuneloop.registry.api import open_registry, registry_uri
    from tuneloop.workspace import Workspace

    cfg = None
    if workspace is not None:
        ws = Workspace(workspace)
    elif config is not None:
        ws, cfg = _workspace(config)
    else:
        try:
            ws = Workspace.find()
        except InputError:
            if registry_uri(registry) is None:
                raise
            ws = None  # a remote registry needs no workspace; downloads go to the user cache
    return open_registry(registry or cfg, ws)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


@models_app.command("list")
def models_list(
    name: Optional[str] = typer.Argument(None, help="Only this registered model."),
    all_versions: bool = typer.Option(False, "--all", help="Include deleted versions."),
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Registered versions, oldest first (deleted ones only with --all)."""
    with _guard():
        reg = _registry(config, workspace, registry)
        versions = reg.list_versions(name, include_deleted=all_versions)
        if json_out:
            _print_json(versions)
            return
        t = Table(title=f"registered model versions ({reg.backend}: {reg.location})")
        for col in ("version", "aliases", "created", "kind", "accuracy", "base", "tags", "artifact sha256"):
            t.add_column(col)
        for v in versions:
            acc = v.get("metrics", {}).get("evaluation", {}).get("accuracy")
            ref = f"[dim strike]{v['ref']}[/] (deleted)" if v.get("deleted") else v["ref"]
            t.add_row(
                ref, ", ".join(v.get("aliases", [])), v["created_at"], v["artifact_kind"],
                f"{acc:.3f}" if isinstance(acc, float) else "", v["base_model"],
                ", ".join(f"{k}={val}" for k, val in v.get("tags", {}).items()), v["artifact_digest"][:16],
            )
        out.print(t)


@models_app.command("show")
def models_show(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS, or NAME (latest)."),
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """One version: lineage, metrics, gate results, tags, artifact."""
    with _guard():
        reg = _registry(config, workspace, registry)
        model, ref = reg.parse_ref(version)
        v = reg.get(model, ref)
        if json_out:
            _print_json(v)
            return
        out.print(f"[bold]{v['ref']}[/]  aliases: {', '.join(v.get('aliases', [])) or '-'}  created {v['created_at']}")
        if v.get("deleted"):
            d = v["deleted"]
            out.print(f"[red]deleted[/] {d['at']} by {d['actor']}: {d['reason'] or '(no reason given)'}")
        out.print(f"artifact: {v['artifact_kind']} sha256 {v['artifact_digest']} at {v.get('artifact_uri') or v['artifact_path']}")
        lin = v["lineage"]
        out.print(f"base model: {v['base_model']}  ({str(lin.get('base_model_fingerprint') or '')[:24]})")
        if lin.get("data"):
            out.print(f"data: train {str(lin['data'].get('train_digest'))[:16]}  eval {str(lin['data'].get('eval_digest'))[:16]}")
        out.print(f"config hash {str(lin.get('config_hash') or '')[:16]}  code {lin.get('code_version')}  run {lin.get('run_id')}")
        if lin.get("git"):
            g = lin["git"]
            out.print(f"git: {g.get('commit', '')[:12]} on {g.get('branch')}{' (dirty)' if g.get('dirty') else ''}")
        if v.get("tags"):
            out.print("tags: " + ", ".join(f"{k}={val}" for k, val in v["tags"].items()))
        if v.get("gates"):
            t = Table(title="gates")
            for col in ("gate", "value", "threshold", "verdict"):
                t.add_column(col)
            for name, g in v["gates"].items():
                verdict = {True: "[green]passed[/]", False: "[red]failed[/]", None: "not applied"}.get(g.get("passed"), str(g.get("passed")))
                if g.get("passed") is not None and g.get("verdict"):
                    verdict = g["verdict"] + (f" {g['interval']}" if g.get("interval") else "")
                t.add_row(name, _fmt(g.get("value")), f"{g.get('op', '')} {_fmt(g.get('threshold'))}", verdict)
            out.print(t)


@models_app.command("lineage")
def models_lineage(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS, or NAME (latest)."),
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Where a version came from: base model, data, config, code, run, metrics, gates and its event history."""
    from tuneloop.registry.ops import lineage_of

    with _guard():
        lin = lineage_of(_registry(config, workspace, registry), version)
        if json_out:
            _print_json(lin)
            return
        t = Table(title=f"lineage of {lin['ref']}", show_header=False)
        t.add_column("what", style="bold")
        t.add_column("value")
        base = lin["base_model"] or {}
        t.add_row("artifact", f"{lin['artifact']['kind']} sha256 {lin['artifact']['sha256']}")
        t.add_row("base model", f"{base.get('id')}  rev {base.get('revision') or '-'}  digest {str(base.get('digest') or '-')[:28]}")
        for k, val in (lin.get("data") or {}).items():
            t.add_row(f"data.{k}", _fmt(val))
        for key in ("run_id", "pipeline", "config_hash", "code_version", "source_path"):
            if lin.get(key):
                t.add_row(key, str(lin[key]))
        if lin.get("git"):
            g = lin["git"]
            t.add_row("git", f"{g.get('commit')} ({g.get('branch')}{', dirty' if g.get('dirty') else ''})")
        ev = lin["metrics"].get("evaluation", lin["metrics"]) if isinstance(lin["metrics"], dict) else {}
        for k, val in ev.items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                t.add_row(f"metric {k}", _fmt(val))
        for name, g in (lin.get("gates") or {}).items():
            t.add_row(f"gate {name}", {True: "passed", False: "failed", None: "not applied"}.get(g.get("passed"), "?"))
        out.print(t)
        e = Table(title="events")
        for col in ("when", "event", "who", "why", "details"):
            e.add_column(col)
        for ev_ in lin["events"]:
            e.add_row(ev_["at"], ev_["kind"], ev_["actor"], ev_["reason"], json.dumps(ev_["details"], sort_keys=True))
        out.print(e)


@models_app.command("promote")
def models_promote(
    version: str = typer.Argument(..., help="The version to promote: NAME:VERSION, NAME@ALIAS or NAME (latest)."),
    alias: str = typer.Option("champion", "--alias", help="Alias to move; the version it left is kept as `previous` (`<alias>-previous` for other aliases)."),
    reason: str = _REASON_OPT,
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Point an alias (default `champion`) at a version, keeping the old one as `previous`."""
    with _guard():
        reg = _registry(config, workspace, registry)
        model, ref = reg.parse_ref(version)
        v = reg.promote(model, ref, alias=alias, reason=reason)
        aliases = reg.aliases(model)
        if json_out:
            _print_json({"model": model, "alias": alias, "version": v["version"], "ref": v["ref"], "aliases": aliases})
            return
        out.print(f"[green]{model}@{alias}[/] -> {v['ref']}   aliases: " + ", ".join(f"{a}={n}" for a, n in aliases.items()))


@models_app.command("rollback")
def models_rollback(
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Option("champion", "--alias", help="Alias to roll back to its previous version."),
    reason: str = _REASON_OPT,
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Point an alias back at `previous`; the rolled-back version becomes `previous` (so twice round-trips)."""
    with _guard():
        reg = _registry(config, workspace, registry)
        v = reg.rollback(name, alias=alias, reason=reason)
        aliases = reg.aliases(name)
        if json_out:
            _print_json({"model": name, "alias": alias, "version": v["version"], "ref": v["ref"], "aliases": aliases})
            return
        out.print(f"[yellow]rolled back[/] {name}@{alias} -> {v['ref']}   aliases: " + ", ".join(f"{a}={n}" for a, n in aliases.items()))


@models_app.command("diff")
def models_diff(
    a: str = typer.Argument(..., help="First version ref."),
    b: str = typer.Argument(..., help="Second version ref."),
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Compare two versions: config key by key, data digests, metrics (with deltas), base, artifact, gates."""
    from tuneloop.registry.ops import diff_versions

    with _guard():
        d = diff_versions(_registry(config, workspace, registry), a, b)
        if json_out:
            _print_json(d)
            return
        out.print(f"[bold]{d['a']}[/] vs [bold]{d['b']}[/]   artifact {'same' if d['artifact']['same'] else 'different'}, "
                  f"base {'same' if d['base_model']['same_digest'] else 'different'}, config hash {'same' if d['config_hash']['same'] else 'different'}")
        for section in ("config", "data"):
            t = Table(title=f"{section} ({len(d[section])} difference(s))")
            for col in ("key", d["a"], d["b"]):
                t.add_column(col)
            for row in d[section]:
                t.add_row(row["key"], _fmt(row["a"]), _fmt(row["b"]))
            out.print(t)
        t = Table(title="metrics")
        for col in ("metric", d["a"], d["b"], "delta"):
            t.add_column(col)
        for row in d["metrics"]:
            t.add_row(row["key"], _fmt(row["a"]), _fmt(row["b"]), _fmt(row.get("delta")))
        out.print(t)
        if d["gates"]:
            out.print("gates: " + ", ".join(f"{g}: {v['a']} -> {v['b']}" for g, v in d["gates"].items()))


@models_app.command("tag")
def models_tag(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS or NAME (latest)."),
    tags: list[str] = typer.Argument(None, help="KEY=VALUE pairs to set."),
    remove: list[str] = typer.Option([], "--remove", help="Tag key to remove (repeatable)."),
    reason: str = _REASON_OPT,
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Set (KEY=VALUE) or remove (--remove KEY) tags on a version; each change is an event."""
    from tuneloop.errors import InputError

    with _guard():
        pairs = []
        for item in tags or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InputError(f"tag {item!r} is not KEY=VALUE (e.g. `tuneloop models tag bot:3 reviewed=yes`)")
            pairs.append((key, value))
        if not pairs and not remove:
            raise InputError("nothing to do: give KEY=VALUE pairs to set and/or --remove KEY")
        reg = _registry(config, workspace, registry)
        model, ref = reg.parse_ref(version)
        number = reg.get(model, ref)["version"]
        for key, value in pairs:
            reg.set_tag(model, number, key, value, reason=reason)
        for key in remove:
            reg.remove_tag(model, number, key, reason=reason)
        v = reg.get(model, number)
        if json_out:
            _print_json({"ref": v["ref"], "tags": v["tags"]})
            return
        out.print(f"{v['ref']} tags: " + (", ".join(f"{k}={val}" for k, val in v["tags"].items()) or "none"))


@models_app.command("delete")
def models_delete(
    version: str = typer.Argument(..., help="NAME:VERSION (or NAME@ALIAS)."),
    force: bool = typer.Option(False, "--force", help="Also remove aliases that point at the version."),
    reason: str = _REASON_OPT,
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Soft-delete a version: hidden from `list` (see --all), lineage kept, artifact freed once unreferenced."""
    with _guard():
        reg = _registry(config, workspace, registry)
        model, ref = reg.parse_ref(version)
        res = reg.delete(model, ref, force=force, reason=reason)
        if json_out:
            _print_json(res)
            return
        out.print(f"deleted {res['version']['ref']}"
                  + (f"; removed aliases {', '.join(res['removed_aliases'])}" if res["removed_aliases"] else "")
                  + (f"; freed artifact {res['collected'][0][:16]}" if res["collected"] else "; artifact kept (still referenced)"))


@models_app.command("register")
def models_register(
    path: Path = typer.Argument(..., help="A model (config.json) or PEFT adapter (adapter_config.json) directory with safetensors weights."),
    name: str = typer.Option(..., "--name", help="Registered model name."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of an adapter (default: base_model_name_or_path in its adapter_config.json)."),
    reason: str = _REASON_OPT,
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Register a model or adapter directory produced elsewhere as the next version of NAME."""
    from tuneloop.registry.ops import register_directory

    with _guard():
        v = register_directory(_registry(config, workspace, registry), path, name, base=base, reason=reason)
        if json_out:
            _print_json(v)
            return
        out.print(f"registered [bold]{v['ref']}[/] ({v['artifact_kind']}, sha256 {v['artifact_digest'][:16]}, base {v['base_model']})")


@models_app.command("export")
def models_export(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS or NAME (latest)."),
    out_dir: Path = typer.Argument(..., help="New directory to write (must not exist or be empty)."),
    merged: bool = typer.Option(False, "--merged", help="Merge a LoRA adapter into its base and save the full model."),
    config: Optional[Path] = _CONFIG_OPT,
    workspace: Optional[Path] = _WS_OPT,
    registry: Optional[str] = _REG_OPT,
    json_out: bool = _JSON_OPT,
) -> None:
    """Write a standard Hugging Face model/adapter directory (transformers, PEFT and vLLM load it directly)."""
    from tuneloop.registry.ops import export_version

    with _guard(), _stdout_to_stderr(json_out):
        res = export_version(_registry(config, workspace, registry), version, out_dir, merged=merged)
    if json_out:
        _print_json(res)
        return
    what = "a merged model" if merged else ("an adapter" if res["kind"] == "adapter" else "a model")
    out.print(f"exported {res['ref']} as {what} to {res['path']}")


@models_app.command("gc")
def models_gc(config: Optional[Path] = _CONFIG_OPT, workspace: Optional[Path] = _WS_OPT,
              registry: Optional[str] = _REG_OPT, json_out: bool = _JSON_OPT) -> None:
    """Remove temporary copies left by killed processes and artifacts no live version uses; report what was freed."""
    from tuneloop.registry.ops import gc

    with _guard():
        rep = gc(_registry(config, workspace, registry))
    if json_out:
        _print_json(rep.to_dict())
    else:
        out.print(rep.summary(), highlight=False)


@models_app.command("recover")
def models_recover(config: Optional[Path] = _CONFIG_OPT, workspace: Optional[Path] = _WS_OPT,
                   json_out: bool = _JSON_OPT) -> None:
    """Rebuild a lost (missing or empty) registry database from the version records in the artifact store."""
    from tuneloop.registry.ops import recover
    from tuneloop.workspace import Workspace

    with _guard():
        rep = recover(Workspace(workspace).root if workspace is not None else _workspace(config)[0].root)
    if json_out:
        _print_json(rep.to_dict())
    else:
        out.print(rep.summary(), highlight=False)


# ------------------------------------------------------------------------------------------------ data


def _data_report_tables(rep: dict[str, Any], title: str) -> list[Table]:
    t = Table(title=f"{title}: {rep['path']} ({rep['format']})")
    t.add_column("")
    t.add_column("records", justify="right")
    for k in ("records", "valid", "invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped", "overlong_dropped"):
        t.add_row(k, str(rep[k]))
    t.add_row("digest", rep["digest"][:16])
    tables = [t]
    if rep["rules"]:
        r = Table(title="rules (records flagged; first examples)")
        for col in ("rule", "records", "examples"):
            r.add_column(col)
        for rule, n in rep["rules"].items():
            ex = "; ".join(f"{rep['position']} {e['line']}: {e['reason'][:70]}" for e in rep["examples"].get(rule, [])[:2])
            r.add_row(rule, str(n), ex)
        tables.append(r)
    if rep["pii"]:
        p = Table(title=f"PII and secrets (policy {rep['pii_policy']}; {rep['pii_records']} records, {rep['pii_records_kept']} kept unredacted)")
        for col in ("type", "found", "examples (masked)"):
            p.add_column(col)
        for kind, n in rep["pii"].items():
            p.add_row(kind, str(n), ", ".join(f"{e['line']}: {e['masked']}" for e in rep["pii_examples"].get(kind, [])))
        tables.append(p)
    if rep.get("gates"):
        g = Table(title="data gates")
        for col in ("gate", "value", "threshold", "verdict"):
            g.add_column(col)
        for gate in rep["gates"]:
            verdict = "[green]passed[/]" if gate["passed"] else "[red]failed[/]"
            g.add_row(gate["name"], f"{gate['value']:.4g}", f"{gate['op']} {gate['threshold']}", verdict)
        tables.append(g)
    return tables


@data_app.command("validate")
def data_validate(
    target: str = typer.Argument(..., help="A dataset (file, directory, saved or named Hugging Face dataset) or a pipeline YAML."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Record format instead of auto-detection: alpaca, sharegpt, messages, preference, kto, text."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Evaluation data to check the training data against (contamination)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write the report JSON/HTML and the clean/quarantine files."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Check a dataset: format, per-record rules, duplicates, contamination, PII, data gates. Exit 1 when a gate fails."""
    from tuneloop.data.validate import validate_target

    with _guard(), _stdout_to_stderr(json_out):
        rep = validate_target(target, fmt=fmt, out_dir=out_dir, eval_data=eval_data)
    if json_out:
        _print_json(rep)
    else:
        for t in _data_report_tables(rep, "train" if "eval" in rep else "dataset"):
            out.print(t)
        if "eval" in rep:
            for t in _data_report_tables(rep["eval"], "eval"):
                out.print(t)
        if rep["rules_not_checked"]:
            out.print("not checked: " + "; ".join(f"{k} ({v})" for k, v in rep["rules_not_checked"].items()))
        out.print(rep["accounting"])
        for failure in rep["failures"]:
            out.print(f"[red]{failure}[/]", highlight=False)
        out.print(f"report: {rep['html_path']}")
    raise typer.Exit(0 if rep["passed"] else 1)


@data_app.command("diff")
def data_diff(
    a: str = typer.Argument(..., help="The old dataset version."),
    b: str = typer.Argument(..., help="The new dataset version."),
    fmt: str = typer.Option("auto", "--format", help="Record format of both (default: detect)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Records added, removed and changed between two versions of a dataset (matched by id, else by prompt)."""
    from tuneloop.data.diff import diff_datasets

    with _guard(), _stdout_to_stderr(json_out):
        d = diff_datasets(a, b, fmt=fmt)
    if json_out:
        _print_json(d)
        return
    out.print(f"{a} -> {b} (matched by {d['match']}): [green]+{d['added']} added[/], [red]-{d['removed']} removed[/], "
              f"[yellow]~{d['changed']} changed[/], {d['unchanged']} unchanged", soft_wrap=True, highlight=False)
    for kind in ("added", "removed", "changed"):
        for e in d["examples"][kind]:
            if kind == "changed":
                out.print(f"  ~ {e['prompt'][:80]!r}: {e['before'][:60]!r} -> {e['after'][:60]!r}", highlight=False)
            else:
                out.print(f"  {'+' if kind == 'added' else '-'} {e['prompt'][:80]!r} -> {e['answer'][:60]!r}", highlight=False)


# ----------------------------------------------------------------------------------------------- serve


@app.command("export-config")
def export_config(
    config: Path = typer.Argument(..., help="Pipeline YAML file."),
    to: str = typer.Option(..., "--to", help="Target tool: axolotl or llamafactory."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the YAML here (LLaMA-Factory: and dataset_info.json beside it) instead of stdout."),
) -> None:
    """Write the equivalent Axolotl or LLaMA-Factory training config for a tuneloop config."""
    with _guard():
        from tuneloop.config import load_config
        from tuneloop.train.external import export_config as export

        text = export(load_config(config), to, output)
        if output is None:
            sys.stdout.write(text)
        else:
            err.print(f"wrote {output}")


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
    from tuneloop.registry.api import open_registry
    from tuneloop.serve.app import create_app, load_served_model

    with _guard():
        ws, cfg = _workspace(config)
        reg = open_registry(cfg, ws)
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
