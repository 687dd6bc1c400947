"""The request log's local spool: an append-only, fsync'd journal in the workspace that holds what the
store (SQLite or PostgreSQL) could not take, until it can.

Entry point: :class:`Spool`, used by ``AsyncRecorder`` (``monitor/requestlog.py``), which decides when to
spool and when to replay; this module only keeps the journal.

Layout: ``<dir>/<seq>.jsonl`` segments (``seq`` a 12-digit counter), appended in order, one JSON object a
line: ``{"kind": "request" | "feedback", "row": {...}}``. Rows are stored as the store would store them,
personal data already redacted: nothing reaches the disk in clear that the store would not hold. A segment is
closed at ``segment_bytes`` and deleted once every line in it is stored.

* :meth:`Spool.append` writes whole lines and returns only after ``fsync``: a record is *spooled* once
  ``append`` returned. A write that fails (a full disk) is cut back to its start, so a later line never follows
  half a line. A process killed inside ``append`` can leave a torn last line; it was never acknowledged, and
  opening the spool cuts it off (counted in ``torn``).
* :meth:`Spool.head` / :meth:`Spool.consume` read the oldest lines and mark them done once the caller stored
  them. The read position lives in memory only: after a crash, the head segment is replayed from its start.
  That is safe because replay is idempotent (requests are inserted "on conflict do nothing" on their request
  id; feedback is an upsert that keeps the newest ``updated_at``).
* Bound: ``max_bytes``. When a batch would pass it, :class:`SpoolFull` is raised and nothing of the batch is
  written: what is spooled stays, in order, and is never evicted; the newest records are the ones refused.
* One process per spool directory: an exclusive ``flock`` on ``<dir>/lock`` (:class:`SpoolBusy` otherwise).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEGMENT_BYTES = 8 << 20


class SpoolFull(Exception):
    """The batch would take the spool past its bound (``serve.request_log_spool_mb``)."""


class SpoolBusy(Exception):
    """Another process holds this spool directory."""


class Spool:
    """An append-only journal of store rows; thread-safe (one lock around appends and reads)."""

    def __init__(self, directory: str | os.PathLike, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes)
        self._lockfile = open(self.dir / "lock", "a+")  # noqa: SIM115 - held for the spool's life
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            raise SpoolBusy(f"the spool {self.dir} is in use by another process") from exc
        self._lock = threading.Lock()
        self._out: Any = None  # the last segment, open for appending
        self._head_offset = 0  # bytes of the first segment already stored
        self.torn = 0  # torn last lines cut off when opening
        self.segments = sorted(int(p.stem) for p in self.dir.glob("*.jsonl") if p.stem.isdigit())
        self._cut_torn_tail()
        self.bytes = sum(self._path(s).stat().st_size for s in self.segments)
        self.records = sum(self._count_lines(s) for s in self.segments)

    # -- state ----------------------------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return self.records == 0

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.jsonl"

    def _count_lines(self, seq: int) -> int:
        n = 0
        with open(self._path(seq), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                n += block.count(b"\n")
        return n

    def _cut_torn_tail(self) -> None:
        if not self.segments:
            return
        path = self._path(self.segments[-1])
        size = path.stat().st_size
        if size == 0:
            return
        with open(path, "rb+") as f:
            f.seek(max(size - (1 << 20), 0))
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            keep = size - len(tail) + cut + 1 if cut >= 0 else max(size - len(tail), 0)
            f.truncate(keep)
            os.fsync(f.fileno())
        self.torn += 1
        log.warning(
            "request log spool: cut a torn last line off %s (%d bytes; written by a process that "
            "died inside a write, so never acknowledged)",
            path,
            size - keep,
        )

    # -- writing --------------------------------------------------------------------------------------------

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append ``entries`` (``{"kind", "row"}``) as whole lines and fsync; raises :class:`SpoolFull` when
        they do not fit (nothing written) and ``OSError`` when the disk refuses them (nothing kept)."""
        if not entries:
            return
        data = "".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n" for e in entries).encode()
        with self._lock:
            if self.bytes + len(data) > self.max_bytes:
                raise SpoolFull(
                    f"the spool {self.dir} holds {self.bytes} bytes; {len(entries)} more records "
                    f"({len(data)} bytes) would pass its bound of {self.max_bytes} bytes"
                )
            out = self._writable()
            start = out.tell()
            try:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            except OSError:
                self._cut_back(out, start)
                raise
            self.bytes += len(data)
            self.records += len(entries)

    def _writable(self):
        if self._out is not None and self._out.tell() < self.segment_bytes:
            return self._out
        if self._out is not None:
            self._out.close()
        seq = (self.segments[-1] + 1) if self.segments else 1
        if self.segments and self._path(self.segments[-1]).stat().st_size < self.segment_bytes:
            seq = self.segments[-1]  # reopen a segment left from an earlier run
        self._out = open(self._path(seq), "ab")  # noqa: SIM115 - kept open for appends
        if seq not in self.segments:
            self.segments.append(seq)
            _fsync_dir(self.dir)
        return self._out

    def _cut_back(self, out, start: int) -> None:
        try:
            out.truncate(start)
            out.seek(start)
        except OSError:  # the segment may now hold a torn line: close it so no later append follows it
            log.error(
                "request log spool: could not cut a failed write back in %s; closing that segment",
                self._path(self.segments[-1]),
            )
            out.close()
            self._out = None

    # -- reading ----------------------------------------------------------------------------------------------

    def head(self, max_records: int) -> tuple[list[dict[str, Any]], tuple[int, int, int]]:
        """Up to ``max_records`` of the oldest entries not yet consumed, and the cursor to pass to
        :meth:`consume` once they are stored. Lines that do not parse are returned as ``{"kind": "corrupt"}``."""
        with self._lock:
            while self.segments:
                seq = self.segments[0]
                entries, end = self._read(seq, self._head_offset, max_records)
                if entries or len(self.segments) == 1:
                    return entries, (seq, end, len(entries))
                self._drop_head(seq)  # an exhausted segment (its records were counted consumed already)
            return [], (0, 0, 0)

    def _read(self, seq: int, offset: int, max_records: int) -> tuple[list[dict[str, Any]], int]:
        entries: list[dict[str, Any]] = []
        if self._out is not None:
            self._out.flush()
        with open(self._path(seq), "rb") as f:
            f.seek(offset)
            while len(entries) < max_records:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    entries.append({"kind": "corrupt", "row": {}, "where": f"{self._path(seq)}@{offset - len(line)}"})
        return entries, offset

    def consume(self, cursor: tuple[int, int, int]) -> None:
        """Mark the entries returned with ``cursor`` as stored; deletes a segment once all of it is."""
        seq, end, n = cursor
        with self._lock:
            if not self.segments or self.segments[0] != seq:
                return
            self._head_offset = end
            self.records -= n
            size = self._path(seq).stat().st_size
            if end >= size and (len(self.segments) > 1 or self.records == 0):
                self._drop_head(seq)

    def _drop_head(self, seq: int) -> None:
        path = self._path(seq)
        if self._out is not None and len(self.segments) == 1:
            self._out.close()
            self._out = None
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        _fsync_dir(self.dir)
        self.segments.pop(0)
        self.bytes -= size
        self._head_offset = 0
        if not self.segments:
            self.bytes, self.records = 0, 0

    def close(self) -> None:
        with self._lock:
            if self._out is not None:
                self._out.close()
                self._out = None
        self._lockfile.close()  # releases the flock


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def open_spool(root: str | os.PathLike, *, max_bytes: int) -> Spool:
    """The first free spool slot under ``root`` (``root/0``, ``root/1``, ...): one per gateway process, so
    gateways sharing a workspace never write one journal. A restarted gateway takes slot 0 again and finds
    what it left there."""
    root = Path(root)
    for slot in range(64):
        try:
            return Spool(root / str(slot), max_bytes=max_bytes)
        except SpoolBusy:
            continue
    raise SpoolBusy(f"all 64 spool slots under {root} are in use")
