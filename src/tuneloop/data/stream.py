"""Streaming pieces of preprocessing: read the validated records without loading them whole, choose the held-out
split and apply source weights record by record, and write the prepared rows to Arrow in batches.

Entry points: :func:`iter_records` (the kept records of a validated set, one at a time), :func:`count_records`,
:func:`held_out_mask`, :func:`shuffled`, :class:`Weigher` and :class:`RowWriter`; :mod:`tuneloop.data.prepare` puts
them together for every objective (SFT's token ids, DPO's pairs, KTO's unpaired records, GRPO's prompts). Each one
makes the same choices as the in-memory preparation did (its code is kept in tests/prepare_in_memory.py): the same
seed gives the same eval records, the same copies, in the same order.

A validated set is ``clean.jsonl`` (one canonical record per line; blank lines skipped), one ``.parquet`` file, or
a directory of ``*.parquet`` shards. Two Parquet layouts are read:

* the Ray engine's kept shards (``<name>.clean.parquet/``, columns ``ord``, ``line``, ``file``, ``source`` and
  ``record``, the canonical JSON): each record is ``record`` with ``_line``, ``_file`` (when not null) and
  ``_source`` (when the source is one of a list, ``source`` >= 0) added, as in ``clean.jsonl``, in input order (``ord``; Ray's shard names do not sort in that order,
  so the shards are ordered by their first ``ord``, and a row out of order is an error);
* any other: one column per record field, the shards in file-name order; Parquet gives every row every column of
  the schema, so a null field is read as absent, as it was in the JSON record.

Memory: one batch of rows at a time, plus the split's bookkeeping: a shuffled index array (4 or 8 bytes per
record, freed after the split) and one byte per record for "held out".
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tuneloop.config import TrainSource
from tuneloop.errors import InputError

ROWS_PER_BATCH = 1_000  # tokenised samples per Arrow record batch (and Parquet rows read per batch)


def _parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a validated set: ``path`` itself, or the ``*.parquet`` files of a directory by name."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(".parquet") and p.is_file())
        if not files:
            raise InputError(
                f"{path}: a directory of validated records must hold *.parquet shards; found none. "
                "Point preprocessing at the data stage's clean.jsonl or its Parquet output directory."
            )
        return files
    return [path]


def _is_parquet(path: Path) -> bool:
    return path.is_dir() or path.name.endswith(".parquet")


def _drop_nulls(value: Any) -> Any:
    """A Parquet row as its JSON record: null fields (columns the record did not have) left out, at every depth."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


RAY_COLUMNS = ("ord", "line", "file", "source", "record")


def _is_ray_layout(files: list[Path]) -> bool:
    import pyarrow.parquet as pq

    return set(RAY_COLUMNS) <= set(pq.ParquetFile(files[0]).schema_arrow.names)


def _first_ord(file: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    first = pc.min(pq.read_table(file, columns=["ord"])["ord"]).as_py()
    return -1 if first is None else first  # an empty shard holds nothing to order


def _ray_records(files: list[Path]) -> Iterator[dict[str, Any]]:
    """The Ray engine's kept shards as clean.jsonl's records, in input order (see the module docstring)."""
    import pyarrow.parquet as pq

    last = -1
    for file in sorted(files, key=lambda f: (_first_ord(f), f.name)):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=ROWS_PER_BATCH, columns=list(RAY_COLUMNS)):
            for row in batch.to_pylist():
                if row["ord"] <= last:
                    raise InputError(
                        f"{file}: record {row['ord']} (line {row['line']}) comes after record {last}: the kept "
                        "shards are not in input order; re-run the data stage (data.engine: ray) to rewrite them"
                    )
                last = row["ord"]
                rec = json.loads(row["record"])
                rec["_line"] = row["line"]
                if row["file"] is not None:
                    rec["_file"] = row["file"]
                if row["source"] is not None and row["source"] >= 0:  # -1: not from a list of sources
                    rec["_source"] = row["source"]
                yield rec


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a validated set, in order, one at a time (see the module docstring for the layouts)."""
    path = Path(path)
    if not _is_parquet(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    import pyarrow.parquet as pq

    files = _parquet_files(path)
    if _is_ray_layout(files):
        yield from _ray_records(files)
        return
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=ROWS_PER_BATCH):
            for row in batch.to_pylist():
                yield _drop_nulls(row)


def count_records(path: Path) -> int:
    """How many records :func:`iter_records` yields (Parquet: from the files' metadata, without reading rows)."""
    path = Path(path)
    if not _is_parquet(path):
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(file).metadata.num_rows for file in _parquet_files(path))


def shuffled(n: int, seed: int | str) -> array:
    """The indexes ``0 .. n-1`` in the order ``random.Random(seed).shuffle`` puts a list of ``n`` items in.

    ``random.shuffle`` only indexes its argument, so shuffling a compact ``array`` of indexes draws exactly what
    shuffling a list does, at 4 (or 8) bytes per record instead of a list's ~36."""
    order = array("i" if n < 2**31 else "q", range(n))
    random.Random(seed).shuffle(order)
    return order


