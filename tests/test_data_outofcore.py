"""The out-of-core data pass (data/outofcore.py) against the in-memory pass, with chunks small enough to spill.

Every test compares the two passes on the same input: the clean file and the quarantine byte for byte, the
report (less its paths), so any difference in kept records, duplicate groups, digest, reasons or counts
fails. Disk full while spilling is simulated by a file whose writes raise ENOSPC (the only thing mocked).
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import pytest

from tuneloop.config import TrainSource
from tuneloop.data import outofcore
from tuneloop.data.outofcore import OutOfCore, ooc_from_config
from tuneloop.data.validate import Checks, clean_texts, validate_dataset
from tuneloop.errors import StageError

SMALL = OutOfCore(chunk_records=37, partitions=3, flush_bytes=2048)  # many chunks, partitions and flushes
_WORDS = [f"w{i}" for i in range(5000)]


def _text(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _planted(seed: int = 0, n: int = 900) -> tuple[list[dict], list[dict]]:
    """Train records with exact copies (some with other whitespace), near copies (a word added), PII, and
    records pasted from the eval set; and the eval set."""
    rng = random.Random(seed)
    base = [_chat(_text(rng, 12), _text(rng)) for _ in range(n)]
    evals = [_chat(_text(rng, 12), _text(rng)) for _ in range(30)]
    recs = list(base)
    for _ in range(n // 10):  # exact copies, some differing in whitespace only
        r = json.loads(json.dumps(rng.choice(base)))
        if rng.random() < 0.5:
            r["messages"][1]["content"] = "  " + r["messages"][1]["content"].replace(" ", "   ", 3)
        recs.append(r)
    for _ in range(n // 8):  # near copies
        r = json.loads(json.dumps(rng.choice(base)))
        r["messages"][1]["content"] += " " + rng.choice(_WORDS)
        recs.append(r)
    for i in range(n // 30):  # PII
        recs.append(_chat(f"write to anna.{i}@example.com please", _text(rng, 20) + f" call +1 415-555-{1000 + i}"))
    recs += [json.loads(json.dumps(e)) for e in evals[:12]]  # contamination
    recs.append(_chat("", ""))  # invalid: empty texts
    recs.append(_chat("!!! ???", "... ---"))  # no words: never grouped
    rng.shuffle(recs)
    return recs, evals


def _write_jsonl(path: Path, recs: list[dict], broken: dict[int, bytes] | None = None) -> None:
    """One record per line; ``broken``: raw lines (bytes) written before record i."""
    with open(path, "wb") as f:
        for i, r in enumerate(recs):
            if broken and i in broken:
                f.write(broken[i] + b"\n")
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")


def _both(
    tmp_path: Path, source, *, checks: Checks, ooc: OutOfCore = SMALL, name: str = "train", **kw
) -> tuple[dict, dict]:
    """(in-memory report, out-of-core report) after asserting that their files are identical."""
    mem = validate_dataset(source, tmp_path / "mem", checks=checks, name=name, ooc=OutOfCore(enabled=False), **kw)
    ooc_rep = validate_dataset(source, tmp_path / "ooc", checks=checks, name=name, ooc=ooc, **kw)
    for suffix in ("clean.jsonl", "quarantine.jsonl"):
        a = (tmp_path / "mem" / f"{name}.{suffix}").read_bytes()
        b = (tmp_path / "ooc" / f"{name}.{suffix}").read_bytes()
        assert a == b, f"{suffix} differs"
    strip = lambda rep: {k: v for k, v in rep.items() if not k.endswith("_path")}  # noqa: E731
    assert json.dumps(strip(mem)) == json.dumps(strip(ooc_rep))  # same numbers, same order of rules and examples
    assert not list((tmp_path / "ooc").glob(".*spill*")), "the spill directory is removed after the pass"
    return mem, ooc_rep


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, list[str]]:
    recs, evals = _planted()
    _write_jsonl(tmp_path / "train.jsonl", recs, broken={300: b'{"messages": [', 301: b'{"text": "\xff not utf8"}'})
    _write_jsonl(tmp_path / "eval.jsonl", evals)
    ev = validate_dataset(tmp_path / "eval.jsonl", tmp_path / "ev", name="eval")
    return tmp_path / "train.jsonl", clean_texts(Path(ev["clean_path"]))


@pytest.mark.parametrize("pii, action, workers", [("report", "drop", 1), ("drop", "drop", 2), ("redact", "report", 1)])
def test_same_files_as_in_memory_with_spills(tmp_path, planted, monkeypatch, pii, action, workers):
    train, eval_texts = planted
    flushes = []
    real_flush = outofcore.Spill._flush_buckets
    monkeypatch.setattr(
        outofcore.Spill, "_flush_buckets", lambda self: (flushes.append(self._buffered), real_flush(self))
    )
    checks = Checks(
        pii=pii, near_dup_threshold=0.8, near_dup_action=action, contamination_action=action, num_workers=workers
    )
    mem, rep = _both(tmp_path, train, checks=checks, eval_texts=eval_texts)
    assert sum(1 for b in flushes if b >= 2048) >= 5, "buckets were spilled many times during the pass"
    # the planted things were found (so equality is not between two empty results)
    assert rep["duplicates"] >= 80 and rep["near_duplicate_groups"] >= 80 and rep["contaminated_found"] == 12
    assert rep["invalid"] >= 3 and rep["pii_records"] >= 30
    assert rep["pii_dropped"] == (rep["pii_records"] if pii == "drop" else 0)
    reasons = [json.loads(line)["reasons"] for line in Path(rep["quarantine_path"]).read_text().splitlines()]
    assert any(r[0].startswith("exact_duplicate: same as line") for r in reasons)
    assert any(r[0].startswith("invalid_json") for r in reasons) and any(
        r[0].startswith("invalid_utf8") for r in reasons
    )
    assert any(r[0].startswith("near_duplicate: similar to line") for r in reasons) == (action == "drop")


def test_default_settings_and_near_dup_groups_equal(tmp_path, planted):
    """The default chunking (one chunk here) gives the same files too, and the groups are those of
    near_duplicate_groups on the kept texts."""
    from tuneloop.data.dedup import near_duplicate_groups

    train, eval_texts = planted
    checks = Checks(near_dup_threshold=0.8, near_dup_action="report", contamination_action="report", num_workers=1)
    _, rep = _both(tmp_path, train, checks=checks, ooc=OutOfCore(), eval_texts=eval_texts)
    texts = clean_texts(Path(rep["clean_path"]))
    assert rep["near_duplicate_groups"] == len(near_duplicate_groups(texts, threshold=0.8)) > 0


def test_directory_of_many_files_with_a_broken_record_in_the_middle(tmp_path):
    """40 shards; shard 17 has a line that breaks the reader: quarantined with its file and line, the run goes on."""
    recs, _ = _planted(seed=1, n=400)
    shards = tmp_path / "shards"
    shards.mkdir()
    per = len(recs) // 40 + 1
    for k in range(40):
        _write_jsonl(
            shards / f"part-{k:05d}.jsonl",
            recs[k * per : (k + 1) * per],
            broken={5: b'{"messages": [{"role": "user"'} if k == 17 else None,
        )
    checks = Checks(near_dup_threshold=0.8, num_workers=1)
    _, rep = _both(tmp_path, shards, checks=checks)
    bad = [json.loads(line) for line in Path(rep["quarantine_path"]).read_text().splitlines()]
    broken = [q for q in bad if q["reasons"][0].startswith("invalid_json")]
    assert [(q["file"], q["line"]) for q in broken] == [("part-00017.jsonl", 6)]
    assert rep["records"] == len(recs) + 1 and rep["valid"] > 300
    clean = [json.loads(line) for line in Path(rep["clean_path"]).read_text().splitlines()]
    assert {r["_file"] for r in clean} >= {"part-00000.jsonl", "part-00039.jsonl"}  # files after the broken one read


def test_list_of_sources_and_kto_labels(tmp_path):
    """A list of sources (per-source counts, _source) and a kto set (near duplicates only within a label)."""
    rng = random.Random(3)
    kto = []
    for i in range(300):
        prompt, answer = _text(rng, 10), _text(rng, 30)
        kto.append({**_chat(prompt, answer), "label": i % 2 == 0})
        if i % 5 == 0:  # the same answer with the other label: kept; with the same label plus a word: near dup
            kto.append({**_chat(prompt, answer), "label": i % 2 != 0})
            kto.append({**_chat(prompt, answer + " extra"), "label": i % 2 == 0})
    _write_jsonl(tmp_path / "a.jsonl", kto[: len(kto) // 2])
    _write_jsonl(tmp_path / "b.jsonl", kto[len(kto) // 2 :])
    sources = [TrainSource(path=str(tmp_path / "a.jsonl")), TrainSource(path=str(tmp_path / "b.jsonl"), weight=2)]
    _, rep = _both(tmp_path, sources, checks=Checks(near_dup_threshold=0.8, num_workers=1))
    assert rep["format"] == "kto" and rep["near_duplicate_groups"] == 60
    assert [s["records"] for s in rep["sources"]] == [len(kto) // 2, len(kto) - len(kto) // 2]


class _WordTokenizer:
    """A whitespace tokenizer: enough for the over-long rule on `text` records."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": list(range(len(text.split())))}


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlong_with_duplicates(tmp_path, policy):
    """An over-long record dropped before an exact copy of it that is short enough (other whitespace does not
    make it shorter in words, so the copy is long too), and short duplicates: same decisions and tallies."""
    rng = random.Random(5)
    recs = []
    for i in range(200):
        t = _text(rng, 80 if i % 7 == 0 else 20)
        recs.append({"text": t})
        if i % 4 == 0:
            recs.append({"text": t.replace(" ", "  ", 2)})
    _write_jsonl(tmp_path / "t.jsonl", recs)
    checks = Checks(max_length=50, overlong=policy, near_dup_threshold=0.8, num_workers=1)
    _, rep = _both(tmp_path, tmp_path / "t.jsonl", checks=checks, tokenizer=_WordTokenizer())
    assert rep["overlong"]["records"] > 10
    assert (rep["overlong_dropped"] > 0) == (policy == "drop")


