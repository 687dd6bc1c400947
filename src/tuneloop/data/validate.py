"""The data_validation stage: read a dataset, normalise every record, quarantine the bad ones.

Entry point: ``validate_dataset(path, out_dir, fmt=..., name=...)``. It writes, atomically:

- ``<name>.clean.jsonl``: kept canonical records in input order, each with ``"_line": N``;
- ``<name>.quarantine.jsonl``: ``{"line", "reasons", "record"}`` per rejected record (the original
  value, or the raw line text when it could not be parsed);
- ``<name>.report.json``: counts, rule tallies, examples and the digest (the dataset version).

Every input record lands in exactly one of the first two files. Records are processed one at a time;
a ``.json`` file is read whole (it is one JSON document), a ``.jsonl`` file line by line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, NamedTuple

from tuneloop.data.formats import FORMATS, detect_format, normalise
from tuneloop.errors import InputError
from tuneloop.fsutil import atomic_write_json

SUPPORTED_SUFFIXES = (".json", ".jsonl")
_DETECT_SAMPLE = 100  # object records looked at by format detection
_MAX_EXAMPLES = 3
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_BOM = b"\xef\xbb\xbf"


class _Item(NamedTuple):
    """One input record: its line, its parsed value, or the raw text and why it could not be parsed."""

    line: int
    value: Any = None
    raw: str | None = None
    error: str | None = None


# --- reading ------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; use null, a number or a string")


def _line_col(text: str, idx: int) -> tuple[int, int]:
    line = text.count("\n", 0, idx) + 1
    return line, idx - (text.rfind("\n", 0, idx) + 1) + 1


def _read_jsonl(path: Path) -> Iterator[_Item]:
    """One item per non-blank line; bad lines become items with an ``error``, never exceptions."""
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, 1):
            if lineno == 1 and data.startswith(_BOM):
                data = data[len(_BOM) :]
            data = data.rstrip(b"\r\n")
            if not data.strip():
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = data.decode("utf-8", errors="replace")
                why = f"invalid_utf8: byte 0x{data[e.start]:02x} at byte {e.start + 1} is not valid UTF-8"
                yield _Item(lineno, raw=raw, error=why)
                continue
            try:
                value = json.loads(text, parse_constant=_reject_constant)
            except json.JSONDecodeError as e:
                yield _Item(lineno, raw=text, error=f"invalid_json: {e.msg} (col {e.colno})")
            except ValueError as e:  # NaN / Infinity
                yield _Item(lineno, raw=text, error=f"invalid_json: {e}")
            except RecursionError:
                yield _Item(lineno, raw=text, error="invalid_json: nested too deeply to parse")
            else:
                yield _Item(lineno, value=value)


def _read_json_array(path: Path) -> Iterator[_Item]:
    """Elements of a top-level JSON array, each with the 1-based line where it starts.

    The file is one JSON document, so any syntax error is fatal: ``InputError`` with file:line:col.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(
            f"{path}:{line}:{col}: byte 0x{data[e.start]:02x} is not valid UTF-8; re-save the file as UTF-8"
        ) from None

    def fail(idx: int, what: str) -> InputError:
        line, col = _line_col(text, idx)
        return InputError(f"{path}:{line}:{col}: {what}")

    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    idx = _WS.match(text, 0).end()
    if text[idx : idx + 1] != "[":
        hint = "if it holds one JSON record per line, rename it to .jsonl"
        raise fail(idx, f"expected a JSON array of records ('[{{...}}, ...]'); {hint}")
    idx = _WS.match(text, idx + 1).end()
    line, counted_to = 1, 0
    if text[idx : idx + 1] != "]":
        while True:
            line += text.count("\n", counted_to, idx)
            counted_to = idx
            try:
                value, end = decoder.raw_decode(text, idx)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}; fix the file") from None
            except (ValueError, RecursionError) as e:
                why = str(e) if isinstance(e, ValueError) else "nested too deeply to parse"
                raise fail(idx, f"invalid JSON in the record starting here: {why}") from None
            yield _Item(line, value=value)
            idx = _WS.match(text, end).end()
            sep = text[idx : idx + 1]
            if sep == "]":
                break
            if sep != ",":
                raise fail(idx, "invalid JSON: expected ',' or ']' after a record; fix the file")
            idx = _WS.match(text, idx + 1).end()
    idx = _WS.match(text, idx + 1).end()
    if idx != len(text):
        raise fail(idx, "invalid JSON: extra data after the closing ']'; fix the file")


