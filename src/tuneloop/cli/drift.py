"""`tuneloop drift`: production prompts (the request log) against the training prompts; exit 1 on drift."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import guard, out, print_json, stdout_to_stderr
from tuneloop.cli.feedback import CONFIG_ARGUMENT, SINCE_OPTION, loop_context, open_log
from tuneloop.errors import InputError


def drift(
    config: Path | None = CONFIG_ARGUMENT,
    since: str | None = SINCE_OPTION,
    features: str | None = typer.Option(None, "--features", help="hashed | embedding (default: drift.features)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Test whether production prompts drifted from the training prompts (domain-classifier AUC against a
    permutation threshold): exit 0 no drift, 1 drift (and a `drift` notification), 2 bad input."""
    from tuneloop.feedback.export import parse_since
    from tuneloop.monitor.drift import drift_from_log, training_prompts
    from tuneloop.rollout.notify import notifier_for

    with guard(), stdout_to_stderr(json_out):
        ws, cfg = loop_context(config)
        if cfg is None:
            raise InputError(
                f"no config given and no run in {ws.root}: pass the pipeline YAML (its data.train_data is the reference)"
            )
        if features not in (None, "hashed", "embedding"):
            raise InputError(f"--features {features!r}: use hashed or embedding")
        d, notifier = cfg.drift, notifier_for(cfg)
        with open_log(ws, cfg) as log:
            result = drift_from_log(
                log,
                training_prompts(cfg.data.train_data),
                parse_since(since),
                alpha=d.alpha,
                permutations=d.permutations,
                min_auc=d.min_auc,
                features=features or d.features,
                max_per_side=d.max_per_side,
            )
        if result.drifted:
            notifier.notify("drift", subject=cfg.model_name, message=result.summary(), details=result.to_dict())
        notifier.close(timeout=30.0)
    if json_out:
        print_json(result.to_dict())
    else:
        out.print(result.summary(), soft_wrap=True, highlight=False)
        for ex in result.examples[:5] if result.drifted else []:
            out.print(f"  {ex.score:.2f}  {ex.prompt[:100]!r}", soft_wrap=True, highlight=False, markup=False)
    raise typer.Exit(1 if result.drifted else 0)
