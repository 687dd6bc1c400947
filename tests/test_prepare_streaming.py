"""The streaming preparation (tuneloop.data.prepare.prepare_dataset over tuneloop.data.stream) gives exactly what
the in-memory preparation gave (tests/prepare_in_memory.py, the code as it was before streaming): the same token ids
in the same order, the same held-out eval records, the same weighted copies, byte-identical record files and the
same metrics, from clean.jsonl and from a directory of Parquet shards; with batches small enough that every file
is written in many pieces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from prepare_in_memory import _split, apply_weights, prepare_dataset_in_memory
from tuneloop.config import TrainSource
from tuneloop.data import stream
from tuneloop.data.prepare import prepare_dataset
from tuneloop.errors import InputError

FILES = ("train_records.jsonl", "eval_records.jsonl", "eval.jsonl", "dropped.jsonl", "metrics.json")


def _records(n: int = 90) -> list[dict]:
    """Canonical records of every kind preparation treats differently, with _line and _source as validation writes them."""
    recs = []
    for i in range(n):
        kind = i % 9
        if kind == 0:
            rec = {"text": f"plain text record {i} " * (1 + i % 4)}
        elif kind == 1:
            rec = {
                "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
                "label": False,
            }
        elif kind == 2:  # the answer lies past max_length: dropped
            rec = {
                "messages": [
                    {"role": "user", "content": "long question " * 40},
                    {"role": "assistant", "content": "late"},
                ]
            }
        elif kind == 3:  # multi-turn, with a system prompt and non-ASCII text
            rec = {
                "messages": [
                    {"role": "system", "content": "Réponds brièvement."},
                    {"role": "user", "content": f"où est le colis {i} ?"},
                    {"role": "assistant", "content": "en route"},
                    {"role": "user", "content": "merci"},
                    {"role": "assistant", "content": f"de rien {i}"},
                ]
            }
        elif kind == 4:  # truncated
            rec = {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "word " * 60}]}
        elif kind == 5:  # no final assistant turn: no eval item
            rec = {
                "messages": [
                    {"role": "user", "content": f"hello {i}"},
                    {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": "bye"},
                ]
            }
        else:
            rec = {
                "messages": [
                    {"role": "user", "content": f"question {i} about parcel {i * 13}"},
                    {"role": "assistant", "content": ["shipping", "billing", "returns"][i % 3]},
                ],
                "label": True,
            }
        recs.append({**rec, "_line": i + 1, "_source": i % 3})
    return recs


SOURCES = [
    TrainSource(path="a.jsonl"),
    TrainSource(path="b.jsonl", weight=2.5),
    TrainSource(path="c.jsonl", weight=0.5),
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from tuneloop.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(stream, "ROWS_PER_BATCH", 7)  # many Arrow batches and Parquet reads, across record kinds


def _prepared(out: Path) -> dict:
    """Everything preparation hands on: the token rows (in order), the dataset's features, each file's bytes."""
    from datasets import load_from_disk

    ds = load_from_disk(str(out / "train"))
    files = {name: (out / name).read_bytes() for name in FILES}
    return {
        "input_ids": list(ds["input_ids"]),
        "labels": list(ds["labels"]),
        "features": ds.features.to_dict(),
        **files,
    }


def _digest(prepared: dict) -> str:
    return hashlib.sha256(
        json.dumps({k: v.decode() if isinstance(v, bytes) else v for k, v in prepared.items()}, sort_keys=True).encode()
    ).hexdigest()


def _both(tmp_path, tok, train, eval_path=None, **kw) -> tuple[dict, dict]:
    kw = {"max_length": 48, "eval_split": 0.2, "seed": 3, **kw}
    old = prepare_dataset_in_memory(tok, train, eval_path, tmp_path / "old", **kw)
    new = prepare_dataset(tok, train, eval_path, tmp_path / "new", **kw)
    assert new == old
    return _prepared(tmp_path / "old"), _prepared(tmp_path / "new")


@pytest.mark.parametrize("sources", [None, SOURCES], ids=["one-source", "weighted-sources"])
def test_streaming_equals_in_memory_with_a_held_out_split(tmp_path, tok, sources):
    train = write_jsonl(tmp_path / "clean.jsonl", _records())
    old, new = _both(tmp_path, tok, train, sources=sources)
    assert new == old and _digest(new) == _digest(old)
    metrics = json.loads(new["metrics.json"])
    assert metrics["dropped"] > 0 and metrics["truncated"] > 0 and metrics["eval_samples"] > 0  # every branch ran
    assert not (tmp_path / "new" / ".train.arrow").exists()
    if sources:
        assert [r["samples"] for r in metrics["sources"]] != [r["train_records"] for r in metrics["sources"]]


def test_streaming_equals_in_memory_with_given_eval_data_and_train_on_inputs(tmp_path, tok):
    recs = _records(60)
    train = write_jsonl(tmp_path / "clean.jsonl", recs[:45])
    ev = write_jsonl(tmp_path / "eval.clean.jsonl", recs[45:])
    old, new = _both(tmp_path, tok, train, ev, sources=SOURCES, train_on_inputs=True, seed=11)
    assert new == old and json.loads(new["metrics.json"])["eval_source"] == "given"


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_sets_split_as_before(tmp_path, tok, n):
    recs = [r for r in _records(40) if r["_line"] % 9 == 7][:n]
    old, new = _both(tmp_path, tok, write_jsonl(tmp_path / "clean.jsonl", recs), eval_split=0.5)
    assert new == old


def test_parquet_shards_prepare_as_their_jsonl(tmp_path, tok):
    """The Ray engine's output (a directory of Parquet shards, read in name order) gives what clean.jsonl gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = _records()
    train = write_jsonl(tmp_path / "clean.jsonl", recs)
    shards = tmp_path / "kept"
    shards.mkdir()
    columns = pa.array(recs).type  # every record's fields: a record without one reads back null there
    for k, start in enumerate(range(0, len(recs), 25)):
        rows = pa.array(recs[start : start + 25], type=columns)
        pq.write_table(pa.Table.from_struct_array(rows), shards / f"part-{k:05d}.parquet")
    (shards / "_SUCCESS").write_text("")  # not a shard: ignored
    assert stream.count_records(shards) == len(recs) and list(stream.iter_records(shards)) == recs
    prepare_dataset(tok, train, None, tmp_path / "from-jsonl", max_length=48, eval_split=0.2, seed=3, sources=SOURCES)
    prepare_dataset(
        tok, shards, None, tmp_path / "from-parquet", max_length=48, eval_split=0.2, seed=3, sources=SOURCES
    )
    jsonl, parquet = _prepared(tmp_path / "from-jsonl"), _prepared(tmp_path / "from-parquet")
    for name in (
        "train_records.jsonl",
        "eval_records.jsonl",
    ):  # the same records; Parquet orders a record's keys by column
        assert [json.loads(x) for x in parquet.pop(name).splitlines()] == [
            json.loads(x) for x in jsonl.pop(name).splitlines()
        ]
    assert parquet == jsonl


