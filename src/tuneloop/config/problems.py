"""Problem lines for a config that does not validate: dotted key path, bad value, what is allowed, file:line.

Entry point: :func:`format_errors` (a pydantic ValidationError -> the lines of one ConfigError, every problem
at once, union noise removed, a flat key reported under the name the user wrote, a close match suggested for an
unknown key). :func:`key_lines` maps a YAML document's dotted keys to their lines.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from tuneloop.config.schema import FLAT_KEYS, FlatKeyConflict, PipelineConfig
from tuneloop.config.schema_base import ItemProblem
from tuneloop.errors import short_repr


def format_errors(exc: ValidationError, raw: dict[str, Any], lines: dict[str, int], source: str | None) -> list[str]:
    """The problem lines of one ConfigError for ``exc`` (``raw``: what was validated, ``lines``: dotted key ->
    line in ``source``, see :func:`key_lines`)."""
    problems = []
    for err in exc.errors():
        if _other_union_member(err):
            continue
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        # pydantic reports union members separately (e.g. `str` and `list[str]`); keep the dotted path clean
        loc = tuple(
            p for p in loc if p not in ("str", "list[str]", "int", "float", "bool", "none", "list[TrainSource]")
        )
        path = _dotted(loc)
        # Report a flat key under the name the user wrote.
        if len(loc) >= 2 and loc[1] in FLAT_KEYS and FLAT_KEYS[loc[1]] == loc[0] and loc[1] in raw:
            path = _dotted(loc[1:])
        line = lines.get(path) or lines.get(path.partition("[")[0])  # a list item: the list's line
        where = f" ({source}:{line})" if source and line else ""
        if err["type"] == "value_error" and isinstance(err.get("ctx", {}).get("error"), ItemProblem):
            problem = err["ctx"]["error"]
            problems.append(f"{path}{problem.sub}{where}: {problem.text}")
            continue
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            did = f"; did you mean `{hint[0]}`?" if hint else ""
            problems.append(f"{path}{where}: unknown key{did}. Allowed here: {', '.join(sorted(known))}")
            continue
        if err["type"] == "missing":
            if loc == ("data",) or loc == ("data", "train_data"):
                path = "data.train_data"
                problems.append(
                    f"{path}: required key is missing; set `train_data` (or `data.train_data`) to a dataset file, directory or name"
                )
            else:
                problems.append(f"{path}{where}: required key is missing")
            continue
        if err["type"] == "value_error" and isinstance(err.get("ctx", {}).get("error"), FlatKeyConflict):
            problems.extend(str(err["ctx"]["error"]).split("\n"))
            continue
        value = err.get("input")
        problems.append(f"{path}{where}: bad value {short_repr(value)}; expected {_allowed(err)}")
    return list(dict.fromkeys(problems))  # union noise deduplicated, order kept


def _other_union_member(err: ErrorDetails) -> bool:
    """``train_data`` is a string or a list: a list given is reported against the list form only, anything
    else against the string form only (which names both)."""
    loc = err["loc"]
    if not loc or "train_data" not in loc or loc[-1] not in ("str", "list[TrainSource]"):
        return False
    return (loc[-1] == "str") == isinstance(err.get("input"), list)


def _dotted(loc: tuple) -> str:
    """A key path for messages: ``data.train_data[1].weight`` for a source list's item, ``notify.webhooks.0`` otherwise."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int) and i and loc[i - 1] in ("train_data", "rewards"):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections, e.g. notify.webhooks.0
            continue
        field = model.model_fields.get(str(part))
        found = _section_model(getattr(field, "annotation", None))
        if found is None:
            return []
        model = found
    keys = list(model.model_fields)
    if model is PipelineConfig:
        keys += list(FLAT_KEYS)
    return keys


def _section_model(ann: Any) -> type[BaseModel] | None:
    """The section model an annotation holds: itself, a list's item, or a union member (``str | list[TrainSource]``)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        if (found := _section_model(arg)) is not None:
            return found
    return None


def _allowed(err: ErrorDetails) -> str:
    t, ctx = err["type"], err.get("ctx") or {}
    if t == "literal_error":
        return f"one of {ctx.get('expected')}"
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[t]
        bound = next(iter(ctx.values()), "?")
        return f"a number {op} {bound}"
    if t == "string_pattern_mismatch":
        return f"a string matching {ctx.get('pattern')}"
    if t.startswith("int_"):
        return "an integer"
    if t.startswith("float_"):
        return "a number"
    if t == "finite_number":
        return "a finite number"
    if t == "model_type" and ctx.get("class_name") == "TrainSource":
        return "a path (a string) or {path: ..., weight: ...}"
    if t.startswith("bool_"):
        return "true or false"
    if t.startswith("string_") and err["loc"][-2:] == ("train_data", "str"):
        return "a dataset path or name (a string), or a list of sources ([a.jsonl, {path: b.jsonl, weight: 3}])"
    if t.startswith("string_"):
        return "a string"
    if t == "missing":
        return "a value (this key is required)"
    msg = err.get("msg", "")
    # pydantic says "Input should be a valid dictionary"; the message already starts with "expected"
    return re.sub(r"^(Input should be|Value error,)\s*", "", msg) or "a valid value"


def key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML mapping document to their 1-based line numbers."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return out
