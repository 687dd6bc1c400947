"""Export the request log and its feedback as datasets: SFT records, DPO pairs and KTO records with provenance.

Entry point: ``export_feedback(log, out_dir, since=..., eval_texts=...)``. It reads the requests logged
since ``since`` and every piece of feedback on them, and writes, atomically, to ``out_dir``:

- ``sft.jsonl``: ``{"messages": [...prompt..., {"role": "assistant", ...}], "id", "meta"}`` from answers
  rated good (rating +1 or score >= ``good_score``) and from corrections (the corrected text is the
  assistant turn);
- ``dpo.jsonl``: ``{"messages": [...prompt, ends with user...], "chosen": [assistant], "rejected":
  [assistant], "id", "meta"}`` from a correction (chosen) against the original answer (rejected), and from
  two rated answers to the same prompt -- one good, one bad -- given by different versions or arms;
- ``kto.jsonl``: ``{"messages": [...prompt..., {"role": "assistant", ...}], "label": bool, "id", "meta"}``, one
  per rated answer, no pair needed: a thumbs up (rating +1, or a score >= ``good_score``, 0.5 by default) is
  desirable (``label: true``), a thumbs down (rating -1, or a score below ``good_score``) undesirable
  (``label: false``); a corrected answer gives two records, the correction (true) and the answer it
  corrects (false). An answer rated both ways is skipped (``conflict``), as for the other files;
- ``manifest.json``: sha256 digest and record count of every file, what was kept and dropped and why;
- optionally (``regression_share > 0``) a held-out share of the corrected failures, appended to a
  regression eval suite (``eval_regression.jsonl``, a task suite in messages format). Held-out prompts are
  kept out of both training files.

The files are ordinary tuneloop datasets (``messages``, ``preference`` and ``kto`` formats; the extra ``id`` and
``meta`` keys are ignored by the reader), so ``tuneloop data validate`` and training (``train.objective`` sft,
dpo, kto) read them as they are.
Every record's ``meta`` carries its provenance: ``origin``, ``request_ids``, ``feedback_ids``, ``versions``
(refs such as ``support-bot:3``), ``arms``, ``artifacts`` and ``created_at`` of the newest request.

Checks, in this order, each drop counted under its rule code in the manifest:

1. personal data and secrets are redacted (``tuneloop.data.pii``) in every text (the log redacts on write
   too; this repeats it for logs written by other tools);
2. the record must normalise as its format (``invalid``), and must not repeat an earlier kept record
   (``exact_duplicate``: same texts, whitespace collapsed);
3. ``contaminated``: a record that overlaps the evaluation set is kept out, so production data never leaks
   into the gates. Overlap is the share of its word 8-grams found in ``eval_texts`` (of the whole record,
   or of its prompt alone); a prompt shorter than the n-gram counts when, normalised, it equals a line of
   an eval text or (4 words or more) occurs inside one;
4. ``near_duplicate``: MinHash near duplicates of a kept record (``near_dup_threshold``); in ``kto.jsonl`` only
   among records of the same label (a good and a bad answer to one prompt differ in a word or two, and both
   teach).

An exact duplicate is the same texts (prompt and answer); in ``kto.jsonl`` that holds whatever the label, so
an answer rated good in one request and bad in another is kept once, with its newest rating.

Records are considered in a fixed priority order -- corrections first, then the newest -- so among
duplicates the most trustworthy record is the one kept. They are written corrections first, each class in
content order (not request order), so the same feedback gives the same file however the requests were timed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from tuneloop.data import dedup, pii
from tuneloop.data.formats import normalise
from tuneloop.errors import InputError
from tuneloop.fsutil import atomic_write_json, atomic_write_text, read_jsonl, sha256_file

__all__ = [
    "ExportResult",
    "RequestLogReader",
    "eval_texts_for_config",
    "eval_texts_from_file",
    "export_feedback",
    "parse_since",
]

MANIFEST_FORMAT = "tuneloop.feedback-export/1"
_ID_BATCH = 500  # request ids per feedback query
_SHORT_MATCH_WORDS = 4  # a short prompt found inside an eval text counts from this many words
_PRIORITY = {
    "correction": 0,
    "correction_vs_original": 0,
    "corrected_original": 0,
    "cross_answer": 1,
    "rated_good": 1,
    "rated_bad": 1,
}


class RequestLogReader(Protocol):
    """What export reads from ``tuneloop.monitor.requestlog.RequestLog`` (``open_request_log(url)``)."""

    def requests(self, *, since: float | None = None, model: str | None = None, limit: int | None = None) -> list: ...

    def feedback(self, *, since: float | None = None, request_ids: list[str] | None = None) -> list: ...


@dataclass
class ExportResult:
    """What ``export_feedback`` wrote (paths), how many records, and the manifest it wrote."""

    out_dir: Path
    sft_path: Path
    dpo_path: Path
    manifest_path: Path
    regression_path: Path | None
    sft_records: int
    dpo_records: int
    regression_added: int
    manifest: dict[str, Any] = field(repr=False)
    kto_path: Path | None = None
    kto_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "sft": str(self.sft_path),
            "dpo": str(self.dpo_path),
            "kto": str(self.kto_path) if self.kto_path else None,
            "manifest": str(self.manifest_path),
            "regression": str(self.regression_path) if self.regression_path else None,
            "sft_records": self.sft_records,
            "dpo_records": self.dpo_records,
            "kto_records": self.kto_records,
            "regression_added": self.regression_added,
            "counts": self.manifest["counts"],
        }


@dataclass
class _Answer:
    """One logged answer with its feedback folded into a verdict."""

    request: Any
    messages: list[dict[str, Any]]  # the prompt, redacted
    key: str  # the prompt, whitespace collapsed: answers with the same key answer the same prompt
    response: str  # redacted
    verdict: str  # good | bad | corrected | conflict | unrated
    correction: str | None
    feedback_ids: list[str]

    def corrected_text(self) -> str:
        """The correction of a ``corrected`` answer (that verdict always has one: :func:`_verdict`)."""
        if self.correction is None:
            raise ValueError(f"an answer with verdict {self.verdict!r} has no correction")
        return self.correction


@dataclass
class _Candidate:
    """An output record before the checks."""

    kind: str  # sft | dpo | kto
    origin: str  # rated_good | correction | correction_vs_original | cross_answer | rated_bad | corrected_original
    record: dict[str, Any]
    answers: list[_Answer]

    def sort_key(self) -> tuple:
        newest = max(a.request.created_at for a in self.answers)
        return (_PRIORITY[self.origin], -newest, self.answers[0].request.request_id)


# --- reading the log ----------------------------------------------------------------------------


def _feedback_by_request(log: RequestLogReader, request_ids: list[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for i in range(0, len(request_ids), _ID_BATCH):
        for fb in log.feedback(request_ids=request_ids[i : i + _ID_BATCH]):
            out[fb.request_id].append(fb)
    return out


def _prompt_messages(prompt: str) -> list[dict[str, Any]]:
    """A logged prompt as messages: chat requests log the JSON messages list; completions the prompt text."""
    text = prompt.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return [
                {**m, "content": _content_text(m["content"])} if isinstance(m.get("content"), list) else m
                for m in value
            ]
    return [{"role": "user", "content": prompt}]


def _content_text(parts: list[Any]) -> str:
    """OpenAI content parts (``[{"type": "text", "text": ...}, ...]``) -> their text, joined by newlines."""
    return "\n".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


def _verdict(feedback: list[Any], good_score: float, response: str) -> tuple[str, str | None]:
    """(verdict, latest correction) from every piece of feedback on one answer."""
    good = any(f.rating == 1 or (f.score is not None and f.score >= good_score) for f in feedback)
    bad = any(f.rating == -1 or (f.score is not None and f.score < good_score) for f in feedback)
    corrections = sorted((f for f in feedback if f.correction and f.correction.strip()), key=lambda f: f.created_at)
    correction = corrections[-1].correction if corrections else None
    if correction is not None and _collapse(correction) != _collapse(response):
        return "corrected", correction
    if correction is not None:  # "corrected" to the same text: an endorsement
        good = True
    if good and bad:
        return "conflict", None
    return ("good" if good else "bad" if bad else "unrated"), None


def _collapse(text: str) -> str:
    return " ".join(text.split())


class _Redactor:
    """Redacts texts (when on) and counts the texts that held personal data or a secret."""

    def __init__(self, on: bool):
        self.on, self.redacted = on, 0

    def __call__(self, text: str) -> str:
        if not self.on or not text:
            return text
        out = pii.redact(text)
        self.redacted += out != text
        return out

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {**m, "content": self(m["content"])} if isinstance(m.get("content"), str) else dict(m) for m in messages
        ]


def _answers(
    requests: list[Any], feedback: dict[str, list[Any]], good_score: float, redactor: _Redactor
) -> tuple[list[_Answer], Counter]:
    answers: list[_Answer] = []
    skipped: Counter[str] = Counter()
    for req in requests:
        fbs = feedback.get(req.request_id, [])
        if not fbs:
            skipped["no_feedback"] += 1
            continue
        response = redactor(req.response or "") if req.status < 400 else ""
        verdict, correction = _verdict(fbs, good_score, response)
        if verdict in ("conflict", "unrated"):
            skipped[verdict] += 1
            continue
        if verdict != "corrected" and not response.strip():
            skipped["no_answer"] += 1  # rated, but the request failed or the answer was empty
            continue
        messages = redactor.messages(_prompt_messages(req.prompt))
        key = json.dumps([[m.get("role"), _collapse(str(m.get("content") or ""))] for m in messages])
        ids = [f.feedback_id for f in sorted(fbs, key=lambda f: f.created_at)]
        answers.append(
            _Answer(req, messages, key, response, verdict, redactor(correction) if correction else None, ids)
        )
    return answers, skipped


# --- candidates ---------------------------------------------------------------------------------


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _candidates(answers: list[_Answer], held_out: set[str]) -> list[_Candidate]:
    out: list[_Candidate] = []
    by_prompt: dict[str, list[_Answer]] = defaultdict(list)
    for a in answers:
        if a.key in held_out:
            continue
        if a.verdict == "good" and a.response.strip():
            out.append(_Candidate("sft", "rated_good", {"messages": a.messages + _assistant(a.response)}, [a]))
        if a.verdict in ("good", "bad") and a.response.strip():  # a thumbs up or down alone is a KTO record
            record = {"messages": a.messages + _assistant(a.response), "label": a.verdict == "good"}
            out.append(_Candidate("kto", "rated_" + a.verdict, record, [a]))
        if a.verdict == "corrected":
            out.append(_Candidate("sft", "correction", {"messages": a.messages + _assistant(a.corrected_text())}, [a]))
            out.append(
                _Candidate(
                    "kto", "correction", {"messages": a.messages + _assistant(a.corrected_text()), "label": True}, [a]
                )
            )
            if a.response.strip():
                pair = {
                    "messages": a.messages,
                    "chosen": _assistant(a.corrected_text()),
                    "rejected": _assistant(a.response),
                }
                out.append(_Candidate("dpo", "correction_vs_original", pair, [a]))
                out.append(
                    _Candidate(
                        "kto",
                        "corrected_original",
                        {"messages": a.messages + _assistant(a.response), "label": False},
                        [a],
                    )
                )
        if a.verdict in ("good", "bad") and a.response.strip():
            by_prompt[a.key].append(a)
    for group in by_prompt.values():
        out += _cross_pairs(group)
    return out


def _cross_pairs(group: list[_Answer]) -> list[_Candidate]:
    """Good vs bad answers to one prompt from different (version, arm); each answer used at most once."""
    goods = [a for a in group if a.verdict == "good"]
    bads = [a for a in group if a.verdict == "bad"]
    pairs, used = [], set()
    for g in goods:
        for j, b in enumerate(bads):
            same_source = (g.request.version, g.request.arm) == (b.request.version, b.request.arm)
            if j in used or same_source or _collapse(g.response) == _collapse(b.response):
                continue
            used.add(j)
            record = {"messages": g.messages, "chosen": _assistant(g.response), "rejected": _assistant(b.response)}
            pairs.append(_Candidate("dpo", "cross_answer", record, [g, b]))
            break
    return pairs


def _provenance(c: _Candidate) -> dict[str, Any]:
    reqs = [a.request for a in c.answers]
    return {
        "source": "feedback",
        "origin": c.origin,
        "request_ids": [r.request_id for r in reqs],
        "feedback_ids": [fid for a in c.answers for fid in a.feedback_ids],
        "versions": [f"{r.model}:{r.version}" if r.version is not None else r.model for r in reqs],
        "arms": [r.arm for r in reqs],
        "artifacts": [r.artifact_sha256 for r in reqs],
        "created_at": max(r.created_at for r in reqs),
    }


# --- checks -------------------------------------------------------------------------------------


def _texts(record: dict[str, Any]) -> tuple[str, str]:
    """(everything but system prompts, the user turns) of a canonical record."""
    turns = [m for m in record["messages"] if m["role"] != "system"]
    answers = [m["content"] for key in ("chosen", "rejected") for m in record.get(key, ())]
    prompt = "\n".join(m["content"] for m in turns if m["role"] == "user")
    return "\n".join([m["content"] for m in turns] + answers), prompt


def _exact_key(record: dict[str, Any]) -> str:
    parts = [
        [k, [[m["role"], _collapse(m["content"])] for m in record.get(k, ())]]
        for k in ("messages", "chosen", "rejected")
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass
class _EvalIndex:
    """The evaluation texts, as the contamination check reads them."""

    texts: list[str]
    lines: set[str]
    joined: str
    ngram: int
    threshold: float

    @classmethod
    def build(cls, texts: list[str], ngram: int, threshold: float) -> _EvalIndex:
        norm = [dedup.normalise_text(t) for t in texts]
        lines = {dedup.normalise_text(line) for t in texts for line in t.splitlines()} - {""}
        return cls(texts, lines, " \n " + " \n ".join(norm) + " \n ", ngram, threshold)

    def contaminated(self, full: list[str], prompts: list[str]) -> set[int]:
        if not full or not self.texts:
            return set()
        hit = set(dedup.contaminated_indices(full, self.texts, ngram=self.ngram, threshold=self.threshold, workers=1))
        hit |= set(
            dedup.contaminated_indices(prompts, self.texts, ngram=self.ngram, threshold=self.threshold, workers=1)
        )
        for i, prompt in enumerate(prompts):
            p = dedup.normalise_text(prompt)
            words = len(p.split())
            if 0 < words < self.ngram and (
                p in self.lines or (words >= _SHORT_MATCH_WORDS and f" {p} " in self.joined)
            ):
                hit.add(i)
        return hit


def _select(
    cands: list[_Candidate], fmt: str, evals: _EvalIndex | None, near_dup: float | None
) -> tuple[list[dict], Counter]:
    """The records that pass the checks (corrections first, each class in content order, with ``id`` and
    ``meta``), and the drops. Among duplicates the first in priority order (corrections, then the newest) is kept."""
    drops: Counter = Counter()
    kept: list[tuple[_Candidate, dict]] = []
    seen: set[str] = set()
    for c in sorted(cands, key=_Candidate.sort_key):
        record, reasons = normalise(c.record, fmt)
        if record is None:
            drops["invalid"] += 1
            continue
        key = _exact_key(record)
        if key in seen:
            drops["exact_duplicate"] += 1
            continue
        seen.add(key)
        kept.append((c, record))
    texts = [_texts(r) for _, r in kept]
    if evals is not None:
        bad = evals.contaminated([t[0] for t in texts], [t[1] for t in texts])
        drops["contaminated"] += len(bad)
        kept = [k for i, k in enumerate(kept) if i not in bad]
        texts = [t for i, t in enumerate(texts) if i not in bad]
    if near_dup is not None and len(kept) > 1:
        later: set[int] = set()
        for label in sorted({r.get("label") for _, r in kept}, key=str):  # kto: within each label only
            idx = [i for i, (_, r) in enumerate(kept) if r.get("label") == label]
            groups = (
                dedup.near_duplicate_groups([texts[i][0] for i in idx], threshold=near_dup, workers=1)
                if len(idx) > 1
                else []
            )
            later |= {idx[j] for group in groups for j in sorted(group)[1:]}
        drops["near_duplicate"] += len(later)
        kept = [k for i, k in enumerate(kept) if i not in later]
    # Written in content order within each priority class, not in request order: the same feedback gives the
    # same file whatever the timing of the requests, so a run that trains on it is reproducible.
    out = []
    for c, record in sorted(kept, key=lambda k: (_PRIORITY[k[0].origin], _exact_key(k[1]))):
        rid = "fb-" + _exact_key(record)[:16]
        out.append({**record, "id": rid, "meta": _provenance(c)})
    return out, +drops


# --- regression suite ---------------------------------------------------------------------------


def _held_out(answers: list[_Answer], share: float) -> set[str]:
    """Prompt keys of the corrected failures held out for the regression suite (a deterministic share)."""
    if share <= 0:
        return set()
    keys = sorted({a.key for a in answers if a.verdict == "corrected"})
    return {k for k in keys if int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share}


def _append_regression(path: Path, answers: list[_Answer], held: set[str], evals: _EvalIndex | None) -> int:
    """Append one task item per held-out prompt (its newest correction) unless the suite already has it or
    it overlaps the evaluation set already."""
    existing: set[str] = set()
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    for rec in read_jsonl(path, "a regression suite") if old else []:
        msgs = rec.get("messages", [])[:-1]
        existing.add(json.dumps([[m.get("role"), _collapse(str(m.get("content") or ""))] for m in msgs]))
    newest: dict[str, _Answer] = {}
    for a in answers:
        if (
            a.key in held
            and a.verdict == "corrected"
            and (a.key not in newest or a.request.created_at > newest[a.key].request.created_at)
        ):
            newest[a.key] = a
    items = []
    for key in sorted(newest, key=lambda k: newest[k].request.created_at):
        a = newest[key]
        record, _ = normalise({"messages": a.messages + _assistant(a.corrected_text())}, "messages")
        if key not in existing and record is not None:
            items.append(
                {
                    "id": f"feedback-{a.request.request_id}",
                    **record,
                    "meta": _provenance(_Candidate("sft", "correction", {}, [a])),
                }
            )
    if evals is not None and items:
        texts = [_texts(item) for item in items]
        overlap = evals.contaminated([t[0] for t in texts], [t[1] for t in texts])
        items = [item for i, item in enumerate(items) if i not in overlap]
    lines = [json.dumps(item, ensure_ascii=False) + "\n" for item in items]
    if lines:
        atomic_write_text(path, old + ("" if not old or old.endswith("\n") else "\n") + "".join(lines))
    return len(lines)


# --- entry point --------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: Iterable[dict]) -> dict[str, Any]:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    atomic_write_text(path, "".join(lines))
    return {"sha256": sha256_file(path), "records": len(lines), "bytes": path.stat().st_size}


def export_feedback(
    log: RequestLogReader,
    out_dir: str | Path,
    *,
    since: float | None = None,
    model: str | None = None,
    eval_texts: list[str] | None = None,
    redact: bool = True,
    near_dup_threshold: float | None = 0.85,
    good_score: float = 0.5,
    contamination_ngram: int = 8,
    contamination_threshold: float = 0.5,
    regression_share: float = 0.0,
    regression_path: str | Path | None = None,
) -> ExportResult:
    """Turn the requests logged since ``since`` (of ``model``, or all) and their feedback into ``sft.jsonl``,
    ``dpo.jsonl``, ``kto.jsonl`` and ``manifest.json`` in ``out_dir`` (see the module docstring). ``eval_texts``: the
    evaluation items (see :func:`eval_texts_from_file`); ``None`` skips the contamination check, and the
    manifest says so. ``regression_share`` of the corrected failures go to ``regression_path`` (default
    ``out_dir/eval_regression.jsonl``) instead of the training files."""
    if not 0 <= regression_share <= 1:
        raise InputError(f"regression_share must be between 0 and 1, got {regression_share}")
    out_dir = Path(out_dir)
    redactor = _Redactor(redact)
    requests = log.requests(since=since, model=model)
    feedback = _feedback_by_request(log, [r.request_id for r in requests])
    answers, skipped = _answers(requests, feedback, good_score, redactor)
    held = _held_out(answers, regression_share)
    cands = _candidates(answers, held)
    evals = (
        _EvalIndex.build(eval_texts, contamination_ngram, contamination_threshold) if eval_texts is not None else None
    )
    sft, sft_drops = _select([c for c in cands if c.kind == "sft"], "messages", evals, near_dup_threshold)
    dpo, dpo_drops = _select([c for c in cands if c.kind == "dpo"], "preference", evals, near_dup_threshold)
    kto, kto_drops = _select([c for c in cands if c.kind == "kto"], "kto", evals, near_dup_threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "sft.jsonl": _write_jsonl(out_dir / "sft.jsonl", sft),
        "dpo.jsonl": _write_jsonl(out_dir / "dpo.jsonl", dpo),
        "kto.jsonl": _write_jsonl(out_dir / "kto.jsonl", kto),
    }
    reg_path = Path(regression_path) if regression_path else out_dir / "eval_regression.jsonl"
    added = _append_regression(reg_path, answers, held, evals) if held else 0
    if added:
        files[reg_path.name] = {
            "sha256": sha256_file(reg_path),
            "records": sum(1 for line in reg_path.open(encoding="utf-8") if line.strip()),
            "bytes": reg_path.stat().st_size,
            "path": str(reg_path),
            "appended": added,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": time.time(),
        "since": since,
        "model": model,
        "source": {
            "requests": len(requests),
            "feedback": sum(len(v) for v in feedback.values()),
            "answers_used": len(answers),
            "skipped_requests": dict(skipped),
        },
        "pii": {"redact": redact, "redacted_texts": redactor.redacted},
        "checks": _checks_summary(evals, near_dup_threshold, good_score),
        "files": files,
        "counts": {
            "sft": _counts([c for c in cands if c.kind == "sft"], len(sft), sft_drops),
            "dpo": _counts([c for c in cands if c.kind == "dpo"], len(dpo), dpo_drops),
            "kto": {
                **_counts([c for c in cands if c.kind == "kto"], len(kto), kto_drops),
                "desirable": sum(r["label"] for r in kto),
                "undesirable": sum(not r["label"] for r in kto),
            },
            "regression": {"held_out_prompts": len(held), "appended": added},
        },
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return ExportResult(
        out_dir,
        out_dir / "sft.jsonl",
        out_dir / "dpo.jsonl",
        out_dir / "manifest.json",
        reg_path if added else None,
        len(sft),
        len(dpo),
        added,
        manifest,
        out_dir / "kto.jsonl",
        len(kto),
    )


def _counts(cands: list[_Candidate], kept: int, drops: Counter) -> dict[str, Any]:
    return {
        "candidates": len(cands),
        "kept": kept,
        "dropped": dict(drops),
        "by_origin": dict(Counter(c.origin for c in cands)),
    }


def _checks_summary(evals: _EvalIndex | None, near_dup: float | None, good_score: float) -> dict[str, Any]:
    contamination: dict[str, Any] = (
        {"eval_texts": len(evals.texts), "ngram": evals.ngram, "threshold": evals.threshold}
        if evals is not None
        else {"not_checked": "no evaluation texts given"}
    )
    return {"good_score": good_score, "near_dup_threshold": near_dup, "contamination": contamination}


def eval_texts_from_file(path: str | Path) -> list[str]:
    """The texts of an evaluation dataset or task suite (any format ``tuneloop data validate`` reads), one
    per item: every turn but system prompts, joined by newlines (what the contamination check compares)."""
    from tuneloop.data.sources import parsed_records

    out = []
    for value, record in parsed_records(path):
        if record is not None:
            out.append(record["text"] if "text" in record and "messages" not in record else _texts(record)[0])
        elif isinstance(value, dict):  # e.g. a task item whose answer is a `reference`, not an assistant turn
            text = _loose_text(value)
            if text:
                out.append(text)
    return out


def eval_texts_for_config(cfg: Any) -> list[str]:
    """Every evaluation item a pipeline config gates on: ``data.eval_data`` and the files of its ``task``
    suites. Without ``data.eval_data`` the eval items are a split of ``data.train_data``, so that file is
    the evaluation set to keep out."""
    sources = [cfg.data.eval_data or cfg.data.train_data]
    sources += [s.path for s in cfg.eval.suites if s.kind == "task" and s.path]
    return [text for source in sources for text in eval_texts_from_file(source)]


def _loose_text(item: dict[str, Any]) -> str:
    """The non-system texts of an eval item that is not a valid training record."""
    parts = [m.get("content") for m in item.get("messages") or [] if isinstance(m, dict) and m.get("role") != "system"]
    parts += [item.get(k) for k in ("prompt", "question", "instruction", "input", "reference", "answer", "output")]
    return "\n".join(p for p in parts if isinstance(p, str) and p.strip())


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None, *, now: float | None = None) -> float | None:
    """``--since`` as unix seconds: a duration back from now (``90m``, ``24h``, ``7d``, ``2w``), an ISO 8601
    time (``2026-11-30`` or ``2026-11-30T12:00:00Z``; UTC when it has no offset) or unix seconds."""
    if text is None or not str(text).strip():
        return None
    value = str(text).strip()
    now = time.time() if now is None else now
    match = _RELATIVE.match(value.lower())
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"--since {value!r} is not a time: use a duration back from now (90m, 24h, 7d), an ISO time "
            "(2026-11-30T12:00:00Z) or unix seconds"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
