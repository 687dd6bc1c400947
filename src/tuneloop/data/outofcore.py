"""The data pass out of core: ``validate_dataset``'s checks with memory that does not grow with the text.

Entry point: :func:`validate_out_of_core`, which :func:`tuneloop.data.validate.validate_dataset` calls (the
default; ``OutOfCore(enabled=False)`` runs the in-memory pass instead). It writes the same clean file,
quarantine, report and digest as the in-memory pass, byte for byte (tests/test_data_outofcore.py), in four
steps that read top to bottom:

1. **stream** (:func:`_stream`): the input is read in chunks of ``data.chunk_records`` records; worker
   processes run the per-record rules (:func:`tuneloop.data.rules._process`) and, on the same chunk, the
   MinHash signatures and LSH band keys (:func:`dedup.minhash_signatures`) and the contamination fraction
   (:func:`dedup.contamination_fractions`) of each valid record. The parent appends, per valid record, its
   canonical JSON to a stage file, its signature to ``sig.u32`` and a few fixed-size columns (line, file,
   flags, label, token count); the exact-duplicate key and every band key go to hash-partitioned bucket
   files (``exact.pNN``, ``bandB.pNN``: the top bits of the key pick the partition). Records that fail a
   rule go to a spill of quarantine lines. Nothing in memory holds a record's text past its chunk.
2. **exact duplicates** (:func:`_exact`): each partition of keys is sorted on its own (equal keys share a
   partition); the first record of a key that is not dropped as over-long is kept, later ones are its
   duplicates.
3. **near duplicates** (:func:`_near`): per band and partition, the (key, id) entries of the kept
   candidates are bucketed with :func:`dedup.band_pairs`; candidate pairs are confirmed on signatures read
   from ``sig.u32`` (``pread`` of the rows they need), and joined with :func:`dedup.join_pairs`.
4. **replay** (:func:`_replay`): the records are walked once more in input order (stage file, rule spill,
   columns) and the quarantine, the clean file, the digest and the rule tally are written exactly as the
   in-memory pass writes them.

Memory: fixed-size arrays of about 50 bytes per valid record (line, file, duplicate links, candidate ids,
flags) plus one band partition and a few chunks at a time (10 M chat records: 3.5 GB peak, most of it from
a memory map that step 3 no longer uses; 1 M: see docs/benchmarks.md); everything else is in the spill
directory (``data.spill_dir``, default a hidden ``.<name>.spill-*`` directory next to the outputs, inside the
workspace): a copy of the records plus about 720 bytes each (512-byte signature, band keys, exact key,
columns), 13 GB for 10 M records of 5.9 GB, removed when the pass ends. Before any work, that estimate
(:func:`spill_estimate`) is checked against the free space there (:func:`check_spill_space`: a ``StageError``
saying bytes needed vs free, on which filesystem, and what to do). A full disk while spilling stops the pass with a ``StageError`` that names the file and the directory, and no clean file or
report is written (the outputs are renamed into place only on success).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.errors import StageError

if TYPE_CHECKING:
    from tuneloop.data.passparts import Checks, Screened, Similar

NUM_PERM, SEED = 128, 0  # validate's near-duplicate settings (as near_duplicate_groups' defaults)
_FLAG_PII, _FLAG_EMPTY = 1, 2
_KIND_BAD, _KIND_PII_DROP, _KIND_OK = 0, 1, 2
_CONFIRM_BLOCK = 1 << 16  # candidate pairs whose signatures are read at once
_REPLAY_BLOCK = 1 << 16  # records whose columns the replay reads at once


@dataclass
class OutOfCore:
    """How the local engine runs the data pass (not what it checks: the results do not depend on these)."""

    enabled: bool = True
    chunk_records: int = 4096  # records per worker task and per spill write
    spill_dir: str | None = None  # None: a hidden directory next to the outputs (inside the workspace)
    partitions: int = 16  # hash partitions of the exact-duplicate keys and of each band's keys
    flush_bytes: int = 64 << 20  # bucket bytes buffered in memory before they are appended to their files


def ooc_from_config(data_cfg: Any) -> OutOfCore:
    """``OutOfCore`` from a ``DataConfig`` (``data.chunk_records``, ``data.spill_dir``; defaults when absent)."""
    out = OutOfCore()
    for name in ("chunk_records", "spill_dir"):
        if getattr(data_cfg, name, None) is not None:
            setattr(out, name, getattr(data_cfg, name))
    return out


# --- the spill directory --------------------------------------------------------------------------


def _disk_error(e: OSError, path: Path, root: Path) -> StageError:
    what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
    return StageError(
        f"data validation stopped: cannot write {path} ({what}). The out-of-core pass keeps a copy of the records plus "
        f"about {SPILL_BYTES_PER_RECORD} bytes each in {root} while it runs (data.spill_dir); free space there or set data.spill_dir to a directory "
        "on a larger disk, then run again. No clean file or report was written."
    )


class Spill:
    """Files of the pass under one directory: appended numpy columns, hash-partitioned buckets (buffered up to
    ``flush_bytes``), and text spills. Every write error becomes a :class:`StageError` naming the file."""

    def __init__(self, root: Path, flush_bytes: int):
        self.root = root
        self.flush_bytes = flush_bytes
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        self._open: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def _write(self, name: str, data: bytes | str) -> None:
        f: Any = self._open.get(name)  # a binary file for bytes, a text file for str
        try:
            if f is None:
                if isinstance(data, bytes):
                    f = self._open[name] = open(self.path(name), "ab")
                else:
                    f = self._open[name] = open(
                        self.path(name), "a", encoding="utf-8", errors="surrogatepass", newline="\n"
                    )
            f.write(data)
        except OSError as e:
            raise _disk_error(e, self.path(name), self.root) from None

    def column(self, name: str, values: np.ndarray) -> None:
        """Append to a column file (kept open: a few of these per pass)."""
        self._write(name, np.ascontiguousarray(values).tobytes())

    def text(self, name: str, text: str) -> None:
        self._write(name, text)

    def bucket(self, name: str, values: np.ndarray) -> None:
        """Append to a bucket file, through the buffer (many of these per pass; files are opened per flush)."""
        self._buffers.setdefault(name, []).append(values)
        self._buffered += values.nbytes
        if self._buffered >= self.flush_bytes:
            self._flush_buckets()

    def _flush_buckets(self) -> None:
        for name, parts in self._buffers.items():
            try:
                with open(self.path(name), "ab") as f:
                    f.write(np.concatenate(parts).tobytes())
            except OSError as e:
                raise _disk_error(e, self.path(name), self.root) from None
        self._buffers.clear()
        self._buffered = 0

    def close(self) -> None:
        """Flush and close everything written so far (before reading it back)."""
        self._flush_buckets()
        for name, f in list(self._open.items()):
            try:
                f.close()
            except OSError as e:
                raise _disk_error(e, self.path(name), self.root) from None
        self._open.clear()

    def read(self, name: str, dtype: Any) -> np.ndarray:
        p = self.path(name)
        return np.fromfile(p, dtype=dtype) if p.exists() else np.zeros(0, dtype=dtype)


_EXACT = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("id", "<i8")])
_BAND = np.dtype([("key", "<u8"), ("id", "<i8")])


def _partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    return (keys % np.uint64(partitions)).astype(np.int64)


def _bucketed(spill: Spill, prefix: str, rows: np.ndarray, keys: np.ndarray, partitions: int) -> None:
    """Rows split by partition of ``keys`` (order kept within a partition) into ``<prefix>.pNN``."""
    part = _partition_of(keys, partitions)
    order = np.argsort(part, kind="stable")
    cuts = np.searchsorted(part[order], np.arange(partitions + 1))
    for p in range(partitions):
        if cuts[p + 1] > cuts[p]:
            spill.bucket(f"{prefix}.p{p:02d}", rows[order[cuts[p] : cuts[p + 1]]])


# --- step 1: stream -------------------------------------------------------------------------------

_CTX: dict[str, Any] = {}  # set in the parent before the workers fork (the eval index is large to pickle)


@dataclass
class _Chunk:
    verdicts: list
    sig: np.ndarray | None
    keys: np.ndarray | None
    contaminated: list[tuple[int, float]]
    labels: list[Any] | None


def _chunk_work(items: list) -> _Chunk:
    """A worker's part: the rules on a chunk of items, then signatures, band keys and contamination of its
    valid records (their similarity texts are dropped before the verdicts go back to the parent)."""
    from tuneloop.data import dedup
    from tuneloop.data.rules import process_records

    c = _CTX
    verdicts = process_records(items, c["fmt"], c["pii"], c["want_text"])
    ok = [v for v in verdicts if v.status == "ok"]
    texts = [v.text or "" for v in ok] if c["want_text"] else []  # want_text: every valid verdict has its text
    sig = keys = None
    if c["near"] and ok:
        sig, keys = dedup.minhash_signatures(
            texts, shingle_size=c["shingle"], num_perm=NUM_PERM, seed=SEED, bands=c["bands"], rows=c["rows"], workers=1
        )
    contaminated = (
        dedup.contamination_fractions(texts, c["eval"], c["contam_threshold"]) if c["eval"] is not None and ok else []
    )
    labels = [json.loads(v.data).get("label") for v in ok] if c["fmt"] == "kto" else None
    if c["want_text"]:
        verdicts = [v._replace(text=None) for v in verdicts]
    return _Chunk(verdicts, sig, keys, contaminated, labels)


@dataclass
class _Streamed:
    """What step 1 leaves in memory: counts, and the few things that are sparse."""

    n_ok: int = 0
    files: list[str | None] = field(default_factory=list)  # file id -> name
    file_id: dict[str | None, int] = field(default_factory=dict)
    contaminated: dict[int, float] = field(default_factory=dict)  # ok index -> fraction (>= threshold)
    label_code: dict[Any, int] = field(default_factory=dict)
    overlong_possible: bool = False


def _stream(
    items: Iterator[Any],
    fmt: str,
    s: Screened,
    checks: Checks,
    tokenizer: Any,
    eval_texts: list[str] | None,
    near: bool,
    spill: Spill,
    ooc: OutOfCore,
) -> _Streamed:
    from tuneloop.data import dedup
    from tuneloop.data.rules import map_chunks, token_count

    bands, rows = dedup.lsh_params(checks.near_dup_threshold, NUM_PERM) if near else (0, 0)
    index = dedup.eval_ngram_index(eval_texts, checks.contamination_ngram) if eval_texts else None
    count_tokens = tokenizer is not None and checks.max_length is not None
    st = _Streamed(overlong_possible=count_tokens)
    _CTX.update(
        fmt=fmt,
        pii=checks.pii,
        want_text=near or index is not None,
        near=near,
        shingle=checks.near_dup_shingle,
        bands=bands,
        rows=rows,
        eval=index,
        contam_threshold=checks.contamination_threshold,
    )
    import multiprocessing

    # the workers read _CTX as the fork left it; without fork (Windows) the work stays in this process
    workers = checks.num_workers if "fork" in multiprocessing.get_all_start_methods() else 1
    try:
        for chunk in map_chunks(items, _chunk_work, chunk=ooc.chunk_records, num_workers=workers):
            _take_chunk(
                chunk, s, st, checks, tokenizer if count_tokens else None, token_count, spill, bands, ooc.partitions
            )
    finally:
        _CTX.clear()
    return st


def _take_chunk(
    chunk: _Chunk,
    s: Screened,
    st: _Streamed,
    checks: Checks,
    tokenizer: Any,
    token_count: Any,
    spill: Spill,
    bands: int,
    partitions: int,
) -> None:
    """The parent's part of step 1 for one chunk, in input order."""
    from tuneloop.data import dedup

    kinds, bad, stage = [], [], []
    lines, fids, flags, keys, ntok = [], [], [], [], []
    for r in chunk.verdicts:
        s.records += 1
        if s.source_of is not None:
            s.per_source[s.source_of[r.file]] += 1
        if r.pii:
            s.note_pii(r)
        if r.status == "bad":
            kinds.append(_KIND_PII_DROP if r.reasons[0].startswith("pii:") else _KIND_BAD)
            bad.append(json.dumps([r.line, r.file, r.reasons, r.data]) + "\n")
            continue
        kinds.append(_KIND_OK)
        stage.append(r.data + "\n")
        lines.append(r.line)
        fid = st.file_id.get(r.file)
        if fid is None:
            fid = st.file_id[r.file] = len(st.files)
            st.files.append(r.file)
        fids.append(fid)
        flags.append(_FLAG_PII if r.pii else 0)
        keys.append(r.key)
        if tokenizer is not None:
            n_tok, exact = token_count(tokenizer, json.loads(r.data), stop_after=checks.max_length)
            ntok.append(0 if n_tok <= checks.max_length else (n_tok if exact else -n_tok))
    first = st.n_ok
    n = len(lines)
    spill.column("kind.i1", np.array(kinds, dtype=np.int8))
    if bad:
        spill.text("bad.jsonl", "".join(bad))
    if not n:
        return
    st.n_ok += n
    spill.text("stage.jsonl", "".join(stage))
    spill.column("line.i8", np.array(lines, dtype=np.int64))
    spill.column("file.i4", np.array(fids, dtype=np.int32))
    ids = np.arange(first, first + n, dtype=np.int64)
    flag = np.array(flags, dtype=np.uint8)
    if chunk.sig is not None:
        flag[dedup.empty_rows(chunk.sig)] |= _FLAG_EMPTY
        spill.column("sig.u32", chunk.sig)
        for b in range(bands):
            entries = np.empty(n, dtype=_BAND)
            assert chunk.keys is not None  # computed with the signatures
            entries["key"], entries["id"] = chunk.keys[b], ids
            _bucketed(spill, f"band{b}", entries, chunk.keys[b], partitions)
    spill.column("flags.u1", flag)
    if chunk.labels is not None:
        codes = [st.label_code.setdefault(v, len(st.label_code)) for v in chunk.labels]
        spill.column("label.i2", np.array(codes, dtype=np.int16))
    if tokenizer is not None:
        spill.column("ntok.i8", np.array(ntok, dtype=np.int64))
    halves = np.frombuffer(b"".join(keys), dtype="<u8").reshape(n, 2)
    entries = np.empty(n, dtype=_EXACT)
    entries["hi"], entries["lo"], entries["id"] = halves[:, 0], halves[:, 1], ids
    _bucketed(spill, "exact", entries, halves[:, 0], partitions)
    for i, frac in chunk.contaminated:
        st.contaminated[first + i] = frac


