"""Near-duplicate detection (MinHash LSH) and train-vs-eval contamination (hashed word n-grams).

Two public entry points, both pure functions of lists of strings:

- ``near_duplicate_groups(texts, threshold=0.8, shingle_size=5, num_perm=128, seed=0)``: groups of indices
  whose estimated Jaccard similarity of **word** shingles is at least ``threshold``;
- ``contaminated_indices(train_texts, eval_texts, ngram=8, threshold=0.5)``: train index -> fraction of its
  word n-grams that occur in some eval record.

Both look at text through ``normalise_text``: lowercase, every run of characters that are not letters or
digits (punctuation, ``_``, whitespace, control characters) becomes one space. Words are the pieces between
spaces. A record with fewer words than the shingle (n-gram) size has one shingle: all its words. A record
with no words has no shingles and is never grouped or reported.

How it scales (the work is vectorised across documents, never a Python loop per word or per hash):

1. a chunk of documents is joined into one byte string; ASCII text is classified, lowercased and split into
   words with a byte lookup table in numpy (runs of non-ASCII characters are first lowercased and their
   non-alphanumerics made spaces in Python, so the words are exactly ``normalise_text``'s);
2. every word is hashed with a polynomial hash computed from a prefix sum over the bytes (64-bit,
   wrapping), then mixed; a shingle hash is a mixed linear combination of its ``k`` word hashes;
3. MinHash: ``num_perm`` hash functions ``h_i(x) = a_i * x mod 2**32`` (``a_i`` odd, ``x`` an odd 32-bit
   shingle hash, so each function is a permutation) are applied to all shingles of a chunk at once, and
   ``np.minimum.reduceat`` over document offsets gives the signatures (``uint32``, docs x num_perm);
4. LSH: ``b`` bands of ``r`` rows, chosen like datasketch's ``_optimal_param`` (minimise the equally
   weighted false-positive and false-negative areas), so datasketch with the same threshold and
   ``num_perm`` uses the same bands. Each band slice is hashed to a 64-bit key (with the signatures);
   collisions are found by sorting the keys; band by band, candidate pairs not yet in one group are
   confirmed when their signatures agree on at least ``threshold * num_perm`` positions (the estimated
   Jaccard) and joined (union-find on a flat label array). A bucket of m texts yields at most ~9m pairs
   (each text with the next 8 in the bucket and with its first), so many copies of one text stay linear.

Signatures and band keys of large inputs are computed by two worker processes (``fork``) writing into one
shared buffer (``workers=1`` or fewer than 20,000 texts: in process). Contamination scans the train texts
the same way, looking each n-gram hash up in the sorted eval hashes behind a flag table.

Memory: ``num_perm * 4 + bands * 8`` bytes per text (about 590 bytes at the defaults), plus per-chunk
arrays; the texts themselves are the caller's.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = [
    "near_duplicate_groups",
    "contaminated_indices",
    "normalise_text",
    "lsh_params",
    # building blocks an engine composes (the streaming pass in outofcore.py, the Ray engine): see
    # /work/notes/data_api.md and near_duplicate_groups / contaminated_indices, which compose them
    "minhash_signatures",
    "empty_rows",
    "band_pairs",
    "unique_pairs",
    "agreement_needed",
    "confirm_pairs",
    "join_pairs",
    "groups_from_labels",
    "ngram_hashes",
    "EvalNgrams",
    "eval_ngram_index",
    "contamination_fractions",
]

_CHUNK_DOCS = 1024  # documents hashed together (keeps the per-chunk arrays in cache)
_PERM_BLOCK = 16  # hash functions applied per pass over a chunk's shingles
_MAX_PAIR_OFFSET = 8  # in a bucket, each document is paired with the next 8 (and the bucket's first)
_PARALLEL_MIN_DOCS = 20_000  # below this, worker processes cost more than they save
_MASK64 = (1 << 64) - 1

_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_ASCII_NON_WORD = re.compile(r"[\x00-\x2f\x3a-\x60\x7b-\x7f]+")  # ASCII except letters and digits
_SEP = 0  # byte joining documents in a chunk
_RUN_CACHE: dict[str, str] = {}


def _fix_run(match: re.Match) -> str:
    """A run of non-ASCII characters, lowercased, with every non-alphanumeric character made a space."""
    run = match.group()
    out = _RUN_CACHE.get(run)
    if out is None:
        out = "".join(ch if ch.isalnum() else " " for ch in run.lower())
        if len(_RUN_CACHE) > 100_000:
            _RUN_CACHE.clear()
        _RUN_CACHE[run] = out
    return out


def normalise_text(text: str) -> str:
    """The text the detectors see: lowercase, runs of non-alphanumeric characters -> one space, stripped.

    Letters and digits are what ``str.isalnum`` says (any script); everything else (punctuation, ``_``,
    whitespace, symbols, control characters) separates words. Non-ASCII characters are lowercased run by
    run (so a Greek capital sigma always becomes ``σ``, never the final form).
    """
    if not text.isascii():
        text = _NON_ASCII_RUN.sub(_fix_run, text)
    return " ".join(_ASCII_NON_WORD.sub(" ", text.lower()).split())


# --- hashing --------------------------------------------------------------------------------------


def _splitmix(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


@cache
def _constants(count: int, salt: int) -> np.ndarray:
    """``count`` fixed odd 64-bit constants (deterministic, independent of numpy's RNG)."""
    state, out = salt & _MASK64, []
    for _ in range(count):
        state, z = _splitmix(state)
        out.append(z | 1)
    return np.array(out, dtype=np.uint64)


_BASE = int(_constants(1, 1)[0])  # odd, so invertible mod 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def _lut() -> np.ndarray:
    """Byte -> lowercase byte for ASCII letters and digits, 0 for everything else (separators)."""
    lut = np.zeros(256, dtype=np.uint8)
    for c in b"abcdefghijklmnopqrstuvwxyz0123456789":
        lut[c] = c
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        lut[c] = c + 32
    lut[128:] = np.arange(128, 256)  # bytes of non-ASCII characters (already normalised) are word bytes
    return lut


_LUT = _lut()


class _Powers:
    """BASE**i and BASE**-i mod 2**64 for i < len, grown on demand (per process)."""

    def __init__(self) -> None:
        self.pow = np.ones(0, dtype=np.uint64)
        self.inv = np.ones(0, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pow) < n:
            size = max(n, 2 * len(self.pow), 1 << 16)
            with np.errstate(over="ignore"):
                p = np.full(size, _BASE, dtype=np.uint64)
                p[0] = 1
                self.pow = np.cumprod(p, dtype=np.uint64)
                q = np.full(size, _BASE_INV, dtype=np.uint64)
                q[0] = 1
                self.inv = np.cumprod(q, dtype=np.uint64)
        return self.pow[:n], self.inv[:n]


_POWERS = _Powers()


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


_BYTE_RUN_CACHE: dict[bytes, bytes] = {}


def _fix_byte_run(run: bytes) -> bytes:
    """``_fix_run`` on UTF-8 bytes, with each removed character replaced by as many spaces as it had bytes
    (so that the length usually stays the same and the run can be patched in place)."""
    out = _BYTE_RUN_CACHE.get(run)
    if out is None:
        text = run.decode("utf-8", "surrogatepass").lower()
        fixed = "".join(ch if ch.isalnum() else " " * len(ch.encode("utf-8", "surrogatepass")) for ch in text)
        out = fixed.encode("utf-8", "surrogatepass")
        if len(_BYTE_RUN_CACHE) > 100_000:
            _BYTE_RUN_CACHE.clear()
        _BYTE_RUN_CACHE[run] = out
    return out


def _normalised_bytes(texts: list[str]) -> bytes:
    """``texts`` joined by NUL as UTF-8, with every run of non-ASCII characters normalised like
    ``_fix_run`` (ASCII is left to the byte lookup table)."""
    joined = "\x00".join(texts)
    if joined.count("\x00") != len(texts) - 1:  # a text contains NUL: it would split the text in two
        joined = "\x00".join(t.replace("\x00", " ") for t in texts)
    data = joined.encode("utf-8", "surrogatepass")
    if joined.isascii():
        return data
    high = np.zeros(len(data) + 2, dtype=bool)
    high[1:-1] = np.frombuffer(data, dtype=np.uint8) >= 0x80
    bounds = np.flatnonzero(high[1:] != high[:-1]).tolist()  # run starts and ends alternate
    patched = bytearray(data)
    # strict: ``high`` is False at both padded ends, so every run start has its end (a mismatch is a bug).
    for s, e in zip(bounds[0::2], bounds[1::2], strict=True):
        run = data[s:e]
        fixed = _fix_byte_run(run)
        if len(fixed) != e - s:
            break
        if fixed != run:
            patched[s:e] = fixed
    else:
        return bytes(patched)
    pieces: list[bytes] = []  # some lowercase letter has another length in UTF-8: rebuild
    prev = 0
    for s, e in zip(bounds[0::2], bounds[1::2], strict=True):
        pieces += (data[prev:s], _fix_byte_run(data[s:e]))
        prev = e
    pieces.append(data[prev:])
    return b"".join(pieces)


def _word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the words of ``texts`` in order (uint64) and the document index of each word (int64)."""
    joined = _normalised_bytes(texts)
    raw = np.frombuffer(joined, dtype=np.uint8)
    byte = np.take(_LUT, raw)
    isword = np.zeros(len(byte) + 2, dtype=bool)
    np.not_equal(byte, 0, out=isword[1:-1])
    bounds = np.flatnonzero(isword[1:] != isword[:-1])  # word starts and ends alternate
    starts, ends = bounds[0::2], bounds[1::2]
    if len(starts) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    powers, inverse = _POWERS.get(len(byte))
    with np.errstate(over="ignore"):
        prefix = np.empty(len(byte) + 1, dtype=np.uint64)
        prefix[0] = 0
        np.cumsum(np.multiply(byte, powers, dtype=np.uint64), out=prefix[1:])
        words = (prefix[ends] - prefix[starts]) * inverse[starts]
        words += np.uint64(0x632BE59BD9B4E019)
        _mix64(words)
    # document of each word: the number of separators before it
    first_word = np.searchsorted(starts, np.flatnonzero(raw == _SEP))  # first word after each separator
    marks = np.zeros(len(starts), dtype=np.int64)
    np.add.at(marks, first_word[first_word < len(starts)], 1)
    return words, np.cumsum(marks)


def _shingle_hashes(words: np.ndarray, docs: np.ndarray, n_docs: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the ``k``-word shingles of each document, grouped by document; and counts per doc.

    Shingles never cross documents; a document with 1..k-1 words has one shingle of all its words.
    """
    mult = _constants(k, 2)
    counts_words = np.bincount(docs, minlength=n_docs)
    n = len(words)
    with np.errstate(over="ignore"):
        if n >= k:
            span = n - k + 1
            h = words[:span] * mult[0]
            for t in range(1, k):
                h += words[t : t + span] * mult[t]
            keep = docs[:span] == docs[k - 1 : k - 1 + span]
            long_h, long_docs = h[keep], docs[:span][keep]
        else:
            long_h, long_docs = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        short = np.flatnonzero((counts_words > 0) & (counts_words < k))
        if len(short):
            first = np.concatenate(([0], np.cumsum(counts_words)))[short]
            size = counts_words[short]
            sh = words[first] * mult[0]
            for t in range(1, k - 1):
                has = size > t
                sh[has] += words[first[has] + t] * mult[t]
            all_docs = np.concatenate((long_docs, short))
            order = np.argsort(all_docs, kind="stable")
            hashes, hash_docs = np.concatenate((long_h, sh))[order], all_docs[order]
        else:
            hashes, hash_docs = long_h, long_docs
        hashes = _mix64(hashes + np.uint64(k))
    return hashes, np.bincount(hash_docs, minlength=n_docs)


def _doc_shingles(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    words, docs = _word_hashes(texts)
    return _shingle_hashes(words, docs, len(texts), k)


# --- MinHash signatures ---------------------------------------------------------------------------


def _perm_params(num_perm: int, seed: int) -> np.ndarray:
    """Odd 32-bit multipliers, one per hash function."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)


_EMPTY = np.uint32(0xFFFFFFFF)


def _signatures_into(out: np.ndarray, keys: np.ndarray, texts: list[str], k: int, a: np.ndarray, rows: int) -> None:
    """MinHash signatures of ``texts`` written to ``out`` (len(texts) x num_perm, uint32), and the LSH key of
    each band of ``rows`` positions to ``keys`` (bands x len(texts), uint64; computed here, where the
    chunk's signatures are still in cache).

    Hash function i is ``x -> a_i * x mod 2**32`` on odd 32-bit shingle hashes ``x`` (the low bit is set so
    that no value is a fixed point of every function, as 0 would be); with ``a_i`` odd it permutes them.
    """
    hashes, counts = _doc_shingles(texts, k)
    x = (hashes >> np.uint64(32)).astype(np.uint32) | np.uint32(1)
    nonempty = np.flatnonzero(counts)
    if len(nonempty) < len(texts):
        out[:] = _EMPTY
        keys[:] = 0
    if len(nonempty) == 0:
        return
    offsets = np.concatenate(([0], np.cumsum(counts[nonempty])[:-1]))
    num_perm = len(a)
    sig_t = np.empty((num_perm, len(nonempty)), dtype=np.uint32)
    buf = np.empty((min(_PERM_BLOCK, num_perm), len(x)), dtype=np.uint32)
    for i in range(0, num_perm, _PERM_BLOCK):
        j = min(i + _PERM_BLOCK, num_perm)
        blk = buf[: j - i]
        np.multiply(a[i:j, None], x[None, :], out=blk)
        np.minimum.reduceat(blk, offsets, axis=1, out=sig_t[i:j])
    mult = _constants(max(rows, 1), 3)
    with np.errstate(over="ignore"):
        for band in range(len(keys)):
            key = np.full(len(nonempty), band + 1, dtype=np.uint64)
            for r in range(rows):  # a random linear combination of the band's values, then mixed
                key += np.multiply(sig_t[band * rows + r], mult[r], dtype=np.uint64)
            keys[band, nonempty] = _mix64(key)
    if len(nonempty) == len(texts):
        out[:] = sig_t.T
    else:
        out[nonempty] = sig_t.T


_SHARED: dict = {}  # set by the parent right before forking workers


def _signature_worker(span: tuple[int, int]) -> None:
    start, stop = span
    s = _SHARED
    _signatures_into(s["sig"][start:stop], s["keys"][:, start:stop], s["texts"][start:stop], s["k"], s["a"], s["rows"])


def _signatures(
    texts: list[str], k: int, num_perm: int, seed: int, workers: int, bands: int = 0, rows: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Signatures (n x num_perm, uint32) and band keys (bands x n, uint64) of ``texts``."""
    a = _perm_params(num_perm, seed)
    n = len(texts)
    spans = [(i, min(i + _CHUNK_DOCS, n)) for i in range(0, n, _CHUNK_DOCS)]
    if workers > 1 and len(spans) > 1 and "fork" in multiprocessing.get_all_start_methods():
        size = n * num_perm * 4 + bands * n * 8
        buffer = mmap.mmap(-1, max(1, size))  # anonymous shared memory, visible to forked children
        sig = np.frombuffer(buffer, dtype=np.uint32, count=n * num_perm).reshape(n, num_perm)
        keys = np.frombuffer(buffer, dtype=np.uint64, count=bands * n, offset=n * num_perm * 4).reshape(bands, n)
        _SHARED.update(sig=sig, keys=keys, texts=texts, k=k, a=a, rows=rows)
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for _ in pool.imap_unordered(_signature_worker, spans, chunksize=4):
                    pass
        finally:
            _SHARED.clear()
        return sig, keys
    sig = np.empty((n, num_perm), dtype=np.uint32)
    keys = np.empty((bands, n), dtype=np.uint64)
    for start, stop in spans:
        _signatures_into(sig[start:stop], keys[:, start:stop], texts[start:stop], k, a, rows)
    return sig, keys


def minhash_signatures(
    texts: list[str],
    *,
    shingle_size: int,
    num_perm: int = 128,
    seed: int = 0,
    bands: int = 0,
    rows: int = 0,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (``len(texts) x num_perm``, uint32) and LSH band keys (``bands x len(texts)``,
    uint64; ``(bands, rows)`` from :func:`lsh_params`) of ``texts``.

    Each text's row depends only on that text, ``shingle_size``, ``num_perm`` and ``seed`` (never on the other
    texts of the call), so signatures computed chunk by chunk, in any process, equal those of one call over
    all texts. A text without words has the all-``0xFFFFFFFF`` row and band keys 0 (see :func:`empty_rows`).
    """
    return _signatures(texts, shingle_size, num_perm, seed, workers, bands, rows)


def empty_rows(sig: np.ndarray) -> np.ndarray:
    """Bool per signature row: the text had no words (all positions the sentinel); such texts never group."""
    maybe = sig[:, 0] == _EMPTY
    out = np.zeros(len(sig), dtype=bool)
    idx = np.flatnonzero(maybe)
    out[idx] = np.all(sig[idx] == _EMPTY, axis=1)
    return out


# --- LSH ------------------------------------------------------------------------------------------


@cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false-positive + false-negative area, as datasketch's ``_optimal_param``.

    For every (b, r) with b * r <= num_perm (b outer, r inner, first minimum wins), the areas under
    ``1 - (1 - s**r)**b`` on [0, threshold] and above it on [threshold, 1], equally weighted. The integrals
    are computed with 200-node Gauss-Legendre quadrature, which is exact for these polynomials up to
    degree 399 (datasketch uses scipy's adaptive quadrature; the choices agree).
    """
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=float)
    bands, rows = pairs[:, :1], pairs[:, 1:]
    x, w = np.polynomial.legendre.leggauss(200)

    def area(lo: float, hi: float, false_negative: bool) -> np.ndarray:
        s = (hi + lo) / 2 + (hi - lo) / 2 * x[None, :]
        miss = (1 - s**rows) ** bands  # probability that no band collides
        return (hi - lo) / 2 * ((miss if false_negative else 1 - miss) @ w)

    error = 0.5 * area(0.0, threshold, False) + 0.5 * area(threshold, 1.0, True)
    b, r = pairs[int(np.argmin(error))]
    return int(b), int(r)


def band_pairs(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Candidate pairs (2 x m, int64) among documents ``ids`` whose band ``keys`` are equal.

    ``ids`` must be ascending (the order of the documents): within a bucket, documents are taken in that
    order (a stable sort of the keys), so the pairs depend only on the bucket's members, not on which other
    buckets are passed in the same call (a partition of the keys by value gives the same pairs).

    In a bucket each document is paired with the next ``_MAX_PAIR_OFFSET`` documents and with the
    bucket's first document: every pair in buckets of up to 9, and linear work for huge buckets (many
    copies of one text) while still connecting the whole bucket.
    """
    order = np.argsort(keys, kind="stable")
    sk, sid = keys[order], ids[order]
    n = len(sk)
    if n < 2:
        return np.zeros((2, 0), np.int64)
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(sk[1:], sk[:-1], out=new_run[1:])
    if new_run.all():
        return np.zeros((2, 0), np.int64)
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    parts = []
    for d in range(1, min(_MAX_PAIR_OFFSET, n - 1) + 1):
        same = run_id[:-d] == run_id[d:]
        if not same.any():
            break
        idx = np.flatnonzero(same)
        parts.append(np.stack((sid[idx], sid[idx + d])))
    head = run_start[run_id]
    far = np.flatnonzero(np.arange(n) - head > _MAX_PAIR_OFFSET)
    if len(far):
        parts.append(np.stack((sid[head[far]], sid[far])))
    return np.concatenate(parts, axis=1)


_band_pairs = band_pairs


def unique_pairs(u: np.ndarray, v: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct unordered pairs of (u, v) as (low, high) arrays, sorted by (low, high); ids < ``n``."""
    code = np.unique(np.minimum(u, v) * n + np.maximum(u, v))
    return code // n, code % n


def agreement_needed(threshold: float, num_perm: int) -> int:
    """Signature positions two texts must agree on to be near duplicates (estimated Jaccard >= threshold)."""
    return math.ceil(threshold * num_perm - 1e-9)


def confirm_pairs(sig_lo: np.ndarray, sig_hi: np.ndarray, need: int) -> np.ndarray:
    """Bool per pair (rows of ``sig_lo`` and ``sig_hi`` side by side): agree on at least ``need`` positions."""
    return np.count_nonzero(sig_lo == sig_hi, axis=1) >= need


def join_pairs(label: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Union-find step on a flat label array (each id's component, named by its smallest id): the labels
    after linking every (lo[i], hi[i]). Components do not depend on the order in which links are joined."""
    if len(lo) == 0:
        return label
    nodes, roots = component_roots(label[lo], label[hi])
    remap = np.arange(len(label))
    remap[nodes] = roots
    return remap[label]


def groups_from_labels(label: np.ndarray) -> list[list[int]]:
    """Components of at least two ids, each sorted, ordered by their smallest id (near_duplicate_groups' shape)."""
    n = len(label)
    size = np.bincount(label, minlength=n)
    members = np.flatnonzero(size[label] >= 2)
    if len(members) == 0:
        return []
    order = members[np.argsort(label[members], kind="stable")]  # ascending within each group
    cuts = [0, *(np.flatnonzero(np.diff(label[order])) + 1).tolist(), len(order)]
    flat = order.tolist()
    return [flat[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]  # consecutive pairs: one fewer


def component_roots(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes of the graph with edges (u, v) and, for each, the smallest node of its component."""
    nodes, inv = np.unique(np.concatenate((u, v)), return_inverse=True)
    eu, ev = inv[: len(u)], inv[len(u) :]
    label = np.arange(len(nodes))
    while True:
        lu, lv = label[eu], label[ev]
        differ = lu != lv
        if not differ.any():
            break
        np.minimum.at(label, np.maximum(lu, lv)[differ], np.minimum(lu, lv)[differ])  # hook roots
        while True:  # pointer jumping until every node points at its root
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
    return nodes, nodes[label]


def _default_workers(n: int) -> int:
    if n < _PARALLEL_MIN_DOCS or multiprocessing.current_process().daemon:  # pool workers cannot fork
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def near_duplicate_groups(
    texts: list[str],
    *,
    threshold: float = 0.8,
    shingle_size: int = 5,
    num_perm: int = 128,
    seed: int = 0,
    workers: int | None = None,
) -> list[list[int]]:
    """Groups of indices of ``texts`` that are near duplicates (MinHash LSH over word shingles).

    Two texts are linked when their MinHash signatures (``num_perm`` hashes over word ``shingle_size``-grams
    of ``normalise_text``) share an LSH band and agree on at least ``threshold`` of the positions (the
    estimated Jaccard similarity); groups are the connected components of those links. Each group is
    sorted, has at least two members, and its first (lowest) index is the record to keep; groups are
    ordered by that index. Exact copies always land in one group; texts without words are never grouped.
    The result depends only on the inputs and ``seed``. ``workers`` processes compute the signatures
    (default: 2 when there are at least 20,000 texts and two CPUs, else 1).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if shingle_size < 1:
        raise ValueError(f"shingle_size must be >= 1, got {shingle_size}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be >= 2, got {num_perm}")
    n = len(texts)
    if n < 2:
        return []
    bands, rows = lsh_params(threshold, num_perm)
    workers = _default_workers(n) if workers is None else workers
    sig, keys = _signatures(texts, shingle_size, num_perm, seed, workers, bands, rows)
    # Texts without words have all-sentinel signatures; a real hash can equal the sentinel, so rows
    # starting with it are checked in full.
    empty = np.flatnonzero(empty_rows(sig))
    ids = np.setdiff1d(np.arange(n), empty, assume_unique=True) if len(empty) else np.arange(n)
    if len(ids) < 2:
        return []
    full = len(ids) == n
    need = agreement_needed(threshold, num_perm)
    step = max(1, (64 << 20) // (num_perm * 8))  # confirm in blocks of ~64 MB
    label = np.arange(n)  # every text's component, named by its smallest index (union-find, flattened)
    with np.errstate(over="ignore"):
        for band in range(bands):
            u, v = band_pairs(keys[band] if full else keys[band, ids], ids)
            open_ = label[u] != label[v]  # pairs already joined (by an earlier band) need no check
            if not open_.any():
                continue
            lo, hi = unique_pairs(u[open_], v[open_], n)
            keep = np.zeros(len(lo), dtype=bool)
            for i in range(0, len(lo), step):  # confirm: estimated Jaccard >= threshold
                keep[i : i + step] = confirm_pairs(sig[lo[i : i + step]], sig[hi[i : i + step]], need)
            if keep.any():
                label = join_pairs(label, label[lo[keep]], label[hi[keep]])
    return groups_from_labels(label)


# --- contamination --------------------------------------------------------------------------------


def ngram_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the word ``ngram``-grams of each text (grouped by text, in order) and their count
    per text; like the signatures, each text's hashes depend on that text alone."""
    words, docs = _word_hashes(texts)
    return _shingle_hashes(words, docs, len(texts), ngram)


_ngram_hashes = ngram_hashes


def _eval_index(seen: np.ndarray) -> tuple[np.ndarray, np.uint64]:
    """A flag per value of the top bits of the hashes in ``seen`` (about 16 flags per eval n-gram, at most
    64 MB) and the shift that gives those bits."""
    bits = min(26, max(16, int(len(seen) * 16 - 1).bit_length()))
    shift = np.uint64(64 - bits)
    flags = np.zeros(1 << bits, dtype=bool)
    flags[seen >> shift] = True
    return flags, shift


@dataclass
class EvalNgrams:
    """The eval set's n-grams as the contamination scan looks them up: sorted distinct hashes and a flag
    table over their top bits (a cheap first filter)."""

    seen: np.ndarray
    flags: np.ndarray
    shift: np.uint64
    ngram: int


def eval_ngram_index(eval_texts: list[str], ngram: int) -> EvalNgrams | None:
    """The n-gram index of the eval texts; None when they hold no words (nothing can be contaminated)."""
    if not eval_texts:
        return None
    seen = np.unique(
        np.concatenate(
            [ngram_hashes(eval_texts[i : i + _CHUNK_DOCS], ngram)[0] for i in range(0, len(eval_texts), _CHUNK_DOCS)]
        )
    )
    if len(seen) == 0:
        return None
    return EvalNgrams(seen, *_eval_index(seen), ngram)


def contamination_fractions(
    texts: list[str], index: EvalNgrams, threshold: float, *, offset: int = 0
) -> list[tuple[int, float]]:
    """(offset + i, fraction of the n-grams of ``texts[i]`` seen in eval) for the texts at or above
    ``threshold``; each text's fraction depends on that text and the index alone."""
    out: list[tuple[int, float]] = []
    for start in range(0, len(texts), _CHUNK_DOCS):
        part = texts[start : start + _CHUNK_DOCS]
        out += _contaminated_chunk(
            (0, len(part)), (part, index.seen, index.flags, index.shift), index.ngram, threshold, offset + start
        )
    return out


def _contaminated_chunk(span: tuple[int, int], index=None, ngram=0, threshold=0.0, offset=0) -> list[tuple[int, float]]:
    """(train index, fraction) for the records of ``texts[start:stop]`` at or above ``threshold``."""
    if index is None:  # in a forked worker
        index, ngram, threshold = _SHARED["index"], _SHARED["ngram"], _SHARED["threshold"]
    texts, seen, flags, shift = index
    start, stop = span
    hashes, counts = ngram_hashes(texts[start:stop], ngram)
    nonempty = np.flatnonzero(counts)
    if len(nonempty) == 0:
        return []
    hit = np.zeros(len(hashes), dtype=np.int64)
    maybe = np.flatnonzero(flags[hashes >> shift])  # cheap filter: most n-grams are not in the eval set
    if len(maybe):
        pos = np.searchsorted(seen, hashes[maybe])
        pos[pos == len(seen)] = 0
        hit[maybe] = seen[pos] == hashes[maybe]
    offsets = np.concatenate(([0], np.cumsum(counts[nonempty])[:-1]))
    frac = np.add.reduceat(hit, offsets) / counts[nonempty]
    return [(offset + start + int(nonempty[i]), float(frac[i])) for i in np.flatnonzero(frac >= threshold - 1e-12)]


def contaminated_indices(
    train_texts: list[str],
    eval_texts: list[str],
    *,
    ngram: int = 8,
    threshold: float = 0.5,
    workers: int | None = None,
) -> dict[int, float]:
    """Train records that overlap the eval set: train index -> fraction of its word n-grams seen in eval.

    N-grams are ``ngram`` consecutive words of ``normalise_text`` (hashed to 64 bits); a record with fewer
    words has one n-gram of all its words. A train record is reported when at least ``threshold`` of its
    n-grams (counted with repetition) occur in any eval record. Records without words are never reported.
    ``workers`` processes scan the train texts (default as in ``near_duplicate_groups``).
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not train_texts or not eval_texts:
        return {}
    ev = eval_ngram_index(eval_texts, ngram)
    if ev is None:
        return {}
    n = len(train_texts)
    spans = [(i, min(i + _CHUNK_DOCS, n)) for i in range(0, n, _CHUNK_DOCS)]
    workers = _default_workers(n) if workers is None else workers
    found: dict[int, float] = {}
    index = (train_texts, ev.seen, ev.flags, ev.shift)
    if workers > 1 and len(spans) > 1 and "fork" in multiprocessing.get_all_start_methods():
        _SHARED.update(index=index, ngram=ngram, threshold=threshold)
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for part in pool.imap(_contaminated_chunk, spans, chunksize=4):
                    found.update(part)
        finally:
            _SHARED.clear()
    else:
        for span in spans:
            found.update(_contaminated_chunk(span, index, ngram, threshold))
    return found
