"""Path-valued settings: which keys hold a path, which file types a dataset may have, and resolving them.

Entry points: :data:`PATH_FIELDS` and :func:`path_values` (every path a config names, e.g. for cache keys),
:data:`DATA_SUFFIXES` (dataset file types), :func:`resolve_paths` (relative paths -> absolute, against the
config file's directory; a dataset that looks like a hub name and is not on disk is left as written).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tuneloop.config.schema import PipelineConfig
from tuneloop.config.schema_data import TrainSource

PATH_FIELDS = (
    "data.train_data",
    "data.eval_data",
    "eval.general_text",
    "eval.redteam_prompts",
    "eval.benign_prompts",
    "eval.mc_suite",
    "train.accelerate_config",
)
"""The config keys that hold a file path, resolved against the config's directory (suite paths: see
:func:`path_values`)."""
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".json.gz", ".jsonl.gz", ".json.zst", ".jsonl.zst")
"""File types a dataset may have (``data.train_data``, ``data.eval_data``, ``tuneloop data validate``); ``.zst``
needs the optional ``zstandard`` package. :func:`tuneloop.data.sources.data_suffix` matches a name against them."""


def _looks_like_hub_dataset(value: str, base_dir: Path) -> bool:
    """``org/name`` (optionally ``:split``) that is not a path on disk and has no file extension."""
    name = value.split(":", 1)[0]
    return (
        re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
        and not (base_dir / name).exists()
        and not name.lower().endswith(DATA_SUFFIXES)
    )


def path_values(cfg: PipelineConfig) -> list[tuple[str, str | None]]:
    """Every path-valued setting as (dotted key, value): :data:`PATH_FIELDS`, then each suite's ``path``."""
    out: list[tuple[str, str | None]] = []
    for dotted in PATH_FIELDS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, list):  # data.train_data as a list of sources
            out += [(f"{dotted}[{i}]", src.path) for i, src in enumerate(value)]
        else:
            out.append((dotted, value))
    out += [(f"eval.suites.{s.name}.path", s.path) for s in cfg.eval.suites]
    return out


def _resolved(value: str, base_dir: Path, dataset: bool) -> str:
    """``value`` resolved against ``base_dir`` when it is a relative path (a dataset may be a hub name or an
    object-store URL such as ``s3://bucket/key``, kept as written)."""
    if dataset and ("://" in value or _looks_like_hub_dataset(value, base_dir)):
        return value
    if os.path.isabs(os.path.expanduser(value)):
        return value
    return str((base_dir / os.path.expanduser(value)).resolve())


def _resolve_sources(sources: list[TrainSource], base_dir: Path) -> None:
    for src in sources:
        if src._written is None:
            src._written = src.path
        src.path = _resolved(src.path, base_dir, True)


def resolve_paths(cfg: PipelineConfig, base_dir: Path) -> None:
    """Make every relative path of ``cfg`` absolute against ``base_dir`` (the config file's directory), in place:
    :data:`PATH_FIELDS`, suite files, reward function files, the judge (when it exists there), a base model that
    is a path, the workspace. Records ``base_dir`` on the config (``cfg._base_dir``, read by the workspace)."""
    for dotted in PATH_FIELDS:
        section, key = dotted.split(".")
        sec = getattr(cfg, section)
        value = getattr(sec, key)
        if isinstance(value, list):
            _resolve_sources(value, base_dir)
        elif value and value != (resolved := _resolved(value, base_dir, section == "data")):
            setattr(sec, key, resolved)
    for suite in cfg.eval.suites:
        if suite.path and not os.path.isabs(os.path.expanduser(suite.path)):
            suite.path = str((base_dir / os.path.expanduser(suite.path)).resolve())
        if suite.include_path and not os.path.isabs(os.path.expanduser(suite.include_path)):
            suite.include_path = str((base_dir / os.path.expanduser(suite.include_path)).resolve())
    for reward in cfg.train.rewards:  # a reward function's file: relative to the config, as data files are
        if reward.function:
            file, name = reward.function_parts()
            if reward._written is None:
                reward._written = reward.function
            if not os.path.isabs(os.path.expanduser(file)):
                reward.function = f"{(base_dir / os.path.expanduser(file)).resolve()}:{name}"
    jp = cfg.eval.judge.path
    if jp and not os.path.isabs(os.path.expanduser(jp)) and (base_dir / os.path.expanduser(jp)).exists():
        cfg.eval.judge.path = str((base_dir / os.path.expanduser(jp)).resolve())
    bm = os.path.expanduser(cfg.base_model)
    # A base model is a local path when it looks like one or exists relative to the config; else a hub id.
    if bm.startswith((".", "/", "~")) or (base_dir / bm).exists():
        cfg.base_model = str((base_dir / bm).resolve()) if not os.path.isabs(bm) else bm
    if cfg.workspace and not os.path.isabs(os.path.expanduser(cfg.workspace)):
        cfg.workspace = str((base_dir / os.path.expanduser(cfg.workspace)).resolve())
    cfg._base_dir = base_dir