# --- step 2: exact duplicates ---------------------------------------------------------------------


def _exact(spill: Spill, n_ok: int, dropped_overlong: np.ndarray | None, partitions: int) -> np.ndarray:
    """Per valid record, the valid record it duplicates (-1: none): the first record of its key that is
    not dropped as over-long (records before that one are over-long drops, not duplicates)."""
    dup_of = np.full(n_ok, -1, dtype=np.int64)
    for p in range(partitions):
        e = spill.read(f"exact.p{p:02d}", _EXACT)
        if len(e) < 2:
            continue
        e = e[np.lexsort((e["id"], e["lo"], e["hi"]))]
        ids = e["id"]
        new = np.empty(len(e), dtype=bool)
        new[0] = True
        new[1:] = (e["hi"][1:] != e["hi"][:-1]) | (e["lo"][1:] != e["lo"][:-1])
        group = np.cumsum(new) - 1
        pos = np.arange(len(e))
        eligible = np.ones(len(e), dtype=bool) if dropped_overlong is None else ~dropped_overlong[ids]
        head = np.full(group[-1] + 1, len(e), dtype=np.int64)  # first eligible position of each group
        np.minimum.at(head, group[eligible], pos[eligible])
        dup = pos > head[group]
        dup_of[ids[dup]] = ids[head[group[dup]]]
    return dup_of


