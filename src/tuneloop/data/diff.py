"""What changed between two versions of a dataset: added, removed and changed records.

Entry point: :func:`diff_datasets`. Both sides are read like ``validate`` reads them (any supported source
and format) and normalised; records that fail the format rules are left out of the comparison and counted
as ``skipped``. Records are matched by a key:

* the original record's ``id`` field, when both sides have one;
* otherwise the prompt: the canonical conversation without its final assistant turn (a preference
  record's prompt; a text record's whole text).

A key on both sides with a different answer (final assistant turn, chosen/rejected, kto label) is
``changed``; a key on one side only is ``added`` or ``removed``. A key repeated within one side is matched
occurrence by occurrence. Example texts are shortened and have personal data redacted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tuneloop.data import pii as piimod
from tuneloop.data.formats import normalise
from tuneloop.data.rules import canonical_json
from tuneloop.data.sources import open_detected, parse_line

_MAX_EXAMPLES = 5


def _split(record: dict) -> tuple[Any, Any]:
    """(prompt part, answer part) of a canonical record."""
    if "messages" not in record:
        return record["text"], None
    msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "chosen" in record:
        return msgs, {
            "chosen": [m["content"] for m in record["chosen"]],
            "rejected": [m["content"] for m in record["rejected"]],
        }
    answer: dict[str, Any] = {"answer": msgs[-1]["content"]}
    if "label" in record:
        answer["label"] = record["label"]
    return msgs[:-1], answer


def _preview(value: Any, limit: int = 160) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict):  # a prompt: show its last turn
        value = value[-1]["content"]
    elif isinstance(value, dict) and set(value) == {"answer"}:
        value = value["answer"]
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = piimod.redact(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load(source: str | Path, fmt: str) -> tuple[str, dict[str, list[tuple[int, Any, Any]]], dict[str, Any]]:
    items, _, fmt = open_detected(source, fmt)
    by_key: dict[str, list[tuple[int, Any, Any]]] = {}
    stats: dict[str, Any] = {"records": 0, "skipped": 0, "with_id": 0}
    digest = hashlib.sha256()
    for item in items:
        stats["records"] += 1
        if item.kind == 0:
            value, _, error = parse_line(item.payload)
        elif item.kind == 1:
            value, error = item.payload, None
        else:
            value, error = None, item.payload[1]
        record = None
        if error is None:
            record, _ = normalise(value, fmt)
        if record is None:
            stats["skipped"] += 1
            continue
        prompt, answer = _split(record)
        rid = value.get("id") if isinstance(value, dict) else None
        if rid is not None and isinstance(rid, (str, int)) and not isinstance(rid, bool):
            stats["with_id"] += 1
            key = f"id:{rid}"
        else:
            key = "prompt:" + hashlib.sha256(canonical_json(prompt).encode()).hexdigest()
        digest.update(canonical_json(record).encode())
        by_key.setdefault(key, []).append((item.line, prompt, answer))
    stats["format"] = fmt
    stats["digest"] = digest.hexdigest()
    return fmt, by_key, stats


def diff_datasets(a: str | Path, b: str | Path, *, fmt: str = "auto") -> dict[str, Any]:
    """Compare dataset ``a`` (old) with ``b`` (new). Returns counts and a few examples of each kind."""
    _, old, sa = _load(a, fmt)
    _, new, sb = _load(b, fmt)
    if (
        sa["with_id"]
        and sb["with_id"]
        and (sa["with_id"] < sa["records"] - sa["skipped"] or sb["with_id"] < sb["records"] - sb["skipped"])
    ):
        match = "mixed (id where present, else prompt)"
    else:
        match = "id" if sa["with_id"] and sb["with_id"] else "prompt"
    if match == "prompt" and (sa["with_id"] or sb["with_id"]):
        # ids on one side only cannot match the other side: fall back to prompts everywhere
        old, new = _rekey(old), _rekey(new)
    counts = {"added": 0, "removed": 0, "changed": 0, "unchanged": 0}
    examples: dict[str, list[dict]] = {"added": [], "removed": [], "changed": []}

    def example(kind: str, entry: dict) -> None:
        if len(examples[kind]) < _MAX_EXAMPLES:
            examples[kind].append(entry)

    for key in list(old) + [k for k in new if k not in old]:
        olds, news = old.get(key, []), new.get(key, [])
        for i in range(max(len(olds), len(news))):
            if i >= len(news):
                line, prompt, answer = olds[i]
                counts["removed"] += 1
                example("removed", {"a_line": line, "prompt": _preview(prompt), "answer": _preview(answer)})
            elif i >= len(olds):
                line, prompt, answer = news[i]
                counts["added"] += 1
                example("added", {"b_line": line, "prompt": _preview(prompt), "answer": _preview(answer)})
            elif olds[i][2] != news[i][2] or (key.startswith("id:") and olds[i][1] != news[i][1]):
                counts["changed"] += 1
                example(
                    "changed",
                    {
                        "a_line": olds[i][0],
                        "b_line": news[i][0],
                        "prompt": _preview(news[i][1]),
                        "before": _preview(olds[i][2]),
                        "after": _preview(news[i][2]),
                    },
                )
            else:
                counts["unchanged"] += 1
    return {
        "a": {"path": str(a), **sa},
        "b": {"path": str(b), **sb},
        "match": match,
        **counts,
        "examples": examples,
    }


def _rekey(by_key: dict[str, list[tuple[int, Any, Any]]]) -> dict[str, list[tuple[int, Any, Any]]]:
    out: dict[str, list[tuple[int, Any, Any]]] = {}
    for entries in by_key.values():
        for line, prompt, answer in entries:
            key = "prompt:" + hashlib.sha256(canonical_json(prompt).encode()).hexdigest()
            out.setdefault(key, []).append((line, prompt, answer))
    for entries in out.values():
        entries.sort(key=lambda e: e[0])
    return out
