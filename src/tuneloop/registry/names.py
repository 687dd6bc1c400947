"""One naming rule for model names, aliases, refs and tags, the same on every registry backend.

* model names: 1-128 characters, letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit;
  no ``/`` (MLflow cannot hold it, and a name is also a directory name in the record store), no ``..``, no
  ``:`` or ``@`` (they separate a version or an alias in refs like ``bot:3`` and ``bot@champion``).
* aliases: 1-128 characters, letters, digits, ``_`` and ``-``, starting with a letter; not ``latest``
  (it means the newest live version) and not ``v<digits>`` (MLflow reserves those for version numbers).

* refs: ``name:3``, ``name@alias`` or ``name`` (the latest live version): :func:`parse_ref`.
* tags: keys of 1-250 characters (``tuneloop.`` is reserved), values of at most 5,000: :func:`check_tag`.

Names already stored by an older tuneloop still resolve; the rule applies when a name or alias is created.
"""

from __future__ import annotations

import re

from tuneloop.errors import InputError

MAX_NAME = 128
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
_VERSION_LIKE = re.compile(r"^[vV][0-9]+$")
RESERVED_ALIASES = ("latest",)
RESERVED_TAG_PREFIX = "tuneloop."
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/ ]{0,249}$")
MAX_TAG_VALUE = 5000


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(value) if isinstance(value, str) else '?'} characters)"


def check_model_name(model: object) -> str:
    """Return ``model`` if it is a valid model name, else raise InputError saying what is allowed."""
    if not isinstance(model, str) or not _MODEL_RE.match(model) or ".." in model:
        raise InputError(
            f"invalid model name {_shown(model)}: use 1-{MAX_NAME} letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, without '..' (no '/', ':' or '@': ':' and '@' separate a version or an "
            "alias in refs like bot:3 and bot@champion); e.g. support-bot"
        )
    return model


def check_alias_name(alias: object) -> str:
    """Return ``alias`` if it is a valid alias name, else raise InputError saying what is allowed."""
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
        raise InputError(
            f"invalid alias {_shown(alias)}: use 1-{MAX_NAME} letters, digits, '_' or '-', starting with a "
            "letter; e.g. champion, staging"
        )
    if alias in RESERVED_ALIASES or _VERSION_LIKE.match(alias):
        raise InputError(
            f"invalid alias {alias!r}: 'latest' and version-like names (v1, V23) are reserved because they "
            "already mean a version; choose another name"
        )
    return alias


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``model:3``, ``model@alias`` or ``model`` into ``(model, version_str)``.

    A bare model name means ``"latest"``. ``model:alias`` and ``model@3`` are accepted too.
    """
    ref = ref.strip() if isinstance(ref, str) else ref
    if not isinstance(ref, str) or not ref:
        raise InputError(f"empty model ref {ref!r}; use 'name', 'name:VERSION' or 'name@ALIAS'")
    sep = "@" if "@" in ref else ":" if ":" in ref else None
    if sep is None:
        return ref, "latest"
    model, _, version = ref.rpartition(sep)
    if not model or not version:
        raise InputError(f"malformed model ref {ref!r}; use 'name', 'name:VERSION' or 'name@ALIAS'")
    return model, version


def previous_alias(alias: str) -> str:
    """Where ``promote`` keeps the version an alias pointed at before: ``previous`` for ``champion``."""
    return "previous" if alias == "champion" else f"{alias}-previous"


def check_tag(key: str, value: str) -> None:
    if not isinstance(key, str) or not _TAG_KEY_RE.match(key):
        raise InputError(
            f"invalid tag key {key!r}: 1-250 characters, letters, digits, '_', '.', '-', '/' or spaces, "
            "not starting with a punctuation mark"
        )
    if key.startswith(RESERVED_TAG_PREFIX):
        raise InputError(f"tag keys starting with {RESERVED_TAG_PREFIX!r} are reserved for tuneloop itself")
    if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
        raise InputError(f"tag value for {key!r} must be a string of at most {MAX_TAG_VALUE} characters")


def version_ranges(numbers: list[int]) -> str:
    """Version numbers for a message: ``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    if not numbers:
        return "none"
    parts, start, prev = [], numbers[0], numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def alias_hint(aliases: dict[str, int]) -> str:
    """The aliases a model has, for an error message about an unknown version or alias."""
    if not aliases:
        return " (no aliases set)"
    return "; aliases: " + ", ".join(f"{a} -> {v}" for a, v in aliases.items())
