"""`tuneloop models ...`: the model registry (versions, aliases, tags, lineage, import and export).

Every command here takes ``--config/-c``, ``--workspace/-w``, ``--registry`` and ``--json``, defined once
in :func:`tuneloop.cli.common.with_registry_options` and received as ``opts``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from tuneloop.cli.common import (
    REASON_OPTION,
    RegistryOptions,
    err,
    guard,
    out,
    print_json,
    stdout_to_stderr,
    with_registry_options,
)
from tuneloop.errors import InputError
from tuneloop.fsutil import format_number
from tuneloop.registry.records import ModelVersion

app = typer.Typer(
    help="The model registry: registered versions, their lineage, metrics and gates.", no_args_is_help=True
)

_PASSED = {True: "[green]passed[/]", False: "[red]failed[/]", None: "not applied"}


def _tags(tags: dict[str, str]) -> str:
    return ", ".join(f"{k}={val}" for k, val in tags.items())


@app.command("list")
@with_registry_options
def list_versions(
    name: str | None = typer.Argument(None, help="Only this registered model."),
    all_versions: bool = typer.Option(False, "--all", help="Include deleted versions."),
    *,
    opts: RegistryOptions,
) -> None:
    """Registered versions, oldest first (deleted ones only with --all)."""
    with guard():
        reg = opts.open()
        versions = reg.list_versions(name, include_deleted=all_versions)
        if opts.json_out:
            print_json([v.to_dict() for v in versions])
            return
        from tuneloop.cli.tables import Col, print_table
        from tuneloop.fsutil import format_time

        # At 80 columns (CI logs, pipes) refs and aliases stay whole; base, digest, created, kind go first.
        cols = [
            Col("version", whole=True),
            Col("aliases", want=len("champion, previous")),
            Col("created", drop=3),
            Col("kind", drop=4),
            Col("accuracy"),
            Col("base", drop=1),
            Col("tags", drop=5),
            Col("artifact sha256", drop=2, whole=True),
        ]
        rows = []
        for v in versions:
            acc = v.metrics.get("evaluation", {}).get("accuracy")
            ref = f"[dim strike]{v.ref}[/] (deleted)" if v.deleted else v.ref
            rows.append(
                [
                    ref,
                    ", ".join(v.aliases),
                    format_time(v.created_at),
                    v.artifact_kind,
                    f"{acc:.3f}" if isinstance(acc, float) else "",
                    v.base_model,
                    _tags(v.tags),
                    v.artifact_digest[:16],
                ]
            )
        print_table(
            out,
            f"registered model versions ({reg.backend}: {reg.location})",
            cols,
            rows,
            more="`tuneloop models show REF` or --json",
        )


@app.command("show")
@with_registry_options
def show(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS, or NAME (latest)."),
    *,
    opts: RegistryOptions,
) -> None:
    """One version: lineage, metrics, gate results, tags, artifact."""
    with guard():
        reg = opts.open()
        v = reg.get(*reg.parse_ref(version))
        if opts.json_out:
            print_json(v.to_dict())
        else:
            _print_version(v)


def _print_version(v: ModelVersion) -> None:
    out.print(f"[bold]{v.ref}[/]  aliases: {', '.join(v.aliases) or '-'}  created {v.created_at}")
    if v.deleted:
        d = v.deleted
        out.print(f"[red]deleted[/] {d['at']} by {d['actor']}: {d['reason'] or '(no reason given)'}")
    out.print(f"artifact: {v.artifact_kind} sha256 {v.artifact_digest} at {v.artifact_uri or v.artifact_path}")
    lin = v.lineage
    out.print(f"base model: {v.base_model}  ({str(lin.get('base_model_fingerprint') or '')[:24]})")
    if lin.get("data"):
        out.print(
            f"data: train {str(lin['data'].get('train_digest'))[:16]}  eval {str(lin['data'].get('eval_digest'))[:16]}"
        )
    out.print(
        f"config hash {str(lin.get('config_hash') or '')[:16]}  code {lin.get('code_version')}  run {lin.get('run_id')}"
    )
    if lin.get("git"):
        g = lin["git"]
        out.print(f"git: {g.get('commit', '')[:12]} on {g.get('branch')}{' (dirty)' if g.get('dirty') else ''}")
    if v.tags:
        out.print("tags: " + _tags(v.tags))
    if v.gates:
        t = Table(title="gates")
        for col in ("gate", "value", "threshold", "verdict"):
            t.add_column(col)
        for name, g in v.gates.items():
            verdict = _PASSED.get(g.get("passed"), str(g.get("passed")))
            if g.get("passed") is not None and g.get("verdict"):
                verdict = g["verdict"] + (f" {g['interval']}" if g.get("interval") else "")
            t.add_row(
                name, format_number(g.get("value")), f"{g.get('op', '')} {format_number(g.get('threshold'))}", verdict
            )
        out.print(t)


@app.command("lineage")
@with_registry_options
def lineage(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS, or NAME (latest)."),
    *,
    opts: RegistryOptions,
) -> None:
    """Where a version came from: base model, data, config, code, run, metrics, gates and its event history."""
    from tuneloop.registry.ops import lineage_of

    with guard():
        lin = lineage_of(opts.open(), version)
        if opts.json_out:
            print_json(lin)
            return
        out.print(_lineage_table(lin))
        e = Table(title="events")
        for col in ("when", "event", "who", "why", "details"):
            e.add_column(col)
        for ev in lin["events"]:
            e.add_row(ev["at"], ev["kind"], ev["actor"], ev["reason"], json.dumps(ev["details"], sort_keys=True))
        out.print(e)


def _lineage_table(lin: dict[str, Any]) -> Table:
    t = Table(title=f"lineage of {lin['ref']}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    base = lin["base_model"] or {}
    t.add_row("artifact", f"{lin['artifact']['kind']} sha256 {lin['artifact']['sha256']}")
    t.add_row(
        "base model",
        f"{base.get('id')}  rev {base.get('revision') or '-'}  digest {str(base.get('digest') or '-')[:28]}",
    )
    for k, val in (lin.get("data") or {}).items():
        t.add_row(f"data.{k}", format_number(val))
    for key in ("run_id", "pipeline", "config_hash", "code_version", "source_path"):
        if lin.get(key):
            t.add_row(key, str(lin[key]))
    if lin.get("git"):
        g = lin["git"]
        t.add_row("git", f"{g.get('commit')} ({g.get('branch')}{', dirty' if g.get('dirty') else ''})")
    ev = lin["metrics"].get("evaluation", lin["metrics"]) if isinstance(lin["metrics"], dict) else {}
    for k, val in ev.items():
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            t.add_row(f"metric {k}", format_number(val))
    for name, g in (lin.get("gates") or {}).items():
        t.add_row(f"gate {name}", {True: "passed", False: "failed", None: "not applied"}.get(g.get("passed"), "?"))
    return t


def _print_alias_move(
    model: str, alias: str, v: ModelVersion, aliases: dict[str, int], opts: RegistryOptions, how: str
) -> None:
    if opts.json_out:
        print_json({"model": model, "alias": alias, "version": v.version, "ref": v.ref, "aliases": aliases})
        return
    out.print(f"{how} -> {v.ref}   aliases: " + ", ".join(f"{a}={n}" for a, n in aliases.items()))


@app.command("promote")
@with_registry_options
def promote(
    version: str = typer.Argument(..., help="The version to promote: NAME:VERSION, NAME@ALIAS or NAME (latest)."),
    alias: str = typer.Option(
        "champion",
        "--alias",
        help="Alias to move; the version it left is kept as `previous` (`<alias>-previous` for other aliases).",
    ),
    reason: str = REASON_OPTION,
    *,
    opts: RegistryOptions,
) -> None:
    """Point an alias (default `champion`) at a version, keeping the old one as `previous`."""
    with guard():
        reg = opts.open()
        model, ref = reg.parse_ref(version)
        v = reg.promote(model, ref, alias=alias, reason=reason)
        _print_alias_move(model, alias, v, reg.aliases(model), opts, f"[green]{model}@{alias}[/]")


@app.command("rollback")
@with_registry_options
def rollback(
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Option("champion", "--alias", help="Alias to roll back to its previous version."),
    reason: str = REASON_OPTION,
    *,
    opts: RegistryOptions,
) -> None:
    """Point an alias back at `previous`; the rolled-back version becomes `previous` (so twice round-trips)."""
    with guard():
        reg = opts.open()
        v = reg.rollback(name, alias=alias, reason=reason)
        _print_alias_move(name, alias, v, reg.aliases(name), opts, f"[yellow]rolled back[/] {name}@{alias}")


@app.command("diff")
@with_registry_options
def diff(
    a: str = typer.Argument(..., help="First version ref."),
    b: str = typer.Argument(..., help="Second version ref."),
    *,
    opts: RegistryOptions,
) -> None:
    """Compare two versions: config key by key, data digests, metrics (with deltas), base, artifact, gates."""
    from tuneloop.registry.ops import diff_versions

    with guard():
        d = diff_versions(opts.open(), a, b)
        if opts.json_out:
            print_json(d)
        else:
            _print_diff(d)


def _print_diff(d: dict[str, Any]) -> None:
    same = {True: "same", False: "different"}
    out.print(
        f"[bold]{d['a']}[/] vs [bold]{d['b']}[/]   artifact {same[bool(d['artifact']['same'])]}, "
        f"base {same[bool(d['base_model']['same_digest'])]}, config hash {same[bool(d['config_hash']['same'])]}"
    )
    for section in ("config", "data"):
        t = Table(title=f"{section} ({len(d[section])} difference(s))")
        for col in ("key", d["a"], d["b"]):
            t.add_column(col)
        for row in d[section]:
            t.add_row(row["key"], format_number(row["a"]), format_number(row["b"]))
        out.print(t)
    t = Table(title="metrics")
    for col in ("metric", d["a"], d["b"], "delta"):
        t.add_column(col)
    for row in d["metrics"]:
        t.add_row(row["key"], format_number(row["a"]), format_number(row["b"]), format_number(row.get("delta")))
    out.print(t)
    if d["gates"]:
        out.print("gates: " + ", ".join(f"{g}: {v['a']} -> {v['b']}" for g, v in d["gates"].items()))


def _tag_pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"tag {item!r} is not KEY=VALUE (e.g. `tuneloop models tag bot:3 reviewed=yes`)")
        pairs.append((key, value))
    return pairs


@app.command("tag")
@with_registry_options
def tag(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS or NAME (latest)."),
    tags: list[str] = typer.Argument(None, help="KEY=VALUE pairs to set."),
    remove: list[str] = typer.Option([], "--remove", help="Tag key to remove (repeatable)."),
    reason: str = REASON_OPTION,
    *,
    opts: RegistryOptions,
) -> None:
    """Set (KEY=VALUE) or remove (--remove KEY) tags on a version; each change is an event."""
    with guard():
        pairs = _tag_pairs(tags or [])
        if not pairs and not remove:
            raise InputError("nothing to do: give KEY=VALUE pairs to set and/or --remove KEY")
        reg = opts.open()
        model, ref = reg.parse_ref(version)
        number = reg.get(model, ref).version
        for key, value in pairs:
            reg.set_tag(model, number, key, value, reason=reason)
        for key in remove:
            reg.remove_tag(model, number, key, reason=reason)
        v = reg.get(model, number)
        if opts.json_out:
            print_json({"ref": v.ref, "tags": v.tags})
            return
        out.print(f"{v.ref} tags: " + (_tags(v.tags) or "none"))


@app.command("delete")
@with_registry_options
def delete(
    version: str = typer.Argument(..., help="NAME:VERSION (or NAME@ALIAS)."),
    force: bool = typer.Option(False, "--force", help="Also remove aliases that point at the version."),
    reason: str = REASON_OPTION,
    *,
    opts: RegistryOptions,
) -> None:
    """Soft-delete a version: hidden from `list` (see --all), lineage kept, artifact freed once unreferenced."""
    with guard():
        reg = opts.open()
        model, ref = reg.parse_ref(version)
        res = reg.delete(model, ref, force=force, reason=reason)
        if opts.json_out:
            print_json(res)
            return
        out.print(
            f"deleted {res['version'].ref}"
            + (f"; removed aliases {', '.join(res['removed_aliases'])}" if res["removed_aliases"] else "")
            + (
                f"; freed artifact {res['collected'][0][:16]}"
                if res["collected"]
                else "; artifact kept (still referenced)"
            )
        )


@app.command("register")
@with_registry_options
def register(
    path: Path = typer.Argument(
        ..., help="A model (config.json) or PEFT adapter (adapter_config.json) directory with safetensors weights."
    ),
    name: str = typer.Option(..., "--name", help="Registered model name."),
    base: str | None = typer.Option(
        None, "--base", help="Base model of an adapter (default: base_model_name_or_path in its adapter_config.json)."
    ),
    reason: str = REASON_OPTION,
    *,
    opts: RegistryOptions,
) -> None:
    """Register a model or adapter directory produced elsewhere as the next version of NAME."""
    from tuneloop.registry.ops import register_directory

    with guard():
        v = register_directory(opts.open(), path, name, base=base, reason=reason)
        if opts.json_out:
            print_json(v.to_dict())
            return
        out.print(
            f"registered [bold]{v.ref}[/] ({v.artifact_kind}, sha256 {v.artifact_digest[:16]}, base {v.base_model})"
        )


@app.command("export")
@with_registry_options
def export(
    version: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS or NAME (latest)."),
    out_dir: Path = typer.Argument(..., help="New directory to write (must not exist or be empty)."),
    merged: bool = typer.Option(False, "--merged", help="Merge a LoRA adapter into its base and save the full model."),
    fmt: str = typer.Option(
        "hf",
        "--format",
        help="hf: a Hugging Face directory. gguf: one llama.cpp GGUF file (an adapter merged into its base; "
        "LlamaForCausalLM with a byte-level BPE tokenizer) and an Ollama Modelfile; needs `pip install 'tuneloop\\[gguf]'`.",
    ),
    quant: str | None = typer.Option(
        None,
        "--quant",
        help="GGUF weights: f16 (default; norms F32) or q8_0 (2-D weights whose rows are a multiple of 32).",
    ),
    *,
    opts: RegistryOptions,
) -> None:
    """Write a standard Hugging Face model/adapter directory (transformers, PEFT and vLLM load it directly), or with
    --format gguf one GGUF file for llama.cpp / Ollama plus a Modelfile (recorded as an `exported` event with its sha256)."""
    if fmt not in ("hf", "gguf"):
        with guard():
            raise InputError(f"--format {fmt!r} is not supported; choose hf or gguf")
    if fmt == "gguf":
        _export_gguf(version, out_dir, quant or "f16", opts)
        return
    if quant is not None:
        with guard():
            raise InputError("--quant applies to --format gguf only")
    from tuneloop.registry.ops import export_version

    with guard(), stdout_to_stderr(opts.json_out):
        res = export_version(opts.open(), version, out_dir, merged=merged)
    if opts.json_out:
        print_json(res)
        return
    what = "a merged model" if merged else ("an adapter" if res["kind"] == "adapter" else "a model")
    out.print(f"exported {res['ref']} as {what} to {res['path']}")


def _export_gguf(version: str, out_dir: Path, quant: str, opts: RegistryOptions) -> None:
    from tuneloop.registry.gguf_export import export_gguf

    with guard(), stdout_to_stderr(opts.json_out):
        res = export_gguf(opts.open(), version, out_dir, quant=quant)
    for w in res["warnings"]:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    if opts.json_out:
        print_json(res)
        return
    out.print(
        f"exported {res['ref']} as GGUF ({quant}, {res['bytes']:,} bytes, sha256 {res['sha256'][:16]}) "
        f"to {res['path']}: {', '.join(res['files'])}"
    )


@app.command("gc")
@with_registry_options
def gc(*, opts: RegistryOptions) -> None:
    """Remove temporary copies left by killed processes and artifacts no live version uses; report what was freed."""
    from tuneloop.registry.ops import gc as collect

    with guard():
        rep = collect(opts.open())
    print_json(rep.to_dict()) if opts.json_out else out.print(rep.summary(), highlight=False)


@app.command("recover")
@with_registry_options
def recover(*, opts: RegistryOptions) -> None:
    """Rebuild a lost (missing or empty) registry database from the version records in the artifact store."""
    from tuneloop.registry.ops import recover as rebuild

    with guard():
        rep = rebuild(opts.workspace_root())
    print_json(rep.to_dict()) if opts.json_out else out.print(rep.summary(), highlight=False)