# --- step 3: near duplicates ----------------------------------------------------------------------


def _near(
    spill: Spill,
    n_ok: int,
    candidate: np.ndarray,
    flags: np.ndarray,
    labels: np.ndarray | None,
    checks: Checks,
    partitions: int,
) -> list[list[int]]:
    """Near-duplicate groups among the candidates (valid-record ids; kto: within one label), as
    ``near_duplicate_groups`` on the candidates' texts finds them."""
    from tuneloop.data import dedup

    threshold = checks.near_dup_threshold
    assert threshold is not None  # the caller runs this step only with near-duplicate detection on
    bands, _ = dedup.lsh_params(threshold, NUM_PERM)
    need = dedup.agreement_needed(threshold, NUM_PERM)
    member = candidate & ((flags & _FLAG_EMPTY) == 0)
    if np.count_nonzero(member) < 2:
        return []
    label = np.arange(n_ok)
    mix = None if labels is None else dedup._constants(1, 5)[0]
    with np.errstate(over="ignore"):
        for b in range(bands):
            lo_all, hi_all = [], []
            for p in range(partitions):
                e = spill.read(f"band{b}.p{p:02d}", _BAND)
                e = e[member[e["id"]]]
                if len(e) < 2:
                    continue
                keys = e["key"] if labels is None else e["key"] ^ (labels[e["id"]].astype(np.uint64) * mix)
                u, v = dedup.band_pairs(keys, e["id"])
                if labels is not None:
                    same = labels[u] == labels[v]
                    u, v = u[same], v[same]
                open_ = label[u] != label[v]
                if open_.any():
                    lo, hi = dedup.unique_pairs(u[open_], v[open_], n_ok)
                    keep = _confirm(spill, n_ok, lo, hi, need)
                    lo_all.append(lo[keep])
                    hi_all.append(hi[keep])
            if lo_all:
                lo, hi = np.concatenate(lo_all), np.concatenate(hi_all)
                label = dedup.join_pairs(label, label[lo], label[hi])
    return dedup.groups_from_labels(label)