def _open_dataset(path: Path) -> Iterator[_Item]:
    """Check ``path`` and return an iterator over its records; ``InputError`` when it cannot be read."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(
            f"{path}: unsupported dataset file type {suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)} (a JSON array of records, or one JSON record per line)"
        )
    if not path.exists():
        raise InputError(f"{path}: dataset file not found; check the path (relative paths resolve from {Path.cwd()})")
    if not path.is_file():
        raise InputError(f"{path}: is not a file; point the dataset path at a {' or '.join(SUPPORTED_SUFFIXES)} file")
    return _read_jsonl(path) if suffix == ".jsonl" else _read_json_array(path)


def _peek(items: Iterator[_Item]) -> tuple[list[_Item], Iterator[_Item]]:
    """Read ahead until ``_DETECT_SAMPLE`` object records; return them and an iterator over all items."""
    sample: list[_Item] = []
    objects = 0
    for item in items:
        sample.append(item)
        objects += item.error is None and isinstance(item.value, dict)
        if objects >= _DETECT_SAMPLE:
            break
    return sample, itertools.chain(sample, items)


# --- writing ------------------------------------------------------------------------------------


@contextmanager
def _atomic_lines(path: Path, errors: str = "strict") -> Iterator[IO[str]]:
    """A text file written to a temp file next to ``path`` and renamed into place only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors=errors, newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _canonical_json(obj: Any) -> str:
    """The serialisation the digest is computed over (same as ``fsutil.sha256_json``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _dedup_key(record: dict) -> bytes:
    """Digest of the messages with whitespace runs collapsed (case kept)."""
    collapsed = [[m["role"], " ".join(m["content"].split())] for m in record["messages"]]
    return hashlib.sha256(_canonical_json(collapsed).encode()).digest()


# --- entry point --------------------------------------------------------------------------------


def validate_dataset(path: Path, out_dir: Path, *, fmt: str = "auto", name: str = "train") -> dict:
    """Validate and normalise the dataset at ``path``; write clean, quarantine and report files to ``out_dir``.

    ``fmt`` is a name from ``formats.FORMATS`` or ``"auto"`` (detected from the first 100 object records).
    Returns the report dict (also written to ``<name>.report.json``). Raises ``InputError`` for problems
    with the file as a whole (missing, unsupported type, empty, a ``.json`` file that is not valid JSON,
    undetectable format); problems with single records go to the quarantine instead.
    """
    path, out_dir = Path(path), Path(out_dir)
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; use 'auto' or one of: {', '.join(FORMATS)}")
    sample, items = _peek(_open_dataset(path))
    if not sample:
        raise InputError(f"{path}: the dataset has no records; add at least one record")
    if fmt == "auto":
        try:
            fmt = detect_format([item.value for item in sample if item.error is None])
        except InputError as e:
            raise InputError(f"{path}: {e}") from None

    clean_path = out_dir / f"{name}.clean.jsonl"
    quarantine_path = out_dir / f"{name}.quarantine.jsonl"
    valid = invalid = duplicates = 0
    rules: Counter[str] = Counter()
    examples: dict[str, list[dict]] = {}
    first_line: dict[bytes, int] = {}  # dedup key -> line of the kept record
    digest = hashlib.sha256(b"[")  # streams sha256_json(list of kept records)

    # Quarantine text may hold lone surrogates (from "\udXXX" escapes); backslashreplace writes them
    # back as the same JSON escape, so the line stays valid JSON.
    with _atomic_lines(clean_path) as clean, _atomic_lines(quarantine_path, "backslashreplace") as quarantine:
        for item in items:
            if item.error is not None:
                record, reasons = None, [item.error]
            else:
                record, reasons = normalise(item.value, fmt)
            if record is not None:
                key = _dedup_key(record)
                if key not in first_line:
                    first_line[key] = item.line
                    digest.update((b"," if valid else b"") + _canonical_json(record).encode())
                    valid += 1
                    clean.write(json.dumps({**record, "_line": item.line}, ensure_ascii=False) + "\n")
                    continue
                duplicates += 1
                reasons = [f"exact_duplicate: same as line {first_line[key]}"]
            else:
                invalid += 1
            original = item.raw if item.error is not None else item.value
            entry = {"line": item.line, "reasons": reasons, "record": original}
            quarantine.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
            for code in dict.fromkeys(reason.split(":", 1)[0] for reason in reasons):
                rules[code] += 1
                reason = next(r for r in reasons if r.startswith(code + ":"))
                shown = examples.setdefault(code, [])
                if len(shown) < _MAX_EXAMPLES:
                    shown.append({"line": item.line, "reason": reason})
    digest.update(b"]")

    report = {
        "path": str(path),
        "format": fmt,
        "position": "line",  # record numbers are 1-based file lines for both .json and .jsonl
        "records": valid + invalid + duplicates,
        "valid": valid,
        "invalid": invalid,
        "duplicates": duplicates,
        "valid_ratio": valid / (valid + invalid) if valid + invalid else 0.0,
        "rules": dict(rules.most_common()),
        "examples": examples,
        "digest": digest.hexdigest(),
        "clean_path": str(clean_path),
        "quarantine_path": str(quarantine_path),
    }
    atomic_write_json(out_dir / f"{name}.report.json", report)
    return report
