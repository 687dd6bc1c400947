"""The data pass's shared pieces, below both engines of one dataset: the in-memory pass
(:mod:`.validate`) and the out-of-core pass (:mod:`.outofcore`); the Ray engine can use them too.

Entry points: :class:`Checks` (what is checked), :func:`checks_from_config`, :func:`clean_texts`,
:class:`SplitReports`; and the private pieces each engine composes the same way so that their outputs are
identical: :class:`Screened` / :class:`Similar` (what a pass found), :func:`not_checked`,
:func:`overlong_reason`, :func:`tally_similar`, :func:`bookkeeping` (a clean record's ``_line``,
``_file``, ``_source``), :func:`report_numbers` (the report's numbers) and :func:`source_rows`.
:mod:`.validate` re-exports all of them under their old names.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.data.rules import MAX_EXAMPLES, RuleTally, similarity_text


@dataclass
class Checks:
    """What ``validate_dataset`` checks beyond the format rules (defaults match ``DataConfig``)."""

    pii: str = "report"  # report | redact | drop
    max_length: int | None = None  # tokens; checked only when a tokenizer is given
    overlong: str = "truncate"  # truncate | drop
    near_dup_threshold: float | None = 0.85
    near_dup_shingle: int = 5
    near_dup_action: str = "drop"  # report | drop
    contamination_ngram: int = 8
    contamination_threshold: float = 0.5
    contamination_action: str = "drop"  # report | drop
    num_workers: int = 2


def checks_from_config(data_cfg: Any) -> Checks:
    """``Checks`` from a ``DataConfig`` (or any object with the same attribute names)."""
    names = Checks.__dataclass_fields__
    return Checks(**{k: getattr(data_cfg, k) for k in names if hasattr(data_cfg, k)})


def near_dup_module():
    try:
        from tuneloop.data import dedup
    except ImportError:
        return None
    return dedup


@dataclass
class Screened:
    """What the streaming pass over the records found; kept candidates are staged on disk, in input order."""

    records: int = 0
    counts: Counter = field(
        default_factory=lambda: Counter(
            invalid=0, duplicates=0, near_duplicates=0, contaminated=0, pii_dropped=0, overlong_dropped=0
        )
    )
    tally: RuleTally = field(default_factory=RuleTally)
    pii_counts: Counter = field(default_factory=Counter)
    pii_examples: dict[str, list[dict]] = field(default_factory=dict)
    pii_records: int = 0
    overlong_seen: int = 0
    kept: list[tuple[int, str | None, bool]] = field(default_factory=list)  # (line, file, has_pii) of kept candidates
    texts: list[str] = field(default_factory=list)  # their similarity texts (when a similarity check is on)
    source_of: dict[str, int] | None = None  # a list of sources: file name -> source index (see sources.open_sources)
    per_source: Counter = field(default_factory=Counter)  # a list of sources: records read per source index
    kept_per_source: Counter = field(default_factory=Counter)  # ... and kept

    def note_pii(self, r: Any) -> None:
        self.pii_records += 1
        for kind, masked in r.pii:
            self.pii_counts[kind] += 1
            shown = self.pii_examples.setdefault(kind, [])
            if len(shown) < MAX_EXAMPLES:
                shown.append({"line": r.line, **({"file": r.file} if r.file else {}), "masked": masked})


@dataclass
class Similar:
    """Near duplicates (index -> reason) and contamination (index -> overlap) among the kept candidates."""

    removed: dict[int, str]
    contamination: dict[int, float]
    near_groups: int = 0
    near_n: int = 0
    contam_n: int = 0
    drop: set[int] = field(default_factory=set)


def not_checked(checks: Checks, tokenizer: Any, dedup: Any, eval_texts: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if tokenizer is None or checks.max_length is None:
        out["overlong"] = "no tokenizer given (validate from a pipeline config with a base model to count tokens)"
    if checks.near_dup_threshold is None:
        out["near_duplicate"] = "disabled (data.near_dup_threshold is null)"
    elif dedup is None:
        out["near_duplicate"] = "tuneloop.data.dedup is not available"
    if eval_texts is None:
        out["contaminated"] = "no evaluation data given"
    return out


def overlong_reason(n_tok: int, exact: bool, checks: Checks) -> str:
    verb = "dropped" if checks.overlong == "drop" else "will be truncated"
    more = "" if exact else "; counting stopped there"
    return f"overlong: {'' if exact else 'over '}{n_tok} tokens > data.max_length {checks.max_length} ({verb}{more})"


def tally_similar(tally: RuleTally, sim: Similar, checks: Checks, where: Any) -> None:
    """The similarity checks' reasons in the rule tally, in candidate order (``where(i)``: (line, file) of
    candidate ``i``); counts ``near_n``/``contam_n`` and fills ``sim.drop``."""
    for i in sorted(set(sim.removed) | set(sim.contamination)):
        line, file = where(i)
        reasons = []
        if i in sim.removed:
            sim.near_n += 1
            reasons.append(sim.removed[i] + ("" if checks.near_dup_action == "drop" else " (reported, kept)"))
        if i in sim.contamination:
            sim.contam_n += 1
            reasons.append(
                f"contaminated: {sim.contamination[i]:.0%} of its {checks.contamination_ngram}-grams occur in the eval data"
                + ("" if checks.contamination_action == "drop" else " (reported, kept)")
            )
        tally.add(line, file, reasons)
    if checks.near_dup_action == "drop":
        sim.drop |= set(sim.removed)
    if checks.contamination_action == "drop":
        sim.drop |= set(sim.contamination)


def bookkeeping(line: int, file: str | None, source_of: dict[str, int] | None) -> str:
    """The JSON members a clean record carries after its own: ``_line``, ``_file`` and, from a list of
    sources, ``_source`` (the index of its source in ``data.train_data``)."""
    extra = f',"_line":{line}' + (f',"_file":{json.dumps(file)}' if file is not None else "")
    return extra + (f',"_source":{source_of[file]}' if source_of is not None and file is not None else "")


def report_numbers(
    s: Screened, sim: Similar, valid: int, pii_kept: int, checks: Checks, not_checked: dict[str, str]
) -> dict[str, Any]:
    """The counts part of the report (the caller adds the source, format, digest and paths)."""
    records, counts = s.records, s.counts
    return {
        "records": records,
        "valid": valid,
        **{
            k: counts[k]
            for k in ("invalid", "duplicates", "near_duplicates", "contaminated", "pii_dropped", "overlong_dropped")
        },
        "accounting": (
            f"records {records} = valid {valid} + invalid {counts['invalid']} + duplicates {counts['duplicates']}"
            f" + near_duplicates {counts['near_duplicates']} + contaminated {counts['contaminated']}"
            f" + pii_dropped {counts['pii_dropped']} + overlong_dropped {counts['overlong_dropped']}"
        ),
        "valid_ratio": (records - counts["invalid"]) / records if records else 0.0,
        "duplicate_ratio": (counts["duplicates"] + sim.near_n) / records if records else 0.0,
        "contamination_ratio": sim.contam_n / records if records else 0.0,
        "near_duplicate_found": sim.near_n,
        "near_duplicate_groups": sim.near_groups,
        "contaminated_found": sim.contam_n,
        "overlong": {"max_length": checks.max_length, "policy": checks.overlong, "records": s.overlong_seen}
        if "overlong" not in not_checked
        else None,
        "pii": dict(sorted(s.pii_counts.items())),
        "pii_records": s.pii_records,
        "pii_records_kept": pii_kept,
        "pii_policy": checks.pii,
        "pii_examples": s.pii_examples,
        "rules": dict(s.tally.rules.most_common()),
        "rules_not_checked": not_checked,
        "examples": s.tally.examples,
        "checks": asdict(checks),
    }


def source_rows(path: Any, s: Screened) -> dict[str, Any]:
    """The report's ``path`` (a list of sources: their names joined by `` + ``) and, for a list, ``sources``:
    per source its name, records read and records kept (not its weight: that is preprocessing's, and a
    weight change re-uses this report)."""
    if not isinstance(path, (list, tuple)):
        return {"path": str(path)}
    rows = [
        {"path": src.label, "records": s.per_source[i], "valid": s.kept_per_source[i]} for i, src in enumerate(path)
    ]
    return {"path": " + ".join(src.label for src in path), "sources": rows}


def clean_texts(clean_path: Path) -> list[str]:
    """The texts of the records in a clean file, as the similarity checks read them (for ``eval_texts``)."""
    out = []
    with open(clean_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(similarity_text(json.loads(line)))
    return out


@dataclass
class SplitReports:
    """The checked splits of one ``data:`` config: ``train`` and, with eval data, ``eval`` (report dicts)."""

    train: dict[str, Any]
    eval: dict[str, Any] | None = None

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        return [("train", self.train)] + ([("eval", self.eval)] if self.eval is not None else [])


def finish_report(
    path: Any,
    s: Screened,
    sim: Similar,
    valid: int,
    pii_kept: int,
    checks: Checks,
    not_checked: dict[str, str],
    *,
    fmt: str,
    position: str,
    digest: str,
    out_dir: Path,
    name: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dataset's report (the same keys whichever engine ran the pass), written as ``<name>.report.json`` and
    ``.html`` in ``out_dir``; returned. Every record must be kept or quarantined exactly once."""
    from tuneloop.data.report import write_report

    accounted = valid + sum(s.counts.values())
    assert accounted == s.records, (accounted, s.records)  # every record is kept or quarantined exactly once
    report = {
        **source_rows(path, s),
        "format": fmt,
        "position": position,
        **report_numbers(s, sim, valid, pii_kept, checks, not_checked),
        "digest": digest,
        "clean_path": str(out_dir / f"{name}.clean.jsonl"),
        "quarantine_path": str(out_dir / f"{name}.quarantine.jsonl"),
        "report_path": str(out_dir / f"{name}.report.json"),
        "html_path": str(out_dir / f"{name}.report.html"),
        **(extra or {}),
    }
    write_report(report, out_dir / f"{name}.report.json", out_dir / f"{name}.report.html")
    return report
