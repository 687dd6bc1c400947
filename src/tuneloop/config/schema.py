"""The configuration schema's top level: :class:`PipelineConfig`, the whole file, and the classic flat keys.

The sections live one concern per module, and this module re-exports them (``from tuneloop.config.schema import
DataConfig`` keeps working):

* ``schema_base``: ``Section``, the base of every section, and ``ItemProblem``;
* ``schema_data``: ``data:`` (``DataConfig``, ``TrainSource``);
* ``schema_train``: ``train:`` (``TrainConfig``, ``RewardSpec``);
* ``schema_eval``: ``eval:`` (``EvalConfig``, ``SuiteConfig``, ``JudgeConfig``), ``gates:`` (``GatesConfig``),
  ``registry:`` (``RegistryConfig``);
* ``schema_production``: ``deploy:`` (``DeployConfig`` and its canary), ``serve:``, ``notify:``, ``drift:``;
* here: the classic flat keys (``FLAT_KEYS``, ``fold_flat_keys``), ``SECTIONS`` and ``PipelineConfig``.

Field descriptions are the configuration reference (:mod:`tuneloop.config.reference` renders
docs/configuration.md from them).

A validator that finds a problem in a list item raises :class:`ItemProblem`; a key given both flat and in its
section raises :class:`FlatKeyConflict`; :mod:`tuneloop.config.problems` turns both into ConfigError lines.
Constructing ``PipelineConfig(**kwargs)`` reports problems the same way and resolves relative paths against
the working directory: see :func:`tuneloop.config.loading.init_from_keywords` for why that constructor is set
there and not written in the class body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneloop.config.schema_base import ItemProblem
from tuneloop.config.schema_data import MAX_SOURCE_WEIGHT, DataConfig, TrainSource
from tuneloop.config.schema_eval import EvalConfig, GatesConfig, JudgeConfig, RegistryConfig, SuiteConfig
from tuneloop.config.schema_production import (
    NOTIFY_EVENTS,
    CanaryConfig,
    CanaryGuardConfig,
    CanaryMetricConfig,
    DeployConfig,
    DriftConfig,
    NotifyConfig,
    ServeConfig,
    WebhookConfig,
)
from tuneloop.config.schema_train import REWARD_KINDS, RewardSpec, TrainConfig

__all__ = [
    "FLAT_KEYS",
    "MAX_SOURCE_WEIGHT",
    "NOTIFY_EVENTS",
    "REWARD_KINDS",
    "SECTIONS",
    "CanaryConfig",
    "CanaryGuardConfig",
    "CanaryMetricConfig",
    "DataConfig",
    "DeployConfig",
    "DriftConfig",
    "EvalConfig",
    "FlatKeyConflict",
    "GatesConfig",
    "ItemProblem",
    "JudgeConfig",
    "NotifyConfig",
    "PipelineConfig",
    "RegistryConfig",
    "RewardSpec",
    "ServeConfig",
    "SuiteConfig",
    "TrainConfig",
    "TrainSource",
    "WebhookConfig",
    "fold_flat_keys",
]


# Classic flat keys (FineTunePipeline sketch) -> the section that holds them.
FLAT_KEYS: dict[str, str] = {
    "train_data": "data",
    "eval_data": "data",
    "method": "train",
    "lora_r": "train",
    "learning_rate": "train",
    "num_epochs": "train",
    "batch_size": "train",
    "min_accuracy": "gates",
    "max_harmful_rate": "gates",
    "max_capability_drop": "gates",
    "auto_deploy": "deploy",
}

SECTIONS = ("data", "train", "eval", "gates", "registry", "deploy", "serve", "notify", "drift")


class FlatKeyConflict(ValueError):
    """A key given both at top level and in its section (one line per key)."""


def fold_flat_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Move classic flat keys into their sections. A key given both ways raises a clear error."""
    out = dict(values)
    clashes = []
    for key, section in FLAT_KEYS.items():
        if key not in out:
            continue
        value = out.pop(key)
        sec = out.get(section)
        if sec is None:
            sec = {}
        if not isinstance(sec, dict):
            out[key] = value  # leave it; the section's own error will be reported
            continue
        sec = dict(sec)
        if key in sec:
            clashes.append(
                f"{key}: given both at top level ({value!r}) and as {section}.{key} ({sec[key]!r}), keep one"
            )
            continue
        sec[key] = value
        out[section] = sec
    if clashes:
        raise FlatKeyConflict("\n".join(clashes))
    return out


class PipelineConfig(BaseModel):
    """A whole pipeline: one YAML file, or the keyword arguments of the classic API."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(
        description="Pipeline name; also the registered model name.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    )
    base_model: str = Field(
        description="Base model: a local directory or a Hugging Face model id (already in the local cache)."
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data splits, initialisation and training order.")
    workspace: str | None = Field(
        None,
        description="Workspace directory (runs, registry, artifacts). Default: `.tuneloop/` next to the config file.",
    )
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)

    # Directory that relative paths were resolved against (not part of the schema).
    _base_dir: Path | None = None
    _parent: Any = None  # train.parent.Parent when base_model names a registered version (set by resolve_parent)

    @model_validator(mode="before")
    @classmethod
    def _sections_from_flat(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return fold_flat_keys(values)

    @field_validator("base_model")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in section form (what a run records)."""
        return self.model_dump(mode="json")


def _flat_property(section: str, key: str) -> property:
    return property(lambda self: getattr(getattr(self, section), key), doc=f"Alias of `{section}.{key}`.")


for _key, _section in FLAT_KEYS.items():
    setattr(PipelineConfig, _key, _flat_property(_section, _key))