def _confirm(spill: Spill, n_ok: int, lo: np.ndarray, hi: np.ndarray, need: int) -> np.ndarray:
    """Which pairs agree on at least ``need`` signature positions; the signatures are read from ``sig.u32``
    with ``pread``. (Through a memory map, the kernel maps the pages around each row too: at 500,000 records
    the random reads made the whole 243 MB file resident; at 10 M the pass peaked at 3.5 GB.)"""
    from tuneloop.data import dedup

    keep = np.zeros(len(lo), dtype=bool)
    with open(spill.path("sig.u32"), "rb", buffering=0) as f:
        for i in range(0, len(lo), _CONFIRM_BLOCK):
            a, b = lo[i : i + _CONFIRM_BLOCK], hi[i : i + _CONFIRM_BLOCK]
            rows = _read_rows(f.fileno(), np.concatenate((a, b)))
            keep[i : i + _CONFIRM_BLOCK] = dedup.confirm_pairs(rows[: len(a)], rows[len(a) :], need)
    return keep


def _read_rows(fd: int, ids: np.ndarray) -> np.ndarray:
    """Signature rows ``ids`` of the file ``fd`` (runs of consecutive ids read at once)."""
    size = NUM_PERM * 4
    uniq, inverse = np.unique(ids, return_inverse=True)
    out = np.empty((len(uniq), NUM_PERM), dtype=np.uint32)
    cuts = np.flatnonzero(np.diff(uniq) != 1) + 1
    for s, e in zip([0, *cuts.tolist()], [*cuts.tolist(), len(uniq)], strict=True):
        data = os.pread(fd, (e - s) * size, int(uniq[s]) * size)
        out[s:e] = np.frombuffer(data, dtype=np.uint32).reshape(e - s, NUM_PERM)
    return out[inverse]


