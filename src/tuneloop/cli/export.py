"""`tuneloop export-config`: the equivalent Axolotl or LLaMA-Factory config, or OpenRLHF command, for a tuneloop config."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tuneloop.cli.common import err, guard


def export_config(
    config: Path = typer.Argument(..., help="Pipeline YAML file."),
    to: str = typer.Option(
        ...,
        "--to",
        help="Target tool: axolotl, llamafactory or openrlhf (a `train:` snippet that runs OpenRLHF as train.command).",
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Write the YAML here (LLaMA-Factory: and dataset_info.json beside it) instead of stdout.",
    ),
) -> None:
    """Write the equivalent Axolotl or LLaMA-Factory training config, or the OpenRLHF command, for a tuneloop config."""
    with guard():
        from tuneloop.config import load_config
        from tuneloop.errors import ConfigError
        from tuneloop.fsutil import atomic_write_text
        from tuneloop.train.external import export_config as export
        from tuneloop.train.openrlhf import export_openrlhf

        if to not in ("axolotl", "llamafactory", "openrlhf"):
            raise ConfigError(f"--to {to!r}: expected axolotl, llamafactory or openrlhf")
        if to == "openrlhf":
            text = export_openrlhf(load_config(config))
            if output is not None:
                atomic_write_text(output, text)
        else:
            text = export(load_config(config), to, output)
        if output is None:
            sys.stdout.write(text)
        else:
            err.print(f"wrote {output}")
