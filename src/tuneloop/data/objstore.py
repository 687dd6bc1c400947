"""Object-store inputs: ``s3://bucket/key`` (and ``gs://``) as ``data.train_data`` / ``data.eval_data``, streamed.

Entry points: :func:`is_url` (is a configured source an object-store URL), :func:`list_objects` (the data files of
a URL: one object, or every data file under a prefix, in the order a local directory's files are read),
:func:`url_problem` (the preflight check: reachable, found, allowed) and :func:`url_digest` (the content identity
for cache keys, from the listing: names, sizes and ETags; nothing is downloaded). An object is an
:class:`ObjectPath`: what :mod:`.sources` and :mod:`.filetypes` need of a ``Path`` (``name``, ``suffix``,
``stem``, ``open("rb")``), so both local passes and the Ray engine's read tasks read it with the same readers,
streaming (a buffered ranged read, never the whole object in memory).

The filesystem is fsspec's: ``s3://`` needs s3fs (``pip install 'tuneloop[s3]'``), ``gs://`` gcsfs. S3 settings come
from the standard AWS environment, as botocore reads it: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` or ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` for a non-AWS endpoint (MinIO, Ceph, moto). The endpoint and keys found in the driver's
environment are given to the filesystem explicitly, so they travel with it (pickled) to Ray workers whose own
environment does not have them. (pyarrow's own ``S3FileSystem`` does not read ``AWS_ENDPOINT_URL`` in pyarrow 26;
it is not used here.)

A missing bucket or key, denied access or bad credentials, an unreachable endpoint and a missing s3fs are each an
``InputError`` (exit 2) that names the URL and says what to do. Outputs (the workspace) stay local.
"""

from __future__ import annotations

import importlib
import io
import os
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tuneloop.errors import InputError

INSTALL = {"s3": "pip install 'tuneloop[s3]'", "gs": "pip install gcsfs", "gcs": "pip install gcsfs"}
_PACKAGE = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
FIRST_BYTES = 64 << 10  # the first ranged GET of a stream (a format sniff reads 8 KB)
BLOCK_BYTES = 8 << 20  # ranged GETs double up to this while an object is read in order
_SAVED_HF = ("dataset_info.json", "state.json", "dataset_dict.json")
_CREDENTIALS = (
    "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the endpoint "
    "(AWS_ENDPOINT_URL for a non-AWS store)"
)


def scheme(text: str) -> str | None:
    """The URL scheme of ``text`` (``s3``), lower case, or None when it is not ``scheme://...``."""
    m = _URL.match(str(text))
    return m.group(1).lower() if m else None


def is_url(text: Any) -> bool:
    """``text`` names a remote dataset (``scheme://...``); an unsupported scheme is refused when it is opened."""
    return isinstance(text, str) and scheme(text) is not None


def filesystem(url: str) -> Any:
    """The fsspec filesystem for ``url``: ``InputError`` for an unsupported scheme or a missing package."""
    s = scheme(url)
    if s not in _PACKAGE:
        raise InputError(f"{url}: unsupported URL scheme {s}://; tuneloop reads s3:// and gs:// URLs and local paths")
    try:
        importlib.import_module(_PACKAGE[s])
    except ImportError:
        raise InputError(
            f"{url}: reading {s}:// URLs needs the {_PACKAGE[s]} package, which is not installed: {INSTALL[s]}"
        ) from None
    fsspec = importlib.import_module("fsspec")  # untyped

    if s != "s3":
        return fsspec.filesystem(s, skip_instance_cache=True)
    env = os.environ.get
    kw: dict[str, Any] = {"config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 3}}}
    if endpoint := env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"):
        kw["client_kwargs"] = {"endpoint_url": endpoint}
    if env("AWS_ACCESS_KEY_ID") and env("AWS_SECRET_ACCESS_KEY"):
        kw.update(key=env("AWS_ACCESS_KEY_ID"), secret=env("AWS_SECRET_ACCESS_KEY"), token=env("AWS_SESSION_TOKEN"))
    return fsspec.filesystem("s3", skip_instance_cache=True, **kw)


@contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Errors of the object store as ``InputError`` naming ``url`` (missing, denied, unreachable)."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{url}: not found (no such bucket, key or prefix); check the URL") from None
    except PermissionError as e:
        raise InputError(f"{url}: access denied ({e}); {_CREDENTIALS}") from None
    except Exception as e:  # botocore's NoCredentialsError, EndpointConnectionError, ClientError, ...
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            raise InputError(f"{url}: no credentials found ({e}); {_CREDENTIALS}") from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
            e, (ConnectionError, TimeoutError)
        ):
            raise InputError(
                f"{url}: cannot reach the object store ({e}); check AWS_ENDPOINT_URL / the network"
            ) from None
        if isinstance(e, OSError) or name in ("ClientError", "NoSuchBucket"):
            raise InputError(f"{url}: the object store refused the request ({name}: {e}); {_CREDENTIALS}") from None
        raise