def _similar(
    groups: list[list[int]],
    contaminated: dict[int, float],
    candidate: np.ndarray,
    cand_of: np.ndarray,
    line_col: np.ndarray,
    file_col: np.ndarray,
    files: list[str | None],
    s: Screened,
    checks: Checks,
) -> Similar:
    """``validate._similar``'s result from the groups (valid-record ids) and the contaminated candidates:
    removed and contaminated candidates, and their reasons in the tally, in candidate order."""
    from tuneloop.data.passparts import Similar

    def where(i: int) -> tuple[int, str | None]:
        return int(line_col[i]), files[file_col[i]]

    sim = Similar({}, contaminated, near_groups=len(groups))
    for g in groups:
        line, file = where(g[0])
        reason = f"near_duplicate: similar to line {line}" + (f" of {file}" if file else "")
        for j in g[1:]:
            sim.removed[int(cand_of[j])] = reason
    if checks.near_dup_action == "drop":
        sim.drop |= set(sim.removed)
    if checks.contamination_action == "drop":
        sim.drop |= set(sim.contamination)
    return sim


def _tally(
    sim: Similar,
    candidate: np.ndarray,
    line_col: np.ndarray,
    file_col: np.ndarray,
    files: list[str | None],
    s: Screened,
    checks: Checks,
) -> None:
    """The similarity reasons in the tally, after the screen's (as the in-memory pass adds them)."""
    from tuneloop.data.passparts import tally_similar

    ids_of = np.flatnonzero(candidate)
    tally_similar(s.tally, sim, checks, lambda c: (int(line_col[ids_of[c]]), files[file_col[ids_of[c]]]))


