"""Loading a config: a YAML file or a dict, ``-o key.path=value`` overrides, validation, relative paths.

Entry points: :func:`load_config` (a YAML file), :func:`build_config` (a dict), :func:`coerce_config` (either,
or a PipelineConfig), :func:`apply_overrides` / :func:`parse_override` (``-o``). Every problem is reported at
once as a ConfigError (:mod:`tuneloop.config.problems`), with the file and line when there is a file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tuneloop.config.paths import resolve_paths
from tuneloop.config.problems import format_errors, key_lines
from tuneloop.config.safe_yaml import safe_load_yaml
from tuneloop.config.schema import FLAT_KEYS, FlatKeyConflict, PipelineConfig
from tuneloop.errors import ConfigError

MAX_CONFIG_BYTES = 1_000_000


def parse_override(item: str) -> tuple[str, Any]:
    """``key.path=value`` -> (key path, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. -o train.learning_rate=1e-4")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = safe_load_yaml(text, f"override {key}") if text.strip() else ""
    except ConfigError as exc:
        if "malformed YAML" not in str(exc):
            raise
        value = text
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``-o key.path=value`` overrides to a raw config dict.

    A flat key and its section path name the same setting: the override lands wherever the config already
    has it, so an override never creates a "given both ways" conflict.
    """
    raw = dict(raw)
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in FLAT_KEYS and parts[0] not in raw:
            parts = [FLAT_KEYS[parts[0]], parts[0]]
        elif len(parts) == 2 and parts[1] in FLAT_KEYS and FLAT_KEYS[parts[1]] == parts[0] and parts[1] in raw:
            parts = [parts[1]]
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return raw


def build_config(
    raw: dict[str, Any],
    *,
    base_dir: Path | None = None,
    source: str | None = None,
    text: str | None = None,
    overridden: Sequence[str] = (),
) -> PipelineConfig:
    """Validate a raw dict into a PipelineConfig, reporting every problem at once."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}", source)
    lines = key_lines(text) if text else {}
    for item in overridden:  # an overridden value did not come from the file: point at no line
        key = item.partition("=")[0].strip()
        lines.pop(key, None)
        lines.pop(key.split(".")[-1], None)
        if key in FLAT_KEYS:
            lines.pop(f"{FLAT_KEYS[key]}.{key}", None)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, raw, lines, source), source) from None
    except FlatKeyConflict as exc:  # raised by the before-validator outside pydantic's wrapping in some versions
        raise ConfigError(str(exc).split("\n"), source) from None
    resolve_paths(cfg, (base_dir or Path.cwd()).resolve())
    return cfg


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config file, apply ``-o`` overrides, validate, and resolve relative paths."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give the path to a tuneloop YAML file)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size:,} bytes; a config may be at most {MAX_CONFIG_BYTES:,} bytes", str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8", str(path)) from None
    raw = safe_load_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path} is empty; see docs/configuration.md for the keys", str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values", str(path))
    raw = apply_overrides(raw, overrides or [])
    return build_config(raw, base_dir=path.parent, source=str(path), text=text, overridden=overrides or [])


def coerce_config(cfg: PipelineConfig | dict[str, Any] | str | os.PathLike[str]) -> PipelineConfig:
    """Accept a PipelineConfig, a dict of (flat or sectioned) keys, or a path to a YAML file."""
    if isinstance(cfg, PipelineConfig):
        return cfg
    if isinstance(cfg, dict):
        return build_config(cfg)
    return load_config(cfg)


def init_from_keywords(self: PipelineConfig, /, **data: Any) -> None:
    """``PipelineConfig(**kwargs)``, the classic API: problems reported as a ConfigError (every one, dotted key
    paths, as for a file but with no line), relative paths resolved against the working directory."""
    try:
        BaseModel.__init__(self, **data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, data, {}, None)) from None
    except FlatKeyConflict as exc:
        raise ConfigError(str(exc).split("\n")) from None
    if self._base_dir is None:
        resolve_paths(self, Path.cwd())


# Set after the class is built, not written as `__init__` in its body: pydantic calls an `__init__` defined in a
# model's body from `model_validate` too, so build_config's validation would go through this constructor and
# lose the file:line of each problem and resolve paths against the working directory before the config's own
# directory. Assigned here, it is the keyword constructor only (tests/test_config.py covers both paths).
PipelineConfig.__init__ = init_from_keywords  # type: ignore[method-assign,assignment]
