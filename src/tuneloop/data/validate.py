"""The data_validation stage: read a dataset, normalise every record, check it, quarantine the bad ones.

Entry points: :func:`validate_splits` (train and eval data of a ``data:`` config: eval first, then train
against the eval texts, then the gates and the reports; used by ``tuneloop data validate`` and the pipeline)
and :func:`validate_dataset` (one dataset). ``validate_dataset(source, out_dir, fmt=..., name=...,
checks=...)`` writes, atomically:

- ``<name>.clean.jsonl``: kept canonical records in input order, each with ``"_line": N`` (and ``"_file"``
  when the source is a directory);
- ``<name>.quarantine.jsonl``: ``{"line", "reasons", "record"}`` per removed record. ``record`` is the
  original value (or the raw line text when it could not be parsed) for records that failed a rule, and
  the canonical record for valid records removed later (duplicates, near duplicates, contamination,
  over-long, PII under ``drop``). Personal data and secrets found in it are always redacted;
- ``<name>.report.json`` and ``<name>.report.html``: counts, rule tallies, examples, PII counts and the
  digest (the dataset version).

Every input record lands in exactly one of the first two files; the report spells out the accounting::

    records = valid + invalid + duplicates + near_duplicates + contaminated + pii_dropped + overlong_dropped

(``valid`` is the number kept). Sources and readers are in :mod:`.sources`, the per-record rules (run in
``checks.num_workers`` processes, in order) in :mod:`.rules`, the data gates in :mod:`.gates`, the HTML view
in :mod:`.report`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tuneloop.config import TrainSource
from tuneloop.data.formats import FORMATS
from tuneloop.data.gates import data_gates, gate_failures
from tuneloop.data.outofcore import OutOfCore, ooc_from_config, validate_out_of_core
from tuneloop.data.passparts import (  # noqa: F401  (re-exported: validate.Checks etc. are used elsewhere)
    Checks,
    Screened,
    Similar,
    SplitReports,
    bookkeeping,
    checks_from_config,
    clean_texts,
    finish_report,
    near_dup_module,
    not_checked,
    overlong_reason,
    report_numbers,
    source_rows,
    tally_similar,
)
from tuneloop.data.report import write_report
from tuneloop.data.rules import quarantine_line, record_verdicts, token_count
from tuneloop.data.sources import open_detected, open_sources
from tuneloop.errors import InputError
from tuneloop.fsutil import atomic_lines


def _overlong(r: Any, s: Screened, quarantine: IO[str], checks: Checks, tokenizer: Any) -> bool:
    """The over-long rule on one valid record; True when the record is dropped."""
    if tokenizer is None or checks.max_length is None:
        return False
    rec = json.loads(r.data)
    n_tok, exact = token_count(tokenizer, rec, stop_after=checks.max_length)
    if n_tok <= checks.max_length:
        return False
    s.overlong_seen += 1
    reason = overlong_reason(n_tok, exact, checks)
    s.tally.add(r.line, r.file, [reason])
    if checks.overlong != "drop":
        return False
    quarantine.write(quarantine_line(r.line, r.file, [reason], rec) + "\n")
    s.counts["overlong_dropped"] += 1
    return True


def _screen(
    verdicts: Iterable[Any], s: Screened, quarantine: IO[str], stage: IO[str], checks: Checks, tokenizer: Any
) -> None:
    """One pass in input order: quarantine records that failed a rule, exact duplicates and over-long ones;
    stage the rest."""
    first_line: dict[bytes, tuple[int, str | None]] = {}  # dedup key -> (line, file) of the kept record
    for r in verdicts:
        s.records += 1
        if s.source_of is not None:
            s.per_source[s.source_of[r.file]] += 1
        if r.pii:
            s.note_pii(r)
        if r.status == "bad":
            quarantine.write(r.data + "\n")
            s.tally.add(r.line, r.file, r.reasons)
            s.counts["pii_dropped" if r.reasons[0].startswith("pii:") else "invalid"] += 1
            continue
        if r.key in first_line:
            line, file = first_line[r.key]
            reason = f"exact_duplicate: same as line {line}" + (f" of {file}" if file is not None else "")
            quarantine.write(quarantine_line(r.line, r.file, [reason], json.loads(r.data)) + "\n")
            s.tally.add(r.line, r.file, [reason])
            s.counts["duplicates"] += 1
            continue
        if _overlong(r, s, quarantine, checks, tokenizer):
            continue
        first_line[r.key] = (r.line, r.file)
        s.kept.append((r.line, r.file, bool(r.pii)))
        stage.write(r.data + "\n")
        if r.text is not None:
            s.texts.append(r.text)


def _similar(
    s: Screened, checks: Checks, near: Any, contam: Any, eval_texts: list[str] | None, labels: list[Any] | None = None
) -> Similar:
    """Dataset-level checks on the kept candidates: near duplicates within (``near``: the dedup module or None;
    with ``labels``, a kto dataset's, only among candidates of the same label: a desirable and an undesirable
    answer to one prompt may differ in a word, and both teach), contamination against the eval texts
    (``contam``: likewise)."""
    sim = Similar({}, {})
    if near is not None and len(s.texts) > 1:
        everyone = list(range(len(s.texts)))
        parts = (
            [[i for i in everyone if labels[i] == v] for v in sorted(set(labels), key=str)] if labels else [everyone]
        )
        for idx in parts:
            found = (
                near.near_duplicate_groups(
                    [s.texts[i] for i in idx], threshold=checks.near_dup_threshold, shingle_size=checks.near_dup_shingle
                )
                if len(idx) > 1
                else []
            )
            sim.near_groups += len(found)
            for group in found:
                head = s.kept[idx[group[0]]]
                for j in group[1:]:
                    sim.removed[idx[j]] = f"near_duplicate: similar to line {head[0]}" + (
                        f" of {head[1]}" if head[1] else ""
                    )
    if contam is not None and s.texts:
        sim.contamination = contam.contaminated_indices(
            s.texts, eval_texts, ngram=checks.contamination_ngram, threshold=checks.contamination_threshold
        )
    tally_similar(s.tally, sim, checks, lambda i: s.kept[i][:2])
    return sim


def _write_kept(
    s: Screened, sim: Similar, stage_path: Path, clean: IO[str], quarantine: IO[str], checks: Checks
) -> tuple[int, int, str]:
    """Move the staged candidates to the clean file (or, when dropped by a similarity check, the quarantine);
    return (kept, kept with PII unredacted, digest of the kept records)."""
    digest = hashlib.sha256(b"[")  # streams sha256_json(list of kept records)
    valid = pii_kept = 0
    with open(stage_path, encoding="utf-8") as staged:
        for i, data in enumerate(staged):
            data = data.rstrip("\n")
            line, file, has_pii = s.kept[i]
            if i in sim.drop:
                near = i in sim.removed and checks.near_dup_action == "drop"
                s.counts["near_duplicates" if near else "contaminated"] += 1
                overlap = (
                    f"contaminated: {sim.contamination[i]:.0%} n-gram overlap with the eval data"
                    if i in sim.contamination
                    else None
                )
                why = [x for x in (sim.removed.get(i), overlap) if x]
                quarantine.write(quarantine_line(line, file, why, json.loads(data)) + "\n")
                continue
            digest.update((b"," if valid else b"") + data.encode())
            valid += 1
            if s.source_of is not None and file is not None:  # from a list of sources every record has its file
                s.kept_per_source[s.source_of[file]] += 1
            pii_kept += has_pii and checks.pii == "report"
            clean.write(data[:-1] + bookkeeping(line, file, s.source_of) + "}\n")
    digest.update(b"]")
    return valid, pii_kept, digest.hexdigest()


def _open(
    path: str | os.PathLike[str] | Sequence[TrainSource], fmt: str, s: Screened
) -> tuple[Iterator[Any], str, str]:
    """(items, position kind, format); a list of sources also sets ``s.source_of``."""
    if not isinstance(path, (list, tuple)):
        # open_detected is annotated str | Path (it reads any os.PathLike through open_source)
        return open_detected(Path(path) if isinstance(path, os.PathLike) else path, fmt)
    opened = open_sources(path, fmt)
    s.source_of = opened.source_of
    return opened.items, opened.position, opened.format


def validate_dataset(
    path: str | os.PathLike[str] | Sequence[TrainSource],
    out_dir: Path,
    *,
    fmt: str = "auto",
    name: str = "train",
    checks: Checks | None = None,
    tokenizer: Any = None,
    eval_texts: list[str] | None = None,
    ooc: OutOfCore | None = None,
) -> dict:
    """Validate and normalise the dataset at ``path``; write clean, quarantine and report files to ``out_dir``.

    ``ooc`` (default ``OutOfCore()``): the out-of-core pass of :mod:`.outofcore` (input streamed in chunks,
    per-record state in files under a spill directory; memory does not grow with the records' text);
    ``OutOfCore(enabled=False)`` runs the in-memory pass below instead. Both write the same files (tested).

    ``path`` may be a list of sources (``data.train_data``): their records are checked as one dataset
    (duplicates and near duplicates across sources too), named in messages by each source as written; clean
    records carry ``_source`` (the source's index) and the report ``sources`` (per-source counts).

    ``fmt`` is a name from ``formats.FORMATS`` or ``"auto"`` (detected from the first 100 object records).
    ``tokenizer`` enables the over-long rule (``checks.max_length``); ``eval_texts`` (see
    :func:`clean_texts`) enables the contamination check. Returns the report dict (also written to
    ``<name>.report.json``, with an HTML view in ``<name>.report.html``). Raises ``InputError`` for problems
    with the source as a whole (missing, unsupported type, empty, a ``.json`` file that is not valid JSON,
    undetectable format); problems with single records go to the quarantine instead.
    """
    checks = checks or Checks()
    out_dir = Path(out_dir)
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; use 'auto' or one of: {', '.join(FORMATS)}")
    if checks.pii not in ("report", "redact", "drop"):
        raise InputError(f"unknown PII policy {checks.pii!r}; use report, redact or drop")
    ooc = ooc or OutOfCore()
    s = Screened()
    items, position, fmt = _open(path, fmt, s)
    if ooc.enabled:
        return validate_out_of_core(
            path,
            items,
            position,
            fmt,
            s,
            out_dir,
            name=name,
            checks=checks,
            tokenizer=tokenizer,
            eval_texts=eval_texts,
            ooc=ooc,
        )
    dedup = near_dup_module()
    near = dedup if checks.near_dup_threshold is not None else None
    contam = dedup if eval_texts is not None else None
    unchecked = not_checked(checks, tokenizer, dedup, eval_texts)
    clean_path, quarantine_path = out_dir / f"{name}.clean.jsonl", out_dir / f"{name}.quarantine.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_fd, stage_name = tempfile.mkstemp(prefix=f".{name}.stage.", suffix=".tmp", dir=out_dir)
    stage_path = Path(stage_name)
    try:
        # Quarantine text may hold lone surrogates (from "\udXXX" escapes); backslashreplace writes them
        # back as the same JSON escape, so the line stays valid JSON.
        with atomic_lines(clean_path) as clean, atomic_lines(quarantine_path, "backslashreplace") as quarantine:
            with os.fdopen(stage_fd, "w", encoding="utf-8", newline="\n") as stage:
                verdicts = record_verdicts(
                    items,
                    fmt,
                    pii_policy=checks.pii,
                    num_workers=checks.num_workers,
                    want_text=near is not None or contam is not None,
                )
                _screen(verdicts, s, quarantine, stage, checks, tokenizer)
            labels = (
                [json.loads(line).get("label") for line in stage_path.read_text(encoding="utf-8").splitlines()]
                if fmt == "kto" and near is not None
                else None
            )
            sim = _similar(s, checks, near, contam, eval_texts, labels)
            s.texts = []
            valid, pii_kept, digest = _write_kept(s, sim, stage_path, clean, quarantine, checks)
    finally:
        stage_path.unlink(missing_ok=True)
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


# --- train and eval splits ------------------------------------------------------------------------


@dataclass
class DataVerdict:
    """The gates on each split: reports with ``gates`` (``Gate.to_dict()`` lists) and ``passed``, and the
    readable failures (train first)."""

    reports: dict[str, dict[str, Any]]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def check_splits(data: Any, out_dir: Path, *, tokenizer: Any = None, train_name: str = "train") -> SplitReports:
    """Validate the eval data (when given) and then the train data against the eval texts (contamination).

    ``data`` is a ``DataConfig``. Writes ``eval.*`` and ``<train_name>.*`` into ``out_dir`` (``eval.train.*``
    when ``train_name`` is ``eval`` too). This is the cacheable part: the gates (:func:`gate_splits`) read only
    the reports.
    """
    if getattr(data, "engine", "local") == "ray":  # data.engine: ray (tuneloop.data.ray_engine), same answers
        from tuneloop.data.ray_engine import check_splits_ray

        return check_splits_ray(data, out_dir, tokenizer=tokenizer, train_name=train_name)
    checks, ooc = checks_from_config(data), ooc_from_config(data)
    if data.eval_data and train_name == "eval":  # the eval split's files must not be overwritten
        train_name = "eval.train"
    ev, eval_texts = None, None
    if data.eval_data:
        ev = validate_dataset(
            data.eval_data, out_dir, fmt=data.format, name="eval", checks=checks, tokenizer=tokenizer, ooc=ooc
        )
        eval_texts = clean_texts(Path(ev["clean_path"]))
    tr = validate_dataset(
        data.train_data,
        out_dir,
        fmt=data.format,
        name=train_name,
        checks=checks,
        tokenizer=tokenizer,
        eval_texts=eval_texts,
        ooc=ooc,
    )
    return SplitReports(tr, ev)


def gate_splits(checked: SplitReports, data: Any, *, report_dir: Path | None = None) -> DataVerdict:
    """Apply the data gates of ``data`` to each split; with ``report_dir``, write each report there (same
    file name) with its gates and verdict, JSON and HTML. Failures name that copy of the report."""
    reports: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for split, rep in checked.items():
        gates = [g.to_dict() for g in data_gates(rep, data, split=split)]
        rep = {**rep, "gates": gates, "passed": all(g["passed"] for g in gates)}
        if report_dir is not None:
            json_path = Path(report_dir) / Path(rep["report_path"]).name
            html_path = Path(report_dir) / Path(rep["html_path"]).name
            rep = {**rep, "report_path": str(json_path), "html_path": str(html_path)}
            write_report(rep, json_path, html_path, gates=gates, split=split)
        if rep["records"] == 0:
            key = "data.train_data" if split == "train" else "data.eval_data"
            failures.append(f"{key}: {rep['path']} contains no records")
        else:
            failures += gate_failures(rep, data, split=split)
        reports[split] = rep
    return DataVerdict(reports, failures)


def validate_splits(data: Any, out_dir: Path, *, tokenizer: Any = None, train_name: str = "train") -> DataVerdict:
    """Check the splits of ``data`` (:func:`check_splits`), then gate them and write the reports with their
    verdicts next to the clean and quarantine files (:func:`gate_splits`)."""
    return gate_splits(
        check_splits(data, out_dir, tokenizer=tokenizer, train_name=train_name), data, report_dir=out_dir
    )
