"""Dataset formats: detect which one a dataset uses and normalise its records to one canonical shape.

Canonical record::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

an optional leading system message, then user and assistant turns alternating, starting with user and
ending with assistant. Every content is a non-blank string.

``normalise`` never raises on a JSON value: it returns ``(record, [])`` or ``(None, [reason, ...])``.
Each reason starts with a stable rule code (``"missing_field: 'output' is missing"``); the codes are
listed in ``RULES``.

Adding a format (sharegpt, preference, kto, text, ...) is one ``_normalise_<name>`` function, one
``_looks_like_<name>`` predicate and one entry in ``FORMATS``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, NamedTuple, Optional

from tuneloop.errors import InputError

ROLES = ("system", "user", "assistant")

#: Rule code -> what it means. Reasons produced here and in ``validate`` start with one of these.
RULES = {
    "not_an_object": "the record (or a message in it) is not a JSON object",
    "missing_field": "a required field is absent",
    "bad_structure": "a field has the wrong container type or shape (e.g. 'messages' is not a list)",
    "non_string_content": "a text field is not a string",
    "empty_content": "a text field is empty or whitespace only",
    "invalid_utf8": "text is not valid UTF-8 (undecodable bytes, or lone surrogates from \\u escapes)",
    "bad_role": "a message role is not system, user or assistant",
    "role_order": "roles do not follow [system] user assistant user assistant ...",
    "no_final_assistant": "the conversation does not end with an assistant message",
    "invalid_json": "the line is not valid JSON (JSONL only)",
    "exact_duplicate": "same messages (whitespace collapsed) as an earlier kept record",
}

Canonical = dict[str, list[dict[str, str]]]
Result = tuple[Optional[Canonical], list[str]]


# --- small helpers ------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ('array', not 'list')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text_problem(value: Any, where: str, *, allow_empty: bool = False) -> str | None:
    """Why ``value`` is not usable text (``None`` when it is)."""
    if not isinstance(value, str):
        return f"non_string_content: {where} is {_json_type(value)}, expected a string"
    if not allow_empty and not value.strip():
        return f"empty_content: {where} is empty or whitespace"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid_utf8: {where} has a lone surrogate at char {e.start + 1}"
    return None


def _required_text(record: dict, key: str, reasons: list[str]) -> str:
    if key not in record:
        reasons.append(f"missing_field: '{key}' is missing")
        return ""
    problem = _text_problem(record[key], f"'{key}'")
    if problem:
        reasons.append(problem)
        return ""
    return record[key]


def _optional_text(record: dict, key: str, reasons: list[str]) -> str:
    """An optional text field; absent or null reads as ''."""
    value = record.get(key)
    if value is None:
        return ""
    problem = _text_problem(value, f"'{key}'", allow_empty=True)
    if problem:
        reasons.append(problem)
        return ""
    return value


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _role_order(roles: list[str]) -> list[str]:
    """Reasons why a list of valid roles is not ``[system] user assistant user ... assistant``."""
    reasons = []
    start = 1 if roles[0] == "system" else 0
    expected = "user"
    for i in range(start, len(roles)):
        role = roles[i]
        if role != expected:
            n = i + 1
            if role == "system":
                why = f"message {n} is system; only the first message may be system"
            elif i == start:
                why = f"message {n} is {role}; the first non-system message must be user"
            else:
                why = f"message {n} is {role} but {expected} was expected (user and assistant alternate)"
            reasons.append(f"role_order: {why}")
            break
        expected = "assistant" if expected == "user" else "user"
    if roles[-1] != "assistant":
        reasons.append(
            f"no_final_assistant: the last message ({len(roles)}) is {roles[-1]}; "
            "a training example must end with an assistant reply"
        )
    return reasons


# --- alpaca -------------------------------------------------------------------------------------


def _looks_like_alpaca(record: dict) -> bool:
    return "instruction" in record and "output" in record


def _alpaca_history(value: Any, reasons: list[str]) -> list[tuple[str, str]]:
    """``history``: a list of [user, assistant] pairs (absent or null = no history)."""
    if value is None:
        return []
    if not isinstance(value, list):
        reasons.append(
            f"bad_structure: 'history' is {_json_type(value)}, expected a list of [user, assistant] pairs"
        )
        return []
    pairs = []
    for i, pair in enumerate(value, 1):
        if not isinstance(pair, list) or len(pair) != 2:
            shape = f"array of {len(pair)}" if isinstance(pair, list) else _json_type(pair)
            reasons.append(f"bad_structure: history item {i} is {shape}, expected [user, assistant]")
            continue
        problems = [
            _text_problem(pair[0], f"history item {i} (user)"),
            _text_problem(pair[1], f"history item {i} (assistant)"),
        ]
        if any(problems):
            reasons.extend(p for p in problems if p)
            continue
        pairs.append((pair[0], pair[1]))
    return pairs


def _normalise_alpaca(record: dict) -> Result:
    """``{"instruction", "input"?, "output", "system"?, "history"?}`` -> canonical."""
    reasons: list[str] = []
    system = _optional_text(record, "system", reasons)
    history = _alpaca_history(record.get("history"), reasons)
    instruction = _required_text(record, "instruction", reasons)
    extra_input = _optional_text(record, "input", reasons)
    output = _required_text(record, "output", reasons)
    if reasons:
        return None, reasons
    messages = [_message("system", system)] if system.strip() else []
    for user, assistant in history:
        messages += [_message("user", user), _message("assistant", assistant)]
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages += [_message("user", user), _message("assistant", output)]
    return {"messages": messages}, []


# --- messages (OpenAI style) --------------------------------------------------------------------


def _looks_like_messages(record: dict) -> bool:
    return "messages" in record


def _normalise_messages(record: dict) -> Result:
    """``{"messages": [{"role", "content"}, ...]}`` -> canonical. Extra keys are ignored."""
    if "messages" not in record:
        return None, ["missing_field: 'messages' is missing"]
    items = record["messages"]
    if not isinstance(items, list):
        return None, [f"bad_structure: 'messages' is {_json_type(items)}, expected a list of messages"]
    if not items:
        return None, ["bad_structure: 'messages' is empty; expected a user and an assistant message"]

    reasons: list[str] = []
    messages: list[dict[str, str]] = []
    roles_ok = True
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            reasons.append(
                f"not_an_object: message {n} is {_json_type(item)}, expected {{\"role\": ..., \"content\": ...}}"
            )
            roles_ok = False
            continue
        role = item.get("role")
        if "role" not in item:
            reasons.append(f"missing_field: message {n} has no 'role'")
            roles_ok = False
        elif role not in ROLES:  # also rejects non-strings (unhashable values compare unequal)
            reasons.append(f"bad_role: message {n} has role {_short(role)}; allowed: {', '.join(ROLES)}")
            roles_ok = False
        where = f"message {n} ({role})" if role in ROLES else f"message {n}"
        if "content" not in item:
            reasons.append(f"missing_field: {where} has no 'content'")
            continue
        problem = _text_problem(item["content"], where)
        if problem:
            reasons.append(problem)
            continue
        if role in ROLES:
            messages.append(_message(role, item["content"]))
    if roles_ok:
        reasons += _role_order([item["role"] for item in items])
    if reasons:
        return None, reasons
    return {"messages": messages}, []


# --- registry and entry points ------------------------------------------------------------------


class _Format(NamedTuple):
    looks_like: Callable[[dict], bool]
    normalise: Callable[[dict], Result]
    keys: str  # what identifies it, for error messages


#: Supported formats, in detection priority order (ties go to the earlier one).
FORMATS: dict[str, _Format] = {
    "alpaca": _Format(_looks_like_alpaca, _normalise_alpaca, "'instruction' and 'output'"),
    "messages": _Format(_looks_like_messages, _normalise_messages, "'messages'"),
}

_DETECT_SAMPLE = 100


def _supported() -> str:
    return ", ".join(f"{name} (keys {f.keys})" for name, f in FORMATS.items())


def detect_format(records: list[Any]) -> str:
    """Name of the format most of the first (up to) 100 object records match, by their keys.

    Raises ``InputError`` naming the keys seen and the supported formats when none matches.
    """
    sample = []
    for record in records:
        if isinstance(record, dict):
            sample.append(record)
            if len(sample) >= _DETECT_SAMPLE:
                break
    if not sample:
        raise InputError(
            "cannot detect the dataset format: no record is a JSON object; "
            f"each record must be an object in one of these formats: {_supported()}"
        )
    votes = Counter(name for record in sample for name, f in FORMATS.items() if f.looks_like(record))
    if votes:
        best = max(votes.values())
        return next(name for name in FORMATS if votes[name] == best)
    keys = Counter(str(key) for record in sample for key in record)
    seen = ", ".join(f"{key!r} ({count})" for key, count in keys.most_common(20)) or "none"
    raise InputError(
        f"cannot detect the dataset format from the first {len(sample)} records: keys seen: {seen}. "
        f"Supported formats: {_supported()}. Rename the fields to match one of them."
    )


def normalise(record: Any, fmt: str) -> Result:
    """Convert one record of format ``fmt`` to the canonical shape.

    Returns ``(canonical, [])`` or ``(None, reasons)``; never raises on a JSON value. An unknown
    ``fmt`` is a caller error and raises ``InputError``.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; supported: {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        return None, [f"not_an_object: the record is {_json_type(record)}, expected a JSON object"]
    return FORMATS[fmt].normalise(record)