@dataclass(frozen=True)
class ObjectPath:
    """One object of a store, with what the readers use of a ``Path``. ``str()`` is its URL."""

    url: str
    fs: Any
    size: int | None = None
    etag: str | None = None

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    def open(self, mode: str = "rb") -> io.BufferedReader:
        """A buffered, seekable stream of the object: ranged GETs that start small (a format sniff costs
        :data:`FIRST_BYTES`) and double while it is read in order, up to :data:`BLOCK_BYTES` each."""
        if mode != "rb":
            raise ValueError("objects are read only")
        size = self.size
        if size is None:
            with remote_errors(self.url):
                size = int(self.fs.size(self.url))
        return io.BufferedReader(_Ranged(self, size), 1 << 16)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the object (one ranged GET)."""
        with remote_errors(self.url):
            data: bytes = self.fs.cat_file(self.url, start=start, end=stop)
            return data


class _Ranged(io.RawIOBase):
    """An object as a raw stream of ranged reads (what :meth:`ObjectPath.open` buffers)."""

    def __init__(self, obj: ObjectPath, size: int) -> None:
        self._obj, self._size = obj, size
        self._pos = self._start = 0
        self._buf = memoryview(b"")
        self._want = FIRST_BYTES // 2  # doubled before the first read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        if self._pos >= self._size:
            return 0
        off = self._pos - self._start
        if not 0 <= off < len(self._buf):
            sequential = off == len(self._buf)
            self._want = min(2 * self._want, BLOCK_BYTES) if sequential else FIRST_BYTES
            stop = min(self._size, self._pos + max(len(b), self._want))
            self._buf, self._start, off = memoryview(self._obj.read_range(self._pos, stop)), self._pos, 0
            if not self._buf:
                raise InputError(f"{self._obj.url}: the object ended early (changed while it was read?); retry")
        n = min(len(b), len(self._buf) - off)
        b[:n] = self._buf[off : off + n]
        self._pos += n
        return n


def _key(rel: str) -> list[str]:
    return rel.split("/")  # a local directory's files sort by path parts: a/x before a-b/x


def list_objects(url: str, suffixes: tuple[str, ...]) -> tuple[list[ObjectPath], list[str] | None]:
    """The objects of ``url`` and, for a prefix, each one's name relative to it (``None`` for one object).

    A prefix (``s3://bucket/dir/`` or ``s3://bucket/dir``) gives every object below it whose name ends with one
    of ``suffixes`` and does not start with a dot, ordered as a local directory's files. ``InputError`` when the
    URL cannot be listed or holds a saved Hugging Face dataset (not readable from a URL)."""
    fs = filesystem(url)
    s = scheme(url)
    with remote_errors(url):
        info = fs.info(url)
        if info.get("type") == "file":
            return [ObjectPath(url, fs, info.get("size"), _etag(info))], None
        found = fs.find(url, detail=True)
    base = url.rstrip("/")
    picked: list[tuple[str, ObjectPath]] = []
    for name, inf in found.items():
        full = f"{s}://{name}"
        if not full.startswith(base + "/"):
            continue
        rel = full[len(base) + 1 :]
        leaf = posixpath.basename(rel)
        if leaf in _SAVED_HF and "/" not in rel:
            raise InputError(
                f"{url}: holds a saved Hugging Face dataset ({leaf}); from an object store tuneloop reads "
                ".jsonl/.json/.csv/.parquet files: export the dataset to Parquet or JSONL under the prefix"
            )
        if leaf.startswith(".") or not leaf.lower().endswith(suffixes):
            continue
        picked.append((rel, ObjectPath(full, fs, inf.get("size"), _etag(inf))))
    picked.sort(key=lambda x: _key(x[0]))
    return [p for _, p in picked], [r for r, _ in picked]


def _etag(info: dict[str, Any]) -> str | None:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c")
    return str(tag).strip('"') if tag else None


def url_problem(url: str, suffixes: tuple[str, ...]) -> str | None:
    """Why ``url`` cannot be read (package missing, bucket or key missing, denied, unreachable, a prefix with no
    data files), or None. Lists the URL: one request or a few."""
    try:
        objects, rels = list_objects(url, suffixes)
    except InputError as e:
        return str(e)
    if rels is not None and not objects:
        return f"{url}: no {', '.join(suffixes)} files under this prefix"
    return None


def url_digest(url: str, suffixes: tuple[str, ...]) -> str:
    """The content identity of ``url`` for cache keys: its objects' names, sizes and ETags (an object rewritten
    gets a new ETag). Not the data digest: that is computed from the records, equal to a local copy's."""
    from tuneloop.fsutil import sha256_json

    objects, rels = list_objects(url, suffixes)
    names = rels if rels is not None else [objects[0].name]
    return sha256_json(["url", url, [[n, o.size, o.etag] for n, o in zip(names, objects, strict=True)]])