def test_settings_from_config_and_spill_dir(tmp_path, planted, monkeypatch):
    from tuneloop.config import DataConfig

    train, _ = planted
    spill = tmp_path / "spill-here"
    data = DataConfig(train_data=str(train), chunk_records=64, spill_dir=str(spill))
    ooc = ooc_from_config(data)
    assert (ooc.chunk_records, ooc.spill_dir, ooc.enabled) == (64, str(spill), True)
    seen = []
    real = outofcore._spill_root
    monkeypatch.setattr(outofcore, "_spill_root", lambda *a: seen.append(real(*a)) or seen[-1])
    validate_dataset(train, tmp_path / "out", checks=Checks(num_workers=1), ooc=ooc)
    assert seen and seen[0].parent == spill and not seen[0].exists()  # used, then removed


class _FullDisk:
    """A binary file whose writes fail with ENOSPC once ``budget`` bytes have been written in all."""

    budget = 0

    def __init__(self, f):
        self.f = f

    def write(self, data):
        _FullDisk.budget -= len(data)
        if _FullDisk.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_while_spilling(tmp_path, planted, monkeypatch):
    """ENOSPC in the middle of the spill: a StageError that says what, where and what to do; no clean file,
    quarantine or report written (nothing marked complete), no temp files, the spill directory removed."""
    import builtins

    train, eval_texts = planted
    _FullDisk.budget = 60_000
    monkeypatch.setattr(outofcore, "open", lambda *a, **kw: _FullDisk(builtins.open(*a, **kw)), raising=False)
    out = tmp_path / "out"
    with pytest.raises(StageError) as e:
        validate_dataset(train, out, checks=Checks(num_workers=1), eval_texts=eval_texts, ooc=SMALL)
    msg = str(e.value)
    assert (
        "the disk is full" in msg and "data.spill_dir" in msg and str(out) in msg and "No clean file or report" in msg
    )
    assert sorted(p.name for p in out.iterdir()) == [], "nothing left behind: no outputs, temp files or spill"


