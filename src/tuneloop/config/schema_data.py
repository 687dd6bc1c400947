"""The ``data:`` section: :class:`DataConfig`, and :class:`TrainSource`, one item of a ``data.train_data`` list.

Field descriptions are the configuration reference (docs/configuration.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tuneloop.config.schema_base import ItemProblem, Section

MAX_SOURCE_WEIGHT = 100.0


class TrainSource(Section):
    """One item of a `data.train_data` list: a dataset and how much it counts in training."""

    path: str = Field(min_length=1, description="A dataset file, directory or name, as a single `train_data` is.")
    weight: float = Field(
        1.0,
        gt=0.0,
        le=MAX_SOURCE_WEIGHT,
        allow_inf_nan=False,
        description="Each training record of this source is used `floor(weight)` times, plus once more with probability "
        "`weight - floor(weight)` (seeded by `seed`): `3` triples the source, `0.5` keeps a seeded half of it. "
        "Applied in preprocessing, after the eval split. A record found in two sources is kept once, from the first "
        "(an exact or near duplicate), with that source's weight. More than 0, at most 100.",
    )
    # The path as the config wrote it (set when relative paths are resolved): the source's name in messages and
    # in cache keys, so that a moved project keeps them. Not part of the schema.
    _written: str | None = None

    @property
    def label(self) -> str:
        """The source's name in quarantine lines, problem messages and reports: its path as written."""
        return self._written or self.path


