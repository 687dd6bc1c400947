"""The data_validation stage: read a dataset, normalise every record, check it, quarantine the bad ones.

Entry point: ``validate_dataset(source, out_dir, fmt=..., name=..., checks=...)``. It writes, atomically:

- ``<name>.clean.jsonl``: kept canonical records in input order, each with ``"_line": N`` (and ``"_file"``
  when the source is a directory);
- ``<name>.quarantine.jsonl``: ``{"line", "reasons", "record"}`` per removed record. ``record`` is the
  original value (or the raw line text when it could not be parsed) for records that failed a rule, and
  the canonical record for valid records removed later (duplicates, near duplicates, contamination,
  over-long, PII under ``drop``). Personal data and secrets found in it are always redacted;
- ``<name>.report.json`` and ``<name>.report.html``: counts, rule tallies, examples, PII counts and the
  digest (the dataset version).

Every input record lands in exactly one of the first two files; the report spells out the accounting::

    records = valid + invalid + duplicates + near_duplicates + contaminated + pii_dropped + overlong_dropped

(``valid`` is the number kept). Sources: ``.jsonl`` (read as bytes, line by line: a line that is not UTF-8
or not JSON is quarantined, never fatal), ``.json`` (one array), ``.parquet``, ``.csv``, a directory of
those, a dataset saved with ``datasets.save_to_disk``, or a Hugging Face dataset name read offline from the
local cache. Record positions are file lines for ``.json``/``.jsonl`` and 1-based record indexes otherwise.

The per-record work (JSON parsing, normalising, rules, PII) runs in ``checks.num_workers`` processes over
chunks of records, in order, so the outputs do not depend on the number of workers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from html import escape
from pathlib import Path
from typing import IO, Any, Iterator, NamedTuple

from tuneloop.data import pii as piimod
from tuneloop.data.formats import FORMATS, RULES, detect_format, normalise, record_texts, sft_messages
from tuneloop.errors import InputError
from tuneloop.fsutil import atomic_write_json, atomic_write_text

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_DETECT_SAMPLE = 100  # object records looked at by format detection
_MAX_EXAMPLES = 3
_CHUNK = 2000  # records per worker task
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_BOM = b"\xef\xbb\xbf"
# ``{{name}}``-style slots left unfilled; ``${{ x.y }}`` (GitHub Actions), ``={{ ... }}`` (JSX) and
# expressions with dots or spaces are code, not template slots.
_PLACEHOLDER = re.compile(r"(?<![$=])\{\{\s*[A-Za-z_][A-Za-z0-9_]{0,40}\s*\}\}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Checks:
    """What ``validate_dataset`` checks beyond the format rules (defaults match ``DataConfig``)."""

    pii: str = "report"  # report | redact | drop
    max_length: int | None = None  # tokens; checked only when a tokenizer is given
    overlong: str = "truncate"  # truncate | drop
    near_dup_threshold: float | None = 0.85
    near_dup_shingle: int = 5
    near_dup_action: str = "drop"  # report | drop
    contamination_ngram: int = 8
    contamination_threshold: float = 0.5
    contamination_action: str = "drop"  # report | drop
    num_workers: int = 2


def checks_from_config(data_cfg: Any) -> Checks:
    """``Checks`` from a ``DataConfig`` (or any object with the same attribute names)."""
    names = Checks.__dataclass_fields__
    return Checks(**{k: getattr(data_cfg, k) for k in names if hasattr(data_cfg, k)})


class _Item(NamedTuple):
    """One input record: position, file (directories only), and ``kind``: 0 = JSON text to parse
    (``payload`` is bytes), 1 = parsed value, 2 = unreadable (``payload`` = (raw text, reason))."""

    line: int
    file: str | None
    kind: int
    payload: Any


# --- reading ------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; use null, a number or a string")


def _line_col(text: str, idx: int) -> tuple[int, int]:
    line = text.count("\n", 0, idx) + 1
    return line, idx - (text.rfind("\n", 0, idx) + 1) + 1


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one instance: json.loads(...) builds one per call
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def _parse_line(data: bytes) -> tuple[Any, str | None, str | None]:
    """(value, raw text, error) for one JSONL line; never raises."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raw = data.decode("utf-8", errors="replace")
        return None, raw, f"invalid_utf8: byte 0x{data[e.start]:02x} at byte {e.start + 1} is not valid UTF-8"
    try:
        return _DECODER.decode(text), None, None
    except json.JSONDecodeError as e:
        return None, text, f"invalid_json: {e.msg} (col {e.colno})"
    except ValueError as e:  # NaN / Infinity
        return None, text, f"invalid_json: {e}"
    except RecursionError:
        return None, text, "invalid_json: nested too deeply to parse"


