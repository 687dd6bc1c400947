"""``data.engine: ray``: the data pass as Ray Data jobs on an existing Ray cluster, with the local engine's answers.

Entry points: :func:`check_splits_ray` (what :func:`tuneloop.data.validate.check_splits` runs when
``data.engine`` is ``ray``: eval first, then train against the eval texts) and :func:`validate_dataset_ray`
(one dataset). :func:`ray_problems` is the preflight check (Ray installed, a cluster named and reachable).

The cluster is the one ``data.ray_address`` names, else ``RAY_ADDRESS``. Before any work its address is
checked with a short TCP connect (:func:`connect`): unreachable, not named or Ray not installed is an
``InputError`` (exit 2) that says what to do. The workers need ``tuneloop`` importable (the same install
as the driver).

One implementation, two engines: the Ray tasks call the local engine's code on their share of the records.

1. **Read** (:func:`_plan`, :func:`_check_parts`): the driver lists the files (a file, a directory, an
   object-store URL or prefix such as ``s3://bucket/dir/``, or a list of sources, in the local engine's order);
   an uncompressed ``.jsonl`` is cut into byte ranges at newlines, whose line numbers come from a first Ray pass
   that counts newlines; any other file (JSON, CSV, Parquet, compressed) is one task reading it with
   :mod:`.sources`' reader. Objects are read by the tasks themselves, with ranged GETs through the fsspec
   filesystem that :mod:`.objstore` builds on the driver (endpoint and keys from the driver's AWS environment,
   shipped with the plan, so a non-AWS endpoint works on workers that lack those settings). Each record keeps its identity
   ``ord = file_index << 40 | line`` (row for Parquet), so order and every message equal the local engine's.
2. **Rules and PII** (map stage): :func:`tuneloop.data.rules.process_records` on each part's items; the over-long
   rule counts tokens here (the tokenizer is shipped to the workers).
3. **Exact duplicates** (shuffle): records grouped by a hash bucket of their dedup key; in each key the first
   record (in ``ord`` order) that is not dropped as over-long is kept, later ones are duplicates.
4. **Near duplicates**: MinHash signatures and LSH band keys per batch with :mod:`.dedup`'s own code (map),
   band keys shuffled into buckets by (label, band, key), candidate pairs made in each bucket exactly as
   :func:`tuneloop.data.dedup._band_pairs` makes them; the candidates' signatures (recomputed for those
   records only) confirm the pairs (estimated Jaccard >= threshold) and the driver joins them into
   connected components (union-find over the confirmed edges only: their number grows with the duplicates,
   not with the dataset).
5. **Contamination** (map): the eval n-gram index is built once on the driver and broadcast
   (shipped once with the stage's function); each batch is scanned with :mod:`.dedup`'s contamination code.
6. **Output**: a last map stage turns each record into its clean line or quarantine entry; Ray writes the
   kept records as Parquet shards (``<name>.clean.parquet/``: ``ord``, ``line``, ``file``, ``source``,
   ``record`` = the canonical JSON) and the quarantine beside them (``<name>.quarantine.parquet/``); the
   driver then reads the result in input order once to compute the digest (a SHA-256 over the kept
   records in order, sequential by definition) and the report, and writes ``<name>.clean.jsonl`` /
   ``<name>.quarantine.jsonl`` as the local engine does (what preprocessing reads).

Results equal the local engine's on the same input: same kept records, digest, duplicate groups,
quarantine entries (same order) and report counts (``tests/test_data_ray.py``). A worker lost mid-pass is
retried by Ray (Ray Data retries a task whose worker died); every stage is a pure function of its input, so
the result is the same.
Not supported here (``InputError`` naming the local engine): saved Hugging Face datasets and dataset names.
Outputs (the shards, the clean file, the report) are written to the local workspace, as the local engine does.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.data.objstore import ObjectPath, is_url, list_objects, remote_errors
from tuneloop.data.sources import Item
from tuneloop.errors import InputError

INSTALL = "pip install 'tuneloop[ray]'"
RANGE_BYTES = 32 << 20  # an uncompressed .jsonl is read in byte ranges of about this size
SIG_BATCH = 16384  # records per signature / contamination task (dedup works through them in chunks of 1,024)
CONNECT_TIMEOUT_S = 3.0
_LINE_BITS = 40  # ord = file_index << 40 | line
_MAX_RETRIES = 3  # the newline-count tasks; Ray Data retries its own tasks when a worker dies (its default)
_CATS = ("invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped", "overlong_dropped")


# --- the cluster ----------------------------------------------------------------------------------


def import_ray() -> Any:
    """The ``ray`` module (with Ray Data), or ``InputError`` with the install line."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise InputError(f"data.engine is ray but Ray Data is not installed ({e}); install it: {INSTALL}") from None
    return ray


