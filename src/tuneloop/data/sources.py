"""Dataset sources and readers: files, directories, saved and named Hugging Face datasets.

Entry points: :func:`open_source` (records of a source and how positions are counted) and
:func:`open_detected` (the same, with the record format detected from the first records). Sources:
``.jsonl`` (read as bytes, line by line: a line that is not UTF-8 or not JSON becomes an unreadable item for
the quarantine, never fatal), ``.json`` (one array), ``.parquet``, ``.csv``, a directory of those, a dataset
saved with ``datasets.save_to_disk``, or a Hugging Face dataset name read offline from the local cache; or an
object-store URL (``s3://bucket/key.jsonl``, a prefix ``s3://bucket/dir/`` read as a directory; ``gs://``), streamed
through fsspec by the same readers (:mod:`.objstore`: credentials and endpoint from the AWS environment).
``.json``/``.jsonl`` may be gzip- (``.gz``) or zstd-compressed (``.zst``, with the optional ``zstandard``
package); compression is recognised by its magic bytes, so a gzip file named ``.jsonl`` is read too. A file
that is empty, UTF-16/32 or binary is an ``InputError`` that says so (:mod:`.filetypes`). Record positions
are physical file lines for ``.json``/``.jsonl``/``.csv`` (a CSV header is line 1) and 1-based record
indexes otherwise. :func:`data_suffix` is the dataset suffix of a file name (``.jsonl.gz``).

:func:`open_sources` reads a list of sources (``data.train_data: [a.jsonl, {path: b.jsonl, weight: 3}]``) as one
dataset: the sources' records chained in order, each labelled with its source as written.

:func:`source_problem` and :func:`source_digest` say, before any reading, whether a configured source (or list
of sources) looks usable and what its content identity is (for cache keys).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

from tuneloop.config import DATA_SUFFIXES, TrainSource
from tuneloop.data.filetypes import SNIFF_BYTES, open_bytes, read_head, sniff, unreadable_reason
from tuneloop.data.formats import detect_format, normalise
from tuneloop.data.objstore import ObjectPath, is_url, list_objects, url_digest, url_problem
from tuneloop.errors import InputError
from tuneloop.fsutil import sha256_file, sha256_json

SUPPORTED_SUFFIXES = DATA_SUFFIXES
DETECT_SAMPLE = 100  # object records looked at by format detection
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
BOM = b"\xef\xbb\xbf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
_EXPECTED = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}


def data_suffix(name: str) -> str:
    """The dataset suffix of a file name: the longest of :data:`SUPPORTED_SUFFIXES` it ends with
    (``x.jsonl.gz`` -> ``.jsonl.gz``), else its last suffix (``x.txt`` -> ``.txt``)."""
    low = name.lower()
    return max((s for s in SUPPORTED_SUFFIXES if low.endswith(s)), key=len, default=Path(low).suffix)


def base_suffix(suffix: str) -> str:
    """``.jsonl.gz`` -> ``.jsonl``: the record format's suffix, without a compression suffix."""
    base, _, last = suffix.rpartition(".")
    return base if base and "." + last in _COMPRESSIONS else suffix


class Item(NamedTuple):
    """One input record: position, file (directories only), and ``kind``: 0 = JSON text to parse
    (``payload`` is bytes), 1 = parsed value, 2 = unreadable (``payload`` = (raw text, reason))."""

    line: int
    file: str | None
    kind: int
    payload: Any


# --- reading ------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; use null, a number or a string")


def _skip_ws(text: str, idx: int) -> int:
    """The index of the first non-whitespace character at or after ``idx`` (``_WS`` matches the empty string too)."""
    m = _WS.match(text, idx)
    return m.end() if m else idx


def _line_col(text: str, idx: int) -> tuple[int, int]:
    line = text.count("\n", 0, idx) + 1
    return line, idx - (text.rfind("\n", 0, idx) + 1) + 1


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one instance: json.loads(...) builds one per call


def parse_line(data: bytes) -> tuple[Any, str | None, str | None]:
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