def _read_jsonl(path: Path, file: str | None = None) -> Iterator[_Item]:
    """One item per non-blank line, unparsed (workers parse); bad lines are quarantined, never fatal."""
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, 1):
            if lineno == 1 and data.startswith(_BOM):
                data = data[len(_BOM) :]
            data = data.rstrip(b"\r\n")
            if not data.strip():
                continue
            yield _Item(lineno, file, 0, data)


def _read_json_array(path: Path, file: str | None = None) -> Iterator[_Item]:
    """Elements of a top-level JSON array, each with the 1-based line where it starts.

    The file is one JSON document, so a syntax error is fatal: ``InputError`` with file:line:col. Bytes
    that are not UTF-8 are not: they end up in the strings as lone surrogates and the records holding
    them are quarantined by the ``invalid_utf8`` rule.
    """
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    text = data.decode("utf-8", errors="surrogateescape")

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
            yield _Item(line, file, 1, value)
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


def _csv_cell(key: str, value: str | None) -> Any:
    """CSV cells are text; a cell holding a JSON array/object (a message list) is parsed, and a ``label``
    column of true/false becomes a boolean."""
    if value is None:
        return None
    s = value.strip()
    if s[:1] in ("[", "{"):
        try:
            return json.loads(s)
        except ValueError:
            return value
    if key == "label" and s.lower() in ("true", "false", "1", "0"):
        return s.lower() in ("true", "1")
    return value


def _read_csv(path: Path, file: str | None = None) -> Iterator[_Item]:
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")  # bad bytes -> invalid_utf8 rule
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for n, row in enumerate(reader, 1):
            extra = row.pop(None, None)
            rec = {k: _csv_cell(k, v) for k, v in row.items()}
            if extra:
                yield _Item(n, file, 2, (json.dumps(extra), f"bad_structure: row has {len(extra)} more cells than the header"))
                continue
            yield _Item(n, file, 1, rec)
    except csv.Error as e:
        raise InputError(f"{path}: malformed CSV: {e}; fix the file") from None


def _read_parquet(path: Path, file: str | None = None) -> Iterator[_Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read Parquet: {e}") from None
    n = 0
    for batch in pf.iter_batches(batch_size=10_000):
        for rec in batch.to_pylist():
            n += 1
            yield _Item(n, file, 1, rec)


def _read_hf(ds: Any, split: str | None, where: str) -> Iterator[_Item]:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split and split in ds:
            ds = ds[split]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        elif "train" in ds:
            ds = ds["train"]
        else:
            raise InputError(f"{where}: has splits {', '.join(ds)}; say which one (e.g. {where}:{next(iter(ds))})")
    for n, rec in enumerate(ds, 1):
        yield _Item(n, None, 1, rec)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json_array, ".csv": _read_csv, ".parquet": _read_parquet}


