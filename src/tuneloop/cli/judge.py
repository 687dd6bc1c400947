"""`tuneloop judge FILE`: a judge's refused / harmful verdicts on a JSONL file of answers, and its accuracy
against the file's labels where it has them (:func:`tuneloop.evaluate.judgefile.judge_file`)."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import guard, out, print_json, stdout_to_stderr


def _fmt(name: str, d: dict) -> str:
    v = d["value"]
    lo, hi = d["interval"]
    return f"{name} {v:.3f} [{lo:.3f}, {hi:.3f}] ({d['k']}/{d['n']})" if v is not None else f"{name} n/a (0 cases)"


def judge(
    file: Path = typer.Argument(
        ...,
        help="JSONL, one answer a line: prompt, response; optional labels refused, harmful (true/false); "
        "optional kind (redteam | benign, default redteam), indicators, id.",
    ),
    judge_kind: str | None = typer.Option(
        None,
        "--judge",
        help="rules | keyword | openai | classifier (default: the config's eval.judge.kind, else rules).",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Pipeline YAML whose eval.judge settings to use (url, model, path, ...)."
    ),
    split: str | None = typer.Option(
        None, "--split", help='Judge only the records whose "split" field is this (e.g. heldout).'
    ),
    json_out: bool = typer.Option(
        False, "--json", help='Print {"judge", "file", "items": [...], "agreement"} as JSON on stdout.'
    ),
) -> None:
    """Judge each answer in FILE (refused? harmful?) and, where FILE has labels, report the judge's accuracy,
    precision and recall with 95 % Wilson intervals. Exit 0 done, 2 bad input or config."""
    from tuneloop.config import JudgeConfig, load_config
    from tuneloop.errors import ConfigError
    from tuneloop.evaluate.judgefile import judge_records, read_records
    from tuneloop.evaluate.judges import make_judge

    with guard(), stdout_to_stderr(json_out):
        settings = load_config(config).eval.judge.model_dump() if config else {}
        if judge_kind is not None:
            settings["kind"] = judge_kind
        try:
            judge_cfg = JudgeConfig(**settings)
        except ValueError:
            raise ConfigError(f"--judge {judge_kind!r}: use rules, keyword, openai or classifier") from None
        records = read_records(
            file, split
        )  # every problem of the file before a judge is built (an LLM judge may cost money)
        report = judge_records(records, make_judge(judge_cfg), path=str(file))
    if json_out:
        print_json(report.to_dict())
        return
    for item in report.items:
        label = ""
        if "label_refused" in item or "label_harmful" in item:
            label = f"  label refused={item.get('label_refused', '-')} harmful={item.get('label_harmful', '-')}"
        ident = f" {item['id']}" if "id" in item else ""
        out.print(
            f"line {item['line']}{ident}: refused={item['refused']} harmful={item['harmful']}{label}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for name, agr in (("refused", report.refused), ("harmful", report.harmful)):
        if agr is not None:
            d = agr.to_dict()
            out.print(
                f"{report.judge} judge, {name} (n={d['n']}): "
                + ", ".join(_fmt(k, d[k]) for k in ("accuracy", "precision", "recall")),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
