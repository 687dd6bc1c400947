"""What a registered version records about where it came from, and what an artifact directory must be.

* :func:`check_artifact_dir` — self-contained and safetensors only: symlinks leaving the directory, malformed
  ``*.safetensors`` files and pickled content (judged by the bytes, see ``registry/content.py``) are refused
  before anything is stored.
* :func:`origin_key` — what makes two registrations the same version (artifact digest, content lineage, gates).
* :func:`detect_kind` — ``adapter`` (has ``adapter_config.json``) or ``model`` (has ``config.json``).
* :func:`base_model_ref` — a base model as lineage: the id or path given, the resolved local path, the hub
  revision when known, and a content digest (the same fingerprint the pipeline's cache keys use).
* :func:`git_info` — commit, branch and dirty flag of the git repository around a directory, if any.
* :func:`actor` — who is acting: ``$TUNELOOP_USER``, else the login name.
* :func:`version_kind` — what a registered version is for: ``reward`` (a reward model, lineage ``kind: reward``)
  or ``chat``.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError
from tuneloop.fsutil import model_fingerprint, sha256_json
from tuneloop.registry.content import check_contents, check_links, content_files
from tuneloop.registry.records import ModelVersion


def actor() -> str:
    """``$TUNELOOP_USER`` if set (CI jobs, shared accounts), else the login name."""
    user = os.environ.get("TUNELOOP_USER", "").strip()
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "unknown"


def version_kind(version: ModelVersion) -> str:
    """``reward`` for a reward model (its lineage says ``kind: reward``: it scores answers and has no chat endpoint),
    else ``chat``."""
    return "reward" if (version.lineage or {}).get("kind") == "reward" else "chat"


def check_artifact_dir(path: Path, kind: str | None = None) -> None:
    """Refuse a directory that is not a self-contained, safetensors-only model or adapter.

    Symlinks leaving the directory, malformed ``*.safetensors`` files and pickled content (by its bytes,
    whatever the file is called) are refused, with every offending file named (see ``registry/content.py``).
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"artifact directory {path} does not exist or is not a directory")
    check_links(path)
    check_contents(path)
    if not any(f.suffix == ".safetensors" for f in content_files(path)):
        raise InputError(
            f"artifact directory {path} has no *.safetensors weights; point at the directory that "
            "save_pretrained wrote (model.safetensors or adapter_model.safetensors)"
        )
    if kind == "adapter" and not (path / "adapter_config.json").is_file():
        raise InputError(
            f"{path} is registered as an adapter but has no adapter_config.json (a PEFT adapter directory has one)"
        )


# Lineage that says where or when something ran, not what it was made from: left out of ``origin_key``.
RUN_SPECIFIC_LINEAGE = (
    "run_id",
    "config_path",
    "source_path",
    "git",
    "stage_keys",
    "config",
    "config_hash",
    "base_model",
    "adapter_config_base",
)


def origin_key(artifact_digest: str, artifact_kind: str | None, lineage: dict, gates: dict) -> str:
    """What makes two registrations the same version: the same bytes, made from the same inputs.

    The artifact digest and kind, the gate results (thresholds, estimates, verdicts), and the lineage without
    what only says where or when it ran (``RUN_SPECIFIC_LINEAGE``: run id, paths, git checkout, cache keys,
    the resolved config with its absolute paths); of ``base`` only its content digest and of ``data`` only the ``*digest`` entries are
    kept. So the same training repeated in a copied workspace (or on another machine) finds the version it
    already made, while different data, base, code version or gates (e.g. a changed threshold) make a new one.
    """
    kept = {k: v for k, v in lineage.items() if k not in RUN_SPECIFIC_LINEAGE}
    if isinstance(kept.get("base"), dict):
        kept["base"] = kept["base"].get("digest")
    if isinstance(kept.get("data"), dict):
        kept["data"] = {k: v for k, v in kept["data"].items() if k.endswith("digest")}
    return sha256_json(
        {
            "artifact": artifact_digest,
            "kind": artifact_kind,
            "lineage": kept,
            "gates": gates or {},
        }
    )


def detect_kind(path: Path) -> str:
    """``adapter`` for a PEFT adapter directory, ``model`` for a transformers model directory."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    raise InputError(
        f"{path} is neither a PEFT adapter (adapter_config.json) nor a transformers model (config.json); "
        "point at a directory written by save_pretrained"
    )


def adapter_base(path: Path) -> str | None:
    """The ``base_model_name_or_path`` an adapter directory names, if any."""
    try:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {Path(path) / 'adapter_config.json'}: {e}") from None
    base = cfg.get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def base_model_ref(name: str) -> dict[str, Any]:
    """Lineage of a base model: ``id`` as given, ``path`` (absolute, local only), ``revision``, ``digest``."""
    p = Path(name)
    ref: dict[str, Any] = {"id": name, "path": str(p.resolve()) if p.is_dir() else None, "revision": None}
    if p.is_dir():
        # A hub snapshot directory (…/snapshots/<commit>/) names its revision.
        if p.resolve().parent.name == "snapshots":
            ref["revision"] = p.resolve().name
        try:
            commit = json.loads((p / "config.json").read_text(encoding="utf-8")).get("_commit_hash")
            ref["revision"] = ref["revision"] or commit
        except (OSError, ValueError, AttributeError):
            pass
    ref["digest"] = model_fingerprint(name)
    return ref


def check_base(base: dict[str, Any] | str, recorded_digest: str | None) -> str:
    """Return where to load a version's base model from, after checking it is the one registered.

    A local base directory whose files changed since registration is refused (IntegrityError), because
    an adapter on a different base is a different model.
    """
    from tuneloop.errors import IntegrityError

    ident = base if isinstance(base, str) else (base.get("path") or base.get("id"))
    if not ident:
        raise InputError("the version records no base model; register it again with --base")
    if recorded_digest and recorded_digest.startswith("dir:"):
        if not Path(ident).is_dir():
            raise InputError(
                f"the base model directory {ident} recorded for this adapter does not exist any more; "
                "restore it, or export/serve a merged model registered from another machine"
            )
        now = model_fingerprint(ident)
        if now != recorded_digest:
            raise IntegrityError(
                f"base model {ident} changed since the adapter was registered (digest {now[4:16]}..., "
                f"recorded {recorded_digest[4:16]}...); the adapter was trained on other weights. Restore the "
                "original base model, or register the adapter again with the new base (--base)"
            )
    return ident


def git_info(cwd: Path | None = None) -> dict[str, Any] | None:
    """Commit, branch and dirty flag of the git repository containing ``cwd``; None outside a repository."""

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ["git", *args], cwd=cwd or Path.cwd(), capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "root": git("rev-parse", "--show-toplevel"),
    }
