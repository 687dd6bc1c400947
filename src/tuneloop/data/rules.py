"""Per-record rules: parse, normalise, check and PII-scan each record (in worker processes), in input order.

Entry point: :func:`record_verdicts` yields one :class:`Verdict` per input item, computed over chunks of
records by ``num_workers`` forked processes (:func:`map_chunks`, a bounded number of chunks in flight), in
order, so the outputs do not depend on the number of workers.
A verdict is ``ok`` (the canonical JSON of the normalised record, its exact-duplicate key and the text the
similarity checks compare) or ``bad`` (the quarantine line, with personal data redacted, and the reasons).

Also here: :class:`RuleTally` (rule counts and a few examples per rule), :func:`token_count` (the over-long
rule; it stops soon after ``max_length`` tokens, so one huge record costs no more than a long one) and
:func:`encode_prefix`, :func:`quarantine_line` and :func:`similarity_text` (what near-duplicate and contamination checks read).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple, TypeVar

from tuneloop.data import pii as piimod
from tuneloop.data.formats import normalise, record_texts, sft_messages
from tuneloop.data.sources import Item, parse_line

MAX_EXAMPLES = 3
T = TypeVar("T")
_CHUNK = 2000  # records per worker task
# ``{{name}}``-style slots left unfilled; ``${{ x.y }}`` (GitHub Actions), ``={{ ... }}`` (JSX) and
# expressions with dots or spaces are code, not template slots.
_PLACEHOLDER = re.compile(r"(?<![$=])\{\{\s*[A-Za-z_][A-Za-z0-9_]{0,40}\s*\}\}")
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def canonical_json(obj: Any) -> str:
    """The serialisation the digest is computed over (same as ``fsutil.sha256_json``)."""
    return _ENCODER.encode(obj)


def dedup_key(record: dict) -> bytes:
    """Digest of the record with whitespace runs collapsed in every text (case kept)."""
    if "messages" not in record:
        return hashlib.blake2b(" ".join(record["text"].split()).encode(), digest_size=16).digest()
    parts = [m["role"] + "\x1f" + " ".join(m["content"].split()) for m in record["messages"]]
    for key in ("chosen", "rejected"):
        if key in record:
            parts += [key + "\x1f" + " ".join(m["content"].split()) for m in record[key]]
    if "label" in record:
        parts.append(f"label\x1f{record['label']}")
    # \x1e/\x1f separate turns and fields; surrogates cannot occur in a normalised record.
    return hashlib.blake2b("\x1e".join(parts).encode(), digest_size=16).digest()


def _map_texts(record: dict, fn) -> dict:
    """A copy of a canonical record with ``fn`` applied to every text."""
    out = dict(record)
    if "text" in out:
        out["text"] = fn(out["text"])
    for key in ("messages", "chosen", "rejected"):
        if key in out:
            out[key] = [{**m, "content": fn(m["content"])} for m in out[key]]
    return out


def _placeholder_reasons(texts: list[str]) -> list[str]:
    found: list[str] = []
    for text in texts:
        if "{{" in text:
            found += [m.group() for m in _PLACEHOLDER.finditer(text)]
    if not found:
        return []
    shown = ", ".join(dict.fromkeys(f[:40] for f in found))
    return [f"placeholder: unfilled template placeholder(s) {shown}; fill them in or remove the record"]


def similarity_text(record: dict) -> str:
    """What near-duplicate and contamination checks compare: every text but system prompts (a system
    prompt shared by every record would make them all look alike)."""
    if "messages" not in record:
        return record["text"]
    parts = [m["content"] for m in record["messages"] if m["role"] != "system"]
    for key in ("chosen", "rejected"):
        parts += [m["content"] for m in record.get(key, ())]
    return "\n".join(parts)


class Verdict(NamedTuple):
    """A worker's verdict on one record. ``status``: 'ok' (``data`` = canonical JSON), or 'bad'
    (``data`` = the quarantine line). ``pii`` = (type, masked) findings."""

    line: int
    file: str | None
    status: str
    data: str
    key: bytes | None
    text: str | None
    pii: tuple[tuple[str, str], ...]
    reasons: tuple[str, ...]


def quarantine_line(line: int, file: str | None, reasons: list[str], record: Any) -> str:
    entry: dict[str, Any] = {"line": line}
    if file is not None:
        entry["file"] = file
    entry.update(reasons=reasons, record=piimod.redact_value(record))
    return json.dumps(entry, ensure_ascii=False, default=str)


def process_records(items: list[Item], fmt: str, pii_policy: str, want_text: bool) -> list[Verdict]:
    """The per-record work on a list of items (the map stage of any engine): one :class:`Verdict` each, in order."""
    out = []
    for item in items:
        value, raw, error = None, None, None
        if item.kind == 0:
            value, raw, error = parse_line(item.payload)
        elif item.kind == 1:
            value = item.payload
        else:
            raw, error = item.payload
        if error is not None:
            q = quarantine_line(item.line, item.file, [error], raw)
            out.append(Verdict(item.line, item.file, "bad", q, None, None, (), (error,)))
            continue
        record, reasons = normalise(value, fmt)
        if record is not None:
            texts = record_texts(record)
            reasons = _placeholder_reasons(texts)
        if reasons:
            reasons = [piimod.redact(r) for r in reasons]  # reasons quote bits of the record (e.g. a bad role)
            q = quarantine_line(item.line, item.file, reasons, value)
            out.append(Verdict(item.line, item.file, "bad", q, None, None, (), tuple(reasons)))
            continue
        if record is None:  # formats.normalise gives a reason with every refusal
            raise RuntimeError(f"normalise({fmt!r}) refused line {item.line} of {item.file} without a reason (a bug)")
        # One scan over all texts of the record joined (no pattern crosses a newline between turns).
        joined = "\n".join(texts)
        findings = tuple((f.type, piimod.mask(joined[f.start : f.end], f.type)) for f in piimod.scan(joined))
        if findings and pii_policy != "report":
            record = _map_texts(record, piimod.redact)
            if pii_policy == "drop":
                kinds = ", ".join(sorted({k for k, _ in findings}))
                reason = f"pii: found {kinds} (data.pii = drop)"
                q = quarantine_line(item.line, item.file, [reason], record)
                out.append(Verdict(item.line, item.file, "bad", q, None, None, findings, (reason,)))
                continue
        text = similarity_text(record) if want_text else None
        out.append(Verdict(item.line, item.file, "ok", canonical_json(record), dedup_key(record), text, findings, ()))
    return out


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


def map_chunks(
    items: Iterator[Item], work: Callable[[list[Item]], T], *, chunk: int = _CHUNK, num_workers: int = 1
) -> Iterator[T]:
    """``work`` on consecutive chunks of ``chunk`` items, results in input order; ``num_workers`` forked
    processes when there are at least two chunks. At most ``2 * num_workers + 1`` chunks are in flight, so
    memory stays bounded by the chunk size however long the input is (``Pool.imap`` reads its whole input
    ahead)."""
    chunks = _chunks(items, chunk)
    first = list(itertools.islice(chunks, 2))
    if num_workers <= 1 or len(first) < 2:
        for part in itertools.chain(first, chunks):
            yield work(part)
        return
    import multiprocessing as mp
    from collections import deque

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(num_workers) as pool:
        pending: deque = deque()
        for part in itertools.chain(first, chunks):
            pending.append(pool.apply_async(work, (part,)))
            if len(pending) > 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def record_verdicts(
    items: Iterator[Item], fmt: str, *, pii_policy: str, num_workers: int, want_text: bool
) -> Iterator[Verdict]:
    """Per-record verdicts in input order; a pool of ``num_workers`` processes when it pays."""
    work = partial(process_records, fmt=fmt, pii_policy=pii_policy, want_text=want_text)
    for part in map_chunks(items, work, num_workers=num_workers):
        yield from part


class RuleTally:
    """Rule counts and a few examples per rule."""

    def __init__(self) -> None:
        self.rules: Counter[str] = Counter()
        self.examples: dict[str, list[dict]] = {}

    def add(self, line: int, file: str | None, reasons: tuple[str, ...] | list[str]) -> None:
        for code in dict.fromkeys(reason.split(":", 1)[0] for reason in reasons):
            self.rules[code] += 1
            shown = self.examples.setdefault(code, [])
            if len(shown) < MAX_EXAMPLES:
                reason = next(r for r in reasons if r.startswith(code + ":"))
                ex: dict[str, Any] = {"line": line, "reason": reason}
                if file is not None:
                    ex["file"] = file
                shown.append(ex)


TOKEN_MARGIN = 8  # tokens at the end of a cut prefix that may differ from the whole text's tokens
_CHARS_PER_TOKEN = 8  # first guess of the characters needed per token (English averages about 4)


def _first_chars(max_tokens: int) -> int:
    return _CHARS_PER_TOKEN * (max_tokens + TOKEN_MARGIN) + 64


def encode_prefix(tokenizer, text: str, max_tokens: int | None) -> tuple[list[int], bool]:
    """(token ids, complete): the ids of all of ``text``, or, when it has more than ``max_tokens`` (plus
    :data:`TOKEN_MARGIN`) tokens, of a prefix that has that many (``complete`` False).

    Memory and time stay bounded by ``max_tokens``, not by the text: prefixes of growing length (8 characters
    per allowed token, then 4 times longer each round) are tokenized until one holds enough tokens or the
    text is used up. A cut can change only the last few tokens of the prefix (the margin), so its count is a
    lower bound of the whole text's. ``max_tokens`` None: the whole text.
    """
    if max_tokens is not None:
        chars = _first_chars(max_tokens)
        while len(text) > chars:
            ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) > max_tokens + TOKEN_MARGIN:
                return ids, False
            chars *= 4
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], True


def _chat_count(tokenizer, messages: list[dict], stop_after: int | None) -> tuple[int, bool]:
    """Tokens of ``messages`` rendered with the chat template, each content first cut to a prefix (grown
    like :func:`encode_prefix`) so that one huge message is never rendered or tokenized whole."""
    chars = None if stop_after is None else _first_chars(stop_after)
    while True:
        cut = chars is not None and any(len(m["content"]) > chars for m in messages)
        shown = [{"role": m["role"], "content": m["content"][:chars] if cut else m["content"]} for m in messages]
        ids, complete = encode_prefix(tokenizer, tokenizer.apply_chat_template(shown, tokenize=False), stop_after)
        if not cut or chars is None or stop_after is None:  # (a cut implies both are set)
            return len(ids), complete
        if len(ids) > stop_after + TOKEN_MARGIN:  # cut contents have no more tokens than the whole ones
            return len(ids), False
        chars *= 4


def token_count(tokenizer, record: dict, *, stop_after: int | None = None) -> tuple[int, bool]:
    """(tokens, exact) of a canonical record as it is trained on (chat template applied; for preference
    records the longer of prompt + chosen and prompt + rejected).

    With ``stop_after`` (``data.max_length``) counting stops soon after that many tokens: a longer record
    gets a count above ``stop_after`` that is a lower bound (``exact`` False), at a cost bounded by
    ``stop_after``, however long the record is.
    """
    msgs = sft_messages(record)
    if msgs is None:
        ids, complete = encode_prefix(tokenizer, record["text"], stop_after)
        return len(ids), complete
    variants = [msgs]
    if "rejected" in record:
        variants.append(list(record["messages"]) + list(record["rejected"]))
    n, exact = 0, True
    for v in variants:
        count, complete = _chat_count(tokenizer, v, stop_after)
        if count > n:
            n, exact = count, complete
    return n, exact


def count_tokens(tokenizer, record: dict) -> int:
    """The exact number of tokens of a record (see :func:`token_count`)."""
    return token_count(tokenizer, record)[0]