def held_out_mask(n: int, eval_split: float, seed: int) -> bytearray:
    """One byte per record, 1 where the record is held out for evaluation: the records the in-memory ``_split``
    held out of ``n`` records (a seeded shuffle of the indexes, the first ``max(1, round(n * eval_split))`` held
    out, none when that leaves nothing to train on)."""
    order = shuffled(n, seed)
    n_eval = max(1, round(n * eval_split))
    if n - n_eval < 1:
        n_eval = 0
    held = bytearray(n)
    for i in order[:n_eval]:
        held[i] = 1
    return held


def split_description(eval_split: float, seed: int) -> str:
    """The metrics' ``eval_source`` for a held-out split (as the in-memory ``_split`` worded it)."""
    return f"held out {eval_split:.0%} of train (seed {seed})"


class Weigher:
    """Source weights applied one record at a time (:func:`tuneloop.data.prepare.apply_weights` is this over a list).

    Call it on each training record in order; it returns how many times the record appears: ``floor(w)``, plus
    one with probability ``w - floor(w)`` (``w``: the weight of the record's ``_source``). Without sources every
    record appears once. :meth:`per_source` gives ``apply_weights``'s per-source rows plus ``records``
    (counted with :meth:`kept`: every record of the validated set, before the split)."""

    def __init__(self, sources: Sequence[TrainSource] | None, seed: int):
        self.sources = list(sources) if sources else None
        self.rng = random.Random(f"train_data weights:{seed}")
        n = len(self.sources or ())
        self.records, self.train_records, self.samples = [0] * n, [0] * n, [0] * n

    def kept(self, rec: dict[str, Any]) -> None:
        if self.sources:
            self.records[rec.get("_source", 0)] += 1

    def __call__(self, rec: dict[str, Any]) -> int:
        if not self.sources:
            return 1
        i = rec.get("_source", 0)
        whole, frac = divmod(self.sources[i].weight, 1.0)
        n = int(whole) + (frac > 0 and self.rng.random() < frac)
        self.train_records[i] += 1
        self.samples[i] += n
        return n

    def per_source(self) -> list[dict[str, Any]] | None:
        if not self.sources:
            return None
        return [
            {
                "path": s.label,
                "weight": s.weight,
                "records": self.records[i],
                "train_records": self.train_records[i],
                "samples": self.samples[i],
            }
            for i, s in enumerate(self.sources)
        ]


class RowWriter:
    """Rows (one value per column of ``schema``) appended in batches to an Arrow stream file, then saved as a
    ``datasets`` dataset directory (what ``datasets.load_from_disk`` and the trainers read).

    ``schema`` fixes the column types: those ``Dataset.from_dict`` / ``Dataset.from_list`` infer from the same rows
    (:mod:`tuneloop.data.prepare` names one per objective), so the saved dataset has the features the in-memory
    path's had. :meth:`save` memory-maps the stream file, lets ``datasets`` write its shards (in the order given,
    e.g. a seeded shuffle) and removes the stream file (so the rows are written twice on disk, never held in
    memory). No rows: an empty dataset with the schema's features that ``load_from_disk`` reads (the in-memory paths
    saved 0 rows as a directory without a shard that it cannot read; the stage stops on 0 training samples)."""

    def __init__(self, path: Path, schema: Any):
        import pyarrow as pa

        self.pa = pa
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.sink = pa.OSFile(str(self.path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.columns: list[list[Any]] = [[] for _ in schema.names]
        self.rows = 0
        self.closed = False

    def add(self, row: dict[str, Any]) -> None:
        for column, name in zip(self.columns, self.schema.names, strict=True):
            column.append(row[name])
        if len(self.columns[0]) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.columns[0]:
            pa = self.pa
            arrays = [
                pa.array(values, type=field.type) for values, field in zip(self.columns, self.schema, strict=True)
            ]
            self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
            self.rows += len(self.columns[0])
            self.columns = [[] for _ in self.schema.names]

    def close(self) -> None:
        if self.closed:
            return
        self._flush()
        self.closed = True
        self.writer.close()
        self.sink.close()

    def save(self, out: Path, shuffle: int | str | None = None) -> int:
        """Close the stream, write the dataset directory ``out``, remove the stream file; returns the rows. With
        ``shuffle``, the rows in the order ``random.Random(shuffle).shuffle`` puts a list of them in (:func:`shuffled`:
        4 bytes a row; ``datasets`` gathers them from the memory-mapped stream file)."""
        from datasets import Dataset

        self.close()
        if self.rows == 0:  # datasets saves 0 rows without a shard, which load_from_disk cannot read: ask for one
            from datasets import Features

            empty = Dataset.from_dict(
                {n: [] for n in self.schema.names}, features=Features.from_arrow_schema(self.schema)
            )
            empty.save_to_disk(str(out), num_shards=1)
            self.path.unlink()
            return 0
        ds = Dataset.from_file(str(self.path))
        if shuffle is not None:
            import numpy as np

            ds = ds.select(np.asarray(shuffled(self.rows, shuffle)))  # save_to_disk gathers the rows in this order
        ds.save_to_disk(str(out))
        del ds
        self.path.unlink()
        return self.rows

    def discard(self) -> None:
        """Close and remove the stream file (after an error, which the caller re-raises: a second error while
        closing, e.g. on a full disk, must not replace it)."""
        try:
            if not self.closed:
                self.closed = True
                self.writer.close()
                self.sink.close()
        except Exception:  # noqa: BLE001  (the caller's error is the one to report)
            pass
        finally:
            self.path.unlink(missing_ok=True)