def test_not_enough_free_space_stops_before_any_work(tmp_path, planted, monkeypatch):
    """shutil.disk_usage says the spill will not fit: a StageError with bytes needed vs free, the filesystem,
    data.spill_dir and what to do, raised before the input is read (no spill directory, no output)."""
    import shutil
    from collections import namedtuple

    train, eval_texts = planted
    need, input_bytes, records = outofcore.spill_estimate(train)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - (need - 1), need - 1))
    monkeypatch.setattr(outofcore, "_stream", lambda *a, **kw: pytest.fail("the pass started"))
    spill = tmp_path / "spill-here"
    out = tmp_path / "out"
    with pytest.raises(StageError) as e:
        validate_dataset(
            train, out, checks=Checks(num_workers=1), eval_texts=eval_texts, ooc=OutOfCore(spill_dir=str(spill))
        )
    msg = str(e.value)
    assert f"needs about {need / 1e9:.2f} GB of spill space in {spill} (data.spill_dir)" in msg
    assert f"({input_bytes / 1e9:.2f} GB of input)" in msg and f"~{records:,} records" in msg
    assert f"has {(need - 1) / 1e9:.2f} GB free" in msg and "the filesystem there (/" in msg
    assert "set data.spill_dir to a directory on a disk with more room" in msg
    assert list(spill.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == []
    # one byte more and it runs (here: as far as the stubbed pass)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - need, need))
    with pytest.raises(pytest.fail.Exception, match="the pass started"):
        validate_dataset(train, out, checks=Checks(num_workers=1), ooc=OutOfCore(spill_dir=str(spill)))


def test_spill_estimate_covers_the_spill(tmp_path, planted, monkeypatch):
    """The estimate counts the records of a JSONL file and is at least what the spill held (measured when the pass
    removes it); a list of sources adds up; inputs that are not local files are not estimated."""
    import shutil

    train, eval_texts = planted
    lines = train.read_bytes().count(b"\n")  # the file is under 1 MiB: every line counted
    need, input_bytes, records = outofcore.spill_estimate(train)
    assert records == lines and input_bytes == train.stat().st_size
    held = []
    real = shutil.rmtree

    def measure(path, **kw):
        held.append(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()))
        real(path, **kw)

    monkeypatch.setattr(shutil, "rmtree", measure)
    validate_dataset(train, tmp_path / "out", checks=Checks(num_workers=1), eval_texts=eval_texts, ooc=SMALL)
    assert held and input_bytes < held[0] <= need
    two = outofcore.spill_estimate([TrainSource(path=str(train)), TrainSource(path=str(train), weight=2)])
    assert two == (2 * need, 2 * input_bytes, 2 * records)
    assert outofcore.spill_estimate("s3://bucket/train.jsonl") is None
    assert outofcore.spill_estimate([TrainSource(path=str(train)), TrainSource(path="hf-org/name")]) is None
