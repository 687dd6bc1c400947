"""Small helpers every layer shares: atomic writes, content digests, UTC timestamps, number formatting, and
telling a full disk from other failures (:func:`is_disk_full`, :func:`free_bytes`).

Everything tuneloop persists goes through these, so a killed process never leaves a half-written file
where a reader would trust it. This module is at the bottom of the import rule (docs/architecture.md):
it imports nothing else from tuneloop.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tuneloop.errors import InputError

_CHUNK = 1 << 20


@contextmanager
def atomic_writer(path: Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """A file opened on a temp file next to ``path``; fsynced and renamed into place only if the block succeeds.

    ``atomic_writer(p, "w", encoding="utf-8", newline="\\n")`` streams text (e.g. JSONL line by line); on an
    exception (Ctrl-C included) the temp file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, then rename."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_lines(path: Path, errors: str = "strict"):
    """A text file streamed to a temp file next to ``path``, fsynced and renamed into place only on success."""
    return atomic_writer(path, "w", encoding="utf-8", errors=errors, newline="\n")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_jsonl(path: str | Path, what: str = "this file") -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line of the JSONL file ``path`` as ``(line number from 1, object)``. A line that is not a JSON
    object raises :class:`~tuneloop.errors.InputError` naming ``path:line`` and what the file is for (``what``).

    The one strict JSONL reader. Readers that must survive a torn or foreign line (the store's journal, the request
    spool, the gateway's probe prompts) or that report every bad line at once (``tuneloop judge``) keep their own
    loops, each saying why."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{path}:{n}: not valid JSON ({exc.msg}); {what} needs one JSON object per line"
                ) from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{n}: expected a JSON object")
            yield n, rec


def read_jsonl(path: str | Path, what: str = "this file") -> list[dict[str, Any]]:
    """The objects of the JSONL file ``path`` in order (:func:`iter_jsonl`'s errors)."""
    return [rec for _, rec in iter_jsonl(path, what)]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: Path) -> str:
    """Digest of a directory tree: relative paths and file contents, in sorted order.

    Hidden files (starting with '.') are ignored so temp files never change a digest.
    """
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(rel.encode("utf-8") + b"\0" + sha256_file(f).encode("ascii") + b"\n")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def replace_dir(src: Path, dst: Path) -> None:
    """Move a fully written directory ``src`` into place at ``dst`` (same filesystem).

    If ``dst`` already exists it is removed first; the rename itself is atomic.
    """
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` (and ``path`` itself) to the disk.

    Before a directory written file by file is renamed into place (a training checkpoint), so that after a crash
    of the machine the renamed directory never holds files the disk did not get.
    """
    path = Path(path)
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [*(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink()), path]:
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it, a new file) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A disk that fills shows up as many kinds of error: OSError ENOSPC/EDQUOT, SQLite's SQLITE_FULL ("database or disk
# is full"), safetensors' "No space left on device (os error 28)", Arrow's IOError text.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = (
    "no space left on device",
    "database or disk is full",
    "disk quota exceeded",
    "storagefull",
    "os error 28",
)
LOW_SPACE_BYTES = 1 << 20  # a write that failed with less free than this is taken as the disk being full


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, says the disk (or a quota) is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Bytes free (to this user) on the filesystem holding ``path`` or its nearest existing parent; None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def model_fingerprint(name: str) -> str:
    """Identity of a base model: digest of a local directory's files, or the hub id itself.

    Files over 64 MiB are identified by size and mtime rather than hashed (used by the pipeline's cache keys
    and by the registry's base-model lineage, so the two agree).
    """
    p = Path(name)
    if not p.is_dir():
        return f"hub:{name}"
    parts = [
        (
            f.relative_to(p).as_posix(),
            sha256_file(f) if f.stat().st_size < (64 << 20) else f"{f.stat().st_size}:{f.stat().st_mtime_ns}",
        )
        for f in sorted(p.rglob("*"))
        if f.is_file() and not f.name.startswith(".")
    ]
    return "dir:" + sha256_json(parts)


def utcnow() -> str:
    """The current time in UTC as ISO 8601 to the second, e.g. ``2026-11-30T04:21:33+00:00``.

    The one timestamp format of run records, registry events and reports.
    """
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def format_number(value: Any, missing: str = "") -> str:
    """A value for a table cell: floats to 4 significant digits, ``None`` as ``missing``, the rest as ``str``."""
    if value is None:
        return missing
    if isinstance(value, float):
        return unsigned_zero(f"{value:.4g}")
    return str(value)


def unsigned_zero(text: str) -> str:
    """A formatted number without the sign of a zero: ``-0``, ``-0.00`` (a tiny negative rounded) read as 0."""
    if text.startswith("-") and text[1:].replace(".", "").strip("0") == "":
        return text[1:]
    return text


def format_time(value: Any) -> str:
    """A timestamp as every table and page shows it: ``2026-12-07 14:33:29 UTC`` (ISO text or unix seconds in;
    anything else comes back as given)."""
    try:
        t = (
            _dt.datetime.fromtimestamp(float(value), _dt.timezone.utc)
            if isinstance(value, (int, float))
            else _dt.datetime.fromisoformat(str(value))
        )
    except (TypeError, ValueError, OverflowError, OSError):
        return "" if value is None else str(value)
    if t.tzinfo is None:
        t = t.astimezone()  # a naive time is this machine's local time
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
