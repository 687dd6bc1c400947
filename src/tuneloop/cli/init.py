"""`tuneloop init`: a starter config and a CI workflow (GitHub Actions or GitLab CI)."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import guard, out


def init(
    directory: Path = typer.Argument(Path("."), help="Project directory (created if missing)."),
    ci: str = typer.Option("github", "--ci", help="CI system: github | gitlab."),
    name: str | None = typer.Option(
        None, "--name", help="Pipeline and registered model name (default: from the directory name)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Write tuneloop.yaml and a workflow that runs `tuneloop ci` on pushes touching the data or the config."""
    from tuneloop.scaffold import init_project

    with guard():
        written = init_project(directory, ci, force=force, name=name)
    for path in written:
        out.print(f"wrote {path}", soft_wrap=True, highlight=False)
    out.print("next: put your data in data/train.jsonl and data/eval.jsonl, then `tuneloop run tuneloop.yaml`")