def ray_address(data: Any) -> str:
    """The cluster to use: ``data.ray_address``, else ``RAY_ADDRESS``; ``InputError`` when neither is set."""
    address = getattr(data, "ray_address", None) or os.environ.get("RAY_ADDRESS")
    if not address:
        raise InputError(
            "data.engine is ray but no Ray cluster is named: set data.ray_address (or RAY_ADDRESS) to the head's "
            "address, e.g. 127.0.0.1:6379 after `ray start --head`; or use data.engine: local"
        )
    return address


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` / ``ray://host:port``; None for ``auto`` and ``local``."""
    text = address.split("://", 1)[-1].rstrip("/")
    if text in ("auto", "local") or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise InputError(f"data.ray_address: {address!r} is not host:port (e.g. 127.0.0.1:6379)")
    return host.strip("[]"), int(port)


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the cluster at ``address`` cannot be reached (a TCP connect to its head), or None."""
    hp = _host_port(address)
    if hp is None:
        return None
    try:
        with socket.create_connection(hp, timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it (`ray start --head`) or fix data.ray_address / RAY_ADDRESS"


def ray_problems(data: Any) -> list[str]:
    """Preflight for ``data.engine: ray``: Ray installed, a cluster named and reachable (each with its key)."""
    if getattr(data, "engine", "local") != "ray":
        return []
    try:
        import_ray()
        address = ray_address(data)
    except InputError as e:
        return [f"data.engine: {e}"]
    problem = unreachable(address)
    return [f"data.ray_address: {problem}"] if problem else []


def connect(data: Any) -> Any:
    """Connect this process to the cluster (re-using a connection to the same address); return ``ray``.
    ``InputError`` (exit 2) before any work when Ray is missing or the cluster cannot be reached."""
    ray = import_ray()
    address = ray_address(data)
    if problem := unreachable(address):
        raise InputError(f"data.engine ray: {problem}")
    if ray.is_initialized():
        if _CONNECTED.get("address") == address:
            return ray
        ray.shutdown()
    try:
        ray.init(
            address=None if address == "local" else address,
            logging_level="ERROR",
            log_to_driver=False,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError) as e:
        raise InputError(f"data.engine ray: cannot connect to the Ray cluster at {address}: {e}") from None
    _CONNECTED["address"] = address
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-dataset INFO lines on the console
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # blocks come back in input order (the driver checks it)
    from ray.data.context import ShuffleStrategy

    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # tasks only: no aggregator actors to place
    return ray


_CONNECTED: dict[str, str] = {}


# --- reading --------------------------------------------------------------------------------------


@dataclass
class _File:
    path: str  # a local path or an object's URL
    label: str | None  # Item.file: None for a single-file source
    source: int  # index in a list of sources, -1 for a single source
    where: Path | ObjectPath  # what the readers open (an ObjectPath carries its filesystem to the workers)
    size: int


@dataclass
class _Plan:
    files: list[_File]
    parts: list[dict[str, Any]]
    position: str
    format: str
    source_of: dict[str, int] | None


def _files_of(source: str, label_prefix: str | None, index: int) -> list[_File]:
    from tuneloop.data.sources import SUPPORTED_SUFFIXES, data_suffix, is_saved_hf

    if is_url(source):  # an object, or a prefix read as a directory (sources.open_source's order and names)
        objects, rels = list_objects(source, SUPPORTED_SUFFIXES)
        if rels is None:
            return [_File(objects[0].url, label_prefix, index, objects[0], _size(objects[0]))]
        labels = [r if label_prefix is None else f"{label_prefix}/{r}" for r in rels]
        return [_File(o.url, n, index, o, _size(o)) for o, n in zip(objects, labels, strict=True)]
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if is_saved_hf(path):
            raise InputError(
                f"{path}: a saved Hugging Face dataset; data.engine ray reads files and directories of "
                ".jsonl/.json/.csv/.parquet: export it to Parquet, or use data.engine: local"
            )
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and data_suffix(p.name) in SUPPORTED_SUFFIXES and not p.name.startswith(".")
        )
        rel = [p.relative_to(path).as_posix() for p in found]
        names = [r if label_prefix is None else f"{label_prefix}/{r}" for r in rel]
        return [_File(str(p), n, index, p, p.stat().st_size) for p, n in zip(found, names, strict=True)]
    if path.is_file():
        return [_File(str(path), label_prefix, index, path, path.stat().st_size)]
    raise InputError(
        f"{source}: not a file, directory or s3:// / gs:// URL; data.engine ray reads files, directories and "
        "object-store URLs (a Hugging Face dataset name needs data.engine: local)"
    )


def _size(obj: ObjectPath) -> int:
    if obj.size is None:
        with remote_errors(obj.url):
            return int(obj.fs.size(obj.url))
    return obj.size


def _read_bytes(where: Path | ObjectPath, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of a local file or an object (one ranged GET)."""
    if isinstance(where, ObjectPath):
        return where.read_range(start, stop)
    with open(where, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


def _plan(path: Any, fmt: str, range_bytes: int) -> _Plan:
    """The files in the local engine's order, the read parts, the position kind and the format (detected by
    :mod:`.sources` on the driver from the first records, as the local engine does)."""
    from tuneloop.data.filetypes import SNIFF_BYTES, read_head, sniff
    from tuneloop.data.sources import base_suffix, data_suffix, open_detected

    _, position, fmt = open_detected(path, fmt)  # the local engine's checks, position kind and format detection
    if isinstance(path, (list, tuple)):
        files = [f for i, src in enumerate(path) for f in _files_of(src.path, src.label, i)]
        source_of: dict[str, int] | None = {f.label: f.source for f in files if f.label is not None}
    else:
        files, source_of = _files_of(str(path), None, -1), None
    parts: list[dict[str, Any]] = []
    for i, f in enumerate(files):
        base = base_suffix(data_suffix(f.where.name))
        head = read_head(f.where, None)  # type: ignore[arg-type]  # an ObjectPath has what read_head uses of a Path
        size = f.size
        if base == ".jsonl" and sniff(head, whole=len(head) < SNIFF_BYTES).kind == "text":
            for start, stop in _ranges(f.where, size, range_bytes):
                parts.append({"file_index": i, "kind": "range", "start": start, "stop": stop, "first_line": 0})
        else:
            parts.append({"file_index": i, "kind": "file", "start": 0, "stop": size, "first_line": 1})
    return _Plan(files, parts, position, fmt, source_of)


def _ranges(where: Path | ObjectPath, size: int, step: int) -> list[tuple[int, int]]:
    """Byte ranges of about ``step`` bytes that start at line starts."""
    cuts = [0]
    with where.open("rb") as f:
        while cuts[-1] + step < size:
            f.seek(cuts[-1] + step)
            f.readline()  # to the end of the line the cut fell in
            pos = f.tell()
            if pos >= size:
                break
            cuts.append(pos)
    cuts.append(size)
    return list(zip(cuts, cuts[1:], strict=False))  # consecutive cuts: one pair fewer than cuts


def _count_lines(part: dict[str, Any], where: Path | ObjectPath) -> int:
    return _read_bytes(where, part["start"], part["stop"]).count(b"\n")


def _range_items(where: Path | ObjectPath, label: str | None, start: int, stop: int, first_line: int) -> Iterator[Item]:
    """:func:`tuneloop.data.sources.read_file` of a ``.jsonl`` on one byte range: items with the file's line
    numbers."""
    from tuneloop.data.sources import BOM

    buf = _read_bytes(where, start, stop)
    for i, data in enumerate(buf.split(b"\n")):
        lineno = first_line + i
        if lineno == 1 and data.startswith(BOM):
            data = data[len(BOM) :]
        data = data.rstrip(b"\r\n")
        if not data.strip():
            continue
        yield Item(lineno, label, 0, data)


def _maybe_fail_once(marker: str | None) -> None:
    """Fault injection for the tests: the first task to get here kills its own worker process (SIGKILL), once."""
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


# --- stage 1: read, rules, PII, token counts (map) ----------------------------------------------


def _check_parts(
    batch: dict[str, np.ndarray],
    files: list[_File],
    fmt: str,
    pii_policy: str,
    want_text: bool,
    tokenizer: Any,
    max_length: int | None,
    overlong: str,
    kto: bool,
    fail_marker: str | None,
) -> dict[str, Any]:
    """Verdicts of the records of the parts in ``batch`` (one row per record)."""
    import pyarrow as pa

    from tuneloop.data.rules import process_records, token_count
    from tuneloop.data.sources import read_file

    _maybe_fail_once(fail_marker)
    cols: dict[str, list] = {
        k: []
        for k in ("ord", "line", "file", "source", "ok", "data", "k1", "k2", "text", "pii", "reasons", "long", "label")
    }
    for j in range(len(batch["file_index"])):
        fi = int(batch["file_index"][j])
        f = files[fi]
        if batch["kind"][j] == "range":
            items = list(
                _range_items(
                    f.where, f.label, int(batch["start"][j]), int(batch["stop"][j]), int(batch["first_line"][j])
                )
            )
        else:
            items = [it._replace(file=f.label) for it in read_file(f.where, f.label)]
        for v in process_records(items, fmt, pii_policy, want_text):
            ok = v.status == "ok"
            cols["ord"].append(fi << _LINE_BITS | v.line)
            cols["line"].append(v.line)
            cols["file"].append(v.file)
            cols["source"].append(f.source)
            cols["ok"].append(ok)
            cols["data"].append(v.data)
            key = v.key or bytes(16)
            cols["k1"].append(int.from_bytes(key[:8], "little"))
            cols["k2"].append(int.from_bytes(key[8:], "little"))
            cols["text"].append(v.text)
            cols["pii"].append(json.dumps(v.pii) if v.pii else None)
            cols["reasons"].append(json.dumps(v.reasons) if v.reasons else None)
            long_reason = None
            if ok and tokenizer is not None and max_length is not None:
                n_tok, exact = token_count(tokenizer, json.loads(v.data), stop_after=max_length)
                if n_tok > max_length:
                    verb = "dropped" if overlong == "drop" else "will be truncated"
                    more = "" if exact else "; counting stopped there"
                    long_reason = f"overlong: {'' if exact else 'over '}{n_tok} tokens > data.max_length {max_length} ({verb}{more})"
            cols["long"].append(long_reason)
            cols["label"].append(json.dumps(json.loads(v.data).get("label")) if ok and kto else "")
    return pa.table(
        {
            "ord": pa.array(cols["ord"], pa.int64()),
            "line": pa.array(cols["line"], pa.int64()),
            "file": pa.array(cols["file"], pa.string()),
            "source": pa.array(cols["source"], pa.int32()),
            "ok": pa.array(cols["ok"], pa.bool_()),
            "data": pa.array(cols["data"], pa.large_string()),
            "k1": pa.array(cols["k1"], pa.uint64()),
            "k2": pa.array(cols["k2"], pa.uint64()),
            "text": pa.array(cols["text"], pa.large_string()),
            "pii": pa.array(cols["pii"], pa.string()),
            "reasons": pa.array(cols["reasons"], pa.string()),
            "long": pa.array(cols["long"], pa.string()),
            "label": pa.array(cols["label"], pa.string()),
        }
    )


# --- stage 2: exact duplicates (shuffle by key bucket) -------------------------------------------


def _key_buckets(batch: dict[str, np.ndarray], buckets: int, drop_long: bool) -> dict[str, np.ndarray]:
    ok = batch["ok"].astype(bool)
    eligible = np.array([x is None for x in batch["long"]], dtype=bool) if drop_long else np.ones(len(ok), bool)
    k1, k2 = batch["k1"][ok], batch["k2"][ok]
    return {
        "bucket": (k1 % np.uint64(buckets)).astype(np.int64),
        "k1": k1,
        "k2": k2,
        "ord": batch["ord"][ok],
        "eligible": eligible[ok],
    }


def _exact_dups(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """In each dedup key: the first eligible record (not dropped as over-long) in ``ord`` order is kept,
    every later record with that key is a duplicate of it -> (ord, ref)."""
    k1, k2, ords, eligible = group["k1"], group["k2"], group["ord"], group["eligible"].astype(bool)
    order = np.lexsort((ords, k2, k1))
    k1, k2, ords, eligible = k1[order], k2[order], ords[order], eligible[order]
    n = len(ords)
    if n == 0:
        return {"ord": np.zeros(0, np.int64), "ref": np.zeros(0, np.int64)}
    new = np.ones(n, dtype=bool)
    new[1:] = (k1[1:] != k1[:-1]) | (k2[1:] != k2[:-1])
    run = np.cumsum(new) - 1
    none = np.iinfo(np.int64).max
    first = np.minimum.reduceat(np.where(eligible, ords, none), np.flatnonzero(new))[run]
    dup = (first != none) & (ords > first)
    return {"ord": ords[dup], "ref": first[dup]}


# --- stage 4: near duplicates (MinHash + LSH band shuffle) ---------------------------------------


def _candidates(batch: dict[str, Any], dup_ords: np.ndarray, drop_long: bool) -> np.ndarray:
    """Mask of the rows that are kept candidates (valid, not an exact duplicate, not dropped as over-long)."""
    keep = batch["ok"].astype(bool) & ~np.isin(batch["ord"], dup_ords)
    if drop_long:
        keep &= np.array([x is None for x in batch["long"]], dtype=bool)
    return keep


def _signatures(texts: list[str], shingle: int, num_perm: int, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    from tuneloop.data.dedup import minhash_signatures

    return minhash_signatures(texts, shingle_size=shingle, num_perm=num_perm, seed=0, bands=bands, rows=rows)


def _band_rows(
    batch: dict[str, Any],
    dup_ords: np.ndarray,
    drop_long: bool,
    shingle: int,
    num_perm: int,
    bands: int,
    rows: int,
    buckets: int,
) -> dict[str, np.ndarray]:
    """(bucket, label, band, key, ord) for each band of each kept candidate with words."""
    from tuneloop.data.dedup import empty_rows

    keep = _candidates(batch, dup_ords, drop_long)
    texts = [t for t, k in zip(batch["text"], keep, strict=True) if k]
    ords, labels = batch["ord"][keep], np.asarray(batch["label"], dtype=object)[keep]
    sig, keys = _signatures(texts, shingle, num_perm, bands, rows)
    words = ~empty_rows(sig) if len(texts) else np.zeros(0, bool)
    ords, labels, keys = ords[words], labels[words], keys[:, words]
    n = len(ords)
    band = np.repeat(np.arange(bands, dtype=np.int64), n)
    key = keys.reshape(-1)
    label = np.tile(labels, bands) if n else np.zeros(0, dtype=object)
    label_hash = np.array([hash_label(x) for x in label], dtype=np.uint64) if n else np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        bucket = (
            (key ^ (label_hash * np.uint64(0x9E3779B97F4A7C15)) ^ band.astype(np.uint64)) % np.uint64(buckets)
        ).astype(np.int64)
    return {
        "bucket": bucket,
        "label": label.astype(str) if n else np.zeros(0, dtype=str),
        "band": band,
        "key": key,
        "ord": np.tile(ords, bands),
    }


def hash_label(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")


def _bucket_pairs(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidate pairs of one shuffle bucket: per (label, band), :func:`dedup._band_pairs` over the members in
    ``ord`` order (exactly the pairs the local engine makes: every key's records are in one bucket)."""
    from tuneloop.data.dedup import band_pairs

    labels, band, key, ords = group["label"], group["band"], group["key"], group["ord"]
    us, vs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    order = np.argsort(ords, kind="stable")
    labels, band, key, ords = labels[order], band[order], key[order], ords[order]
    for lab in np.unique(labels):
        for b in np.unique(band[labels == lab]):
            m = (labels == lab) & (band == b)
            pairs = band_pairs(key[m], ords[m])
            us.append(pairs[0])
            vs.append(pairs[1])
    u, v = np.concatenate(us), np.concatenate(vs)
    return {"u": np.minimum(u, v), "v": np.maximum(u, v)}


def _node_signatures(batch: dict[str, Any], nodes: np.ndarray, shingle: int, num_perm: int) -> dict[str, np.ndarray]:
    """Signatures of the candidate-pair members in ``batch`` (recomputed: they are few)."""
    keep = np.isin(batch["ord"], nodes)
    texts = [t for t, k in zip(batch["text"], keep, strict=True) if k]
    sig, _ = _signatures(texts, shingle, num_perm, 0, 1)
    return {"ord": batch["ord"][keep], "sig": sig}


def _near_groups(
    pairs: tuple[np.ndarray, np.ndarray], sigs: dict[int, np.ndarray], threshold: float, num_perm: int
) -> list[list[int]]:
    """Confirm the candidate pairs (signatures agree on >= threshold of positions) and join them: groups of
    ords, each sorted, ordered by their first member."""
    from tuneloop.data.dedup import agreement_needed, component_roots, confirm_pairs

    u, v = pairs
    if len(u) == 0:
        return []
    code = np.unique(np.stack((u, v), axis=1), axis=0)
    u, v = code[:, 0], code[:, 1]
    need = agreement_needed(threshold, num_perm)
    nodes = np.array(sorted(sigs), dtype=np.int64)
    table = np.stack([sigs[int(o)] for o in nodes]) if len(nodes) else np.zeros((0, num_perm), np.uint32)
    iu, iv = np.searchsorted(nodes, u), np.searchsorted(nodes, v)
    keep = confirm_pairs(table[iu], table[iv], need)
    if not keep.any():
        return []
    members, roots = component_roots(u[keep], v[keep])
    groups: dict[int, list[int]] = {}
    for m, r in zip(members.tolist(), roots.tolist(), strict=True):
        groups.setdefault(r, []).append(m)
    return [sorted(g) for _, g in sorted(groups.items())]


# --- stage 5: contamination (map, eval index broadcast) ------------------------------------------


def _contaminated(
    batch: dict[str, Any], dup_ords: np.ndarray, drop_long: bool, index: Any, threshold: float
) -> dict[str, np.ndarray]:
    from tuneloop.data.dedup import contamination_fractions

    keep = _candidates(batch, dup_ords, drop_long)
    texts = [t for t, k in zip(batch["text"], keep, strict=True) if k]
    ords = batch["ord"][keep]
    found = contamination_fractions(texts, index, threshold) if texts else []
    return {
        "ord": np.array([ords[i] for i, _ in found], dtype=np.int64),
        "frac": np.array([f for _, f in found], dtype=np.float64),
    }


# --- stage 6: outcome of every record (map) -------------------------------------------------------


@dataclass
class _Found:
    """What the dataset-level stages found, broadcast to the last map stage (sizes grow with the removed)."""

    dup_ord: np.ndarray
    dup_ref: np.ndarray
    near_ord: np.ndarray
    near_head: np.ndarray
    contam_ord: np.ndarray
    contam_frac: np.ndarray
    labels: list[str | None]  # file index -> Item.file


def _where(line: int, file: str | None) -> str:
    return f"line {line}" + (f" of {file}" if file is not None else "")


def _outcomes(
    batch: dict[str, Any],
    found: _Found,
    pii_policy: str,
    overlong: str,
    near_action: str,
    contam_action: str,
    ngram: int,
) -> dict[str, Any]:
    """Per record: ``cat`` (0 kept, 1.. the report's category), ``phase`` (1 removed while screening, 2 by a
    similarity check), ``out`` (kept: canonical JSON; removed: the quarantine line) and the reasons the
    rule tally adds in each phase (``t1``, ``t2``)."""
    from tuneloop.data.rules import quarantine_line

    cat: list[int] = []
    phase: list[int] = []
    out: list[str] = []
    t1: list[str | None] = []
    t2: list[str | None] = []

    def add(c: int, p: int, text: str, r1: str | None, r2: str | None) -> None:
        cat.append(c)
        phase.append(p)
        out.append(text)
        t1.append(r1)
        t2.append(r2)

    ords = batch["ord"]
    di = np.searchsorted(found.dup_ord, ords)
    ni = np.searchsorted(found.near_ord, ords)
    ci = np.searchsorted(found.contam_ord, ords)
    for j in range(len(ords)):
        o, line, file = int(ords[j]), int(batch["line"][j]), batch["file"][j]
        data, reasons, long_reason = batch["data"][j], batch["reasons"][j], batch["long"][j]
        if not batch["ok"][j]:
            add(5 if json.loads(reasons)[0].startswith("pii:") else 1, 1, data, reasons, None)
            continue
        if di[j] < len(found.dup_ord) and found.dup_ord[di[j]] == o:
            ref = int(found.dup_ref[di[j]])
            reason = (
                f"exact_duplicate: same as {_where(ref & ((1 << _LINE_BITS) - 1), found.labels[ref >> _LINE_BITS])}"
            )
            add(2, 1, quarantine_line(line, file, [reason], json.loads(data)), json.dumps([reason]), None)
            continue
        if long_reason is not None and overlong == "drop":
            add(6, 1, quarantine_line(line, file, [long_reason], json.loads(data)), json.dumps([long_reason]), None)
            continue
        r1 = json.dumps([long_reason]) if long_reason is not None else None
        near = ni[j] < len(found.near_ord) and found.near_ord[ni[j]] == o
        contam = ci[j] < len(found.contam_ord) and found.contam_ord[ci[j]] == o
        removed: str | None = None
        frac = 0.0
        sim_reasons = []
        if near:
            head = int(found.near_head[ni[j]])
            removed = f"near_duplicate: similar to line {head & ((1 << _LINE_BITS) - 1)}" + (
                f" of {found.labels[head >> _LINE_BITS]}" if found.labels[head >> _LINE_BITS] else ""
            )
            sim_reasons.append(removed + ("" if near_action == "drop" else " (reported, kept)"))
        if contam:
            frac = float(found.contam_frac[ci[j]])
            sim_reasons.append(
                f"contaminated: {frac:.0%} of its {ngram}-grams occur in the eval data"
                + ("" if contam_action == "drop" else " (reported, kept)")
            )
        r2 = json.dumps(sim_reasons) if sim_reasons else None
        drop_near, drop_contam = near and near_action == "drop", contam and contam_action == "drop"
        if drop_near or drop_contam:
            overlap = f"contaminated: {frac:.0%} n-gram overlap with the eval data" if contam else None
            why = [x for x in (removed, overlap) if x]
            add(3 if drop_near else 4, 2, quarantine_line(line, file, why, json.loads(data)), r1, r2)
            continue
        add(0, 0, data, r1, r2)
    import pyarrow as pa

    return pa.table(
        {
            "ord": pa.array(ords, pa.int64()),
            "line": pa.array(batch["line"], pa.int64()),
            "file": pa.array(list(batch["file"]), pa.string()),
            "source": pa.array(batch["source"], pa.int32()),
            "pii": pa.array(list(batch["pii"]), pa.string()),
            "cat": pa.array(cat, pa.int8()),
            "phase": pa.array(phase, pa.int8()),
            "out": pa.array(out, pa.large_string()),
            "t1": pa.array(t1, pa.string()),
            "t2": pa.array(t2, pa.string()),
        }
    )


def _kept_rows(batch: Any) -> Any:
    """The kept records' shard rows (``record``: the canonical JSON the digest covers)."""
    import pyarrow.compute as pc

    kept = batch.filter(pc.equal(batch["cat"], 0))
    return kept.select(["ord", "line", "file", "source", "out"]).rename_columns(
        ["ord", "line", "file", "source", "record"]
    )


def _quarantine_rows(batch: Any) -> Any:
    """The quarantine's shard rows (``entry``: the quarantine line)."""
    import pyarrow.compute as pc

    gone = batch.filter(pc.not_equal(batch["cat"], 0))
    return gone.select(["ord", "line", "file", "phase", "out"]).rename_columns(
        ["ord", "line", "file", "phase", "entry"]
    )


# --- the driver -----------------------------------------------------------------------------------


@dataclass
class RayTimes:
    """Seconds per stage of the last :func:`validate_dataset_ray` (for the benchmark)."""

    stages: dict[str, float] = field(default_factory=dict)


LAST_TIMES = RayTimes()


def validate_dataset_ray(
    path: Any,
    out_dir: Path,
    *,
    data: Any,
    fmt: str = "auto",
    name: str = "train",
    checks: Any = None,
    tokenizer: Any = None,
    eval_texts: list[str] | None = None,
    range_bytes: int | None = None,
    fail_marker: str | None = None,
) -> dict:
    """:func:`tuneloop.data.validate.validate_dataset` on the Ray cluster of ``data`` (``data.ray_address`` /
    ``RAY_ADDRESS``): the same files and report, plus the kept records and the quarantine as Parquet shards
    (``<name>.clean.parquet/``, ``<name>.quarantine.parquet/``). ``fail_marker``: tests only (a worker kills
    itself once, see :func:`_maybe_fail_once`).

    The steps, each timed in :data:`LAST_TIMES`, are the stages of the module docstring: plan and line numbers,
    read + rules + PII, exact duplicates, near duplicates, contamination, outcomes and shards, then the driver's
    digest and files."""
    from tuneloop.data import dedup
    from tuneloop.data.passparts import Checks
    from tuneloop.data.passparts import not_checked as checks_not_run

    ray = connect(data)
    checks = checks or Checks()
    _check_options(fmt, checks)
    times: dict[str, float] = {}
    with _timed(times, "plan"):
        plan = _plan(path, fmt, range_bytes or RANGE_BYTES)
        near_on = checks.near_dup_threshold is not None
        contam_on = eval_texts is not None
        drop_long = tokenizer is not None and checks.max_length is not None and checks.overlong == "drop"
        buckets = max(2, 2 * max(1, int(ray.cluster_resources().get("CPU", 1))))
        _number_lines(ray, plan)
    with _timed(times, "read_rules_pii"):
        verdicts = _read_and_check(
            ray,
            plan,
            checks,
            tokenizer,
            want_text=near_on or contam_on,
            kto=plan.format == "kto" and near_on,
            fail_marker=fail_marker,
        )
    with _timed(times, "exact_duplicates"):
        dup_ord, dup_ref = _exact_duplicates(verdicts, buckets, drop_long)
    with _timed(times, "near_duplicates"):
        near_groups = _near_duplicates(verdicts, checks, dup_ord, drop_long, buckets) if near_on else []
    with _timed(times, "contamination"):
        contam = _contamination(verdicts, checks, eval_texts if contam_on else None, dup_ord, drop_long)
    with _timed(times, "outcomes_and_shards"):
        found = _found(dup_ord, dup_ref, near_groups, contam, plan)
        final = _outcomes_dataset(verdicts, found, checks)
        out_dir = Path(out_dir)
        _write_shards(final, out_dir, name)
    with _timed(times, "driver_digest_and_files"):
        not_checked = checks_not_run(checks, tokenizer, dedup if near_on or contam_on else None, eval_texts)
        report = _write_files(final, out_dir, name, path, plan, checks, not_checked, near_groups)
    LAST_TIMES.stages = times
    return report


def _check_options(fmt: str, checks: Any) -> None:
    """``InputError`` for a format or PII policy the data pass does not know."""
    from tuneloop.data.formats import FORMATS

    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; use 'auto' or one of: {', '.join(FORMATS)}")
    if checks.pii not in ("report", "redact", "drop"):
        raise InputError(f"unknown PII policy {checks.pii!r}; use report, redact or drop")


@contextmanager
def _timed(times: dict[str, float], stage: str) -> Iterator[None]:
    """Record the seconds the ``with`` block took as ``times[stage]`` (when it finishes without an error)."""
    t = time.perf_counter()
    yield
    times[stage] = time.perf_counter() - t


def _number_lines(ray: Any, plan: _Plan) -> None:
    """Set each byte range's ``first_line``: the newlines of the ranges before it in its file, counted on the
    cluster (one task per range)."""
    count = ray.remote(_count_lines).options(max_retries=_MAX_RETRIES)
    counts = ray.get([count.remote(p, plan.files[p["file_index"]].where) for p in plan.parts if p["kind"] == "range"])
    it = iter(counts)
    next_line: dict[int, int] = {}
    for p in plan.parts:
        if p["kind"] == "range":
            p["first_line"] = next_line.get(p["file_index"], 1)
            next_line[p["file_index"]] = p["first_line"] + next(it)


def _read_and_check(
    ray: Any, plan: _Plan, checks: Any, tokenizer: Any, *, want_text: bool, kto: bool, fail_marker: str | None
) -> Any:
    """Stages 1 and 2: every part read and run through the rules and PII, one task per part (materialized: the
    later stages all read it)."""
    return (
        ray.data.from_items(plan.parts, override_num_blocks=len(plan.parts))
        .map_batches(
            _check_parts,
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            fn_kwargs=dict(
                files=plan.files,
                fmt=plan.format,
                pii_policy=checks.pii,
                want_text=want_text,
                tokenizer=tokenizer,
                max_length=checks.max_length,
                overlong=checks.overlong,
                kto=kto,
                fail_marker=fail_marker,
            ),
        )
        .materialize()
    )


def _exact_duplicates(verdicts: Any, buckets: int, drop_long: bool) -> tuple[np.ndarray, np.ndarray]:
    """Stage 3: (the duplicates' ords, the ord each duplicates), sorted by ord."""
    dups = (
        verdicts.map_batches(_key_buckets, batch_format="numpy", fn_kwargs=dict(buckets=buckets, drop_long=drop_long))
        .groupby("bucket")
        .map_groups(_exact_dups, batch_format="numpy")
    )
    dup_rows = _collect(dups, ("ord", "ref"))
    order = np.argsort(dup_rows["ord"])
    return dup_rows["ord"][order], dup_rows["ref"][order]


def _near_duplicates(verdicts: Any, checks: Any, dup_ord: np.ndarray, drop_long: bool, buckets: int) -> list[list[int]]:
    """Stage 4: the near-duplicate groups (candidate pairs from the LSH buckets, confirmed on their signatures)."""
    from tuneloop.data import dedup

    bands, rows = dedup.lsh_params(checks.near_dup_threshold, 128)
    band_ds = verdicts.map_batches(
        _band_rows,
        batch_size=SIG_BATCH,
        batch_format="numpy",
        fn_kwargs=dict(
            dup_ords=dup_ord,
            drop_long=drop_long,
            shingle=checks.near_dup_shingle,
            num_perm=128,
            bands=bands,
            rows=rows,
            buckets=buckets,
        ),
    )
    pairs = _collect(band_ds.groupby("bucket").map_groups(_bucket_pairs, batch_format="numpy"), ("u", "v"))
    nodes = np.unique(np.concatenate((pairs["u"], pairs["v"])))
    sigs: dict[int, np.ndarray] = {}
    if len(nodes):
        node_ds = verdicts.map_batches(
            _node_signatures,
            batch_size=SIG_BATCH,
            batch_format="numpy",
            fn_kwargs=dict(nodes=nodes, shingle=checks.near_dup_shingle, num_perm=128),
        )
        for b in node_ds.iter_batches(batch_size=4096, batch_format="numpy"):
            sigs.update(zip(b["ord"].tolist(), b["sig"], strict=True))
    return _near_groups((pairs["u"], pairs["v"]), sigs, checks.near_dup_threshold, 128)


def _contamination(
    verdicts: Any, checks: Any, eval_texts: list[str] | None, dup_ord: np.ndarray, drop_long: bool
) -> dict[str, np.ndarray]:
    """Stage 5: ``ord`` and ``frac`` of the records whose n-gram overlap with ``eval_texts`` reaches the
    threshold (empty without eval texts)."""
    from tuneloop.data import dedup

    contam: dict[str, np.ndarray] = {"ord": np.zeros(0, np.int64), "frac": np.zeros(0)}
    index = dedup.eval_ngram_index(eval_texts, checks.contamination_ngram) if eval_texts else None
    if index is not None:
        contam = _collect(
            verdicts.map_batches(
                _contaminated,
                batch_size=SIG_BATCH,
                batch_format="numpy",
                fn_kwargs=dict(
                    dup_ords=dup_ord, drop_long=drop_long, index=index, threshold=checks.contamination_threshold
                ),
            ),
            ("ord", "frac"),
        )
    return contam


def _found(
    dup_ord: np.ndarray,
    dup_ref: np.ndarray,
    near_groups: list[list[int]],
    contam: dict[str, np.ndarray],
    plan: _Plan,
) -> _Found:
    """What stages 3 to 5 found, sorted by ord for the outcome stage's lookups."""
    near_ord = np.array([o for g in near_groups for o in g[1:]], dtype=np.int64)
    near_head = np.array([g[0] for g in near_groups for _ in g[1:]], dtype=np.int64)
    no, co = np.argsort(near_ord), np.argsort(contam["ord"])
    return _Found(
        dup_ord,
        dup_ref,
        near_ord[no],
        near_head[no],
        contam["ord"][co],
        contam["frac"][co],
        [f.label for f in plan.files],
    )


def _outcomes_dataset(verdicts: Any, found: _Found, checks: Any) -> Any:
    """Stage 6: every record's outcome (materialized: the shards and the driver's pass read it)."""
    return verdicts.map_batches(
        _outcomes,
        batch_format="numpy",
        fn_kwargs=dict(
            found=found,
            pii_policy=checks.pii,
            overlong=checks.overlong,
            near_action=checks.near_dup_action,
            contam_action=checks.contamination_action,
            ngram=checks.contamination_ngram,
        ),
    ).materialize()


def _write_shards(final: Any, out_dir: Path, name: str) -> None:
    """The kept records and the quarantine as Parquet shards, each directory replaced only when complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_shards, quarantine_shards = out_dir / f"{name}.clean.parquet", out_dir / f"{name}.quarantine.parquet"
    for shards, fn in ((clean_shards, _kept_rows), (quarantine_shards, _quarantine_rows)):
        _replace_dir(shards, lambda tmp, fn=fn: final.map_batches(fn, batch_format="pyarrow").write_parquet(str(tmp)))


def _collect(ds: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b in ds.iter_batches(batch_size=65536, batch_format="numpy"):
        for n in names:
            parts[n].append(b[n])
    return {n: (np.concatenate(v) if v else np.zeros(0, np.int64)) for n, v in parts.items()}


def _replace_dir(target: Path, write) -> None:
    """Write a directory of shards next to ``target`` and move it into place only when complete."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_files(
    final: Any,
    out_dir: Path,
    name: str,
    path: Any,
    plan: _Plan,
    checks: Any,
    not_checked: dict[str, str],
    near_groups: list[list[int]],
) -> dict:
    """Read the outcomes in input order once: digest, clean and quarantine JSONL, the report (the local
    engine's :func:`tuneloop.data.passparts.finish_report`)."""
    from tuneloop.data.passparts import Screened, Similar, bookkeeping, finish_report
    from tuneloop.fsutil import atomic_lines

    s = Screened()
    s.source_of = plan.source_of
    later: list[tuple[int, str | None, list[str]]] = []
    digest = hashlib.sha256(b"[")
    valid = pii_kept = near_n = contam_found = 0
    clean_path, quarantine_path = out_dir / f"{name}.clean.jsonl", out_dir / f"{name}.quarantine.jsonl"
    last = -1
    with (
        atomic_lines(clean_path) as clean,
        atomic_lines(quarantine_path, "backslashreplace") as quarantine,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="backslashreplace", dir=out_dir) as phase2,
    ):
        for b in final.iter_batches(batch_size=8192, batch_format="numpy"):
            for j in range(len(b["ord"])):
                o = int(b["ord"][j])
                if o <= last:
                    raise RuntimeError(
                        f"Ray returned the records out of order ({o} after {last}); this is a bug in ray_engine"
                    )
                last = o
                line, file, cat, out = int(b["line"][j]), b["file"][j], int(b["cat"][j]), b["out"][j]
                s.records += 1
                src = int(b["source"][j])
                if plan.source_of is not None:
                    s.per_source[src] += 1
                pii = b["pii"][j]
                if pii is not None:
                    s.note_pii(_PiiRow(line, file, [tuple(x) for x in json.loads(pii)]))
                if b["t1"][j] is not None:
                    reasons = json.loads(b["t1"][j])
                    s.tally.add(line, file, reasons)
                    s.overlong_seen += reasons[0].startswith("overlong:")
                if b["t2"][j] is not None:
                    reasons = json.loads(b["t2"][j])
                    later.append((line, file, reasons))
                    near_n += any(r.startswith("near_duplicate:") for r in reasons)
                    contam_found += any(r.startswith("contaminated:") for r in reasons)
                if cat == 0:
                    digest.update((b"," if valid else b"") + out.encode())
                    valid += 1
                    if plan.source_of is not None:
                        s.kept_per_source[src] += 1
                    pii_kept += pii is not None and checks.pii == "report"
                    clean.write(out[:-1] + bookkeeping(line, file, plan.source_of) + "}\n")
                    continue
                s.counts[_CATS[cat - 1]] += 1
                (quarantine if int(b["phase"][j]) == 1 else phase2).write(out + "\n")
        phase2.seek(0)
        for row in phase2:
            quarantine.write(row)
    digest.update(b"]")
    for line, file, reasons in later:
        s.tally.add(line, file, reasons)
    sim = Similar({}, {}, near_groups=len(near_groups), near_n=near_n, contam_n=contam_found)
    shards = {
        "engine": "ray",
        "clean_shards": str(out_dir / f"{name}.clean.parquet"),
        "quarantine_shards": str(out_dir / f"{name}.quarantine.parquet"),
    }
    report = finish_report(
        path,
        s,
        sim,
        valid,
        pii_kept,
        checks,
        not_checked,
        fmt=plan.format,
        position=plan.position,
        digest=digest.hexdigest(),
        out_dir=out_dir,
        name=name,
        extra=shards,
    )
    return report


@dataclass
class _PiiRow:
    line: int
    file: str | None
    pii: list[tuple[str, str]]


def check_splits_ray(
    data: Any, out_dir: Path, *, tokenizer: Any = None, train_name: str = "train", fail_marker: str | None = None
) -> Any:
    """:func:`tuneloop.data.validate.check_splits` with ``data.engine: ray``: the eval data first, then the
    train data against the eval texts, each on the cluster."""
    from tuneloop.data.passparts import SplitReports, checks_from_config, clean_texts

    connect(data)
    checks = checks_from_config(data)
    if data.eval_data and train_name == "eval":
        train_name = "eval.train"
    ev, eval_texts = None, None
    if data.eval_data:
        ev = _validate_one(
            data.eval_data, out_dir, data=data, fmt=data.format, name="eval", checks=checks, tokenizer=tokenizer
        )
        eval_texts = clean_texts(Path(ev["clean_path"]))
    tr = _validate_one(
        data.train_data,
        out_dir,
        data=data,
        fmt=data.format,
        name=train_name,
        checks=checks,
        tokenizer=tokenizer,
        eval_texts=eval_texts,
        fail_marker=fail_marker,
    )
    return SplitReports(tr, ev)


def _validate_one(path: Any, out_dir: Path, **kw: Any) -> dict:
    return validate_dataset_ray(path, out_dir, **kw)
