"""The data pass at scale: N synthetic chat records with planted duplicates, near duplicates and PII.

    python benchmarks/data_scale.py --records N [--seed S] [--baseline-records M] [--workdir DIR]
                                    [--in-memory auto|yes|no] [--delete-data]

1. Builds N records in the `messages` format (user + assistant, 300-600 characters) from sentences of
   ../shared/datasets/*, recombined at random with unique random words mixed in, so that the base records
   are mutually dissimilar (no shared 5-word shingle in practice), streamed to DIR/train.jsonl (10 M records
   are about 5.9 GB; memory stays bounded: copies come from a reservoir of 200,000 earlier base records).
   Planted: ~2% exact copies of a base record, ~3% near copies (changes of case, punctuation and
   whitespace, which normalisation removes, plus one word added, dropped or replaced; the true shingle
   Jaccard of up to 5,000 pairs is computed and reported), ~1% records with PII (emails, phone numbers,
   Luhn-valid card numbers, AWS-style access keys), and an eval file of 2,000 records of which 0.1% of N
   (at most 2,000, each once) are pasted into train (contamination).
2. Runs the full data pass in a fresh process: `validate_dataset` on the eval file, then on the train file
   with near-dup detection and contamination against the eval texts (formats, rules, exact dedup, PII,
   quarantine, report) with the out-of-core pass (the default engine); and, up to 2 M records (or with
   --in-memory yes), the old in-memory pass (`OutOfCore(enabled=False)`) on the same data, side by side,
   with whether clean file, quarantine, report and groups are identical. Peak RSS = the largest sum of
   VmRSS over the pass's process and all its descendants, polled from /proc every 0.2 s (pages shared
   by the forked workers count in each: an upper bound); maxrss of the process + its largest worker too.
3. Near-dup recall = planted near pairs that land in one group / planted; precision = pairs inside the
   reported groups (exact copies excluded) that are planted / all such pairs; contamination = planted
   pasted records found.
4. Baseline: datasketch `MinHash.bulk` (hashfunc xxh32, faster than its default sha1) + `MinHashLSH.insert`
   + `query` (same threshold, num_perm and word 5-shingles of the same normalised text) on the first M records, and tuneloop's `near_duplicate_groups`
   on the same M texts in the same run. throughput_ratio_vs_datasketch = baseline_seconds / tuneloop_seconds.

Prints human-readable lines; the LAST line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
THRESHOLD, NUM_PERM, SHINGLE = 0.8, 128, 5
EVAL_RECORDS = 2000


# --- synthetic data -------------------------------------------------------------------------------


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def load_sentences() -> list[str]:
    """Sentences of 4-40 words from every shared dataset (text fields only), deduplicated."""
    out: dict[str, None] = {}
    for path in sorted(DATASETS.glob("*.json*")):
        text = path.read_text(encoding="utf-8")
        records = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else json.loads(text)
        )
        for s in _strings(records):
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(s.split())):
                if 4 <= len(sent.split()) <= 40 and "{{" not in sent:
                    out[sent] = None
    if not out:
        sys.exit(f"no sentences found under {DATASETS}")
    return list(out)


class Words:
    """Unique pseudo-random words: a bijective mix of a counter, written in base 26."""

    _PAIRS = [a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"]

    def __init__(self, seed: int):
        self.i = seed * 1_000_003 + 1

    def __call__(self) -> str:
        self.i += 1
        x = (self.i * 0x9E3779B97F4A7C15) & ((1 << 37) - 1)  # < 676**4: four letter pairs
        p = self._PAIRS
        return p[x % 676] + p[x // 676 % 676] + p[x // 456976 % 676] + p[x // 308915776]


def luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # positions from the right, check digit not yet appended
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i : i + 4] for i in range(0, 16, 4))


def pii_item(rng: random.Random, kind: str) -> str:
    if kind == "email":
        return f"{rng.choice(['anna', 'li', 'omar', 'sofia', 'jan'])}.{rng.randrange(10**6)}@example.com"
    if kind == "phone":
        return f"+1 {rng.randrange(200, 999)}-555-{rng.randrange(10000):04d}"
    if kind == "credit_card":
        return luhn_card(rng)
    return "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))


def message_text(messages: list[dict]) -> str:
    """The text near-dup detection and contamination look at: all contents, one per line."""
    return "\n".join(m["content"] for m in messages)


def _fill(rng: random.Random, sentences: list[list[str]], word, lo: int, hi: int) -> str:
    """Random sentences with a unique word after every 6-9 words, cut to lo..hi characters."""
    target = rng.randint(lo, hi)
    parts: list[str] = []
    size = 0
    while size < target:
        s = rng.choice(sentences)
        i = 0
        while i < len(s):
            step = 6 + int(rng.random() * 4)
            parts += s[i : i + step]
            parts.append(word())
            i += step
        size = sum(map(len, parts)) + len(parts)
    text = " ".join(parts)
    return text[: text.rfind(" ", 0, hi)] if len(text) > hi else text


def base_record(rng: random.Random, sentences: list[list[str]], word) -> list[dict]:
    return [
        {"role": "user", "content": _fill(rng, sentences, word, 80, 180)},
        {"role": "assistant", "content": _fill(rng, sentences, word, 220, 400)},
    ]


def near_copy(rng: random.Random, messages: list[dict], word) -> list[dict]:
    """Invisible edits (case, punctuation, whitespace) plus one word added, dropped or replaced."""
    out = []
    for m in messages:
        words = m["content"].split(" ")
        i = rng.randrange(len(words))
        words[i] = words[i].upper()
        j = rng.randrange(len(words))
        words[j] = words[j] + rng.choice([",", "!", " -", ";"])
        out.append({"role": m["role"], "content": "  ".join(words[:3]) + " " + " ".join(words[3:])})
    target = out[-1]
    words = target["content"].split(" ")
    edit = rng.choice(["append", "drop", "replace_last", "prepend"])
    if edit == "append":
        words.append(word())
    elif edit == "drop":
        words.pop()
    elif edit == "replace_last":
        words[-1] = word()
    else:
        words.insert(0, word())
    target["content"] = " ".join(words)
    return out


def shingles(text: str) -> set[str]:
    from tuneloop.data.dedup import normalise_text

    w = normalise_text(text).split()
    if len(w) < SHINGLE:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i : i + SHINGLE]) for i in range(len(w) - SHINGLE + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


POOL = 200_000  # base records a copy can come from: a uniform reservoir sample of those written so far


def build(n: int, seed: int, workdir: Path) -> dict:
    """Write train.jsonl (n records, streamed to disk) and eval.jsonl; return what was planted (by 1-based
    line). Memory is bounded: copies are made from a reservoir of up to ``POOL`` earlier base records."""
    rng = random.Random(seed)
    sentences = [s.split() for s in load_sentences()]
    word = Words(seed)
    eval_records = [base_record(rng, sentences, word) for _ in range(EVAL_RECORDS)]
    n_exact, n_near, n_pii = round(n * 0.02), round(n * 0.03), round(n * 0.01)
    n_cont = min(EVAL_RECORDS, max(1, round(n * 0.001)))
    pasted = iter(rng.sample(range(EVAL_RECORDS), n_cont))  # distinct eval records
    n_base = n - n_exact - n_near - n_cont
    kinds = [0] * n_base + [1] * n_exact + [2] * n_near + [3] * n_cont  # base, exact, near, contaminated
    rng.shuffle(kinds)
    pool: list[tuple[int, list[dict]]] = []  # (line, messages) of base records: a copy picks an earlier one
    n_bases = 0
    exact_pairs, near_pairs, cont_lines, near_jaccard = [], [], [], []
    pii_planted = {"email": 0, "phone": 0, "credit_card": 0, "aws_access_key": 0}
    chars, counted = 0, 0
    with open(workdir / "train.jsonl", "w", encoding="utf-8") as f:
        for line, kind in enumerate(kinds, 1):
            if kind == 0 or not pool:
                msgs = base_record(rng, sentences, word)
                if rng.random() < n_pii / max(1, n_base):
                    pii = rng.choice(list(pii_planted))
                    pii_planted[pii] += 1
                    msgs[rng.randrange(2)]["content"] += f" Contact: {pii_item(rng, pii)}."
                n_bases += 1
                if len(pool) < POOL:
                    pool.append((line, msgs))
                elif (j := rng.randrange(n_bases)) < POOL:
                    pool[j] = (line, msgs)
            elif kind == 1:
                orig, msgs = rng.choice(pool)
                exact_pairs.append((orig, line))
            elif kind == 2:
                orig, src = rng.choice(pool)
                msgs = near_copy(rng, src, word)
                near_pairs.append((orig, line))
                if len(near_jaccard) < 5000:
                    near_jaccard.append(jaccard(message_text(src), message_text(msgs)))
            else:
                msgs = [dict(m) for m in eval_records[next(pasted)]]
                cont_lines.append(line)
            if counted < 5000:
                chars += len(message_text(msgs))
                counted += 1
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    with open(workdir / "eval.jsonl", "w", encoding="utf-8") as f:
        for msgs in eval_records:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    # dissimilarity of base records: Jaccard of 2,000 random pairs (from the reservoir)
    pairs = [rng.sample(range(len(pool)), 2) for _ in range(min(2000, len(pool)))] if len(pool) > 1 else []
    base_j = [jaccard(message_text(pool[a][1]), message_text(pool[b][1])) for a, b in pairs]
    return {
        "records": n,
        "exact_pairs": exact_pairs,
        "near_pairs": near_pairs,
        "contaminated_lines": cont_lines,
        "pii_planted": pii_planted,
        "near_jaccard_min": min(near_jaccard, default=None),
        "near_jaccard_mean": sum(near_jaccard) / len(near_jaccard) if near_jaccard else None,
        "base_jaccard_max": max(base_j, default=None),
        "mean_chars": chars / max(1, counted),
    }


# --- the data pass (runs in its own process) ------------------------------------------------------


_NEAR = re.compile(r"near_duplicate: similar to line (\d+)")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _timed(f, name: str, spent: dict[str, float]):
    """``f``, adding the seconds each call takes to ``spent[name]``."""

    def timed(*args, **kw):
        t = time.perf_counter()
        try:
            return f(*args, **kw)
        finally:
            spent[name] += time.perf_counter() - t

    return timed


def run_pass(workdir: Path, mode: str) -> dict:
    """The full data pass, timed, in this (fresh) process: validate_dataset on the eval file, then on the
    train file with near-dup and contamination against the eval texts. ``mode``: ``ooc`` (the out-of-core
    pass, the default engine) or ``memory`` (the in-memory pass, ``OutOfCore(enabled=False)``)."""
    from tuneloop.data import dedup, validate
    from tuneloop.data.outofcore import OutOfCore

    spent = {"near_duplicate_groups": 0.0, "contaminated_indices": 0.0}
    for fname in spent:  # time the in-memory pass's detectors (it looks them up on the module)
        setattr(dedup, fname, _timed(getattr(dedup, fname), fname, spent))
    ooc = OutOfCore(enabled=mode == "ooc")
    out = workdir / f"out-{mode}"
    t0 = time.perf_counter()
    checks = validate.Checks(
        near_dup_threshold=THRESHOLD,
        near_dup_shingle=SHINGLE,
        near_dup_action="drop",
        contamination_action="drop",
        pii="report",
    )
    ev = validate.validate_dataset(workdir / "eval.jsonl", out, name="eval", checks=checks, ooc=ooc)
    eval_texts = validate.clean_texts(Path(ev["clean_path"]))
    report = validate.validate_dataset(workdir / "train.jsonl", out, checks=checks, eval_texts=eval_texts, ooc=ooc)
    seconds = time.perf_counter() - t0
    # groups and contaminated lines from the quarantine reasons
    heads: dict[int, list[int]] = {}
    cont_lines = []
    with open(report["quarantine_path"], encoding="utf-8") as f:
        for row in f:
            if "near_duplicate" not in row and "contaminated" not in row:
                continue
            q = json.loads(row)
            for reason in q["reasons"]:
                m = _NEAR.match(reason)
                if m:
                    heads.setdefault(int(m.group(1)), []).append(q["line"])
                elif reason.startswith("contaminated"):
                    cont_lines.append(q["line"])
    groups = [sorted([h, *members]) for h, members in sorted(heads.items())]
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "mode": mode,
        "seconds": round(seconds, 2),
        "near_dup_seconds": round(spent["near_duplicate_groups"], 2) if mode == "memory" else None,
        "contamination_seconds": round(spent["contaminated_indices"], 2) if mode == "memory" else None,
        "groups": groups,
        "contaminated_lines": sorted(cont_lines),
        "report": {
            k: report.get(k)
            for k in (
                "format",
                "records",
                "valid",
                "invalid",
                "duplicates",
                "near_duplicates",
                "contaminated",
                "near_duplicate_groups",
                "pii",
                "pii_records",
                "digest",
            )
        },
        "clean_sha256": _sha256(Path(report["clean_path"])),
        "quarantine_sha256": _sha256(Path(report["quarantine_path"])),
        # maxrss of this process plus that of its largest child (worker processes)
        "maxrss_mb": round((self_kb + child_kb) / 1024, 1),
        "maxrss_self_mb": round(self_kb / 1024, 1),
    }


def _tree_rss_kb(pid: int) -> int:
    """Resident set size of a process and all its descendants (kB, from /proc; pages shared between a
    forked parent and its workers count in each, so the sum is an upper bound)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for row in f:
                    if row.startswith("VmRSS:"):
                        total += int(row.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_pass_child(workdir: Path, mode: str) -> dict:
    """run_pass in a fresh process, its process tree's RSS polled every 0.2 s."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--records", "0", "--_pass", str(workdir), "--_mode", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = 0
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            peak = max(peak, _tree_rss_kb(proc.pid))
    if proc.returncode != 0:
        sys.exit(f"data pass ({mode}) failed:\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_tree_mb"] = round(peak / 1024, 1)
    return res


def score(res: dict, planted: dict) -> dict:
    """Near-dup recall / precision and contamination found, by line, against what was planted."""
    member = {line: k for k, g in enumerate(res["groups"]) for line in g}
    exact_copy = {b for _, b in planted["exact_pairs"]}  # exact copies are removed before near-dup
    planted_near = {(a, b) for a, b in planted["near_pairs"]}
    # a near copy of a record that also has an exact copy may be grouped with the kept original only
    recall_hits = sum(1 for a, b in planted_near if a in member and member.get(b) == member[a])
    found_pairs = set()
    for g in res["groups"]:
        g = [x for x in g if x not in exact_copy]
        found_pairs.update((g[i], g[j]) for i in range(len(g)) for j in range(i + 1, len(g)))
    # two near copies of the same original are true near duplicates of each other too
    origin = {b: a for a, b in planted_near}
    true_found = sum(1 for x, y in found_pairs if origin.get(y, y) == origin.get(x, x))
    cont_found, cont_planted = set(res["contaminated_lines"]), set(planted["contaminated_lines"])
    return {
        "near_dup_recall": round(recall_hits / len(planted_near), 4) if planted_near else None,
        "near_dup_precision": round(true_found / len(found_pairs), 4) if found_pairs else None,
        "near_pairs_found": len(found_pairs),
        "contamination_found": len(cont_found & cont_planted),
        "contamination_planted": len(cont_planted),
        "contamination_recall": round(len(cont_found & cont_planted) / len(cont_planted), 4) if cont_planted else None,
        "contamination_false": len(cont_found - cont_planted),
    }


# --- baseline -------------------------------------------------------------------------------------


def baseline(workdir: Path, m: int, near_pairs: list[tuple[int, int]]) -> dict:
    import xxhash
    from datasketch import MinHash, MinHashLSH

    from tuneloop.data import dedup

    texts = []
    with open(workdir / "train.jsonl", encoding="utf-8") as f:
        for _, row in zip(range(m), f, strict=False):
            texts.append(message_text(json.loads(row)["messages"]))
    gc.collect()

    t0, c0 = time.perf_counter(), time.process_time()
    shingle_sets = []
    for t in texts:
        w = dedup.normalise_text(t).split()
        sh = [" ".join(w[i : i + SHINGLE]) for i in range(len(w) - SHINGLE + 1)] if len(w) >= SHINGLE else [" ".join(w)]
        shingle_sets.append([s.encode("utf-8") for s in sh])
    # xxh32 instead of datasketch's default sha1: its fastest documented option (about 2x faster bulk)
    hashes = MinHash.bulk(shingle_sets, num_perm=NUM_PERM, seed=1, hashfunc=xxhash.xxh32_intdigest)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    for i, h in enumerate(hashes):
        lsh.insert(i, h)
    found = set()
    for i, h in enumerate(hashes):
        for j in lsh.query(h):
            if j != i:
                found.add((min(i, j), max(i, j)))
    ds_seconds, ds_cpu = time.perf_counter() - t0, time.process_time() - c0
    ds_bands_rows = [lsh.b, lsh.r]
    del hashes, lsh, shingle_sets
    gc.collect()

    t0 = time.perf_counter()
    groups = dedup.near_duplicate_groups(texts, threshold=THRESHOLD, shingle_size=SHINGLE, num_perm=NUM_PERM)
    tl_seconds = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    groups1 = dedup.near_duplicate_groups(
        texts, threshold=THRESHOLD, shingle_size=SHINGLE, num_perm=NUM_PERM, workers=1
    )
    tl1_seconds, tl1_cpu = time.perf_counter() - t0, time.process_time() - c0

    # recall of planted near pairs inside the first m records, for both (datasketch: candidate pairs,
    # joined transitively like ours)
    inside = [(a - 1, b - 1) for a, b in near_pairs if b <= m]
    member = {i: k for k, g in enumerate(groups) for i in g}
    ds_groups = _components(found)
    ds_member = {i: k for k, g in enumerate(ds_groups) for i in g}
    return {
        "baseline_records": m,
        "datasketch_seconds": round(ds_seconds, 2),
        "tuneloop_seconds": round(tl_seconds, 2),
        "tuneloop_1worker_seconds": round(tl1_seconds, 2),
        # CPU seconds of the single-process runs: less disturbed by other load on the machine
        "cpu_ratio_1worker": round(ds_cpu / tl1_cpu, 2),
        "same_groups_1_vs_2_workers": groups == groups1,
        "datasketch_recall": _recall(inside, ds_member),
        "tuneloop_recall_on_baseline_records": _recall(inside, member),
        "bands_rows": list(dedup.lsh_params(THRESHOLD, NUM_PERM)),
        "datasketch_bands_rows": ds_bands_rows,
    }


def _components(pairs: set[tuple[int, int]]) -> list[list[int]]:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return [sorted(g) for g in groups.values()]


def _recall(pairs: list[tuple[int, int]], member: dict[int, int]) -> float | None:
    if not pairs:
        return None
    hit = sum(1 for a, b in pairs if a in member and member.get(a) == member.get(b))
    return round(hit / len(pairs), 4)


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, required=True, help="number of training records to build")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--baseline-records",
        type=int,
        default=None,
        help="records for the datasketch comparison (default min(N, 100000); 0 skips it)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    ap.add_argument(
        "--in-memory",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also run the old in-memory pass on the same data, side by side (auto: up to 2,000,000 records)",
    )
    ap.add_argument("--delete-data", action="store_true", help="delete the generated data and outputs at the end")
    ap.add_argument("--_pass", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_mode", default="ooc", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._pass is not None:  # child process: the data pass alone
        print(json.dumps(run_pass(a._pass, a._mode)))
        return

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    planted = build(a.records, a.seed, workdir)
    build_seconds = time.perf_counter() - t0
    size_mb = (workdir / "train.jsonl").stat().st_size / 2**20
    print(
        f"built {a.records} records ({size_mb:.0f} MB, mean {planted['mean_chars']:.0f} chars of message text) "
        f"in {build_seconds:.1f} s under {workdir}",
        flush=True,
    )
    print(
        f"planted: {len(planted['exact_pairs'])} exact copies, {len(planted['near_pairs'])} near copies "
        f"(shingle Jaccard of up to 5,000 of them: min {planted['near_jaccard_min']:.3f}, mean {planted['near_jaccard_mean']:.3f}), "
        f"{len(planted['contaminated_lines'])} eval records pasted into train, PII {planted['pii_planted']}; "
        f"base records: max Jaccard of 2,000 random pairs {planted['base_jaccard_max']:.3f}",
        flush=True,
    )

    modes = ["ooc"] + (["memory"] if a.in_memory == "yes" or (a.in_memory == "auto" and a.records <= 2_000_000) else [])
    results = {}
    for mode in modes:
        res = run_pass_child(workdir, mode)
        res.update(score(res, planted))
        results[mode] = res
        name = "out-of-core pass (default)" if mode == "ooc" else "in-memory pass (OutOfCore(enabled=False))"
        extra = (
            (
                f" (of which near_duplicate_groups {res['near_dup_seconds']} s, contaminated_indices "
                f"{res['contamination_seconds']} s)"
            )
            if mode == "memory"
            else ""
        )
        print(
            f"{name}: {res['seconds']:.1f} s{extra}, peak RSS of the process tree {res['peak_rss_tree_mb']:.0f} MB "
            f"(maxrss process + largest worker {res['maxrss_mb']:.0f} MB, main process {res['maxrss_self_mb']:.0f} MB)",
            flush=True,
        )
        print(f"  report: {res['report']}")
        print(
            f"  near duplicates: {len(res['groups'])} groups; recall {res['near_dup_recall']}, precision "
            f"{res['near_dup_precision']} ({res['near_pairs_found']} pairs found); contamination: "
            f"{res['contamination_found']}/{res['contamination_planted']} planted found, {res['contamination_false']} others flagged",
            flush=True,
        )
    ooc = results["ooc"]
    out = {
        "records": a.records,
        "input_mb": round(size_mb, 1),
        "build_seconds": round(build_seconds, 1),
        "seconds": ooc["seconds"],
        "peak_rss_mb": ooc["peak_rss_tree_mb"],
        "maxrss_mb": ooc["maxrss_mb"],
        **{
            k: ooc[k]
            for k in (
                "near_dup_recall",
                "near_dup_precision",
                "contamination_recall",
                "contamination_found",
                "contamination_planted",
                "contamination_false",
            )
        },
        "near_jaccard_min": round(planted["near_jaccard_min"], 4),
        "near_jaccard_mean": round(planted["near_jaccard_mean"], 4),
        "base_jaccard_max": round(planted["base_jaccard_max"], 4),
        "report": ooc["report"],
        "throughput_ratio_vs_datasketch": None,
    }
    if "memory" in results:
        mem = results["memory"]
        same = {
            "clean_bytes": mem["clean_sha256"] == ooc["clean_sha256"],
            "quarantine_bytes": mem["quarantine_sha256"] == ooc["quarantine_sha256"],
            "report": mem["report"] == ooc["report"],
            "groups": mem["groups"] == ooc["groups"],
        }
        out["in_memory"] = {
            "seconds": mem["seconds"],
            "peak_rss_mb": mem["peak_rss_tree_mb"],
            "maxrss_mb": mem["maxrss_mb"],
            "near_dup_seconds": mem["near_dup_seconds"],
            "contamination_seconds": mem["contamination_seconds"],
        }
        out["same_as_in_memory"] = same
        print(
            f"side by side at {a.records}: out of core {ooc['seconds']:.1f} s / {ooc['peak_rss_tree_mb']:.0f} MB, "
            f"in memory {mem['seconds']:.1f} s / {mem['peak_rss_tree_mb']:.0f} MB; identical: {same}",
            flush=True,
        )
    m = min(a.records, 100_000) if a.baseline_records is None else min(a.baseline_records, a.records)
    if m > 0:
        try:
            base = baseline(workdir, m, planted["near_pairs"])
        except ImportError:
            print("datasketch is not installed (pip install -e '.[bench]'): baseline skipped")
        else:
            ratio = base["datasketch_seconds"] / base["tuneloop_seconds"]
            print(
                f"near-dup on the first {m} records: datasketch {base['datasketch_seconds']} s, tuneloop "
                f"{base['tuneloop_seconds']} s (1 worker: {base['tuneloop_1worker_seconds']} s) -> {ratio:.1f}x; "
                f"recall datasketch {base['datasketch_recall']}, tuneloop {base['tuneloop_recall_on_baseline_records']}"
            )
            out["throughput_ratio_vs_datasketch"] = round(ratio, 2)
            out["throughput_ratio_1worker"] = round(base["datasketch_seconds"] / base["tuneloop_1worker_seconds"], 2)
            out.update(base)
    if a.delete_data:
        import shutil

        for name in ("train.jsonl", "eval.jsonl", "out-ooc", "out-memory"):
            target = workdir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
