"""Typed pipeline configuration: schema, YAML loading, CLI overrides, and error reporting.

One schema serves the Python API, the YAML file, ``-o key=value`` overrides and the configuration
reference (docs/configuration.md is generated from the field descriptions; a test keeps it in step).

A config may be written two ways, or mixed:

* sections: ``data:``, ``train:``, ``eval:``, ``gates:``, ``registry:``, ``deploy:``;
* the classic flat keys at top level (``train_data``, ``lora_r``, ``min_accuracy``, ...), see ``FLAT_KEYS``.

A value given both ways is an error. Unknown keys are errors. Every problem is reported at once, with its
dotted key path, the bad value, what is allowed, and (for YAML files) the file and line.

Entry points: :func:`load_config` (a YAML file), :func:`coerce_config` (a file, a dict or a config) and
:class:`PipelineConfig`. The package, one concern per module, bottom to top:

* ``schema_base``: ``Section``, the base of every section's pydantic model, and ``ItemProblem``;
* the sections, one module per concern: ``schema_data`` (``data:``), ``schema_train`` (``train:`` and its rewards),
  ``schema_eval`` (``eval:`` with its suites and judge, ``gates:``, ``registry:``), ``schema_production``
  (``deploy:`` with its canary, ``serve:``, ``notify:``, ``drift:``);
* ``schema``: the classic flat keys and ``PipelineConfig``, the whole file; it re-exports the sections' names;
* ``safe_yaml``: YAML read with limits (alias bombs, nesting), ``safe_load_yaml``;
* ``paths``: the path-valued keys (``PATH_FIELDS``, ``path_values``), dataset file types (``DATA_SUFFIXES``),
  relative paths resolved against the config's directory;
* ``problems``: pydantic's errors -> ConfigError lines with key path, value, what is allowed, file:line;
* ``loading``: ``load_config``, ``build_config``, ``coerce_config``, ``-o`` overrides, ``PipelineConfig(**kwargs)``;
* ``reference``: docs/configuration.md from the schema.

Other modules import from ``tuneloop.config``; the names below are its public interface.
"""

from __future__ import annotations

from tuneloop.config.loading import (
    MAX_CONFIG_BYTES,
    apply_overrides,
    build_config,
    coerce_config,
    load_config,
    parse_override,
)
from tuneloop.config.paths import DATA_SUFFIXES, PATH_FIELDS, path_values
from tuneloop.config.reference import SUBSECTIONS, model_default, reference_markdown
from tuneloop.config.safe_yaml import MAX_YAML_DEPTH, MAX_YAML_NODES, safe_load_yaml
from tuneloop.config.schema import FLAT_KEYS, SECTIONS, PipelineConfig, fold_flat_keys
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
    "DATA_SUFFIXES",
    "FLAT_KEYS",
    "MAX_CONFIG_BYTES",
    "MAX_SOURCE_WEIGHT",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "NOTIFY_EVENTS",
    "PATH_FIELDS",
    "REWARD_KINDS",
    "SECTIONS",
    "SUBSECTIONS",
    "CanaryConfig",
    "CanaryGuardConfig",
    "CanaryMetricConfig",
    "DataConfig",
    "DeployConfig",
    "DriftConfig",
    "EvalConfig",
    "GatesConfig",
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
    "apply_overrides",
    "build_config",
    "coerce_config",
    "fold_flat_keys",
    "load_config",
    "model_default",
    "parse_override",
    "path_values",
    "reference_markdown",
    "safe_load_yaml",
]
