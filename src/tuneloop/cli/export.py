"""`tuneloop export-config`: the equivalent Axolotl or LLaMA-Factory config for a tuneloop config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tuneloop.cli.common import err, guard


def export_config(
    config: Path = typer.Argument(..., help="Pipeline YAML file."),
    to: str = typer.Option(..., "--to", help="Target tool: axolotl or llamafactory."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the YAML here (LLaMA-Factory: and dataset_info.json beside it) instead of stdout."),
) -> None:
    """Write the equivalent Axolotl or LLaMA-Factory training config for a tuneloop config."""
    with guard():
        from tuneloop.config import load_config
        from tuneloop.train.external import export_config as export

        text = export(load_config(config), to, output)
        if output is None:
            sys.stdout.write(text)
        else:
            err.print(f"wrote {output}")
