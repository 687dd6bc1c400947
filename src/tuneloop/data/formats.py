"""Dataset formats: detect which one a dataset uses and normalise its records to one canonical shape.

Formats (names used in config and reports), in detection priority order:

==============  =====================================================================================
``preference``  ``prompt``/``chosen``/``rejected`` (prompt a string or a message list; answers a string,
                a message or a list of messages), or sharegpt/OpenAI-style ``conversations``/``messages``
                plus ``chosen`` + ``rejected``
``kto``         ``messages`` (or ``conversations``) + a boolean ``label`` (desirable or not)
``sharegpt``    ``conversations`` of ``{"from", "value"}``: human, gpt, system, function_call,
                observation; optional ``system`` and ``tools``
``messages``    OpenAI ``messages`` of ``{"role", "content"}``; assistant ``tool_calls`` and ``tool``
                turns; optional ``tools``
``alpaca``      ``instruction``, ``input``?, ``output``, ``system``?, ``history``?
``text``        ``{"text": ...}`` (plain text for continued pre-training)
==============  =====================================================================================

Canonical records (what ``<name>.clean.jsonl`` holds, one per line)::

    SFT (alpaca, sharegpt, messages):
        {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
         "tools"?: str}
    kto:        {"messages": [...same, ends with assistant...], "label": bool}
    preference: {"messages": [...the prompt: same roles, ends with a user turn...],
                 "chosen":   [{"role": "assistant", "content": str}],
                 "rejected": [{"role": "assistant", "content": str}]}
    text:       {"text": str}

In ``messages`` an optional leading system message comes first, then a user turn; user is followed by
assistant; assistant by user or tool; tool by assistant or another tool. An assistant turn that calls a tool
carries ``"tool_call": true`` and its content is the call as JSON text (``{"name": ..., "arguments": ...}``,
or a JSON list of such calls). ``tools`` is the tool schema as JSON text. Every content is a non-blank
string. The preference shape is TRL's conversational DPO shape with ``messages`` as the prompt:
``{"prompt": r["messages"], "chosen": r["chosen"], "rejected": r["rejected"]}``.

``normalise`` never raises on a JSON value: it returns ``(record, [])`` or ``(None, [reason, ...])``.
Each reason starts with a stable rule code (``"missing_field: 'output' is missing"``); the codes are
listed in ``RULES`` (``validate`` adds the dataset-level ones).

Adding a format is one ``_normalise_<name>`` function, one ``_looks_like_<name>`` predicate and one entry
in ``FORMATS``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from tuneloop.errors import InputError, short_repr

ROLES = ("system", "user", "assistant", "tool")

#: Rule code -> what it means. Reasons produced here and in ``validate`` start with one of these.
RULES = {
    "not_an_object": "the record (or a message in it) is not a JSON object",
    "missing_field": "a required field is absent",
    "bad_structure": "a field has the wrong container type or shape (e.g. 'messages' is not a list)",
    "non_string_content": "a text field is not a string",
    "empty_content": "a text field is empty or whitespace only",
    "invalid_utf8": "text is not valid UTF-8 (undecodable bytes, or lone surrogates from \\u escapes)",
    "bad_role": "a message role is not one the format allows",
    "role_order": "roles do not follow [system] user assistant (tool assistant) user assistant ...",
    "no_final_assistant": "the conversation does not end with an assistant message",
    "bad_label": "a kto record's 'label' is not true or false",
    "invalid_json": "the line is not valid JSON (JSONL only)",
    "placeholder": "text holds an unfilled template placeholder such as {{name}}",
    "overlong": "the sample is longer than data.max_length tokens",
    "pii": "the record holds personal data or a secret (data.pii = drop)",
    "exact_duplicate": "same content (whitespace collapsed) as an earlier kept record",
    "near_duplicate": "nearly the same text as an earlier kept record (MinHash similarity)",
    "contaminated": "shares too many n-grams with the evaluation data",
}

Canonical = dict[str, Any]
Result = tuple[Canonical | None, list[str]]


# --- small helpers ------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ('array', not 'list')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names: dict[type, str] = {dict: "object", list: "array", str: "string"}
    return names.get(type(value), type(value).__name__)


def _text_problem(value: Any, where: str, *, allow_empty: bool = False) -> str | None:
    """Why ``value`` is not usable text (``None`` when it is)."""
    if not isinstance(value, str):
        return f"non_string_content: {where} is {_json_type(value)}, expected a string"
    if not allow_empty and not value.strip():
        return f"empty_content: {where} is empty or whitespace"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid_utf8: {where} has an undecodable byte or lone surrogate at char {e.start + 1}"
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


def _message(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content}


_NEXT = {"user": ("assistant",), "assistant": ("user", "tool"), "tool": ("assistant", "tool")}


def _role_order(roles: list[str], *, final: str = "assistant") -> list[str]:
    """Reasons why a list of valid roles is not ``[system] user assistant (tool+ assistant)* user ... <final>``."""
    reasons = []
    if not roles:
        return ["bad_structure: the conversation has no messages"]
    start = 1 if roles[0] == "system" else 0
    prev = None
    for i in range(start, len(roles)):
        role, n = roles[i], i + 1
        allowed = ("user",) if prev is None else _NEXT[prev]
        if role not in allowed:
            if role == "system":
                why = f"message {n} is system; only the first message may be system"
            elif prev is None:
                why = f"message {n} is {role}; the first non-system message must be user"
            elif set(allowed) == {"assistant"} or set(allowed) == {"user", "tool"} and role == "assistant":
                want = " or ".join(allowed)
                why = f"message {n} is {role} but {want} was expected (user and assistant alternate)"
            else:
                why = f"message {n} is {role} but {' or '.join(allowed)} was expected after {prev}"
            reasons.append(f"role_order: {why}")
            break
        prev = role
    if roles[-1] != final:
        if final == "assistant":
            reasons.append(
                f"no_final_assistant: the last message ({len(roles)}) is {roles[-1]}; "
                "a training example must end with an assistant reply"
            )
        else:
            reasons.append(
                f"role_order: the prompt's last message ({len(roles)}) is {roles[-1]}; "
                "a preference prompt must end with a user turn"
            )
    elif len(roles) == start and final == "assistant":
        pass  # unreachable: roles[-1] would be system
    return reasons


def _tools(record: dict, reasons: list[str]) -> dict[str, str]:
    """The optional ``tools`` schema as JSON text (a list/object is serialised)."""
    value = record.get("tools")
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, (list, dict)):
        try:
            return {"tools": json.dumps(value, ensure_ascii=False, sort_keys=True)}
        except (TypeError, ValueError):
            reasons.append("bad_structure: 'tools' cannot be serialised to JSON")
            return {}
    problem = _text_problem(value, "'tools'")
    if problem:
        reasons.append(problem)
        return {}
    return {"tools": value}


# --- conversations (shared by sharegpt, messages, kto, preference) ------------------------------

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_OPENAI_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "developer": "system",
}


def _tool_calls_text(calls: Any, where: str, reasons: list[str]) -> str | None:
    """OpenAI ``tool_calls`` -> JSON text of ``{"name", "arguments"}`` (a list when more than one)."""
    if not isinstance(calls, list) or not calls:
        reasons.append(f"bad_structure: {where} 'tool_calls' is {_json_type(calls)}, expected a non-empty list")
        return None
    out = []
    for j, call in enumerate(calls, 1):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            reasons.append(f"bad_structure: {where} tool call {j} has no function name")
            return None
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append({"name": fn["name"], "arguments": args})
    try:
        return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)
    except (TypeError, ValueError):
        reasons.append(f"bad_structure: {where} tool call arguments cannot be serialised to JSON")
        return None


def _conversation(items: Any, field: str, style: str, reasons: list[str]) -> list[dict[str, Any]] | None:
    """Parse a list of turns (``style`` 'sharegpt' = from/value, 'openai' = role/content) into canonical
    messages. Appends reasons and returns ``None`` when a turn is unusable; role order is not checked here."""
    if not isinstance(items, list):
        reasons.append(f"bad_structure: '{field}' is {_json_type(items)}, expected a list of messages")
        return None
    if not items:
        reasons.append(f"bad_structure: '{field}' is empty; expected a user and an assistant message")
        return None
    role_key, text_key, table = (
        ("from", "value", _SHAREGPT_ROLES) if style == "sharegpt" else ("role", "content", _OPENAI_ROLES)
    )
    out: list[dict[str, Any]] = []
    ok = True
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            reasons.append(
                f'not_an_object: message {n} is {_json_type(item)}, expected {{"{role_key}": ..., "{text_key}": ...}}'
            )
            ok = False
            continue
        rk, tk, roles = role_key, text_key, table
        if rk not in item and tk not in item and ("role" in item or "from" in item):  # the other style
            rk, tk, roles = ("role", "content", _OPENAI_ROLES) if "role" in item else ("from", "value", _SHAREGPT_ROLES)
        if rk not in item:
            reasons.append(f"missing_field: message {n} has no '{rk}'")
            ok = False
            continue
        raw_role = item[rk]
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            allowed = ", ".join(
                k for k in (_SHAREGPT_ROLES if roles is _SHAREGPT_ROLES else ("system", "user", "assistant", "tool"))
            )
            reasons.append(f"bad_role: message {n} has {rk} {short_repr(raw_role, 40)}; allowed: {allowed}")
            ok = False
            continue
        where = f"message {n} ({role})"
        calls = item.get("tool_calls") if role == "assistant" else None
        if calls is not None and not (isinstance(item.get(tk), str) and item[tk].strip()):
            text = _tool_calls_text(calls, where, reasons)
            if text is None:
                ok = False
                continue
            out.append({"role": "assistant", "content": text, "tool_call": True})
            continue
        if tk not in item:
            reasons.append(f"missing_field: {where} has no '{tk}'")
            ok = False
            continue
        problem = _text_problem(item[tk], where)
        if problem:
            reasons.append(problem)
            ok = False
            continue
        msg = _message(role, item[tk])
        if raw_role == "function_call":
            msg["tool_call"] = True
        out.append(msg)
    return out if ok else None


def _leading_system(record: dict, messages: list[dict[str, Any]], reasons: list[str]) -> list[dict[str, Any]]:
    """A top-level ``system`` string becomes the first message (unless the conversation has one)."""
    system = _optional_text(record, "system", reasons)
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        return [_message("system", system)] + messages
    return messages


# --- alpaca -------------------------------------------------------------------------------------


def _looks_like_alpaca(record: dict) -> bool:
    return "instruction" in record and "output" in record


def _alpaca_history(value: Any, reasons: list[str]) -> list[tuple[str, str]]:
    """``history``: a list of [user, assistant] pairs (absent or null = no history)."""
    if value is None:
        return []
    if not isinstance(value, list):
        reasons.append(f"bad_structure: 'history' is {_json_type(value)}, expected a list of [user, assistant] pairs")
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


def _chat(record: dict, field: str, style: str, *, final: str = "assistant") -> Result:
    if field not in record:
        return None, [f"missing_field: '{field}' is missing"]
    reasons: list[str] = []
    messages = _conversation(record[field], field, style, reasons)
    if messages is not None:
        messages = _leading_system(record, messages, reasons)
        reasons += _role_order([m["role"] for m in messages], final=final)
    extra = _tools(record, reasons)
    if reasons:
        return None, reasons
    return {"messages": messages, **extra}, []


def _normalise_messages(record: dict) -> Result:
    """``{"messages": [{"role", "content" | "tool_calls"}, ...], "tools"?}`` -> canonical. Extra keys are ignored."""
    return _chat(record, "messages", "openai")


# --- sharegpt -----------------------------------------------------------------------------------


def _looks_like_sharegpt(record: dict) -> bool:
    return "conversations" in record


def _normalise_sharegpt(record: dict) -> Result:
    """``{"conversations": [{"from", "value"}, ...], "system"?, "tools"?}`` -> canonical."""
    return _chat(record, "conversations", "sharegpt")


# --- kto ----------------------------------------------------------------------------------------


def _looks_like_kto(record: dict) -> bool:
    return "label" in record and ("messages" in record or "conversations" in record)


def _normalise_kto(record: dict) -> Result:
    """``{"messages" | "conversations": [...], "label": bool}`` -> canonical + ``label``."""
    field, style = (
        ("messages", "openai")
        if "messages" in record or "conversations" not in record
        else ("conversations", "sharegpt")
    )
    out, reasons = _chat(record, field, style)
    label = record.get("label")
    if "label" not in record:
        reasons.append("missing_field: 'label' is missing")
    elif not isinstance(label, bool):
        reasons.append(f"bad_label: 'label' is {_json_type(label)} {short_repr(label, 40)}, expected true or false")
    if reasons:
        return None, reasons
    assert out is not None  # _chat gives a record whenever it gives no reasons
    return {**out, "label": label}, []


# --- preference ---------------------------------------------------------------------------------


def _looks_like_preference(record: dict) -> bool:
    return "chosen" in record and "rejected" in record


def _answer(record: dict, key: str, style: str, reasons: list[str]) -> list[dict[str, Any]] | None:
    """``chosen``/``rejected``: a string, one message, or a list of messages -> assistant messages."""
    if key not in record:
        reasons.append(f"missing_field: '{key}' is missing")
        return None
    value = record[key]
    if isinstance(value, str) or value is None or isinstance(value, (bool, int, float)):
        problem = _text_problem(value, f"'{key}'")
        if problem:
            reasons.append(problem)
            return None
        return [_message("assistant", cast(str, value))]  # _text_problem refuses anything but a string
    items = [value] if isinstance(value, dict) else value
    sub: list[str] = []
    msgs = _conversation(items, key, style, sub)
    reasons += [
        r.replace("message ", f"'{key}' message ", 1) if not r.startswith("bad_structure: '") else r for r in sub
    ]
    if msgs is None:
        return None
    if any(m["role"] not in ("assistant", "tool") for m in msgs) or msgs[-1]["role"] != "assistant":
        reasons.append(f"role_order: '{key}' must hold assistant turns only (ending with assistant)")
        return None
    return msgs


def _normalise_preference(record: dict) -> Result:
    """prompt/chosen/rejected or conversations|messages + chosen + rejected -> canonical preference."""
    reasons: list[str] = []
    if "prompt" in record:
        prompt = record["prompt"]
        style = "openai"
        if isinstance(prompt, list):
            style = "sharegpt" if prompt and isinstance(prompt[0], dict) and "from" in prompt[0] else "openai"
            messages = _conversation(prompt, "prompt", style, reasons)
        else:
            problem = _text_problem(prompt, "'prompt'")
            messages = None if problem else [_message("user", prompt)]
            if problem:
                reasons.append(problem)
    elif "conversations" in record:
        style = "sharegpt"
        messages = _conversation(record["conversations"], "conversations", style, reasons)
    elif "messages" in record:
        style = "openai"
        messages = _conversation(record["messages"], "messages", style, reasons)
    else:
        return None, ["missing_field: 'prompt' (or 'conversations' / 'messages') is missing"]
    if messages is not None:
        messages = _leading_system(record, messages, reasons)
        reasons += _role_order([m["role"] for m in messages], final="user")
    chosen = _answer(record, "chosen", style, reasons)
    rejected = _answer(record, "rejected", style, reasons)
    if (
        chosen is not None
        and rejected is not None
        and [m["content"] for m in chosen] == [m["content"] for m in rejected]
    ):
        reasons.append("bad_structure: 'chosen' and 'rejected' are the same answer")
    extra = _tools(record, reasons)
    if reasons:
        return None, reasons
    return {"messages": messages, "chosen": chosen, "rejected": rejected, **extra}, []


# --- text ---------------------------------------------------------------------------------------


def _looks_like_text(record: dict) -> bool:
    return "text" in record


def _normalise_text(record: dict) -> Result:
    """``{"text": str}`` -> ``{"text": str}``. Extra keys are ignored."""
    reasons: list[str] = []
    text = _required_text(record, "text", reasons)
    if reasons:
        return None, reasons
    return {"text": text}, []


# --- registry and entry points ------------------------------------------------------------------


class _Format(NamedTuple):
    looks_like: Callable[[dict], bool]
    normalise: Callable[[dict], Result]
    keys: str  # what identifies it, for error messages


#: Supported formats, in detection priority order: a record counts for the first format it matches.
FORMATS: dict[str, _Format] = {
    "preference": _Format(_looks_like_preference, _normalise_preference, "'chosen' and 'rejected'"),
    "kto": _Format(_looks_like_kto, _normalise_kto, "'messages' and 'label'"),
    "sharegpt": _Format(_looks_like_sharegpt, _normalise_sharegpt, "'conversations'"),
    "messages": _Format(_looks_like_messages, _normalise_messages, "'messages'"),
    "alpaca": _Format(_looks_like_alpaca, _normalise_alpaca, "'instruction' and 'output'"),
    "text": _Format(_looks_like_text, _normalise_text, "'text'"),
}

#: Formats whose records are SFT conversations (a ``messages`` list ending with an assistant turn).
SFT_FORMATS = ("alpaca", "sharegpt", "messages")

_DETECT_SAMPLE = 100


def _supported() -> str:
    return ", ".join(f"{name} (keys {f.keys})" for name, f in FORMATS.items())


def _first_match(record: dict) -> str | None:
    for name, f in FORMATS.items():
        if f.looks_like(record):
            return name
    return None


def detect_format(records: list[Any]) -> str:
    """Name of the format most of the first (up to) 100 object records match, by their keys.

    Each record votes for the first format (in ``FORMATS`` order) whose keys it has. Raises ``InputError``
    naming the keys seen and the supported formats when none matches.
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
    votes = Counter(name for name in map(_first_match, sample) if name)
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
    try:
        return FORMATS[fmt].normalise(record)
    except RecursionError:
        return None, ["bad_structure: the record is nested too deeply"]


def record_texts(record: Canonical) -> list[str]:
    """Every text of a canonical record, in order (what PII, placeholder and similarity checks read)."""
    if "text" in record and "messages" not in record:
        return [record["text"]]
    texts = [m["content"] for m in record.get("messages", ())]
    for key in ("chosen", "rejected"):
        texts += [m["content"] for m in record.get(key, ())]
    return texts


def sft_messages(record: Canonical) -> list[dict[str, Any]] | None:
    """The conversation a supervised fine-tune trains on: ``messages`` (+ ``chosen`` for preference
    records); ``None`` for text records."""
    if "messages" not in record:
        return None
    return list(record["messages"]) + list(record.get("chosen", ()))
