"""Continue from a registered version: ``base_model: support-bot@champion`` (or ``support-bot:3``).

Entry point: :func:`resolve_parent` (called when a pipeline or ``tuneloop eval`` is built): when
``cfg.base_model`` names a version in the workspace's registry, ``cfg.base_model`` becomes a local directory
holding that version as a whole model, and ``cfg._parent`` records which version it was (the register stage
writes it into the new version's lineage as ``parent``).

* A full-model version is used as it is: the registry's verified artifact directory.
* An adapter version is **merged** into its own base once (PEFT ``merge_and_unload``, safetensors) into
  ``<workspace>/parents/<model>-v<version>-<sha256[:12]>/`` (written to a temporary directory, then renamed),
  and the run trains on that merged model. Merged rather than stacked on purpose: the reference model of
  DPO, KTO and GRPO (the base with the new adapter disabled) and the evaluation's base are then the parent
  itself, so preference training pulls away from the SFT parent, not from the original base, and the gates
  compare the candidate against the parent by default. The cost: a new adapter trained on a merged parent has
  that merged directory as its base (the gateway loads it as a base of its own).

What is a ref: an existing path is always a path; ``name:N`` and ``name@alias`` are refs; a bare ``name`` is a
ref only when the registry holds a model of that name (otherwise a Hugging Face id, as before).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError
from tuneloop.registry.records import ModelVersion

log = logging.getLogger(__name__)

_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(:[0-9]+|@[A-Za-z0-9_.-]+)?$")


@dataclass(frozen=True)
class Parent:
    ref: str  # as given: "support-bot@champion"
    model: str
    version: int
    artifact_digest: str  # the parent version's artifact digest (sha256); `artifact_sha256` in the lineage
    artifact_kind: str  # "model" | "adapter"
    path: str  # the whole-model directory the run trains on

    def lineage(self) -> dict[str, Any]:
        """The ``lineage.parent`` entry: the fields in order, the digest under its lineage key ``artifact_sha256``."""
        return {
            "ref": self.ref,
            "model": self.model,
            "version": self.version,
            "artifact_sha256": self.artifact_digest,
            "artifact_kind": self.artifact_kind,
            "path": self.path,
        }


def looks_like_ref(text: str) -> bool:
    return bool(_REF.match(text)) and not os.path.exists(os.path.expanduser(text))


def resolve_parent(cfg, workspace) -> Parent | None:
    """Point ``cfg.base_model`` at the registered version it names (merging an adapter once); None when it
    names none. Raises :class:`InputError` (exit 2) for a ref whose model exists but whose version or alias
    does not, with the versions that do."""
    given = cfg.base_model
    if getattr(cfg, "_parent", None) is not None or not looks_like_ref(given):
        return getattr(cfg, "_parent", None)
    explicit = ":" in given or "@" in given
    if not Path(getattr(workspace, "root", workspace)).exists() and not (
        explicit and getattr(cfg.registry, "uri", None)
    ):
        # No workspace yet, so no local registry: nothing is created for a check (a bare name is a hub id then)
        if explicit:
            raise InputError(
                f"base_model: {given!r} looks like a registry ref, but there is no workspace (and so no "
                "registry) yet; register a version first, or give a local directory or a Hugging Face model id"
            )
        return None
    from tuneloop.registry.api import open_registry

    reg = open_registry(cfg, workspace)
    model = re.split(r"[:@]", given, maxsplit=1)[0]
    if model not in reg.models():
        if ":" in given or "@" in given:
            raise InputError(
                f"base_model: {given!r} looks like a registry ref, but the registry has no model {model!r} "
                f"(it has: {', '.join(reg.models()) or 'none'}); give a registered version, a local "
                "directory or a Hugging Face model id"
            )
        return None  # a bare name the registry does not know: a Hugging Face id
    try:
        name, number = reg.parse_ref(given)
        version = reg.get(name, number)
    except Exception as exc:  # noqa: BLE001 - the registry's own message says which versions exist
        raise InputError(f"base_model: {given!r}: {exc}") from None
    artifact = Path(reg.open_artifact(name, version.version))
    kind = version.artifact_kind or ("adapter" if (artifact / "adapter_config.json").is_file() else "model")
    if kind == "adapter":
        path = merged_parent(workspace, name, version, artifact)
    else:
        path = artifact
    parent = Parent(
        ref=given,
        model=name,
        version=version.version,
        artifact_digest=version.artifact_digest,
        artifact_kind=kind,
        path=str(path),
    )
    cfg.base_model = str(path)
    cfg._parent = parent
    log.info("base_model %s is %s:%d (%s); training continues from it (%s)", given, name, parent.version, kind, path)
    return parent


def merged_parent(workspace, model: str, version: ModelVersion, adapter_dir: Path) -> Path:
    """The adapter version merged into its base, once per artifact, under ``<workspace>/parents/``."""
    root = Path(getattr(workspace, "root", workspace)) / "parents"
    out = root / f"{model}-v{version.version}-{version.artifact_digest[:12]}"
    if (out / "config.json").is_file():
        return out
    base = version.base_model
    if not base:
        raise InputError(
            f"base_model: {model}:{version.version} is an adapter with no recorded base model; "
            "it cannot be merged to continue from it"
        )
    from tuneloop.modeling import load_causal_lm

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    try:
        merged = load_causal_lm(str(base), adapter=str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        from transformers import AutoTokenizer

        tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
        AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(tmp)
        from tuneloop.fsutil import fsync_tree, replace_dir

        fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %s:%s into its base %s -> %s", model, version.version, base, out)
    return out