class DataConfig(Section):
    """Where the data comes from and how it is checked and prepared."""

    train_data: str | list[TrainSource] = Field(
        description="Training data: a .json (array), .jsonl, .parquet or .csv file (.json/.jsonl also gzip- or zstd-compressed: "
        "`.jsonl.gz`, `.jsonl.zst`; zstd needs `pip install 'tuneloop[zstd]'`), a directory of them, a dataset saved "
        "with `datasets.save_to_disk`, or a Hugging Face dataset name (`name` or `name:split`, read offline from the local cache), "
        "or an object-store URL: an object (`s3://bucket/train.jsonl`) or a prefix read as a directory (`s3://bucket/sft/`), "
        "streamed on both engines (`pip install 'tuneloop[s3]'`; credentials and endpoint from the standard AWS environment, "
        "`AWS_ENDPOINT_URL` for a non-AWS store such as MinIO; `gs://` with gcsfs). "
        "Or a list of such sources, each a path or `{path, weight}`, e.g. `[data/train.jsonl, {path: feedback/sft.jsonl, weight: 3}]`: "
        "their records are validated together (duplicates are found across sources) and each source's training records "
        "are repeated or sampled by its weight (see `data.train_data[]`). All sources must have the same record format. Required."
    )
    eval_data: str | None = Field(
        None,
        description="Evaluation data in the same formats. When absent, `eval_split` of the training data is held out.",
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "preference", "kto", "text"] = Field(
        "auto", description="Record format; `auto` detects it from the keys of the records."
    )
    min_usable_records: int | None = Field(
        1,
        ge=0,
        le=10**12,
        description="Data gate: the data_validation stage fails when fewer records than this are left after every check "
        "(in the training data, and in `eval_data` when given), with an account of the removed ones, e.g. `32 records: "
        "24 exact duplicates, 8 contaminated by eval; 0 left for training`. The default 1 only stops a run with nothing "
        "left to train on (small smoke-test datasets still pass); raise it to the least your run needs. `null` disables it.",
    )
    min_valid_ratio: float | None = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Data gate: the data_validation stage fails when fewer records than this ratio pass the format rules.",
    )
    max_duplicate_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Data gate: fail when (exact + near) duplicates exceed this share of the records. `null` disables it.",
    )
    max_contamination: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Data gate: fail when more than this share of training records overlap the eval data. `null` disables it.",
    )
    max_pii_records: int | None = Field(
        None,
        ge=0,
        le=10**12,
        description="Data gate: fail when more kept records than this still hold personal data or secrets "
        "(with `pii: redact` or `drop` none do). `null` disables it.",
    )
    pii: Literal["report", "redact", "drop"] = Field(
        "report",
        description="Personal data and secrets (emails, phones, cards, IPs, IBANs, access keys, tokens, private keys): "
        "`report` counts them, `redact` replaces them with `[EMAIL]` etc., `drop` quarantines the record.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Samples longer than `max_length` tokens: `truncate` keeps them (cut in preprocessing), `drop` quarantines them.",
    )
    near_dup_threshold: float | None = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Near-duplicate detection (MinHash LSH): estimated Jaccard similarity of word shingles at which two records "
        "are near duplicates. `null` disables it.",
    )
    near_dup_shingle: int = Field(5, ge=1, le=64, description="Words per shingle for near-duplicate detection.")
    near_dup_action: Literal["report", "drop"] = Field(
        "drop",
        description="Near duplicates: `drop` quarantines all but the first of each group; `report` only counts them.",
    )
    contamination_ngram: int = Field(
        8, ge=1, le=64, description="Words per n-gram for the train-vs-eval contamination check."
    )
    contamination_threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="A training record is contaminated when at least this share of its n-grams occur in the eval data.",
    )
    contamination_action: Literal["report", "drop"] = Field(
        "drop", description="Contaminated training records: `drop` quarantines them; `report` only counts them."
    )
    num_workers: int = Field(
        2, ge=1, le=256, description="Processes for the per-record validation work (parsing, rules, PII)."
    )
    chunk_records: int = Field(
        4096,
        ge=1,
        le=10**7,
        description="The local (out-of-core) data pass: records per chunk that a worker checks and hashes at once; "
        "memory grows with it, results do not depend on it.",
    )
    spill_dir: str | None = Field(
        None,
        description="Where the local (out-of-core) data pass keeps per-record state while it runs (a copy of the records "
        "plus about 700 bytes each: 13 GB for 10 M chat records of 5.9 GB; removed at the end). `null`: a hidden directory "
        "next to the stage's outputs, in the workspace.",
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where the data checks run: `local` (this machine) or `ray` (Ray Data jobs on the cluster at `ray_address`, "
        "else `RAY_ADDRESS`; same checks, same kept records, digest and report; `pip install 'tuneloop[ray]'`).",
    )
    ray_address: str | None = Field(
        None,
        description="With `engine: ray`: the Ray cluster's head, e.g. `127.0.0.1:6379` (after `ray start --head`); "
        "`null` reads `RAY_ADDRESS`. An unreachable address is an error before any work.",
    )
    eval_split: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Fraction of the training data held out for evaluation when `eval_data` is absent.",
    )
    max_length: int = Field(
        512,
        ge=16,
        le=2**20,
        description="Maximum tokens per training sample; longer samples are truncated or dropped (see `overlong`).",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template to use instead of the tokenizer's own. When neither exists a ChatML template is used.",
    )

    @field_validator("train_data", mode="before")
    @classmethod
    def _source_list(cls, v: Any) -> Any:
        """A list's plain strings become ``{path: ...}``; an empty list or a path given twice is refused."""
        if not isinstance(v, (list, tuple)):
            return v
        if not v:
            raise ItemProblem("", "an empty list; give at least one source (a path, or {path: ..., weight: ...})")
        items = [{"path": x} if isinstance(x, str) else x for x in v]
        seen: set[str] = set()
        for i, x in enumerate(items):
            p = x.path if isinstance(x, TrainSource) else x.get("path") if isinstance(x, dict) else None
            if isinstance(p, str) and p in seen:
                raise ItemProblem(
                    f"[{i}]", f"{p!r} is listed twice; list each source once (its `weight` counts it more)"
                )
            if isinstance(p, str):
                seen.add(p)
        return items

    @property
    def train_sources(self) -> list[TrainSource]:
        """``train_data`` as a list of sources: a single path is one source of weight 1."""
        if isinstance(self.train_data, str):
            return [TrainSource(path=self.train_data)]
        return list(self.train_data)