def _read_jsonl(path: Path, file: str | None = None, compression: str | None = None) -> Iterator[Item]:
    """One item per non-blank line, unparsed (workers parse); bad lines are quarantined, never fatal."""
    with open_bytes(path, compression) as f:
        for lineno, data in enumerate(f, 1):
            if lineno == 1 and data.startswith(BOM):
                data = data[len(BOM) :]
            data = data.rstrip(b"\r\n")
            if not data.strip():
                continue
            yield Item(lineno, file, 0, data)


def _read_json_array(path: Path, file: str | None = None, compression: str | None = None) -> Iterator[Item]:
    """Elements of a top-level JSON array, each with the 1-based line where it starts.

    The file is one JSON document, so a syntax error is fatal: ``InputError`` with file:line:col. Bytes
    that are not UTF-8 are not: they end up in the strings as lone surrogates and the records holding
    them are quarantined by the ``invalid_utf8`` rule.
    """
    with open_bytes(path, compression) as f:
        data = f.read()
    if data.startswith(BOM):
        data = data[len(BOM) :]
    text = data.decode("utf-8", errors="surrogateescape")

    def fail(idx: int, what: str) -> InputError:
        line, col = _line_col(text, idx)
        return InputError(f"{path}:{line}:{col}: {what}")

    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    idx = _skip_ws(text, 0)
    if text[idx : idx + 1] != "[":
        hint = "if it holds one JSON record per line, rename it to .jsonl"
        raise fail(idx, f"expected a JSON array of records ('[{{...}}, ...]'); {hint}")
    idx = _skip_ws(text, idx + 1)
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
            yield Item(line, file, 1, value)
            idx = _skip_ws(text, end)
            sep = text[idx : idx + 1]
            if sep == "]":
                break
            if sep != ",":
                raise fail(idx, "invalid JSON: expected ',' or ']' after a record; fix the file")
            idx = _skip_ws(text, idx + 1)
    idx = _skip_ws(text, idx + 1)
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


def _read_csv(path: Path, file: str | None = None, compression: str | None = None) -> Iterator[Item]:
    """One item per row, at the physical line where the row starts (the header is line 1; a quoted field
    spanning lines counts each of them; blank lines are skipped)."""
    with open_bytes(path, compression) as f:
        text = f.read().decode("utf-8-sig", errors="surrogateescape")  # bad bytes -> invalid_utf8 rule
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                return
            if not row:
                continue
            rec = {k: _csv_cell(k, v) for k, v in itertools.zip_longest(header, row[: len(header)])}
            if len(row) > len(header):
                extra = row[len(header) :]
                yield Item(
                    start,
                    file,
                    2,
                    (json.dumps(extra), f"bad_structure: row has {len(extra)} more cells than the header"),
                )
                continue
            yield Item(start, file, 1, rec)
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV: {e}; fix the file") from None


def _read_parquet(path: Path, file: str | None = None, compression: str | None = None) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path if isinstance(path, Path) else path.open("rb"))  # an ObjectPath: streamed reads
    except Exception as e:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read Parquet: {e}") from None
    n = 0
    for batch in pf.iter_batches(batch_size=10_000):
        for rec in batch.to_pylist():
            n += 1
            yield Item(n, file, 1, rec)


def _read_hf(ds: Any, split: str | None, where: str) -> Iterator[Item]:
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
        yield Item(n, None, 1, rec)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json_array, ".csv": _read_csv, ".parquet": _read_parquet}
_LINE_POSITIONS = (".json", ".jsonl", ".csv")


def read_file(path: Path | ObjectPath, file: str | None = None) -> Iterator[Item]:
    """Items of one data file (``file``: its name within a directory source). What the file holds is checked
    first, from its bytes: compression is read whatever the name says, and an empty (single-file source),
    UTF-16/32 or binary file is an ``InputError`` that says which. An empty file in a directory adds nothing.
    ``path`` may be an object of an object store (:class:`tuneloop.data.objstore.ObjectPath`): read streaming,
    with the same readers; messages name its URL."""
    if isinstance(path, ObjectPath):
        return _read_any(path.url, cast(Path, path), file)  # it has all the readers use of a Path (objstore.py)
    return _read_any(str(path), path, file)