def test_the_comparison_can_fail(tmp_path, tok):
    """A different seed changes the split and the digest: the equality above is not vacuous."""
    train = write_jsonl(tmp_path / "clean.jsonl", _records())
    prepare_dataset(tok, train, None, tmp_path / "a", max_length=48, eval_split=0.2, seed=3)
    prepare_dataset(tok, train, None, tmp_path / "b", max_length=48, eval_split=0.2, seed=4)
    a, b = _prepared(tmp_path / "a"), _prepared(tmp_path / "b")
    assert a["features"] == b["features"] and _digest(a) != _digest(b)


def test_an_empty_directory_of_shards_says_what_to_point_at(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(InputError, match=r"kept: a directory of validated records must hold \*\.parquet shards"):
        stream.count_records(tmp_path / "kept")


@pytest.mark.parametrize("n", [0, 1, 2, 5, 10, 101, 1000])
@pytest.mark.parametrize("eval_split", [0.0, 0.05, 0.1, 0.5, 0.99])
def test_held_out_mask_is_the_in_memory_split(n, eval_split):
    records = [{"i": i} for i in range(n)]
    for seed in (0, 7):
        _, held, _ = _split(records, None, eval_split, seed)
        mask = stream.held_out_mask(n, eval_split, seed)
        assert [r["i"] for r in held] == [i for i in range(n) if mask[i]]


def test_weigher_draws_what_apply_weights_draws():
    records = [{"_source": i % 3, "i": i} for i in range(3000)]
    out, rows = apply_weights(records, SOURCES, seed=5)
    weigh = stream.Weigher(SOURCES, seed=5)
    for rec in records:
        weigh.kept(rec)
    streamed = [rec for rec in records for _ in range(weigh(rec))]
    assert streamed == out
    assert [{k: v for k, v in r.items() if k != "records"} for r in weigh.per_source()] == rows
    assert stream.Weigher(None, seed=5)(records[0]) == 1 and stream.Weigher(None, seed=5).per_source() is None


def test_training_counts_tokens_in_arrow(tmp_path, tok):
    """train_sft's mean tokens per sample come from the memory-mapped Arrow column, not Python lists."""
    from datasets import load_from_disk

    from tuneloop.train.sft import prepared_tokens

    train = write_jsonl(tmp_path / "clean.jsonl", _records())
    metrics = prepare_dataset(tok, train, None, tmp_path / "out", max_length=48, eval_split=0.2, seed=3)
    ds = load_from_disk(str(tmp_path / "out" / "train"))
    assert prepared_tokens(ds) == sum(len(x) for x in ds["input_ids"]) == metrics["train_tokens"] > 0


def test_the_ray_engines_kept_shards_read_as_its_clean_jsonl(tmp_path, tok):
    """data/ray_engine.py's <name>.clean.parquet/: ord, line, file, source, record (canonical JSON); Ray's shard names
    do not sort in input order (block 10 before block 2), so the reader orders shards by ord."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = _records(60)
    bare = [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]
    clean = write_jsonl(
        tmp_path / "clean.jsonl",
        [{**b, "_line": 2 * i + 1, "_file": f"part{i % 2}.jsonl", "_source": i % 3} for i, b in enumerate(bare)],
    )
    shards = tmp_path / "train.clean.parquet"
    shards.mkdir()
    for block, (start, stop) in zip((2, 10, 7), ((0, 25), (25, 40), (40, 60)), strict=True):
        rows = range(start, stop)
        pq.write_table(
            pa.table(
                {
                    "ord": pa.array([1000 + 3 * i for i in rows], pa.int64()),
                    "line": pa.array([2 * i + 1 for i in rows], pa.int64()),
                    "file": pa.array([f"part{i % 2}.jsonl" for i in rows]),
                    "source": pa.array([i % 3 for i in rows], pa.int32()),
                    "record": pa.array([json.dumps(bare[i]) for i in rows]),
                }
            ),
            shards / f"abc_{block}_0.parquet",
        )
    assert list(stream.iter_records(shards)) == list(stream.iter_records(clean))
    prepare_dataset(tok, clean, None, tmp_path / "from-jsonl", max_length=48, eval_split=0.2, seed=3, sources=SOURCES)
    prepare_dataset(tok, shards, None, tmp_path / "from-shards", max_length=48, eval_split=0.2, seed=3, sources=SOURCES)
    assert _prepared(tmp_path / "from-shards") == _prepared(tmp_path / "from-jsonl")

    single = tmp_path / "single.clean.parquet"  # one source: file null, source -1 -> neither _file nor _source
    single.mkdir()
    pq.write_table(
        pa.table(
            {
                "ord": [5, 3],
                "line": [1, 2],
                "file": pa.array([None, None], pa.string()),
                "source": pa.array([-1, -1], pa.int32()),
                "record": [json.dumps(bare[0]), json.dumps(bare[1])],
            }
        ),
        single / "x_0_0.parquet",
    )
    with pytest.raises(
        InputError, match=r"record 3 \(line 2\) comes after record 5: the kept shards are not in input order"
    ):
        list(stream.iter_records(single))
    pq.write_table(
        pa.table(
            {
                "ord": [3, 5],
                "line": [1, 2],
                "file": pa.array([None, None], pa.string()),
                "source": pa.array([-1, -1], pa.int32()),
                "record": [json.dumps(bare[0]), json.dumps(bare[1])],
            }
        ),
        single / "x_0_0.parquet",
    )
    assert list(stream.iter_records(single)) == [{**bare[0], "_line": 1}, {**bare[1], "_line": 2}]
