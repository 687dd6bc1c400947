"""The configuration reference, docs/configuration.md, generated from the schema's field descriptions.

Entry point: :func:`reference_markdown` (``python scripts/gen_config_reference.py`` writes it; a test checks
the file is up to date).
"""

from __future__ import annotations

import re
from typing import Any, cast

from pydantic import BaseModel

from tuneloop.config.schema import FLAT_KEYS, SECTIONS, PipelineConfig
from tuneloop.config.schema_data import TrainSource
from tuneloop.config.schema_eval import JudgeConfig, SuiteConfig
from tuneloop.config.schema_production import CanaryConfig, CanaryGuardConfig, CanaryMetricConfig, WebhookConfig
from tuneloop.config.schema_train import RewardSpec


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    text = re.sub(r"tuneloop\.config\.schema\w*\.", "tuneloop.config.", text)  # the name users import
    text = re.sub(r"Literal\[(.*?)\]", lambda m: "one of " + m.group(1).replace("'", "`"), text)
    return text.replace("NoneType", "null").replace(" | ", " or ").replace("|", " or ")


# Nested sections documented under their section in the reference.
SUBSECTIONS: dict[str, tuple[tuple[str, type[BaseModel]], ...]] = {
    "data": (("data.train_data[]", TrainSource),),
    "train": (("train.rewards[]", RewardSpec),),
    "eval": (("eval.suites[]", SuiteConfig), ("eval.judge", JudgeConfig)),
    "notify": (("notify.webhooks[]", WebhookConfig),),
    "deploy": (
        ("deploy.canary", CanaryConfig),
        ("deploy.canary.metrics[]", CanaryMetricConfig),
        ("deploy.canary.guards[]", CanaryGuardConfig),
    ),
}


def model_default(x: Any) -> Any:
    """A list item of a default as the reference shows it: a suite by its kind, another model as its set keys."""
    if not isinstance(x, BaseModel):
        return x
    return x.kind if hasattr(x, "kind") else x.model_dump(exclude_none=True)


def _schema_files() -> str:
    """The modules the reference is generated from: the top level's, then each section's (in ``SECTIONS`` order)."""
    models: list[type[BaseModel]] = [PipelineConfig]
    for section in SECTIONS:
        models += [_section_model(section), *(m for _, m in SUBSECTIONS.get(section, ()))]
    modules = dict.fromkeys(m.__module__ for m in models)
    return "src/tuneloop/config/ (" + ", ".join(m.rsplit(".", 1)[1] + ".py" for m in modules) + ")"


def _section_model(section: str) -> type[BaseModel]:
    return cast(type[BaseModel], PipelineConfig.model_fields[section].annotation)


_INTRO = [
    "# Configuration reference",
    "",
    f"<!-- Generated from {_schema_files()} by `python scripts/gen_config_reference.py`; do not edit by hand. -->",
    "",
    "A tuneloop config is one YAML file. Settings live in sections (`data:`, `train:`, `eval:`, `gates:`,",
    "`registry:`, `deploy:`); the classic flat keys listed below are also accepted at top level. A value given",
    "both ways is an error, unknown keys are errors, and every problem is reported at once with its key path",
    "and line. Relative paths are resolved against the config file's directory. Override any key from the",
    "command line with `-o key.path=value` (values are parsed as YAML: `-o gates.min_accuracy=null`).",
]
_TABLE_HEAD = ["| key | type | default | description |", "|---|---|---|---|"]


def reference_markdown() -> str:
    """docs/configuration.md, generated from the schema (a test checks the file is up to date)."""
    lines = [*_INTRO, "", "## Top level", "", *_TABLE_HEAD, *_rows(PipelineConfig, "")]
    for section in SECTIONS:
        lines += _table(f"## `{section}:`", _section_model(section), f"{section}.")
        for sub, sub_model in SUBSECTIONS.get(section, ()):
            lines += _table(f"### `{sub}`", sub_model, f"{sub}.")
    lines += ["", "## Classic flat keys", "", "| flat key | same as |", "|---|---|"]
    lines += [f"| `{k}` | `{s}.{k}` |" for k, s in FLAT_KEYS.items()]
    return "\n".join(lines) + "\n"


def _table(heading: str, model: type[BaseModel], prefix: str) -> list[str]:
    """A section's part of the reference: heading, the model's docstring, one row per key."""
    return ["", heading, "", (model.__doc__ or "").strip(), "", *_TABLE_HEAD, *_rows(model, prefix)]


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    """One table row per key of ``model`` (nested sections have tables of their own): key, type, default, text."""
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            continue
        if f.default_factory is not None:
            made = f.get_default(call_default_factory=True)
            made = [model_default(x) for x in made] if isinstance(made, list) else made
            default = f"`{made!r}`"
        else:
            default = "required" if f.is_required() else f"`{f.default!r}`".replace("None", "null")
        flat = (
            f" Also accepted at top level as `{name}`." if prefix and FLAT_KEYS.get(name) == prefix.rstrip(".") else ""
        )
        out.append(f"| `{prefix}{name}` | {_type_name(ann)} | {default} | {f.description or ''}{flat} |")
    return out
