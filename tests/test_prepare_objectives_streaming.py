"""The streaming preparation of the TRL objectives (tuneloop.data.prepare: prepare_preferences for DPO and the other
pair objectives and the reward model, prepare_kto, prepare_prompts for GRPO) gives exactly what the in-memory code
gave (tests/prepare_in_memory.py, the code as it was at e04d4c5): the same rows in the same order (KTO's seeded
shuffle included), the same dataset features, the same held-out eval records, the same weighted copies,
byte-identical record, item, dropped and metrics files; from clean.jsonl and from Parquet shards; with batches small
enough that every file is written in many pieces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from prepare_in_memory import prepare_kto_in_memory, prepare_preferences_in_memory, prepare_prompts_in_memory
from tuneloop.config import TrainSource
from tuneloop.data import stream
from tuneloop.data.prepare import prepare_kto, prepare_preferences, prepare_prompts

FILES = ("train_records.jsonl", "eval_records.jsonl", "eval.jsonl", "dropped.jsonl", "metrics.json")
SOURCES = [
    TrainSource(path="a.jsonl"),
    TrainSource(path="b.jsonl", weight=2.5),
    TrainSource(path="c.jsonl", weight=0.5),
]


def _prompt(i: int) -> list[dict]:
    if i % 4 == 0:  # a system prompt, non-ASCII, a tool_call flag that TRL does not know (dropped by _plain)
        return [
            {"role": "system", "content": "Réponds brièvement."},
            {"role": "user", "content": f"où est le colis {i} ?"},
            {"role": "assistant", "content": "je vérifie", "tool_call": True},
            {"role": "user", "content": "merci 谢谢"},
        ]
    return [{"role": "user", "content": f"question {i} about parcel {i * 13} " * (1 + i % 3)}]


def _pairs(n: int = 90) -> list[dict]:
    """Canonical preference records (data/formats.py) with _line and _source as validation writes them."""
    return [
        {
            "messages": _prompt(i),
            "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad answer {i} " * (i % 3)}],
            "_line": i + 1,
            "_source": i % 3,
        }
        for i in range(n)
    ]


def _unpaired(n: int = 90) -> list[dict]:
    """Canonical kto records, two desirable for one undesirable."""
    return [
        {
            "messages": [*_prompt(i), {"role": "assistant", "content": ["shipping", "billing", "returns"][i % 3]}],
            "label": i % 3 != 1,
            "_line": i + 1,
            "_source": i % 3,
        }
        for i in range(n)
    ]


def _conversations(n: int = 90) -> list[dict]:
    """Records of every kind GRPO treats differently: text (dropped), kto false (dropped), no final assistant turn
    (dropped), a prompt over max_length (dropped), multi-turn, single-turn."""
    recs = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            rec: dict = {"text": f"plain text {i}"}
        elif kind == 1:
            rec = {"messages": [*_prompt(i), {"role": "assistant", "content": "no"}], "label": False}
        elif kind == 2:
            rec = {"messages": [{"role": "user", "content": f"hello {i}"}]}
        elif kind == 3:
            rec = {
                "messages": [{"role": "user", "content": "long question " * 40}, {"role": "assistant", "content": "x"}]
            }
        else:
            rec = {"messages": [*_prompt(i), {"role": "assistant", "content": f"answer {i}"}]}
        recs.append({**rec, "_line": i + 1, "_source": i % 3})
    return recs


@pytest.fixture(scope="module")
def tok(tiny_model):
    from tuneloop.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(stream, "ROWS_PER_BATCH", 7)  # many Arrow batches and Parquet reads


def _prepared(out: Path) -> dict:
    """Everything preparation hands on: the dataset's rows (in order) and features, each file's bytes."""
    from datasets import load_from_disk

    ds = load_from_disk(str(out / "train"))
    return {
        "rows": ds.to_list(),
        "features": ds.features.to_dict(),
        **{name: (out / name).read_bytes() for name in FILES},
    }


def _digest(prepared: dict) -> str:
    return hashlib.sha256(
        json.dumps({k: v.decode() if isinstance(v, bytes) else v for k, v in prepared.items()}, sort_keys=True).encode()
    ).hexdigest()


def _run(objective: str, tok, train: Path, eval_path: Path | None, out: Path, *, in_memory: bool, **kw) -> dict:
    kw = {"eval_split": 0.2, "seed": 3, **kw}
    if objective == "dpo":
        fn = prepare_preferences_in_memory if in_memory else prepare_preferences
        return fn(train, eval_path, out, objective="orpo", **kw)
    if objective == "kto":
        fn = prepare_kto_in_memory if in_memory else prepare_kto
        return fn(train, eval_path, out, **kw)
    fn = prepare_prompts_in_memory if in_memory else prepare_prompts
    return fn(tok, train, eval_path, out, max_length=96, **kw)


def _both(tmp_path: Path, objective: str, tok, train: Path, eval_path: Path | None = None, **kw) -> tuple[dict, dict]:
    old = _run(objective, tok, train, eval_path, tmp_path / "old", in_memory=True, **kw)
    new = _run(objective, tok, train, eval_path, tmp_path / "new", in_memory=False, **kw)
    assert new == old
    assert not (tmp_path / "new" / ".train.arrow").exists()
    return _prepared(tmp_path / "old"), _prepared(tmp_path / "new")


RECORDS = {"dpo": _pairs, "kto": _unpaired, "grpo": _conversations}


@pytest.mark.parametrize("sources", [None, SOURCES], ids=["one-source", "weighted-sources"])
@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_streaming_equals_in_memory_with_a_held_out_split(tmp_path, tok, objective, sources):
    train = write_jsonl(tmp_path / "clean.jsonl", RECORDS[objective]())
    old, new = _both(tmp_path, objective, tok, train, sources=sources)
    assert new == old and _digest(new) == _digest(old)
    metrics = json.loads(new["metrics.json"])
    assert metrics["train_samples"] > 20 and metrics["eval_samples"] > 0
    if objective == "grpo":
        assert metrics["dropped"] > 0  # every drop reason ran
        reasons = {json.loads(x)["reason"].split(" ")[0] for x in new["dropped.jsonl"].splitlines()}
        assert reasons == {"kto", "a", "no", "prompt"}
    if objective == "kto":
        assert metrics["desirable"] > 0 and metrics["undesirable"] > 0
    if sources:
        assert [r["samples"] for r in metrics["sources"]] != [r["train_records"] for r in metrics["sources"]]


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_streaming_equals_in_memory_with_given_eval_data(tmp_path, tok, objective):
    recs = RECORDS[objective](60)
    train = write_jsonl(tmp_path / "clean.jsonl", recs[:45])
    ev = write_jsonl(tmp_path / "eval.clean.jsonl", recs[45:])
    old, new = _both(tmp_path, objective, tok, train, ev, sources=SOURCES, seed=11)
    assert new == old and json.loads(new["metrics.json"])["eval_source"] == "given"


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_tiny_sets_split_as_before(tmp_path, tok, objective, n):
    train = write_jsonl(tmp_path / "clean.jsonl", RECORDS[objective](n))
    old, new = _both(tmp_path, objective, tok, train, eval_split=0.5)
    assert new == old


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_no_training_rows_is_a_readable_empty_dataset(tmp_path, tok, objective):
    """An empty training set (eval data given): no training rows. The in-memory path saved it as a dataset
    directory without a shard, which load_from_disk cannot read; the streamed one is empty with the objective's features (the stage
    stops on 0 samples either way). Every file is still the in-memory path's."""
    from datasets import load_from_disk

    train = write_jsonl(tmp_path / "clean.jsonl", [])
    ev = write_jsonl(tmp_path / "eval.jsonl", RECORDS[objective](12)[4:6])
    old = _run(objective, tok, train, ev, tmp_path / "old", in_memory=True)
    new = _run(objective, tok, train, ev, tmp_path / "new", in_memory=False)
    assert new == old and new["train_samples"] == 0 and new["eval_samples"] > 0
    assert all((tmp_path / "new" / f).read_bytes() == (tmp_path / "old" / f).read_bytes() for f in FILES)
    _run(
        objective,
        tok,
        write_jsonl(tmp_path / "all.jsonl", RECORDS[objective](12)),
        None,
        tmp_path / "full",
        in_memory=False,
    )
    empty = load_from_disk(str(tmp_path / "new" / "train"))
    assert empty.num_rows == 0 and empty.features == load_from_disk(str(tmp_path / "full" / "train")).features