# --- step 4: replay -------------------------------------------------------------------------------


def _replay(
    spill: Spill,
    s: Screened,
    st: _Streamed,
    sim: Similar,
    cand_of: np.ndarray,
    dup_of: np.ndarray,
    ntok: np.ndarray | None,
    checks: Checks,
    clean: Any,
    quarantine: Any,
) -> tuple[int, int, str]:
    """Every record once more in input order: the quarantine (rule failures, duplicates, over-long drops;
    then the similarity drops in candidate order), the clean file, the digest. Returns (kept, kept with
    PII unredacted, digest), as ``validate._write_kept``."""
    import hashlib

    from tuneloop.data.passparts import bookkeeping, overlong_reason
    from tuneloop.data.rules import quarantine_line

    kinds = spill.read("kind.i1", np.int8)
    line_col = spill.read("line.i8", np.int64)
    file_col = spill.read("file.i4", np.int32)
    flag_col = spill.read("flags.u1", np.uint8)
    files, source_of = st.files, s.source_of
    digest = hashlib.sha256(b"[")
    valid = pii_kept = 0
    report_pii = checks.pii == "report"
    drop_over = checks.overlong == "drop"
    later: list[str] = []  # similarity drops; appended after the screen's lines
    later_bytes = 0
    j = 0  # valid-record id
    for name in ("stage.jsonl", "bad.jsonl"):
        spill.path(name).touch()
    with (
        open(spill.path("stage.jsonl"), encoding="utf-8") as stage,
        open(spill.path("bad.jsonl"), encoding="utf-8") as bad,
    ):
        for start in range(0, len(kinds), _REPLAY_BLOCK):
            block = kinds[start : start + _REPLAY_BLOCK].tolist()
            n = block.count(_KIND_OK)
            lines, fids = line_col[j : j + n].tolist(), file_col[j : j + n].tolist()
            pii_flags = (flag_col[j : j + n] & _FLAG_PII).tolist()
            dups, cands = dup_of[j : j + n].tolist(), cand_of[j : j + n].tolist()
            toks = ntok[j : j + n].tolist() if ntok is not None else None
            k = 0
            for kind in block:
                if kind != _KIND_OK:
                    line, file, reasons, qline = json.loads(bad.readline())
                    quarantine.write(qline + "\n")
                    s.tally.add(line, file, reasons)
                    s.counts["pii_dropped" if kind == _KIND_PII_DROP else "invalid"] += 1
                    continue
                data = stage.readline()[:-1]
                line, file = lines[k], files[fids[k]]
                d, c = dups[k], cands[k]
                t = toks[k] if toks is not None else 0
                k += 1
                if d >= 0:
                    first_file = files[file_col[d]]
                    reason = f"exact_duplicate: same as line {line_col[d]}" + (
                        f" of {first_file}" if first_file is not None else ""
                    )
                    quarantine.write(quarantine_line(line, file, [reason], json.loads(data)) + "\n")
                    s.tally.add(line, file, [reason])
                    s.counts["duplicates"] += 1
                    continue
                if t:
                    s.overlong_seen += 1
                    reason = overlong_reason(abs(t), t > 0, checks)
                    s.tally.add(line, file, [reason])
                    if drop_over:
                        quarantine.write(quarantine_line(line, file, [reason], json.loads(data)) + "\n")
                        s.counts["overlong_dropped"] += 1
                        continue
                if c in sim.drop:
                    near = c in sim.removed and checks.near_dup_action == "drop"
                    s.counts["near_duplicates" if near else "contaminated"] += 1
                    overlap = (
                        f"contaminated: {sim.contamination[c]:.0%} n-gram overlap with the eval data"
                        if c in sim.contamination
                        else None
                    )
                    why = [x for x in (sim.removed.get(c), overlap) if x]
                    later.append(quarantine_line(line, file, why, json.loads(data)) + "\n")
                    later_bytes += len(later[-1])
                    if later_bytes > (16 << 20):
                        spill.text("similar.jsonl", "".join(later))
                        later, later_bytes = [], 0
                    continue
                digest.update((b"," if valid else b"") + data.encode())
                valid += 1
                if source_of is not None:
                    s.kept_per_source[source_of[file]] += 1
                pii_kept += bool(pii_flags[k - 1]) and report_pii
                clean.write(data[:-1] + bookkeeping(line, file, source_of) + "}\n")
            j += n
    if later:
        spill.text("similar.jsonl", "".join(later))
    spill.close()
    if spill.path("similar.jsonl").exists():
        with open(spill.path("similar.jsonl"), encoding="utf-8", errors="surrogatepass") as f:
            shutil.copyfileobj(f, quarantine)
    digest.update(b"]")
    return valid, pii_kept, digest.hexdigest()


