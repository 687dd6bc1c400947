"""Registry operations behind ``tuneloop models``: register a directory made elsewhere, lineage, diff, export,
gc (dead temporary copies, unreferenced artifacts) and recover (rebuild a lost database from the store).

Each works on any backend that satisfies :class:`tuneloop.registry.api.ModelRegistry`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuneloop.errors import InputError
from tuneloop.fsutil import sha256_file, sha256_json
from tuneloop.registry.card import (
    base_layer_count,
    clean_tokenizer_config,
    is_blank_peft_card,
    model_card,
    module_names,
    portable_base_name,
)
from tuneloop.registry.lineage import (
    adapter_base,
    base_model_ref,
    check_artifact_dir,
    check_base,
    detect_kind,
    git_info,
)
from tuneloop.registry.names import parse_ref
from tuneloop.registry.records import ModelVersion
from tuneloop.registry.recovery import recover_database
from tuneloop.version import __version__, code_version


def register_directory(
    reg, path: Path, name: str, *, base: str | None = None, actor: str | None = None, reason: str = ""
) -> ModelVersion:
    """Register a model or PEFT adapter directory produced outside tuneloop as the next version of ``name``.

    An adapter's base is ``base`` or else the ``base_model_name_or_path`` in its adapter_config.json; it is
    referenced (path/id + digest), never copied.
    """
    path = Path(path)
    kind = detect_kind(path) if path.is_dir() else None
    check_artifact_dir(path, kind)
    named_base = adapter_base(path) if kind == "adapter" else None
    if kind == "adapter":
        base = base or named_base
        if not base:
            raise InputError(
                f"{path} is a PEFT adapter whose adapter_config.json names no base_model_name_or_path; "
                "say which base model it belongs to with --base PATH_OR_HUB_ID"
            )
    elif base:
        raise InputError(
            f"{path} is a full model (config.json, no adapter_config.json); --base only applies to adapters"
        )
    base_model = base if kind == "adapter" else str(path.resolve())
    lineage: dict[str, Any] = {
        "source": "register",
        "source_path": str(path.resolve()),
        "base": base_model_ref(base) if kind == "adapter" and base else None,  # an adapter always has one (above)
        "adapter_config_base": named_base,
        "code_version": code_version(),
        "git": git_info(),
    }
    if kind == "adapter":
        lineage["base_model_fingerprint"] = lineage["base"]["digest"]
    cfg_file = path / ("adapter_config.json" if kind == "adapter" else "config.json")
    try:
        lineage["config_hash"] = sha256_json(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    return reg.register(
        name,
        path,
        artifact_kind=kind,
        base_model=base_model,
        lineage=lineage,
        metrics={},
        gates={},
        actor=actor,
        reason=reason or f"registered from {path.resolve()}",
    )


def resolve(reg, ref: str) -> ModelVersion:
    model, version = parse_ref(ref)
    return reg.get(model, version)


def lineage_of(reg, ref: str) -> dict:
    """Where a version came from, in one document: base, data, config, code, run, metrics, gates, events."""
    v = resolve(reg, ref)
    lin = v.lineage
    base = lin.get("base") or {"id": v.base_model, "digest": lin.get("base_model_fingerprint")}
    return {
        "ref": v.ref,
        "artifact": {"kind": v.artifact_kind, "sha256": v.artifact_digest},
        "base_model": base,
        "run_id": lin.get("run_id"),
        "pipeline": lin.get("pipeline"),
        "data": lin.get("data"),
        "config_hash": lin.get("config_hash"),
        "code_version": lin.get("code_version"),
        "git": lin.get("git"),
        "source_path": lin.get("source_path"),
        "metrics": v.metrics,
        "gates": v.gates,
        "aliases": list(v.aliases),
        "tags": v.tags,
        "deleted": v.deleted,
        "events": [e.to_dict() for e in reg.events(v.model, v.version)],
    }


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, val in obj.items():
            out.update(_flatten(val, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _changes(a: dict, b: dict) -> list[dict[str, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]


def diff_versions(reg, ref_a: str, ref_b: str) -> dict:
    """Compare two versions: config key by key, data digests, metrics (with deltas), base, artifact, gates."""
    a, b = resolve(reg, ref_a), resolve(reg, ref_b)
    la, lb = a.lineage, b.lineage
    metrics = []
    for row in _changes(a.metrics, b.metrics) + [
        {"key": k, "a": v, "b": v} for k, v in _flatten(a.metrics).items() if _flatten(b.metrics).get(k) == v
    ]:
        if isinstance(row["a"], (int, float)) and isinstance(row["b"], (int, float)) and not isinstance(row["a"], bool):
            row["delta"] = row["b"] - row["a"]
        metrics.append(row)
    metrics.sort(key=lambda r: r["key"])
    gate_verdicts = {
        name: {"a": (a.gates.get(name) or {}).get("passed"), "b": (b.gates.get(name) or {}).get("passed")}
        for name in sorted(a.gates.keys() | b.gates.keys())
    }
    base_a = (la.get("base") or {}).get("digest") or la.get("base_model_fingerprint")
    base_b = (lb.get("base") or {}).get("digest") or lb.get("base_model_fingerprint")
    return {
        "a": a.ref,
        "b": b.ref,
        "config": _changes(la.get("config") or {}, lb.get("config") or {}),
        "config_hash": {
            "a": la.get("config_hash"),
            "b": lb.get("config_hash"),
            "same": la.get("config_hash") == lb.get("config_hash"),
        },
        "data": _changes(la.get("data") or {}, lb.get("data") or {}),
        "base_model": {"a": a.base_model, "b": b.base_model, "same_digest": base_a == base_b},
        "artifact": {
            "a": a.artifact_digest,
            "b": b.artifact_digest,
            "same": a.artifact_digest == b.artifact_digest,
        },
        "code_version": {"a": la.get("code_version"), "b": lb.get("code_version")},
        "metrics": metrics,
        "gates": gate_verdicts,
    }


def export_version(reg, ref: str, out_dir: Path, *, merged: bool = False, actor: str | None = None) -> dict:
    """Write a version as a standard Hugging Face directory that transformers / PEFT / vLLM load directly.

    * a full model: its files (config.json, model.safetensors, tokenizer);
    * an adapter: adapter_config.json and adapter_model.safetensors and the tokenizer;
    * ``merged=True`` with an adapter: the LoRA merged into the base, saved as safetensors, plus the tokenizer.

    What is written is what a Hub or vLLM user expects: ``base_model_name_or_path`` is the base's hub id or the
    path the config gave (:func:`tuneloop.registry.card.portable_base_name`), not this machine's absolute path;
    ``target_modules`` are module names; ``tokenizer_config.json`` has no ``is_local``/``local_files_only``;
    README.md is a model card (base, data digests, metrics, gate verdicts, tuneloop version); directories and
    files get the usual modes (0777/0666 less the umask). The artifact is verified first; ``out_dir`` must not
    exist or be empty; it appears complete or not at all. The version gets an ``exported`` event with the sha256 of
    each weights file written.
    """
    v = resolve(reg, ref)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"export target {out_dir} exists and is not an empty directory; choose a new directory")
    src = reg.open_artifact(v.model, v.version)  # verifies every file's sha256
    base, base_name = None, None
    if v.artifact_kind == "adapter":
        lin = v.lineage
        base = check_base(
            lin.get("base") or v.base_model,
            (lin.get("base") or {}).get("digest") or lin.get("base_model_fingerprint"),
        )
        base_name = portable_base_name(v)
    if merged and v.artifact_kind != "adapter":
        raise InputError(f"{v.ref} is a full model, not an adapter: there is nothing to merge; export without --merged")

    kind = "model" if merged or v.artifact_kind == "model" else "adapter"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        if merged:
            assert base is not None  # merged is refused above unless the version is an adapter, which has a base
            _write_merged(src, base, tmp)
        else:
            _copy_artifact(src, tmp)
            if base is not None:
                _rewrite_adapter_config(tmp / "adapter_config.json", base_name, base_layer_count(base))
        _finish_export(tmp, v, kind=kind, base_name=base_name, merged=merged)
        weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    details = {"format": "hf", "kind": kind, "merged": merged, "sha256": weights, "path": str(out_dir.resolve())}
    try:  # like a GGUF export: recorded on the version, or not left behind
        event = reg.record_event(v.model, v.version, "exported", details, actor=actor).to_dict()
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return {
        "ref": v.ref,
        "path": str(out_dir.resolve()),
        "kind": kind,
        "merged": merged,
        "base_model": base_name,
        "base_model_path": base,
        "files": sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()),
        "sha256": weights,
        "event": event,
    }


def _copy_artifact(src: Path, dest: Path) -> None:
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_file() and not any(p.startswith(".") for p in rel.parts):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest / rel)


def _rewrite_adapter_config(path: Path, base_name: str | None, layers: int | None) -> None:
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_name
    cfg["target_modules"] = module_names(cfg.get("target_modules"), layers)
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _finish_export(tmp: Path, v: ModelVersion, *, kind: str, base_name: str | None, merged: bool) -> None:
    """Tokenizer config, model card, ``tuneloop_export.json`` and file modes of an export being written."""
    clean_tokenizer_config(tmp / "tokenizer_config.json")
    readme = tmp / "README.md"
    card = model_card(v, kind=kind, base_name=base_name)
    if readme.is_file() and not is_blank_peft_card(own := readme.read_text(encoding="utf-8", errors="replace")):
        card += "\n## Notes from the registered artifact\n\n" + own
    readme.write_text(card, encoding="utf-8")
    (tmp / "tuneloop_export.json").write_text(
        json.dumps(
            {
                "ref": v.ref,
                "artifact_sha256": v.artifact_digest,
                "kind": v.artifact_kind,
                "merged": merged,
                "base_model": base_name,
                "tuneloop_version": __version__,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    normal_modes(tmp)


def normal_modes(root: Path) -> None:
    """Directories 0777 and files 0666, less the process umask (``mkdtemp`` makes 0700, safetensors 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _write_merged(adapter_dir: Path, base: str, out: Path) -> None:
    from tuneloop.modeling import load_causal_lm, load_tokenizer, save_tokenizer

    model = load_causal_lm(base, adapter=str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
    save_tokenizer(load_tokenizer(str(tok_src)), out)


# -- gc and recover -------------------------------------------------------------------------------


@dataclass
class GcReport:
    """What ``gc`` removed: temporary copies of dead processes and artifacts no live version references."""

    location: str
    temps: list[dict[str, Any]] = field(default_factory=list)  # {"path", "bytes", "owner"}
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # {"digest", "bytes"}

    @property
    def freed_bytes(self) -> int:
        return sum(t["bytes"] for t in self.temps) + sum(a["bytes"] for a in self.artifacts)

    @property
    def entries(self) -> int:
        return len(self.temps) + len(self.artifacts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "freed_bytes": self.freed_bytes, "entries": self.entries}

    def summary(self) -> str:
        return (
            f"{self.location}: removed {len(self.temps)} dead temporary cop{'y' if len(self.temps) == 1 else 'ies'} "
            f"and {len(self.artifacts)} unreferenced artifact(s), freed {_human(self.freed_bytes)}"
        )


class Collectable(Protocol):
    """What ``gc`` needs from a registry backend (both ``SqliteRegistry`` and ``MlflowRegistry`` have it)."""

    location: str
    removed_temps: list  # RemovedTemp entries taken away when the registry was opened
    store: Any  # its ArtifactStore (for MLflow: the local verified cache)

    def gc(self) -> list[tuple[str, int]]: ...


def gc(reg: Collectable) -> GcReport:
    """Remove temporary copies left by killed processes (also those already removed when ``reg`` was opened)
    and stored artifacts that no live version references. Copies of running processes are kept."""
    temps = [*reg.removed_temps, *reg.store.remove_dead_temps(include_legacy=True)]
    return GcReport(
        location=reg.location,
        temps=[asdict(t) for t in temps],
        artifacts=[{"digest": d, "bytes": n} for d, n in reg.gc()],
    )


@dataclass
class RecoverReport:
    """What ``recover`` rebuilt (see :func:`tuneloop.registry.recovery.recover_database`)."""

    database: str
    moved_aside: str | None
    models: list[str]
    versions: int
    aliases: dict[str, dict[str, int]]
    events: int
    deleted: list[str]
    missing_artifacts: list[str]
    unrecorded_artifacts: list[str]
    skipped_events: int
    unreadable: list[str]
    rollouts: list[str] = field(default_factory=list)  # rollout ids restored from the journal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"rebuilt {self.database}: {self.versions} version(s) of {len(self.models)} model(s), "
            f"{self.events} event(s), aliases "
            + (
                "; ".join(f"{m}: " + ", ".join(f"{a} -> {n}" for a, n in al.items()) for m, al in self.aliases.items())
                or "none"
            )
        ]
        if self.rollouts:
            lines.append(f"rollouts restored as of their last recorded decision: {', '.join(self.rollouts)}")
        if self.moved_aside:
            lines.append(f"the old database was moved to {self.moved_aside}")
        if self.missing_artifacts:
            lines.append(
                f"warning: artifacts missing from the store for {', '.join(self.missing_artifacts)} (they cannot be served)"
            )
        if self.unrecorded_artifacts:
            lines.append(
                f"{len(self.unrecorded_artifacts)} stored artifact(s) belong to no record; `tuneloop models gc` removes them"
            )
        if self.unreadable:
            lines.append("unreadable: " + "; ".join(self.unreadable[:5]))
        return "\n".join(lines)


def recover(root: Path) -> RecoverReport:
    """Rebuild the SQLite registry database in workspace directory ``root`` from the records in its store."""
    return RecoverReport(**recover_database(Path(root)))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
