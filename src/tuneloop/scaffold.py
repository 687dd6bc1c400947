"""``tuneloop init``: a starter config and a CI workflow for the gated loop.

Entry point: ``init_project(directory, ci="github" | "gitlab", force=False, name=None)``. It writes

- ``tuneloop.yaml``: a starter pipeline config (valid for ``load_config``; the data paths it names are
  the user's to fill);
- ``.github/workflows/tuneloop.yml`` (GitHub Actions) or ``.gitlab-ci.yml`` (GitLab CI): a job that runs
  ``tuneloop ci tuneloop.yaml`` on pushes touching the data or the config, on a runner label chosen for
  GPUs, with the registry on a shared MLflow server (``TUNELOOP_REGISTRY_URI``), uploading the report;
  and a chained canary job that waits with ``tuneloop rollout status NAME --wait``.

The templates are ``resources/init_*`` in the package. Existing files are never overwritten unless
``force`` is set; the check runs before anything is written, so a refused init writes nothing.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from tuneloop.errors import InputError
from tuneloop.fsutil import atomic_write_text

__all__ = ["CI_KINDS", "init_project", "project_files"]

#: CI system -> (template resource, path of the workflow in the project).
CI_KINDS: dict[str, tuple[str, str]] = {
    "github": ("init_github.yml", ".github/workflows/tuneloop.yml"),
    "gitlab": ("init_gitlab.yml", ".gitlab-ci.yml"),
}
CONFIG_NAME = "tuneloop.yaml"
_NAME_TOKEN = "__TUNELOOP_NAME__"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _template(resource: str) -> str:
    return resources.files("tuneloop.resources").joinpath(resource).read_text(encoding="utf-8")


def _default_name(directory: Path) -> str:
    """A pipeline name from the directory name (the characters a pipeline name allows), else ``model``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", directory.resolve().name).strip("-._")
    return name if name and _NAME_OK.match(name) else "model"


def project_files(ci: str, name: str) -> dict[str, str]:
    """Relative path -> content of every file ``init_project`` writes (nothing is written)."""
    if ci not in CI_KINDS:
        raise InputError(f"unknown CI system {ci!r}; use one of: {', '.join(CI_KINDS)} (tuneloop init --ci github)")
    if not _NAME_OK.match(name):
        raise InputError(
            f"invalid pipeline name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    resource, workflow = CI_KINDS[ci]
    return {
        CONFIG_NAME: _template("init_tuneloop.yaml").replace(_NAME_TOKEN, name),
        workflow: _template(resource).replace(_NAME_TOKEN, name),
    }


def init_project(
    directory: str | Path = ".", ci: str = "github", *, force: bool = False, name: str | None = None
) -> list[Path]:
    """Write a starter ``tuneloop.yaml`` and the ``ci`` workflow into ``directory`` (created if missing).

    ``name`` is the pipeline (and registered model) name; default: from the directory name. Returns the
    paths written. Raises ``InputError`` -- before writing anything -- when a file exists and ``force`` is
    not set, or when ``ci`` or ``name`` is not valid.
    """
    directory = Path(directory)
    files = project_files(ci, name or _default_name(directory))
    existing = [rel for rel in files if (directory / rel).exists()]
    if existing and not force:
        raise InputError(
            f"{', '.join(str(directory / rel) for rel in existing)} already exist(s); nothing was written. "
            "Use --force to overwrite, or run `tuneloop init` in another directory"
        )
    written = []
    for rel, text in files.items():
        path = directory / rel
        atomic_write_text(path, text)  # creates parent directories
        written.append(path)
    return written
