"""`tuneloop feedback export`: the request log and its feedback -> SFT records and DPO pairs.

Also the lookups the loop commands share (``drift`` uses them too): which workspace and config, and where
the workspace's request log is (:func:`request_log_url`, the one place that decides it).
"""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import err, guard, out, print_json, stdout_to_stderr, workspace_for
from tuneloop.errors import InputError

app = typer.Typer(help="Production feedback -> the next training set.", no_args_is_help=True)

CONFIG_ARGUMENT = typer.Argument(
    None, help="Pipeline YAML file (default: the config of the workspace's newest run, found upwards)."
)
SINCE_OPTION = typer.Option(
    None, "--since", help="Only requests since: a duration back (24h, 7d), an ISO time or unix seconds."
)


def loop_context(config: Path | None):
    """``(workspace, config)``: the config given, else the nearest workspace and the resolved config its
    newest run recorded (``None`` when it has no run)."""
    from tuneloop.config import load_config

    ws, cfg = workspace_for(config)
    if cfg is None:
        runs = sorted(ws.runs_dir.glob("*/config.yaml")) if ws.runs_dir.is_dir() else []
        cfg = load_config(runs[-1]) if runs else None
    return ws, cfg


def request_log_url(ws, cfg) -> str:
    """The request log the gateway writes for this workspace: ``serve.request_log``, else the workspace's."""
    from tuneloop.monitor.requestlog import default_log_url

    if cfg is not None and cfg.serve.request_log:
        return cfg.serve.request_log
    return default_log_url(ws.root)


def open_log(ws, cfg):
    """The workspace's request log; an ``InputError`` when the gateway has not written one yet."""
    from tuneloop.monitor.requestlog import open_request_log

    url = request_log_url(ws, cfg)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise InputError(
            f"no request log at {url.removeprefix('sqlite:///')}: `tuneloop serve` writes it as it answers requests"
        )
    return open_request_log(url)


@app.command("export")
def export(
    config: Path | None = CONFIG_ARGUMENT,
    out_dir: Path = typer.Option(..., "--out", help="Directory for sft.jsonl, dpo.jsonl, kto.jsonl and manifest.json."),
    since: str | None = SINCE_OPTION,
    regression_share: float = typer.Option(
        0.0, "--regression-share", help="Share of corrected failures held out for a regression eval suite (0-1)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the export summary as JSON on stdout."),
) -> None:
    """Turn logged requests and their feedback into SFT records, DPO pairs and KTO records (PII redacted,
    deduplicated, evaluation items kept out, provenance on every record)."""
    from tuneloop.feedback.export import eval_texts_for_config, export_feedback, parse_since

    with guard(), stdout_to_stderr(json_out):
        ws, cfg = loop_context(config)
        with open_log(ws, cfg) as log:
            result = export_feedback(
                log,
                out_dir,
                since=parse_since(since),
                regression_share=regression_share,
                eval_texts=eval_texts_for_config(cfg) if cfg is not None else None,
            )
    if json_out:
        print_json(result.to_dict())
        return
    if cfg is None:
        err.print(
            "[yellow]warning:[/] no config: the evaluation-set overlap check was skipped (pass the pipeline YAML)"
        )
    out.print(
        f"{result.sft_records} SFT records -> {result.sft_path}\n{result.dpo_records} DPO pairs -> {result.dpo_path}",
        soft_wrap=True,
        highlight=False,
    )
    kto = result.manifest["counts"]["kto"]
    out.print(
        f"{result.kto_records} KTO records ({kto['desirable']} desirable, {kto['undesirable']} undesirable) -> {result.kto_path}",
        soft_wrap=True,
        highlight=False,
    )
    if result.regression_path:
        out.print(
            f"{result.regression_added} regression items -> {result.regression_path}", soft_wrap=True, highlight=False
        )
    out.print(f"manifest (digests, provenance counts, drops): {result.manifest_path}", soft_wrap=True, highlight=False)