# --- the pass -------------------------------------------------------------------------------------


def _spill_root(out_dir: Path, name: str, ooc: OutOfCore, path: Any = None) -> Path:
    """A new spill directory under ``data.spill_dir`` (or ``out_dir``), after checking that the spill of the input
    ``path`` fits there (:func:`check_spill_space`)."""
    base = Path(ooc.spill_dir).expanduser() if ooc.spill_dir else out_dir
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StageError(
            f"data validation: cannot create a spill directory in {base} ({e.strerror}); "
            "set data.spill_dir to a writable directory"
        ) from None
    check_spill_space(path, base)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{name}.spill-", dir=base))
    except OSError as e:
        raise StageError(
            f"data validation: cannot create a spill directory in {base} ({e.strerror}); "
            "set data.spill_dir to a writable directory"
        ) from None


# What the spill holds at its largest, per input byte and per record: a copy of the records (their canonical JSON,
# about the input's size) and the fixed-size rows (512-byte signature, band keys, exact key, columns). Measured: the
# planted set of tests/test_data_outofcore.py left 1,263,008 bytes in the spill where input + 700 B/record gave
# 1,240,920 (about 720 B/record beyond the input); the 10 M run of benchmarks/data_scale.py spilled 13 GB for 5.9 GB
# of input (about 710 B/record). 800 leaves a margin; tests/test_data_outofcore.py checks the estimate covers it.
SPILL_COPY_FACTOR = 1.0
SPILL_BYTES_PER_RECORD = 800
_SAMPLE_BYTES = 1 << 20  # bytes of each text file read to estimate its records (lines)


def _input_files(path: Any) -> list[Path] | None:
    """The local files of a data pass's input (a file, a directory, or a list of sources), or ``None`` when any
    part is not a local path (an object-store URL, a hub name): its size is then unknown here."""
    items = path if isinstance(path, (list, tuple)) else [path]
    files: list[Path] = []
    for item in items:
        raw = str(getattr(item, "path", item))
        p = Path(raw).expanduser()
        if "://" in raw or not p.exists():
            return None
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


def _estimated_records(file: Path, size: int) -> int:
    """Records in ``file``: Parquet from its metadata, any other file by its lines (counted in the first MiB and
    scaled to its size; a pretty-printed JSON array overcounts, so the estimate errs on the safe side)."""
    if file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(file).metadata.num_rows)
        except Exception:  # noqa: BLE001  (not readable as Parquet: counted as text below)
            pass
    with open(file, "rb") as f:
        sample = f.read(_SAMPLE_BYTES)
    if not sample:
        return 0
    return max(1, round(sample.count(b"\n") * size / len(sample)))


