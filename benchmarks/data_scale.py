"""The data pass at scale: N synthetic chat records with planted duplicates, near duplicates and PII.

    python benchmarks/data_scale.py --records N [--seed S] [--baseline-records M] [--workdir DIR]

1. Builds N records in the `messages` format (user + assistant, 300-600 characters) from sentences of
   ../shared/datasets/*, recombined at random with unique random words mixed in, so that the base records
   are mutually dissimilar (no shared 5-word shingle in practice). Planted: ~2% exact copies of a base record,
   ~3% near copies (changes of case, punctuation and whitespace, which normalisation removes, plus one
   word added, dropped or replaced; the true shingle Jaccard of each pair is computed and reported), ~1%
   records with PII (emails, phone numbers, Luhn-valid card numbers, AWS-style access keys), and an eval
   file of 2,000 records of which 0.1% of N are pasted into train (contamination).
2. Runs the full data pass in a fresh process (so its peak RSS is its own): `validate_dataset` (formats,
   rules, exact dedup, and whatever part of near-dup/contamination/PII it integrates), plus
   `near_duplicate_groups` / `contaminated_indices` on the kept texts when validate_dataset does not yet run
   them itself (the output says which). Timed end to end; peak RSS = maxrss of that process + its largest
   worker process.
3. Near-dup recall = planted near pairs that land in one group / planted; precision = pairs inside the
   reported groups (exact copies excluded) that are planted / all such pairs.
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
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
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


def build(n: int, seed: int, workdir: Path) -> dict:
    """Write train.jsonl (n records) and eval.jsonl; return what was planted (by 1-based line)."""
    rng = random.Random(seed)
    sentences = [s.split() for s in load_sentences()]
    word = Words(seed)
    eval_records = [base_record(rng, sentences, word) for _ in range(EVAL_RECORDS)]
    n_exact, n_near, n_pii = round(n * 0.02), round(n * 0.03), round(n * 0.01)
    n_cont = min(EVAL_RECORDS, max(1, round(n * 0.001)))
    pasted = iter(rng.sample(range(EVAL_RECORDS), n_cont))  # distinct eval records
    n_base = n - n_exact - n_near - n_cont
    kinds = ["base"] * n_base + ["exact"] * n_exact + ["near"] * n_near + ["contaminated"] * n_cont
    rng.shuffle(kinds)
    # a copy must come after its original: copies pick an earlier base record
    records: list[list[dict]] = []
    base_lines: list[int] = []
    exact_pairs, near_pairs, cont_lines, near_jaccard = [], [], [], []
    pii_planted = {"email": 0, "phone": 0, "credit_card": 0, "aws_access_key": 0}
    for kind in kinds:
        line = len(records) + 1
        if kind == "base" or not base_lines:
            msgs = base_record(rng, sentences, word)
            if rng.random() < n_pii / max(1, n_base):
                pii = rng.choice(list(pii_planted))
                pii_planted[pii] += 1
                msgs[rng.randrange(2)]["content"] += f" Contact: {pii_item(rng, pii)}."
            base_lines.append(line)
        elif kind == "exact":
            orig = rng.choice(base_lines)
            msgs = records[orig - 1]
            exact_pairs.append((orig, line))
        elif kind == "near":
            orig = rng.choice(base_lines)
            msgs = near_copy(rng, records[orig - 1], word)
            near_pairs.append((orig, line))
            if len(near_jaccard) < 5000:
                near_jaccard.append(jaccard(message_text(records[orig - 1]), message_text(msgs)))
        else:
            msgs = [dict(m) for m in eval_records[next(pasted)]]
            cont_lines.append(line)
        records.append(msgs)
    with open(workdir / "train.jsonl", "w", encoding="utf-8") as f:
        for msgs in records:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    with open(workdir / "eval.jsonl", "w", encoding="utf-8") as f:
        for msgs in eval_records:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    # dissimilarity of base records: Jaccard of 2,000 random pairs
    pairs = [rng.sample(base_lines, 2) for _ in range(min(2000, len(base_lines)))] if len(base_lines) > 1 else []
    base_j = [jaccard(message_text(records[a - 1]), message_text(records[b - 1])) for a, b in pairs]
    return {
        "records": n,
        "exact_pairs": exact_pairs,
        "near_pairs": near_pairs,
        "contaminated_lines": cont_lines,
        "pii_planted": pii_planted,
        "near_jaccard_min": min(near_jaccard, default=None),
        "near_jaccard_mean": sum(near_jaccard) / len(near_jaccard) if near_jaccard else None,
        "base_jaccard_max": max(base_j, default=None),
        "mean_chars": sum(len(message_text(r)) for r in records[:5000]) / min(5000, len(records)),
    }


# --- the data pass (runs in its own process) ------------------------------------------------------


def _read_texts(path: Path) -> tuple[list[int], list[str]]:
    lines, texts = [], []
    with open(path, encoding="utf-8") as f:
        for n, row in enumerate(f, 1):
            rec = json.loads(row)
            lines.append(rec.get("_line", n))
            texts.append(message_text(rec["messages"]))
    return lines, texts


_NEAR = re.compile(r"near_duplicate: similar to line (\d+)")


def run_pass(workdir: Path) -> dict:
    """The full data pass, timed: validate_dataset with near-dup and contamination when it runs them
    itself (validating the eval file first to get its texts), else validate_dataset followed by
    near_duplicate_groups and contaminated_indices on the kept texts."""
    import dataclasses
    import inspect

    from tuneloop.data import dedup, validate

    params = inspect.signature(validate.validate_dataset).parameters
    integrated = "checks" in params and "eval_texts" in params and hasattr(validate, "clean_texts")
    spent = {"near_duplicate_groups": 0.0, "contaminated_indices": 0.0}
    for fname in spent:  # time the detectors inside validate_dataset (it looks them up on the module)
        def timed(*args, _f=getattr(dedup, fname), _name=fname, **kw):
            t = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                spent[_name] += time.perf_counter() - t
        setattr(dedup, fname, timed)
    t0 = time.perf_counter()
    if integrated:
        names = {f.name for f in dataclasses.fields(validate.Checks)}
        want = {"near_dup_threshold": THRESHOLD, "near_dup_shingle": SHINGLE, "near_dup_action": "drop",
                "contamination_action": "drop", "pii": "report"}
        checks = validate.Checks(**{k: v for k, v in want.items() if k in names})
        ev = validate.validate_dataset(workdir / "eval.jsonl", workdir / "out", name="eval", checks=checks)
        eval_texts = validate.clean_texts(Path(ev["clean_path"]))
        report = validate.validate_dataset(workdir / "train.jsonl", workdir / "out", checks=checks, eval_texts=eval_texts)
        seconds = time.perf_counter() - t0
        # groups and contaminated lines from the quarantine reasons
        heads: dict[int, list[int]] = {}
        cont_lines = []
        with open(report["quarantine_path"], encoding="utf-8") as f:
            for row in f:
                q = json.loads(row)
                for reason in q["reasons"]:
                    m = _NEAR.match(reason)
                    if m:
                        heads.setdefault(int(m.group(1)), []).append(q["line"])
                    elif reason.startswith("contaminated"):
                        cont_lines.append(q["line"])
        groups = [sorted([h, *members]) for h, members in sorted(heads.items())]
        timing = {"validate_seconds": round(seconds, 2), "near_dup_seconds": round(spent["near_duplicate_groups"], 2),
                  "contamination_seconds": round(spent["contaminated_indices"], 2)}
    else:
        report = validate.validate_dataset(workdir / "train.jsonl", workdir / "out")
        t1 = time.perf_counter()
        lines, texts = _read_texts(Path(report["clean_path"]))
        found = dedup.near_duplicate_groups(texts, threshold=THRESHOLD, shingle_size=SHINGLE, num_perm=NUM_PERM)
        t2 = time.perf_counter()
        _, eval_texts = _read_texts(workdir / "eval.jsonl")
        cont = dedup.contaminated_indices(texts, eval_texts)
        t3 = time.perf_counter()
        seconds = t3 - t0
        groups = [[lines[i] for i in g] for g in found]
        cont_lines = [lines[i] for i in cont]
        timing = {"validate_seconds": round(t1 - t0, 2), "near_dup_seconds": round(t2 - t1, 2),
                  "contamination_seconds": round(t3 - t2, 2)}
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "integrated": integrated,
        "seconds": round(seconds, 2),
        **timing,
        "groups": groups,
        "contaminated_lines": sorted(cont_lines),
        "report": {k: report.get(k) for k in ("format", "records", "valid", "invalid", "duplicates",
                                               "near_duplicates", "contaminated", "pii", "digest")},
        # maxrss of this process plus that of its largest child (worker processes); pages shared
        # between them (the signature buffer) are counted twice, so this is an upper bound
        "peak_rss_mb": round((self_kb + child_kb) / 1024, 1),
        "peak_rss_self_mb": round(self_kb / 1024, 1),
    }


# --- baseline -------------------------------------------------------------------------------------


def baseline(workdir: Path, m: int, near_pairs: list[tuple[int, int]]) -> dict:
    import xxhash
    from datasketch import MinHash, MinHashLSH

    from tuneloop.data import dedup

    texts = []
    with open(workdir / "train.jsonl", encoding="utf-8") as f:
        for _, row in zip(range(m), f):
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
    groups1 = dedup.near_duplicate_groups(texts, threshold=THRESHOLD, shingle_size=SHINGLE, num_perm=NUM_PERM, workers=1)
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
    ap.add_argument("--baseline-records", type=int, default=None, help="records for the datasketch comparison (default min(N, 100000); 0 skips it)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    ap.add_argument("--_pass", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._pass is not None:  # child process: the data pass alone
        print(json.dumps(run_pass(a._pass)))
        return

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    planted = build(a.records, a.seed, workdir)
    size_mb = (workdir / "train.jsonl").stat().st_size / 2**20
    print(f"built {a.records} records ({size_mb:.0f} MB, mean {planted['mean_chars']:.0f} chars of message text) "
          f"in {time.perf_counter() - t0:.1f} s under {workdir}")
    print(f"planted: {len(planted['exact_pairs'])} exact copies, {len(planted['near_pairs'])} near copies "
          f"(shingle Jaccard of up to 5,000 of them: min {planted['near_jaccard_min']:.3f}, mean {planted['near_jaccard_mean']:.3f}), "
          f"{len(planted['contaminated_lines'])} eval records pasted into train, PII {planted['pii_planted']}; "
          f"base records: max Jaccard of 2,000 random pairs {planted['base_jaccard_max']:.3f}")

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--records", "0", "--_pass", str(workdir)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"data pass failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    # recall / precision of near-duplicate groups, by line
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
    recall = recall_hits / len(planted_near) if planted_near else None
    precision = true_found / len(found_pairs) if found_pairs else None
    cont_found = set(res["contaminated_lines"])
    cont_planted = set(planted["contaminated_lines"])

    if res["integrated"]:
        how = "validate_dataset on eval, then on train with near-dup + contamination (integrated)"
        parts = (f" (of which near_duplicate_groups {res['near_dup_seconds']} s, contaminated_indices "
                 f"{res['contamination_seconds']} s)")
    else:
        how = "validate_dataset + near_duplicate_groups + contaminated_indices (validate_dataset does not run them yet)"
        parts = (f" (validate {res['validate_seconds']} s, near-dup {res['near_dup_seconds']} s, "
                 f"contamination {res['contamination_seconds']} s)")
    print(f"data pass: {how}: {res['seconds']:.1f} s{parts}, peak RSS {res['peak_rss_mb']:.0f} MB "
          f"(main process {res['peak_rss_self_mb']:.0f} MB)")
    print(f"report: {res['report']}")
    print(f"near duplicates: {len(res['groups'])} groups; recall {recall:.4f}, precision {precision:.4f} "
          f"({len(found_pairs)} pairs found)")
    print(f"contamination: {len(cont_found & cont_planted)}/{len(cont_planted)} planted found, "
          f"{len(cont_found - cont_planted)} others flagged")

    out = {
        "records": a.records,
        "seconds": res["seconds"],
        "peak_rss_mb": res["peak_rss_mb"],
        "near_dup_recall": round(recall, 4) if recall is not None else None,
        "near_dup_precision": round(precision, 4) if precision is not None else None,
        "throughput_ratio_vs_datasketch": None,
        "integrated": res["integrated"],
        "validate_seconds": res["validate_seconds"],
        "near_dup_seconds": res["near_dup_seconds"],
        "contamination_seconds": res["contamination_seconds"],
        "contamination_recall": round(len(cont_found & cont_planted) / len(cont_planted), 4),
        "contamination_false": len(cont_found - cont_planted),
        "near_jaccard_min": round(planted["near_jaccard_min"], 4),
        "near_jaccard_mean": round(planted["near_jaccard_mean"], 4),
        "base_jaccard_max": round(planted["base_jaccard_max"], 4),
        "report": res["report"],
    }
    m = min(a.records, 100_000) if a.baseline_records is None else min(a.baseline_records, a.records)
    if m > 0:
        try:
            base = baseline(workdir, m, planted["near_pairs"])
        except ImportError:
            print("datasketch is not installed (pip install -e '.[bench]'): baseline skipped")
        else:
            ratio = base["datasketch_seconds"] / base["tuneloop_seconds"]
            print(f"near-dup on the first {m} records: datasketch {base['datasketch_seconds']} s, tuneloop "
                  f"{base['tuneloop_seconds']} s (1 worker: {base['tuneloop_1worker_seconds']} s) -> {ratio:.1f}x; "
                  f"recall datasketch {base['datasketch_recall']}, tuneloop {base['tuneloop_recall_on_baseline_records']}")
            out["throughput_ratio_vs_datasketch"] = round(ratio, 2)
            out["throughput_ratio_1worker"] = round(base["datasketch_seconds"] / base["tuneloop_1worker_seconds"], 2)
            out.update(base)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
