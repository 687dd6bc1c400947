"""Content-addressed store of artifact directories (a full model or a LoRA adapter).

Layout under ``root``::

    <digest>/                  one directory per distinct content, named by ``sha256_dir`` of it
        <files...>             read-only copies of the source directory's files
        .manifest.json         relative path, size and sha256 of every file (hidden: not in the digest)
    .tmp-<random>/             a copy in progress; a killed ``put_dir`` may leave one behind

A directory only ever appears under its digest by an atomic rename of a complete, fsynced copy, so a
reader never sees a half-written artifact. Hidden files in the source (names starting with '.') are not
part of ``sha256_dir`` and are therefore not copied.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from tuneloop.errors import InputError, IntegrityError
from tuneloop.fsutil import atomic_write_json, read_json, sha256_dir

MANIFEST_NAME = ".manifest.json"
_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


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
        src = Path(src)
        if not src.is_dir():
            raise InputError(f"artifact directory {src} does not exist or is not a directory")
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
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
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
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
            broken = Path(tempfile.mkdtemp(prefix=".tmp-broken-", dir=self.root))
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
        trash = Path(tempfile.mkdtemp(prefix=".tmp-gc-", dir=self.root))
        try:
            os.rename(target, trash / "old")
            _fsync_dir(self.root)
            return True
        except FileNotFoundError:
            return False  # removed concurrently
        finally:
            shutil.rmtree(trash, ignore_errors=True)

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
                problems.append(
                    f"file {rel!r} differs: size {entry['size']} bytes, manifest says {want.get('size')}"
                )
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