def _is_saved_hf(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


@contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face libraries in offline mode (read from the local cache only), restored afterwards.

    The libraries read ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` at import time, so the module constants are
    switched too (they may have been imported before).
    """
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in env})
    import datasets.config
    import huggingface_hub.constants as hub

    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in
             ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"), (hub, "HF_HUB_OFFLINE"))
             if hasattr(mod, attr)]
    for mod, attr, _ in saved:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_source(source: str | os.PathLike[str]) -> tuple[Iterator[_Item], str]:
    """Records of ``source`` and how positions are counted (``"line"`` or ``"record"``).

    ``source`` is a file, a directory of files, a ``datasets.save_to_disk`` directory, or a Hugging Face
    dataset name (``name`` or ``name:split``) read offline. Raises ``InputError`` when it cannot be read.
    """
    text = str(source)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        if _is_saved_hf(path):
            from datasets import load_from_disk

            try:
                ds = load_from_disk(str(path))
            except Exception as e:
                raise InputError(f"{path}: cannot load the saved dataset: {e}") from None
            return _read_hf(ds, None, str(path)), "record"
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise InputError(f"{path}: the directory holds no {', '.join(SUPPORTED_SUFFIXES)} files")
        position = "line" if all(p.suffix.lower() in (".json", ".jsonl") for p in files) else "record"
        chained = itertools.chain.from_iterable(_READERS[p.suffix.lower()](p, p.relative_to(path).as_posix()) for p in files)
        return chained, position
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in _READERS:
            raise InputError(
                f"{path}: unsupported dataset file type {suffix or '(no extension)'!r}; supported: "
                f"{', '.join(SUPPORTED_SUFFIXES)}, a directory of them, or a saved Hugging Face dataset"
            )
        return _READERS[suffix](path), "line" if suffix in (".json", ".jsonl") else "record"
    if path.exists():
        raise InputError(f"{path}: is not a file or directory")
    if suffix in SUPPORTED_SUFFIXES or text.startswith((".", "/", "~")) or not _HUB_ID.match(text.split(":")[0]):
        raise InputError(f"{path}: dataset file not found; check the path (relative paths resolve from {Path.cwd()})")
    name, _, split = text.partition(":")
    try:
        with _hf_offline():
            import datasets

            ds = datasets.load_dataset(name, split=split or None)
    except Exception as e:
        raise InputError(
            f"{text}: not a local file and not a Hugging Face dataset in the local cache ({type(e).__name__}: "
            f"{str(e)[:200]}); tuneloop reads datasets offline: download it first, or give a file path"
        ) from None
    return _read_hf(ds, split or None, text), "record"


def _peek(items: Iterator[_Item]) -> tuple[list[_Item], Iterator[_Item]]:
    """Read ahead until ``_DETECT_SAMPLE`` object records; return them and an iterator over all items."""
    sample: list[_Item] = []
    objects = 0
    for item in items:
        sample.append(item)
        objects += item.kind != 2 and (item.kind == 1 or item.payload[:1] == b"{")
        if objects >= _DETECT_SAMPLE:
            break
    return sample, itertools.chain(sample, items)


def _sample_values(sample: list[_Item]) -> list[Any]:
    out = []
    for item in sample:
        if item.kind == 1:
            out.append(item.payload)
        elif item.kind == 0:
            value, _, error = _parse_line(item.payload)
            if error is None:
                out.append(value)
    return out


# --- per-record work (runs in worker processes) -------------------------------------------------


def _canonical_json(obj: Any) -> str:
    """The serialisation the digest is computed over (same as ``fsutil.sha256_json``)."""
    return _ENCODER.encode(obj)


def _dedup_key(record: dict) -> bytes:
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


def _similarity_text(record: dict) -> str:
    """What near-duplicate and contamination checks compare: every text but system prompts (a system
    prompt shared by every record would make them all look alike)."""
    if "messages" not in record:
        return record["text"]
    parts = [m["content"] for m in record["messages"] if m["role"] != "system"]
    for key in ("chosen", "rejected"):
        parts += [m["content"] for m in record.get(key, ())]
    return "\n".join(parts)


class _Out(NamedTuple):
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


def _quarantine_line(line: int, file: str | None, reasons: list[str], record: Any) -> str:
    entry: dict[str, Any] = {"line": line}
    if file is not None:
        entry["file"] = file
    entry.update(reasons=reasons, record=piimod.redact_value(record))
    return json.dumps(entry, ensure_ascii=False, default=str)


def _process(items: list[_Item], fmt: str, pii_policy: str, want_text: bool) -> list[_Out]:
    out = []
    for item in items:
        value, raw, error = None, None, None
        if item.kind == 0:
            value, raw, error = _parse_line(item.payload)
        elif item.kind == 1:
            value = item.payload
        else:
            raw, error = item.payload
        if error is not None:
            q = _quarantine_line(item.line, item.file, [error], raw)
            out.append(_Out(item.line, item.file, "bad", q, None, None, (), (error,)))
            continue
        record, reasons = normalise(value, fmt)
        if record is not None:
            texts = record_texts(record)
            reasons = _placeholder_reasons(texts)
        if reasons:
            reasons = [piimod.redact(r) for r in reasons]  # reasons quote bits of the record (e.g. a bad role)
            q = _quarantine_line(item.line, item.file, reasons, value)
            out.append(_Out(item.line, item.file, "bad", q, None, None, (), tuple(reasons)))
            continue
        # One scan over all texts of the record joined (no pattern crosses a newline between turns).
        joined = "\n".join(texts)
        findings = tuple((f.type, piimod.mask(joined[f.start : f.end], f.type)) for f in piimod.scan(joined))
        if findings and pii_policy != "report":
            record = _map_texts(record, piimod.redact)
            if pii_policy == "drop":
                kinds = ", ".join(sorted({k for k, _ in findings}))
                reason = f"pii: found {kinds} (data.pii = drop)"
                q = _quarantine_line(item.line, item.file, [reason], record)
                out.append(_Out(item.line, item.file, "bad", q, None, None, findings, (reason,)))
                continue
        text = _similarity_text(record) if want_text else None
        out.append(_Out(item.line, item.file, "ok", _canonical_json(record), _dedup_key(record), text, findings, ()))
    return out


def _chunks(items: Iterator[_Item], size: int) -> Iterator[list[_Item]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


def _results(items: Iterator[_Item], fmt: str, checks: Checks, want_text: bool) -> Iterator[_Out]:
    """Per-record verdicts in input order; a pool of ``checks.num_workers`` processes when it pays."""
    work = partial(_process, fmt=fmt, pii_policy=checks.pii, want_text=want_text)
    chunks = _chunks(items, _CHUNK)
    first = list(itertools.islice(chunks, 2))
    if checks.num_workers <= 1 or len(first) < 2:
        for chunk in itertools.chain(first, chunks):
            yield from work(chunk)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(checks.num_workers) as pool:
        for part in pool.imap(work, itertools.chain(first, chunks), chunksize=1):
            yield from part


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


class _Tally:
    """Rule counts and a few examples per rule."""

    def __init__(self) -> None:
        self.rules: Counter[str] = Counter()
        self.examples: dict[str, list[dict]] = {}

    def add(self, line: int, file: str | None, reasons: tuple[str, ...] | list[str]) -> None:
        for code in dict.fromkeys(reason.split(":", 1)[0] for reason in reasons):
            self.rules[code] += 1
            shown = self.examples.setdefault(code, [])
            if len(shown) < _MAX_EXAMPLES:
                reason = next(r for r in reasons if r.startswith(code + ":"))
                ex: dict[str, Any] = {"line": line, "reason": reason}
                if file is not None:
                    ex["file"] = file
                shown.append(ex)


def _count_tokens(tokenizer, record: dict) -> int:
    msgs = sft_messages(record)
    if msgs is None:
        return len(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
    variants = [msgs]
    if "rejected" in record:
        variants.append(list(record["messages"]) + list(record["rejected"]))
    n = 0
    for v in variants:
        text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in v], tokenize=False)
        n = max(n, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return n


def _near_dup_module():
    try:
        from tuneloop.data import dedup
    except ImportError:
        return None
    return dedup


# --- entry point --------------------------------------------------------------------------------


def open_detected(source: str | Path, fmt: str = "auto") -> tuple[Iterator[_Item], str, str]:
    """Open ``source`` and detect its format from the first records (unless ``fmt`` is given): (records,
    position kind, format). InputError for an empty dataset or an undetectable format."""
    items, position = open_source(source)
    sample, items = _peek(items)
    if not sample:
        raise InputError(f"{source}: the dataset has no records; add at least one record")
    if fmt == "auto":
        try:
            fmt = detect_format(_sample_values(sample))
        except InputError as e:
            raise InputError(f"{source}: {e}") from None
    return items, position, fmt


def validate_dataset(
    path: str | os.PathLike[str],
    out_dir: Path,
    *,
    fmt: str = "auto",
    name: str = "train",
    checks: Checks | None = None,
    tokenizer: Any = None,
    eval_texts: list[str] | None = None,
) -> dict:
    """Validate and normalise the dataset at ``path``; write clean, quarantine and report files to ``out_dir``.

    ``fmt`` is a name from ``formats.FORMATS`` or ``"auto"`` (detected from the first 100 object records).
    ``tokenizer`` enables the over-long rule (``checks.max_length``); ``eval_texts`` (see
    :func:`clean_texts`) enables the contamination check. Returns the report dict (also written to
    ``<name>.report.json``, with an HTML view in ``<name>.report.html``). Raises ``InputError`` for problems
    with the source as a whole (missing, unsupported type, empty, a ``.json`` file that is not valid JSON,
    undetectable format); problems with single records go to the quarantine instead.
    """
    checks = checks or Checks()
    out_dir = Path(out_dir)
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; use 'auto' or one of: {', '.join(FORMATS)}")
    if checks.pii not in ("report", "redact", "drop"):
        raise InputError(f"unknown PII policy {checks.pii!r}; use report, redact or drop")
    items, position, fmt = open_detected(path, fmt)

    dedup = _near_dup_module()
    near_on = checks.near_dup_threshold is not None and dedup is not None
    contam_on = eval_texts is not None and dedup is not None
    not_checked: dict[str, str] = {}
    if tokenizer is None or checks.max_length is None:
        not_checked["overlong"] = "no tokenizer given (validate from a pipeline config with a base model to count tokens)"
    if checks.near_dup_threshold is None:
        not_checked["near_duplicate"] = "disabled (data.near_dup_threshold is null)"
    elif dedup is None:
        not_checked["near_duplicate"] = "tuneloop.data.dedup is not available"
    if eval_texts is None:
        not_checked["contaminated"] = "no evaluation data given"

    clean_path = out_dir / f"{name}.clean.jsonl"
    quarantine_path = out_dir / f"{name}.quarantine.jsonl"
    counts = Counter(invalid=0, duplicates=0, near_duplicates=0, contaminated=0, pii_dropped=0, overlong_dropped=0)
    tally = _Tally()
    pii_counts: Counter[str] = Counter()
    pii_examples: dict[str, list[dict]] = {}
    pii_records = 0
    overlong_seen = 0
    first_line: dict[bytes, tuple[int, str | None]] = {}  # dedup key -> (line, file) of the kept record
    kept: list[tuple[int, str | None, bool]] = []  # (line, file, has_pii) of kept candidates
    texts: list[str] = []
    records = 0

    out_dir.mkdir(parents=True, exist_ok=True)
    stage_fd, stage_name = tempfile.mkstemp(prefix=f".{name}.stage.", suffix=".tmp", dir=out_dir)
    stage_path = Path(stage_name)
    try:
        # Quarantine text may hold lone surrogates (from "\udXXX" escapes); backslashreplace writes them
        # back as the same JSON escape, so the line stays valid JSON.
        with _atomic_lines(clean_path) as clean, _atomic_lines(quarantine_path, "backslashreplace") as quarantine:
            with os.fdopen(stage_fd, "w", encoding="utf-8", newline="\n") as stage:
                for r in _results(items, fmt, checks, want_text=near_on or contam_on):
                    records += 1
                    if r.pii:
                        pii_records += 1
                        for kind, masked in r.pii:
                            pii_counts[kind] += 1
                            shown = pii_examples.setdefault(kind, [])
                            if len(shown) < _MAX_EXAMPLES:
                                shown.append({"line": r.line, **({"file": r.file} if r.file else {}), "masked": masked})
                    if r.status == "bad":
                        quarantine.write(r.data + "\n")
                        tally.add(r.line, r.file, r.reasons)
                        counts["pii_dropped" if r.reasons[0].startswith("pii:") else "invalid"] += 1
                        continue
                    if r.key in first_line:
                        line, file = first_line[r.key]
                        reason = f"exact_duplicate: same as line {line}" + (f" of {file}" if file is not None else "")
                        quarantine.write(_quarantine_line(r.line, r.file, [reason], json.loads(r.data)) + "\n")
                        tally.add(r.line, r.file, [reason])
                        counts["duplicates"] += 1
                        continue
                    if tokenizer is not None and checks.max_length is not None:
                        rec = json.loads(r.data)
                        n_tok = _count_tokens(tokenizer, rec)
                        if n_tok > checks.max_length:
                            overlong_seen += 1
                            verb = "dropped" if checks.overlong == "drop" else "will be truncated"
                            reason = f"overlong: {n_tok} tokens > data.max_length {checks.max_length} ({verb})"
                            tally.add(r.line, r.file, [reason])
                            if checks.overlong == "drop":
                                quarantine.write(_quarantine_line(r.line, r.file, [reason], rec) + "\n")
                                counts["overlong_dropped"] += 1
                                continue
                    first_line[r.key] = (r.line, r.file)
                    kept.append((r.line, r.file, bool(r.pii)))
                    stage.write(r.data + "\n")
                    if r.text is not None:
                        texts.append(r.text)
            del first_line

            # Dataset-level checks on the kept candidates: near duplicates within, contamination against eval.
            removed: dict[int, str] = {}
            near_groups = 0
            if near_on and len(texts) > 1:
                groups = dedup.near_duplicate_groups(
                    texts, threshold=checks.near_dup_threshold, shingle_size=checks.near_dup_shingle
                )
                near_groups = len(groups)
                for group in groups:
                    head = kept[group[0]]
                    for i in group[1:]:
                        removed[i] = f"near_duplicate: similar to line {head[0]}" + (f" of {head[1]}" if head[1] else "")
            contamination: dict[int, float] = {}
            if contam_on and texts:
                contamination = dedup.contaminated_indices(
                    texts, eval_texts, ngram=checks.contamination_ngram, threshold=checks.contamination_threshold
                )
            near_n = contam_n = 0
            for i in sorted(set(removed) | set(contamination)):
                line, file, _ = kept[i]
                reasons = []
                if i in removed:
                    near_n += 1
                    reasons.append(removed[i] + ("" if checks.near_dup_action == "drop" else " (reported, kept)"))
                if i in contamination:
                    contam_n += 1
                    reasons.append(
                        f"contaminated: {contamination[i]:.0%} of its {checks.contamination_ngram}-grams occur in the eval data"
                        + ("" if checks.contamination_action == "drop" else " (reported, kept)")
                    )
                tally.add(line, file, reasons)
            drop = set()
            if checks.near_dup_action == "drop":
                drop |= set(removed)
            if checks.contamination_action == "drop":
                drop |= set(contamination)
            del texts

            digest = hashlib.sha256(b"[")  # streams sha256_json(list of kept records)
            valid = pii_kept = 0
            with open(stage_path, encoding="utf-8") as staged:
                for i, data in enumerate(staged):
                    data = data.rstrip("\n")
                    line, file, has_pii = kept[i]
                    if i in drop:
                        reason = removed.get(i) if i in removed and checks.near_dup_action == "drop" else None
                        if reason is not None:
                            counts["near_duplicates"] += 1
                        else:
                            counts["contaminated"] += 1
                        why = [x for x in (removed.get(i), f"contaminated: {contamination[i]:.0%} n-gram overlap with the eval data" if i in contamination else None) if x]
                        quarantine.write(_quarantine_line(line, file, why, json.loads(data)) + "\n")
                        continue
                    digest.update((b"," if valid else b"") + data.encode())
                    valid += 1
                    pii_kept += has_pii and checks.pii == "report"
                    extra = f',"_line":{line}' + (f',"_file":{json.dumps(file)}' if file is not None else "")
                    clean.write(data[:-1] + extra + "}\n")
            digest.update(b"]")
    finally:
        stage_path.unlink(missing_ok=True)

    accounted = valid + sum(counts.values())
    assert accounted == records, (accounted, records)  # every record is kept or quarantined exactly once
    report = {
        "path": str(path),
        "format": fmt,
        "position": position,
        "records": records,
        "valid": valid,
        "invalid": counts["invalid"],
        "duplicates": counts["duplicates"],
        "near_duplicates": counts["near_duplicates"],
        "contaminated": counts["contaminated"],
        "pii_dropped": counts["pii_dropped"],
        "overlong_dropped": counts["overlong_dropped"],
        "accounting": (
            f"records {records} = valid {valid} + invalid {counts['invalid']} + duplicates {counts['duplicates']}"
            f" + near_duplicates {counts['near_duplicates']} + contaminated {counts['contaminated']}"
            f" + pii_dropped {counts['pii_dropped']} + overlong_dropped {counts['overlong_dropped']}"
        ),
        "valid_ratio": (records - counts["invalid"]) / records if records else 0.0,
        "duplicate_ratio": (counts["duplicates"] + near_n) / records if records else 0.0,
        "contamination_ratio": contam_n / records if records else 0.0,
        "near_duplicate_found": near_n,
        "near_duplicate_groups": near_groups,
        "contaminated_found": contam_n,
        "overlong": {"max_length": checks.max_length, "policy": checks.overlong, "records": overlong_seen}
        if "overlong" not in not_checked else None,
        "pii": dict(sorted(pii_counts.items())),
        "pii_records": pii_records,
        "pii_records_kept": pii_kept,
        "pii_policy": checks.pii,
        "pii_examples": pii_examples,
        "rules": dict(tally.rules.most_common()),
        "rules_not_checked": not_checked,
        "examples": tally.examples,
        "checks": asdict(checks),
        "digest": digest.hexdigest(),
        "clean_path": str(clean_path),
        "quarantine_path": str(quarantine_path),
        "report_path": str(out_dir / f"{name}.report.json"),
        "html_path": str(out_dir / f"{name}.report.html"),
    }
    atomic_write_json(out_dir / f"{name}.report.json", report)
    atomic_write_text(out_dir / f"{name}.report.html", report_html(report))
    return report


def clean_texts(clean_path: Path) -> list[str]:
    """The texts of the records in a clean file, as the similarity checks read them (for ``eval_texts``)."""
    out = []
    with open(clean_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(_similarity_text(json.loads(line)))
    return out


# --- gates --------------------------------------------------------------------------------------


@dataclass
class Gate:
    name: str
    value: float
    op: str
    threshold: float
    passed: bool
    detail: str = ""


def data_gates(report: dict, data_cfg: Any) -> list[Gate]:
    """The data gates of ``data_cfg`` (``min_valid_ratio``, ``max_duplicate_ratio``, ``max_contamination``,
    ``max_pii_records``) applied to one report; a gate set to ``None`` is left out."""
    gates = []

    def add(name: str, value: float, op: str, detail: str) -> None:
        threshold = getattr(data_cfg, name, None)
        if threshold is None:
            return
        ok = value >= threshold if op == ">=" else value <= threshold
        gates.append(Gate(name, value, op, threshold, ok, detail))

    r = report
    add("min_valid_ratio", r["valid_ratio"], ">=", f"{r['records'] - r['invalid']} of {r['records']} records pass the format rules")
    add("max_duplicate_ratio", r["duplicate_ratio"], "<=", f"{r['duplicates']} exact + {r['near_duplicate_found']} near duplicates of {r['records']} records")
    add("max_contamination", r["contamination_ratio"], "<=", f"{r['contaminated_found']} of {r['records']} records overlap the eval data")
    add("max_pii_records", r["pii_records_kept"], "<=", f"{r['pii_records_kept']} kept records hold PII (policy {r['pii_policy']})")
    return gates


def gate_failures(report: dict, data_cfg: Any, *, split: str = "train") -> list[str]:
    """Readable messages for the failed gates of one report (empty when all pass)."""
    out = []
    for g in data_gates(report, data_cfg):
        if not g.passed:
            fmt = (lambda v: f"{v:.4g}") if isinstance(g.value, float) else str
            out.append(
                f"data gate {g.name} failed on {split}: {fmt(g.value)} is not {g.op} {g.threshold} "
                f"({g.detail}); report: {report['report_path']}; removed records with reasons: {report['quarantine_path']}"
            )
    return out


# --- HTML ---------------------------------------------------------------------------------------

_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}"
    "th{background:#f6f6f6}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}.bad{color:#c5221f}.ok{color:#137333}"
)


def report_html(report: dict, gates: list[Gate] | None = None) -> str:
    """A small self-contained HTML page for a validation report (no scripts, no external files)."""

    def table(rows: list[tuple], head: tuple) -> str:
        h = "".join(f"<th>{escape(str(x))}</th>" for x in head)
        body = "".join("<tr>" + "".join(f"<td>{escape(str(x))}</td>" for x in row) + "</tr>" for row in rows)
        return f"<table><tr>{h}</tr>{body}</table>"

    r = report
    keys = ("format", "records", "valid", "invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped", "overlong_dropped", "valid_ratio", "digest")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>data report: {escape(r['path'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Data report</h1><p><code>{escape(r['path'])}</code></p>",
        table([(k, r[k]) for k in keys], ("", "value")),
        f"<p>{escape(r['accounting'])}</p>",
    ]
    if gates:
        parts.append("<h2>Gates</h2>" + table([(g.name, f"{g.value:.4g}", f"{g.op} {g.threshold}", "passed" if g.passed else "FAILED") for g in gates], ("gate", "value", "threshold", "verdict")))
    parts.append("<h2>Rules</h2>" + table([(k, n, RULES.get(k, "")) for k, n in r["rules"].items()], ("rule", "records", "meaning")))
    if r["rules_not_checked"]:
        parts.append("<p>Not checked: " + escape("; ".join(f"{k}: {v}" for k, v in r["rules_not_checked"].items())) + "</p>")
    ex = [(k, e.get("file", ""), e["line"], e["reason"][:300]) for k, es in r["examples"].items() for e in es]
    if ex:
        parts.append("<h2>Examples</h2>" + table(ex, ("rule", "file", r["position"], "reason")))
    parts.append("<h2>Personal data and secrets</h2>")
    parts.append(table([(k, n) for k, n in r["pii"].items()], ("type", "found")) if r["pii"] else "<p>none found</p>")
    pe = [(k, e["line"], e["masked"]) for k, es in r["pii_examples"].items() for e in es]
    if pe:
        parts.append(table(pe, ("type", r["position"], "masked")))
    parts.append(f"<p>policy: {escape(r['pii_policy'])}; records with PII: {r['pii_records']}, kept unredacted: {r['pii_records_kept']}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


# --- command-line entry -------------------------------------------------------------------------


def validate_target(
    target: str,
    *,
    fmt: str | None = None,
    out_dir: Path | None = None,
    eval_data: str | None = None,
) -> dict[str, Any]:
    """``tuneloop data validate``: validate a dataset (file, directory, name) or the data of a pipeline config.

    A dataset is checked with the default ``data:`` settings and gates, without a tokenizer (so the
    over-long rule is reported as not checked); ``eval_data`` adds the contamination check. A config
    (``.yaml``/``.yml``) uses its own data settings, gates, eval data and base model tokenizer. Writes
    ``<name>.report.json``/``.html`` (with the gate verdicts; ``<name>`` is the dataset's file stem, or
``train``/``eval`` for a config) into ``out_dir`` (default
    ``./tuneloop-data-report`` for a dataset, ``<workspace>/data-report`` for a config). Returns the train
    report with ``gates``, ``passed``, ``out_dir`` and, when there is eval data, ``eval`` (its report).
    """
    from tuneloop.config import DataConfig, load_config

    tokenizer = None
    name = "train"
    if Path(target).suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(target, [f"data.format={fmt}"] if fmt else [])
        data = cfg.data
        if eval_data:
            data = data.model_copy(update={"eval_data": eval_data})
        if out_dir is None:
            from tuneloop.workspace import Workspace

            out_dir = Workspace.for_config(cfg).root / "data-report"
        try:
            from tuneloop.modeling import load_tokenizer

            tokenizer = load_tokenizer(cfg.base_model, data.chat_template)
        except Exception:  # reported as "not checked" in the report
            tokenizer = None
    else:
        data = DataConfig(train_data=target, eval_data=eval_data, **({"format": fmt} if fmt else {}))
        out_dir = Path("tuneloop-data-report") if out_dir is None else out_dir
        name = re.sub(r"[^\w.-]+", "_", Path(target.split(":")[0]).stem) or "dataset"
    out_dir = Path(out_dir)
    checks = checks_from_config(data)
    result: dict[str, Any] = {}
    eval_texts = None
    if data.eval_data:
        ev = validate_dataset(data.eval_data, out_dir, fmt=data.format, name="eval", checks=checks, tokenizer=tokenizer)
        eval_texts = clean_texts(Path(ev["clean_path"]))
        ev_gates = data_gates(ev, data)
        ev = {**ev, "gates": [vars(g) for g in ev_gates], "passed": all(g.passed for g in ev_gates)}
        atomic_write_json(Path(ev["report_path"]), ev)
        atomic_write_text(Path(ev["html_path"]), report_html(ev, ev_gates))
        result["eval"] = ev
    tr = validate_dataset(data.train_data, out_dir, fmt=data.format, name=name, checks=checks, tokenizer=tokenizer, eval_texts=eval_texts)
    gates = data_gates(tr, data)
    failures = gate_failures(tr, data) + (gate_failures(result["eval"], data, split="eval") if "eval" in result else [])
    tr = {**tr, "gates": [vars(g) for g in gates], "passed": all(g.passed for g in gates)}
    atomic_write_json(Path(tr["report_path"]), tr)
    atomic_write_text(Path(tr["html_path"]), report_html(tr, gates))
    return {**tr, **result, "failures": failures, "passed": not failures, "out_dir": str(out_dir)}
