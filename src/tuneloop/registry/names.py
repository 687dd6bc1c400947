"""One naming rule for model names and aliases, the same on every registry backend.

* model names: 1-128 characters, letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit;
  no ``/`` (MLflow cannot hold it, and a name is also a directory name in the record store), no ``..``, no
  ``:`` or ``@`` (they separate a version or an alias in refs like ``bot:3`` and ``bot@champion``).
* aliases: 1-128 characters, letters, digits, ``_`` and ``-``, starting with a letter; not ``latest``
  (it means the newest live version) and not ``v<digits>`` (MLflow reserves those for version numbers).

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