def test_kto_rows_are_shuffled_as_before(tmp_path, tok):
    """TRL's KTO reads rows in order, so the seeded shuffle matters: it is the in-memory one, and a different seed
    gives another order (the comparison can fail)."""
    train = write_jsonl(tmp_path / "clean.jsonl", _unpaired())
    _, new = _both(tmp_path, "kto", tok, train, sources=SOURCES)
    prepare_kto(train, None, tmp_path / "seed4", eval_split=0.2, seed=4, sources=SOURCES)
    other = _prepared(tmp_path / "seed4")
    assert other["features"] == new["features"] and _digest(other) != _digest(new)
    unshuffled = [json.loads(x) for x in new["train_records.jsonl"].splitlines()]
    assert [r["prompt"] + r["completion"] for r in new["rows"]] != [
        [{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in unshuffled
    ]


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_parquet_shards_prepare_as_their_jsonl(tmp_path, tok, objective):
    """The Ray engine's layout (ord, line, file, source, record; shard names not in input order) gives what
    clean.jsonl gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = RECORDS[objective](60)
    train = write_jsonl(tmp_path / "clean.jsonl", recs)
    shards = tmp_path / "train.clean.parquet"
    shards.mkdir()
    for block, (start, stop) in zip((2, 10, 7), ((0, 25), (25, 40), (40, 60)), strict=True):
        rows = range(start, stop)
        pq.write_table(
            pa.table(
                {
                    "ord": pa.array(list(rows), pa.int64()),
                    "line": pa.array([recs[i]["_line"] for i in rows], pa.int64()),
                    "file": pa.array([None] * len(rows), pa.string()),
                    "source": pa.array([recs[i]["_source"] for i in rows], pa.int32()),
                    "record": pa.array(
                        [json.dumps({k: v for k, v in recs[i].items() if not k.startswith("_")}) for i in rows]
                    ),
                }
            ),
            shards / f"abc_{block}_0.parquet",
        )
    for name, path in (("jsonl", train), ("parquet", shards)):
        _run(objective, tok, path, None, tmp_path / name, in_memory=False, sources=SOURCES)
    assert _prepared(tmp_path / "parquet") == _prepared(tmp_path / "jsonl")


def test_a_failure_leaves_no_stream_file_and_no_dataset(tmp_path, tok, monkeypatch):
    """An error while preparing (here: writing a row) removes the Arrow stream file and renames no output into place."""
    train = write_jsonl(tmp_path / "clean.jsonl", _pairs())

    def broken(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream.RowWriter, "add", broken)
    with pytest.raises(OSError, match="No space left"):
        prepare_preferences(train, None, tmp_path / "out", eval_split=0.2, seed=3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
