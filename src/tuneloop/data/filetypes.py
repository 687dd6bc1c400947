"""What a data file really holds, from its first bytes, and its bytes decompressed.

Entry points: :func:`sniff` (``empty``, ``gzip``, ``zstd``, ``utf-16``/``utf-32`` text, ``binary`` or plain
text, from magic bytes, byte-order marks and NUL patterns), :func:`open_bytes` (a binary stream of a file's
content, gunzipped or zstd-decompressed, that raises ``InputError`` when the compressed data is truncated or
corrupt) and :func:`unreadable_reason` (why a file cannot be read as UTF-8 text, to put in an ``InputError``).

gzip is read with the standard library; zstd needs the optional package ``zstandard``
(``pip install 'tuneloop[zstd]'``); without it a zstd file is an error that says so.
"""

from __future__ import annotations

import gzip
import importlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tuneloop.errors import InputError

SNIFF_BYTES = 8192
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "UTF-32", "little-endian"),
    (b"\x00\x00\xfe\xff", "UTF-32", "big-endian"),
    (b"\xff\xfe", "UTF-16", "little-endian"),
    (b"\xfe\xff", "UTF-16", "big-endian"),
)
_MAGIC = (  # binary formats a dataset is sometimes mistaken for
    (b"PAR1", "a Parquet file (rename it to .parquet)"),
    (b"PK\x03\x04", "a zip archive (unzip it first)"),
    (b"\xfd7zXZ\x00", "an xz archive (decompress it first: xz -d)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (extract it first)"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_CONTROL = bytes(range(0, 9)) + bytes(range(14, 32))  # control bytes other than tab, newlines, form feed, CR


@dataclass(frozen=True)
class FileKind:
    """``kind``: ``text``, ``empty``, ``gzip``, ``zstd``, ``utf-16``, ``utf-32`` or ``binary``; ``what``: in words."""

    kind: str
    what: str


def _nul_pattern(head: bytes) -> FileKind | None:
    """UTF-16/32 without a byte-order mark: ASCII text has NUL bytes at fixed positions."""
    sample = head[: len(head) - len(head) % 4][:1024]
    if len(sample) < 8:
        return None
    for width, name in ((4, "UTF-32"), (2, "UTF-16")):
        for lead, order in ((0, "little-endian"), (width - 1, "big-endian")):
            chars = [sample[i : i + width] for i in range(0, len(sample), width)]
            ascii_like = sum(c[lead] != 0 and all(b == 0 for j, b in enumerate(c) if j != lead) for c in chars)
            if ascii_like >= 0.9 * len(chars):
                return FileKind(name.lower(), f"{name} ({order}, no byte-order mark) text")
    return None


def _wide_text(rest: bytes, width: int, order: str) -> bool:
    """Whether the bytes after a UTF-16/32 byte-order mark are text in that encoding rather than UTF-8 that
    merely starts with those bytes: a dataset in UTF-16/32 holds ASCII (braces, quotes, commas, newlines),
    whose code units have a NUL high byte."""
    units = len(rest) // width
    high = width - 1 if order == "little-endian" else 0
    return units > 0 and sum(rest[i * width + high] == 0 for i in range(units)) >= 0.05 * units


def sniff(head: bytes, *, whole: bool = False) -> FileKind:
    """What the first bytes of a file say it is. ``whole``: ``head`` is the whole file (so only whitespace
    means empty)."""
    if not head:
        return FileKind("empty", "empty (0 bytes)")
    if whole and not head.strip():
        return FileKind("empty", f"empty (only {len(head)} bytes of whitespace)")
    if head.startswith(GZIP_MAGIC):
        return FileKind("gzip", "gzip-compressed")
    if head.startswith(ZSTD_MAGIC):
        return FileKind("zstd", "zstd-compressed")
    for bom, name, order in _BOMS:
        if head.startswith(bom) and _wide_text(head[len(bom) :], 4 if name == "UTF-32" else 2, order):
            return FileKind(name.lower(), f"{name} ({order}) text")
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return FileKind("binary", f"binary: {what}")
    if b"\x00" in head and (wide := _nul_pattern(head)):
        return wide
    # A stray NUL or control byte is one bad line (quarantined); many of them is not text at all.
    nul, control = head.count(0), sum(head.count(c) for c in _CONTROL)
    if nul > 0.01 * len(head) or control > 0.05 * len(head):
        return FileKind(
            "binary",
            f"binary ({control} of its first {len(head)} bytes are NUL or other control bytes, which text does not hold)",
        )
    return FileKind("text", "text")


def unreadable_reason(kind: FileKind, path: Path, expected: str, compression: str | None = None) -> str:
    """The message for a file of ``kind`` (not ``text``) where ``expected`` (e.g. ``JSON Lines``) was expected;
    ``compression``: the file was decompressed and ``kind`` is what its content is."""
    what = f"{compression}-compressed and its content is {kind.what}" if compression else kind.what
    if kind.kind == "empty":
        return f"{path}: the file is {what}, so the dataset has no records; add records to it, or point the config at the right file"
    if kind.kind in ("utf-16", "utf-32"):
        enc = kind.kind.upper()
        return (
            f"{path}: the file is {what}; tuneloop reads UTF-8 {expected}: convert it, e.g. "
            f"`iconv -f {enc} -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`"
        )
    return f"{path}: the file is {what}, not UTF-8 {expected} text; give a {expected} file"


# --- decompression --------------------------------------------------------------------------------


def zstd_module() -> Any:
    """The ``zstandard`` module, or ``None`` when the optional package is not installed."""
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        return None


class _ZstdRaw(io.RawIOBase):
    """zstd frames decompressed as a raw stream; a file that ends inside a frame raises ``InputError``
    (``zstandard``'s own stream reader returns what it has and says nothing)."""

    def __init__(self, path: Path, module: Any) -> None:
        self._f = path.open("rb")  # a Path, or an objstore.ObjectPath (streamed from an object store)
        self._path, self._zstd = path, module
        self._d = module.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            chunk = self._f.read(1 << 16)
            if not chunk:
                if self._started and not self._d.eof:
                    raise InputError(
                        f"{self._path}: zstd data is truncated (the file ends inside a frame); fetch the file again"
                    )
                return 0
            self._started = True
            try:
                while chunk:
                    self._buf += self._d.decompress(chunk)
                    chunk = self._d.unused_data if self._d.eof else b""
                    if chunk:  # another frame follows
                        self._d = self._zstd.ZstdDecompressor().decompressobj()
            except self._zstd.ZstdError as e:
                raise InputError(f"{self._path}: zstd data is corrupt ({e}); fetch the file again") from None
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _GzipChecked(io.RawIOBase):
    """A gzip stream whose truncation and corruption errors are ``InputError`` naming the file."""

    def __init__(self, path: Path) -> None:
        self._raw = path.open("rb")  # a Path, or an objstore.ObjectPath
        self._g = gzip.GzipFile(fileobj=self._raw, mode="rb")
        self._path = path

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            return self._g.readinto(b)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"{self._path}: gzip data is truncated or corrupt ({e}); fetch the file again") from None

    def close(self) -> None:
        self._g.close()
        self._raw.close()
        super().close()


def open_bytes(path: Path, compression: str | None) -> BinaryIO:
    """A buffered binary stream of the content of ``path``: as is, gunzipped (``gzip``) or zstd-decompressed."""
    if compression is None:
        return path.open("rb")  # a Path, or an objstore.ObjectPath (typed as a Path here)
    if compression == "gzip":
        return io.BufferedReader(_GzipChecked(path), 1 << 16)
    module = zstd_module()
    if module is None:
        raise InputError(
            f"{path}: the file is zstd-compressed and the optional package zstandard is not installed: "
            "`pip install 'tuneloop[zstd]'` (or `pip install zstandard`), or decompress it first with `zstd -d`"
        )
    return io.BufferedReader(_ZstdRaw(path, module), 1 << 16)


def read_head(path: Path, compression: str | None) -> bytes:
    """The first :data:`SNIFF_BYTES` of the (decompressed) content of ``path``."""
    with open_bytes(path, compression) as f:
        return f.read(SNIFF_BYTES)
