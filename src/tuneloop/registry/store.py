"""Content-addressed store of artifact directories (a full model or a LoRA adapter), and version records.

Layout under ``root``::

    <digest>/                  one directory per distinct content, named by ``sha256_dir`` of it
        <files...>             read-only copies of the source directory's files
        .manifest.json         relative path, size and sha256 of every file (hidden: not in the digest)
    .versions/<model>-<hash>/<n>.json  the record of each registered version (row, lineage, metrics, gates,
                               the model's aliases then)
    .versions/events.jsonl     append-only journal of every registry event, with the aliases after it
    .tmp-<what>-<pid>@<host>.<random>/  a copy in progress, owned by process <pid> on <host>

A directory only ever appears under its digest by an atomic rename of a complete, fsynced copy, so a
reader never sees a half-written artifact. Hidden files in the source (names starting with '.') are not
part of ``sha256_dir`` and are therefore not copied. A symlink inside the source directory is stored as a
copy of the file it points to; one that leaves the directory is refused (``registry/content.py``).

Temporary copies name their owner, so a killed process's leftovers are found and removed the next time the
store is opened (:meth:`ArtifactStore.remove_dead_temps`); copies of live processes, and of processes on
other hosts sharing the store, are left alone. The version records and the journal let ``tuneloop models
recover`` rebuild a lost registry database.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tuneloop.errors import InputError, IntegrityError
from tuneloop.fsutil import atomic_write_json, pid_alive, read_json, sha256_dir, utcnow

MANIFEST_NAME = ".manifest.json"
RECORDS_DIR = ".versions"
JOURNAL_NAME = "events.jsonl"
TEMP_PREFIX = ".tmp-"
LEGACY_TEMP_AGE_S = 3600.0
_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_TEMP_RE = re.compile(r"^\.tmp-[a-z]+-(?P<pid>[0-9]+)@(?P<host>.+)\.[^.]+$")


@dataclass(frozen=True)
class RemovedTemp:
    """A temporary copy removed from the store: where it was, its size and why it could go."""

    path: str
    bytes: int
    owner: str


class ArtifactStore:
    """Directories stored once per content digest, verified against a manifest on every open."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- writing ---------------------------------------------------------------------------------

    def put_dir(self, src: Path) -> str:
        """Store a copy of directory ``src`` and return its digest (``sha256_dir(src)``).

        If the same content is already stored and verifies, nothing is copied. A stored copy that
        fails verification is replaced by the fresh one. Safe to call concurrently for the same content.
        """
        from tuneloop.registry.content import check_links

        src = Path(src)
        if not src.is_dir():
            raise InputError(f"artifact directory {src} does not exist or is not a directory")
        check_links(src)
        files = _content_files(src)
        if not files:
            raise InputError(
                f"artifact directory {src} has no files to store (hidden files are ignored); "
                "point at the directory the trainer saved the model or adapter into"
            )
        digest = sha256_dir(src)
        target = self.path(digest)
        if target.exists() and self._verifies(digest):
            return digest

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.make_temp("put")
        try:
            entries = [_copy_file(src / rel, tmp / rel, rel) for rel in files]
            copied = _digest_of_entries(entries)
            if copied != digest:
                raise InputError(
                    f"artifact directory {src} changed while it was being stored "
                    f"(digest {digest[:12]} before, {copied[:12]} after copying); "
                    "wait for whatever writes into it to finish, then register again"
                )
            atomic_write_json(
                tmp / MANIFEST_NAME,
                {
                    "digest": digest,
                    "created_at": utcnow(),
                    "source": str(src.resolve()),
                    "files": entries,
                },
            )
            for d in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
                _fsync_dir(d)
            self._move_into_place(tmp, digest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return digest

    def _move_into_place(self, tmp: Path, digest: str) -> None:
        """Rename the finished copy to ``root/<digest>``; if another process won the race, keep theirs."""
        target = self.path(digest)
        for _ in range(3):
            try:
                os.rename(tmp, target)
                _fsync_dir(self.root)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            # The target appeared: a concurrent put of the same content, or a broken copy to replace.
            if self._verifies(digest):
                return  # the caller's finally removes our now-redundant temp copy
            broken = self.make_temp("broken")
            try:
                os.rename(target, broken / "old")
            except FileNotFoundError:
                pass  # someone else moved it aside first; just retry the rename
            shutil.rmtree(broken, ignore_errors=True)
        raise IntegrityError(
            f"could not place artifact {digest} in {self.root}: the existing copy keeps failing "
            f"verification; remove {target} by hand and register again"
        )

    def remove(self, digest: str) -> bool:
        """Delete a stored artifact (moved aside atomically first, so readers never see half of it)."""
        target = self.path(digest)
        if not target.exists():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        trash = self.make_temp("gc")
        try:
            os.rename(target, trash / "old")
            _fsync_dir(self.root)
            return True
        except FileNotFoundError:
            return False  # removed concurrently
        finally:
            shutil.rmtree(trash, ignore_errors=True)

    # -- temporary copies --------------------------------------------------------------------------

    def make_temp(self, what: str) -> Path:
        """A new temporary directory in the store whose name records this process as its owner."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{what}-{os.getpid()}@{_host()}.", dir=self.root))

    def remove_dead_temps(self, *, include_legacy: bool = False) -> list[RemovedTemp]:
        """Remove temporary copies whose owner process is dead; return what was removed.

        Only copies made on this host are judged (a pid means nothing on another host sharing the store).
        With ``include_legacy``, copies without an owner in their name (written by tuneloop before it
        recorded one) are removed too once untouched for an hour.
        """
        if not self.root.is_dir():
            return []
        removed = []
        for p in sorted(self.root.iterdir()):
            if not p.name.startswith(TEMP_PREFIX):
                continue
            owner = _temp_owner(p, include_legacy)
            if owner is None:
                continue
            size = tree_size(p)
            _make_writable(p)
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(RemovedTemp(str(p), size, owner))
        return removed

    # -- version records ---------------------------------------------------------------------------

    @property
    def records_dir(self) -> Path:
        return self.root / RECORDS_DIR

    def write_record(self, model: str, version: int, record: dict[str, Any]) -> None:
        """Write (atomically, fsynced) the record of ``model:version`` beside the artifacts."""
        # The folder name carries a hash of the exact name, so `Bot` and `bot` stay apart on a
        # case-insensitive filesystem; the record itself names its model.
        folder = f"{model}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"
        atomic_write_json(self.records_dir / folder / f"{int(version)}.json", record)

    def read_records(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every version record (sorted by model and version) and the files that could not be read."""
        records: list[dict[str, Any]] = []
        unreadable: list[str] = []
        if not self.records_dir.is_dir():
            return records, unreadable
        for f in sorted(self.records_dir.glob("*/*.json")):
            try:
                rec = read_json(f)
                if not isinstance(rec, dict) or not {"model", "version", "artifact_digest"} <= rec.keys():
                    raise ValueError("not a version record")
                records.append(rec)
            except (OSError, ValueError) as e:
                unreadable.append(f"{f}: {e}")
        records.sort(key=lambda r: (r["model"], int(r["version"])))
        return records, unreadable

    def has_records(self) -> bool:
        return self.records_dir.is_dir() and any(self.records_dir.glob("*/*.json"))

    def digests(self) -> list[str]:
        """Digests of the artifacts in the store."""
        return sorted(p.name for p in self.root.iterdir() if _DIGEST_RE.match(p.name)) if self.root.is_dir() else []

    def has_artifacts(self) -> bool:
        return bool(self.digests())

    def append_event(self, entry: dict[str, Any]) -> None:
        """Append one line to the journal and fsync it (callers serialise writers, e.g. by a DB lock)."""
        self.records_dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        fd = os.open(self.records_dir / JOURNAL_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_events(self) -> tuple[list[dict[str, Any]], int]:
        """The journal's entries in order, and how many lines were unreadable (e.g. torn by a crash)."""
        path = self.records_dir / JOURNAL_NAME
        if not path.is_file():
            return [], 0
        entries, bad = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                bad += 1
        return entries, bad

    # -- reading ---------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where the artifact with ``digest`` lives (whether or not it exists)."""
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise InputError(f"not an artifact digest: {digest!r} (expected 64 lowercase hex characters)")
        return self.root / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_dir()

    def verify(self, digest: str) -> None:
        """Re-hash every stored file and check it against the manifest and the directory digest.

        Raises IntegrityError naming each file that differs, is missing or is extra.
        """
        problems = self._problems(digest)
        if problems:
            where = self.path(digest)
            shown = "\n".join(f"  - {p}" for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise IntegrityError(
                f"artifact {digest} at {where} failed verification:\n{shown}{more}\n"
                "The stored copy is corrupted or was modified after it was registered. Register the "
                "original directory again (that repairs the stored copy) or restore it from a backup; "
                "do not edit files inside the store."
            )

    def open_verified(self, digest: str) -> Path:
        """Verify the artifact and return its directory; what loaders call before reading it."""
        self.verify(digest)
        return self.path(digest)

    def _verifies(self, digest: str) -> bool:
        return not self._problems(digest)

    def _problems(self, digest: str) -> list[str]:
        where = self.path(digest)
        if not where.is_dir():
            return [f"the artifact directory is missing from the store ({self.root})"]
        try:
            manifest = read_json(where / MANIFEST_NAME)
            expected = {e["path"]: e for e in manifest["files"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"{MANIFEST_NAME} is missing or unreadable ({e})"]

        present = {
            p.relative_to(where).as_posix()
            for p in where.rglob("*")
            if p.is_file() and p.relative_to(where).as_posix() != MANIFEST_NAME
        }
        problems = [f"missing file {rel!r}" for rel in sorted(expected.keys() - present)]
        problems += [f"extra file {rel!r} (not in the manifest)" for rel in sorted(present - expected.keys())]

        actual: list[dict[str, Any]] = []
        for rel in sorted(expected.keys() & present, key=PurePosixPath):
            entry = _hash_file(where / rel, rel)
            actual.append(entry)
            want = expected[rel]
            if entry["size"] != want.get("size"):
                problems.append(f"file {rel!r} differs: size {entry['size']} bytes, manifest says {want.get('size')}")
            elif entry["sha256"] != want.get("sha256"):
                problems.append(
                    f"file {rel!r} differs: sha256 {entry['sha256'][:12]}..., "
                    f"manifest says {str(want.get('sha256'))[:12]}..."
                )
        if not problems and _digest_of_entries(actual) != digest:
            problems.append("the manifest does not match the directory digest (the manifest itself was changed)")
        return problems


# -- helpers -------------------------------------------------------------------------------------


def _content_files(src: Path) -> list[str]:
    """Relative posix paths of the files ``sha256_dir`` covers, in its order."""
    out = []
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        if not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return out


def _digest_of_entries(entries: list[dict[str, Any]]) -> str:
    """The ``sha256_dir`` digest computed from per-file hashes, so files are read only once."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: PurePosixPath(e["path"])):
        h.update(e["path"].encode("utf-8") + b"\0" + e["sha256"].encode("ascii") + b"\n")
    return h.hexdigest()


def _hash_file(path: Path, rel: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"path": rel, "size": size, "sha256": h.hexdigest()}


def _copy_file(src: Path, dst: Path, rel: str) -> dict[str, Any]:
    """Copy one file, hashing the bytes written; fsync it and make it read-only."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            h.update(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o444)
    return {"path": rel, "size": size, "sha256": h.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "localhost")


def _temp_owner(p: Path, include_legacy: bool) -> str | None:
    """A description of a temp copy's dead owner, or None when it must be kept."""
    m = _TEMP_RE.match(p.name)
    if m is None:
        if not include_legacy:
            return None
        try:
            age = time.time() - p.stat().st_mtime
        except OSError:
            return None
        return f"no recorded owner, untouched for {age / 3600:.1f} h" if age > LEGACY_TEMP_AGE_S else None
    pid, host = int(m["pid"]), m["host"]
    if host != _host() or pid_alive(pid):
        return None
    return f"process {pid} on {host} is gone"

    return True


def tree_size(p: Path) -> int:
    """Bytes of the files under ``p`` (links not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(p):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _make_writable(p: Path) -> None:
    """Make every directory under ``p`` writable, so rmtree can unlink the read-only files in it."""
    for dirpath, dirnames, _ in os.walk(p):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o755)
            except OSError:
                pass