def _read_any(name: str, path: Path, file: str | None) -> Iterator[Item]:
    base = base_suffix(data_suffix(name))
    compression, head = None, read_head(path, None)
    kind = sniff(head, whole=len(head) < SNIFF_BYTES)
    if base == ".parquet" and kind.kind != "empty":  # binary by nature; pyarrow says what is wrong with it
        return _read_parquet(path, file)
    if kind.kind in ("gzip", "zstd"):
        compression, head = kind.kind, read_head(path, kind.kind)
        kind = sniff(head, whole=len(head) < SNIFF_BYTES)
    if kind.kind == "text":
        return _READERS[base](path, file, compression)
    if kind.kind == "empty" and file is not None:
        return iter(())
    raise InputError(unreadable_reason(kind, path, _EXPECTED[base], compression))


def is_saved_hf(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


@contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face libraries in offline mode (read from the local cache only), restored afterwards.

    The libraries read ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` at import time, so the module constants are
    switched too (they may have been imported before).
    """
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in env})
    import datasets.config
    import huggingface_hub.constants as hub

    saved = [
        (mod, attr, getattr(mod, attr))
        for mod, attr in (
            (datasets.config, "HF_HUB_OFFLINE"),
            (datasets.config, "HF_DATASETS_OFFLINE"),
            (hub, "HF_HUB_OFFLINE"),
        )
        if hasattr(mod, attr)
    ]
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


def open_source(source: str | os.PathLike[str]) -> tuple[Iterator[Item], str]:
    """Records of ``source`` and how positions are counted (``"line"`` or ``"record"``).

    ``source`` is a file, a directory of files, a ``datasets.save_to_disk`` directory, or a Hugging Face
    dataset name (``name`` or ``name:split``) read offline. Raises ``InputError`` when it cannot be read.
    """
    text = str(source)
    if is_url(text):
        return _open_url(text)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        if is_saved_hf(path):
            from datasets import load_from_disk

            try:
                ds = load_from_disk(str(path))
            except Exception as e:
                raise InputError(f"{path}: cannot load the saved dataset: {e}") from None
            return _read_hf(ds, None, str(path)), "record"
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and data_suffix(p.name) in SUPPORTED_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise InputError(f"{path}: the directory holds no {', '.join(SUPPORTED_SUFFIXES)} files")
        position = "line" if all(base_suffix(data_suffix(p.name)) in _LINE_POSITIONS for p in files) else "record"
        readers = [read_file(p, p.relative_to(path).as_posix()) for p in files]  # each file's kind checked now
        return itertools.chain.from_iterable(readers), position
    suffix = data_suffix(path.name)
    if path.is_file():
        if suffix not in SUPPORTED_SUFFIXES:
            raise InputError(
                f"{path}: unsupported dataset file type {suffix or '(no extension)'!r}; supported: "
                f"{', '.join(SUPPORTED_SUFFIXES)}, a directory of them, or a saved Hugging Face dataset"
            )
        return read_file(path), "line" if base_suffix(suffix) in _LINE_POSITIONS else "record"
    if path.exists():
        raise InputError(f"{path}: is not a file or directory")
    if suffix in SUPPORTED_SUFFIXES or text.startswith((".", "/", "~")) or not _HUB_ID.match(text.split(":")[0]):
        raise InputError(f"{path}: dataset file not found; check the path (relative paths resolve from {Path.cwd()})")
    name, _, split = text.partition(":")
    try:
        with hf_offline():
            import datasets

            ds = datasets.load_dataset(name, split=split or None)
    except Exception as e:
        raise InputError(
            f"{text}: not a local file and not a Hugging Face dataset in the local cache ({type(e).__name__}: "
            f"{str(e)[:200]}); tuneloop reads datasets offline: download it first, or give a file path"
        ) from None
    return _read_hf(ds, split or None, text), "record"


def _open_url(url: str) -> tuple[Iterator[Item], str]:
    """:func:`open_source` for an object-store URL: one object, or a prefix read as a directory is (its data files
    in a directory's order, each item's ``file`` its name below the prefix)."""
    objects, rels = list_objects(url, SUPPORTED_SUFFIXES)
    if rels is None:
        suffix = data_suffix(objects[0].name)
        if suffix not in SUPPORTED_SUFFIXES:
            raise InputError(
                f"{url}: unsupported dataset file type {suffix or '(no extension)'!r}; supported: "
                f"{', '.join(SUPPORTED_SUFFIXES)}, or a prefix holding such files"
            )
        return read_file(objects[0]), "line" if base_suffix(suffix) in _LINE_POSITIONS else "record"
    if not objects:
        raise InputError(f"{url}: no {', '.join(SUPPORTED_SUFFIXES)} files under this prefix; check the URL")
    position = "line" if all(base_suffix(data_suffix(o.name)) in _LINE_POSITIONS for o in objects) else "record"
    return itertools.chain.from_iterable(read_file(o, rel) for o, rel in zip(objects, rels, strict=True)), position


def _peek(items: Iterator[Item]) -> tuple[list[Item], Iterator[Item]]:
    """Read ahead until ``DETECT_SAMPLE`` object records; return them and an iterator over all items."""
    sample: list[Item] = []
    objects = 0
    for item in items:
        sample.append(item)
        objects += item.kind != 2 and (item.kind == 1 or item.payload[:1] == b"{")
        if objects >= DETECT_SAMPLE:
            break
    return sample, itertools.chain(sample, items)


def _sample_values(sample: list[Item]) -> list[Any]:
    out = []
    for item in sample:
        if item.kind == 1:
            out.append(item.payload)
        elif item.kind == 0:
            value, _, error = parse_line(item.payload)
            if error is None:
                out.append(value)
    return out


def open_detected(source: str | Path | Sequence[TrainSource], fmt: str = "auto") -> tuple[Iterator[Item], str, str]:
    """Open ``source`` and detect its format from the first records (unless ``fmt`` is given): (records,
    position kind, format). InputError for an empty dataset or an undetectable format. A list of sources
    (``data.train_data``) is read as :func:`open_sources` reads it."""
    if not isinstance(source, (str, Path)):
        opened = open_sources(source, fmt)
        return opened.items, opened.position, opened.format
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


@dataclass
class OpenedSources:
    """The records of a list of sources, chained in order. Each item's ``file`` names its source as written
    (a directory source's files: ``<source>/<relative file>``); ``source_of`` maps such a name to the
    source's index, filled in as the items are read."""

    items: Iterator[Item]
    position: str
    format: str
    source_of: dict[str, int] = field(default_factory=dict)


def _labelled(items: Iterator[Item], label: str, index: int, source_of: dict[str, int]) -> Iterator[Item]:
    for item in items:
        name = label if item.file is None else f"{label}/{item.file}"
        source_of.setdefault(name, index)
        yield item._replace(file=name)


def _overlap_problem(sources: Sequence[TrainSource]) -> str | None:
    """Two sources that name the same files (the same path twice, or a file inside a listed directory)."""
    urls = [s.path.rstrip("/") for s in sources]
    for i, a in enumerate(urls):
        for j, b in enumerate(urls):
            if i < j and is_url(a) and is_url(b) and (a == b or a.startswith(b + "/") or b.startswith(a + "/")):
                return (
                    f"{sources[i].label} and {sources[j].label} hold the same objects; "
                    "list each object or prefix once (a `weight` counts a source more)"
                )
    paths = [
        Path(os.path.expanduser(s.path)).resolve() if Path(os.path.expanduser(s.path)).exists() else None
        for s in sources
    ]
    for i, pa in enumerate(paths):
        for j, pb in enumerate(paths):
            if (
                i < j
                and pa is not None
                and pb is not None
                and (pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa))
            ):
                return (
                    f"{sources[i].label} and {sources[j].label} hold the same files; "
                    "list each file once (a `weight` counts a source more)"
                )
    return None


def open_sources(sources: Sequence[TrainSource], fmt: str = "auto") -> OpenedSources:
    """Open a list of sources (``data.train_data``): each source's format is detected on its own records
    (unless ``fmt`` is given, which applies to all) and all must agree. InputError names the source at fault.
    Positions are lines when every source counts lines, else record indexes (a list mixing, say, Parquet and
    JSONL shows a JSONL record's line as its record number)."""
    if not sources:
        raise InputError("data.train_data: the list of sources is empty; give at least one")
    if problem := _overlap_problem(sources):
        raise InputError(f"data.train_data: {problem}")
    opened = OpenedSources(iter(()), "line", fmt)
    parts: list[Iterator[Item]] = []
    first: tuple[str, str] | None = None
    for index, src in enumerate(sources):
        items, position, found = open_detected(src.path, fmt)
        if first is not None and found != first[1]:
            raise InputError(
                f"data.train_data: {src.label} holds {found} records but {first[0]} holds {first[1]}; the sources are "
                f"checked and normalised as one dataset, so they need one record format: convert {src.label} to {first[1]} records"
            )
        first = first or (src.label, found)
        opened.position = "record" if position == "record" else opened.position
        parts.append(_labelled(items, src.label, index, opened.source_of))
    assert first is not None  # sources is not empty
    opened.items, opened.format = itertools.chain.from_iterable(parts), first[1]
    return opened


def parsed_records(source: str | Path | Sequence[TrainSource]) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    """Each readable value of a source (format detected) with its canonical record, ``None`` when it does not
    normalise; unreadable items are skipped. For reading a dataset's texts, not for validating it."""
    items, _, fmt = open_detected(source)
    for item in items:
        if item.kind == 2:
            continue
        try:
            value = json.loads(item.payload) if item.kind == 0 else item.payload
        except ValueError:
            continue
        yield value, normalise(value, fmt)[0]


def normalised_records(source: str | Path | Sequence[TrainSource]) -> Iterator[dict[str, Any]]:
    """The canonical records of a source whose records normalise (format detected); unreadable or invalid
    records are skipped. For reading a dataset's texts (drift, eval overlap), not for validating it."""
    return (record for _, record in parsed_records(source) if record is not None)


def source_problem(value: str | Sequence[TrainSource]) -> str | None:
    """Why a configured data source cannot be used (``None`` when it looks usable; a hub name is checked when
    read). For a list of sources: the problems of its sources, each named ``[index] label``."""
    if not isinstance(value, str):
        found = [f"[{i}] {s.label}: {problem}" for i, s in enumerate(value) if (problem := source_problem(s.path))]
        return "; ".join(found) or _overlap_problem(value)
    if is_url(value):
        return url_problem(value, SUPPORTED_SUFFIXES)
    p = Path(value)
    if p.is_dir():
        return None
    if p.is_file():
        if data_suffix(p.name) not in SUPPORTED_SUFFIXES:
            return f"unsupported file type {p.suffix!r} in {value}; use {', '.join(SUPPORTED_SUFFIXES)}, a directory or a dataset name"
        return None
    if os.path.isabs(value) or data_suffix(p.name) in SUPPORTED_SUFFIXES:
        return f"file not found: {value}; check the path (relative paths are resolved against the config's directory)"
    return None


def source_digest(value: str | Sequence[TrainSource] | None, *, weights: bool = True) -> str | None:
    """Content identity of a data source: a file's digest, a directory's file digests, or the name itself.
    A list of sources: its sources' names as written and digests, in order, with their weights unless
    ``weights=False`` (data validation does not apply them; preprocessing does)."""
    if value is not None and not isinstance(value, str):
        return sha256_json([[s.label, source_digest(s.path)] + ([s.weight] if weights else []) for s in value])
    if not value:
        return None
    if is_url(value):
        return url_digest(value, SUPPORTED_SUFFIXES)
    p = Path(value)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return sha256_json([(f.relative_to(p).as_posix(), sha256_file(f)) for f in sorted(p.rglob("*")) if f.is_file()])
    return f"name:{value}"