def spill_estimate(path: Any) -> tuple[int, int, int] | None:
    """(bytes the spill needs at its largest, input bytes, estimated records) for the input ``path``, or ``None``
    when the input is not all local files."""
    files = _input_files(path)
    if files is None:
        return None
    sizes = [f.stat().st_size for f in files]
    records = sum(_estimated_records(f, n) for f, n in zip(files, sizes, strict=True))
    need = round(SPILL_COPY_FACTOR * sum(sizes) + SPILL_BYTES_PER_RECORD * records)
    return need, sum(sizes), records


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def check_spill_space(path: Any, base: Path) -> None:
    """Stop before any work, with a :class:`StageError`, when the spill of ``path`` (:func:`spill_estimate`) will not
    fit in the free space of ``base``'s filesystem. Inputs that are not local files are not checked here."""
    estimate = spill_estimate(path)
    if estimate is None:
        return
    need, input_bytes, records = estimate
    free = shutil.disk_usage(base).free
    if need <= free:
        return
    gb = 1e9
    raise StageError(
        f"data validation stopped before it started: the out-of-core pass needs about {need / gb:.2f} GB of spill "
        f"space in {base} (data.spill_dir): a copy of the records ({input_bytes / gb:.2f} GB of input) plus about "
        f"{SPILL_BYTES_PER_RECORD} bytes for each of ~{records:,} records; the filesystem there "
        f"({_mount_point(base)}) has {free / gb:.2f} GB free. Free space there or set data.spill_dir to a directory "
        "on a disk with more room, then run again."
    )


def validate_out_of_core(
    path: Any,
    items: Iterator[Any],
    position: str,
    fmt: str,
    s: Screened,
    out_dir: Path,
    *,
    name: str,
    checks: Checks,
    tokenizer: Any,
    eval_texts: list[str] | None,
    ooc: OutOfCore,
) -> dict:
    """``validate_dataset`` out of core, on the opened ``items`` (see the module docstring); same return value."""
    from tuneloop.data.passparts import finish_report, near_dup_module, not_checked
    from tuneloop.fsutil import atomic_lines

    dedup = near_dup_module()
    near = checks.near_dup_threshold is not None and dedup is not None
    unchecked = not_checked(checks, tokenizer, dedup, eval_texts)
    clean_path, quarantine_path = out_dir / f"{name}.clean.jsonl", out_dir / f"{name}.quarantine.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    spill = Spill(_spill_root(out_dir, name, ooc, path), ooc.flush_bytes)
    try:
        st = _stream(items, fmt, s, checks, tokenizer, eval_texts, near, spill, ooc)
        spill.close()
        flags = spill.read("flags.u1", np.uint8)
        ntok = spill.read("ntok.i8", np.int64) if st.overlong_possible else None
        dropped_overlong = (ntok != 0) if ntok is not None and checks.overlong == "drop" else None
        dup_of = _exact(spill, st.n_ok, dropped_overlong, ooc.partitions)
        candidate = dup_of < 0
        if dropped_overlong is not None:
            candidate &= ~dropped_overlong
        cand_of = np.where(candidate, np.cumsum(candidate) - 1, -1)
        labels = spill.read("label.i2", np.int16) if fmt == "kto" and near else None
        groups = (
            _near(spill, st.n_ok, candidate, flags, labels, checks, ooc.partitions)
            if near and np.count_nonzero(candidate) > 1
            else []
        )
        line_col, file_col = spill.read("line.i8", np.int64), spill.read("file.i4", np.int32)
        contaminated = (
            {int(cand_of[i]): f for i, f in st.contaminated.items() if candidate[i]} if eval_texts is not None else {}
        )
        sim = _similar(groups, contaminated, candidate, cand_of, line_col, file_col, st.files, s, checks)
        with atomic_lines(clean_path) as clean, atomic_lines(quarantine_path, "backslashreplace") as quarantine:
            valid, pii_kept, digest = _replay(spill, s, st, sim, cand_of, dup_of, ntok, checks, clean, quarantine)
        _tally(sim, candidate, line_col, file_col, st.files, s, checks)
        del line_col, file_col
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise _disk_error(e, Path(e.filename or out_dir), spill.root) from None
        raise
    finally:
        _close_quietly(spill)
        shutil.rmtree(spill.root, ignore_errors=True)
    return finish_report(
        path,
        s,
        sim,
        valid,
        pii_kept,
        checks,
        unchecked,
        fmt=fmt,
        position=position,
        digest=digest,
        out_dir=out_dir,
        name=name,
    )


def _close_quietly(spill: Spill) -> None:
    for f in spill._open.values():
        try:
            f.close()
        except OSError:
            pass
    spill._open.clear()
