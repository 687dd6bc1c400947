"""The in-memory preparation this project used before streaming: ``prepare_dataset`` and its helpers as they were at
commit 94d5dfe (src/tuneloop/data/prepare.py), and ``prepare_preferences``, ``prepare_kto``, ``prepare_prompts`` and
``_write_prepared`` as they were at commit e04d4c5, copied verbatim but for the functions' names (``_in_memory``
added) and ``read_records(train_path)`` written out as ``list(iter_records(train_path))`` (what it was). The pure
per-record helpers (``trl_preference``, ``trl_unpaired``, ``prompt_record``, ``_plain``) are imported from the product.

It is kept as the reference that the streaming preparation (:mod:`tuneloop.data.prepare`) must equal
(tests/test_prepare_streaming.py, tests/test_prepare_objectives_streaming.py: same rows, same order, same split,
same files) and as the baseline whose memory benchmarks/prepare_scale.py measures beside the streaming path's. Not
used by the product.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneloop.config import TrainSource
from tuneloop.data.formats import sft_messages
from tuneloop.data.prepare import (
    IGNORE_INDEX,
    _plain,
    prompt_record,
    tokenize_conversation,
    trl_preference,
    trl_unpaired,
)
from tuneloop.data.rules import encode_prefix
from tuneloop.data.stream import iter_records
from tuneloop.fsutil import atomic_write_json, atomic_write_text


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Canonical records of one split as JSONL (without tuneloop's bookkeeping fields)."""
    text = "".join(
        json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n" for r in records
    )
    atomic_write_text(path, text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split(
    records: list[dict[str, Any]], eval_path: Path | None, eval_split: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train, eval, how the eval records were chosen): ``eval_path``'s records, or a seeded ``eval_split``
    share of ``records`` (at least one, when that leaves one to train on)."""
    if eval_path is not None:
        return records, read_jsonl(eval_path), "given"
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_split))
    if len(order) - n_eval < 1:
        n_eval = 0
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held], f"held out {eval_split:.0%} of train (seed {seed})"


def apply_weights(
    records: list[dict[str, Any]], sources: Sequence[TrainSource] | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The training records with each source's weight applied, and per-source counts (``None`` without a
    list of sources).

    A record of a source of weight ``w`` (its ``_source`` index into ``sources``) appears ``floor(w)`` times,
    plus once more with probability ``w - floor(w)``, drawn from a generator seeded by ``seed``: the same
    data and seed give the same set. Copies stay next to each other (the trainer shuffles)."""
    if not sources:
        return records, None
    rng = random.Random(f"train_data weights:{seed}")
    rows = [{"path": s.label, "weight": s.weight, "train_records": 0, "samples": 0} for s in sources]
    out: list[dict[str, Any]] = []
    for rec in records:
        i = rec.get("_source", 0)
        whole, frac = divmod(sources[i].weight, 1.0)
        n = int(whole) + (frac > 0 and rng.random() < frac)
        rows[i]["train_records"] += 1
        rows[i]["samples"] += n
        out += [rec] * n
    return out, rows


def _kept_per_source(records: list[dict[str, Any]], rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Per-source rows with ``records``: records each source kept after validation (before the eval split)."""
    if rows is None:
        return None
    counts = [0] * len(rows)
    for rec in records:
        counts[rec.get("_source", 0)] += 1
    return [
        {
            "path": r["path"],
            "weight": r["weight"],
            "records": n,
            "train_records": r["train_records"],
            "samples": r["samples"],
        }
        for r, n in zip(rows, counts, strict=True)
    ]


def _eval_items(eval_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluation items (prompt + reference) from the records that end with an assistant turn; a kto record
    labelled false is no reference and makes none."""
    items = []
    for i, rec in enumerate(eval_records):
        msgs = sft_messages(rec)
        if not msgs or msgs[-1]["role"] != "assistant" or rec.get("label") is False:
            continue
        items.append(
            {"id": f"eval-{i}", "line": rec.get("_line"), "messages": msgs[:-1], "reference": msgs[-1]["content"]}
        )
    return items


def prepare_dataset_in_memory(
    tok,
    train_path: Path,
    eval_path: Path | None,
    out_dir: Path,
    *,
    max_length: int,
    eval_split: float,
    seed: int,
    train_on_inputs: bool = False,
    sources: Sequence[TrainSource] | None = None,
) -> dict[str, Any]:
    """Tokenize the training records and write the evaluation items. Returns the stage metrics.

    With ``sources`` (``data.train_data`` as a list; the clean records carry ``_source``) the training records
    are weighted by :func:`apply_weights` after the eval split, so no copy of an eval record is trained on;
    the metrics then have ``sources``: per source its ``records`` after validation, ``train_records`` after
    the split and ``samples`` after weighting (before tokenization drops any)."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()

    out_dir = Path(out_dir)
    clean = read_jsonl(train_path)
    train_records, eval_records, split = _split(clean, eval_path, eval_split, seed)
    train_records, per_source = apply_weights(train_records, sources, seed)

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    dropped, truncated, tokens, target_tokens = [], 0, 0, 0
    for rec in train_records:
        messages = sft_messages(rec)
        if messages is None:  # a text record: every token is trained on
            ids, _ = encode_prefix(tok, rec["text"], max_length)
            ex = {"input_ids": ids[:max_length], "labels": ids[:max_length], "truncated": len(ids) > max_length}
        elif rec.get("label") is False:
            dropped.append(
                {
                    "line": rec.get("_line"),
                    "reason": "kto label false: supervised fine-tuning does not train on undesirable answers",
                }
            )
            continue
        else:
            ex = tokenize_conversation(tok, messages, max_length=max_length, train_on_inputs=train_on_inputs)
        n_target = sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
        if n_target == 0:
            dropped.append(
                {"line": rec.get("_line"), "reason": f"no answer tokens left within max_length={max_length}"}
            )
            continue
        truncated += ex["truncated"]
        tokens += len(ex["input_ids"])
        target_tokens += n_target
        rows["input_ids"].append(ex["input_ids"])
        rows["labels"].append(ex["labels"])

    Dataset.from_dict(rows).save_to_disk(str(out_dir / "train"))
    _write_records(out_dir / "train_records.jsonl", train_records)  # for external trainers (train.backend: command)
    _write_records(out_dir / "eval_records.jsonl", eval_records)
    items = _eval_items(eval_records)
    atomic_write_text(out_dir / "eval.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    atomic_write_text(out_dir / "dropped.jsonl", "".join(json.dumps(x) + "\n" for x in dropped))
    n = len(rows["input_ids"])
    metrics = {
        "train_samples": n,
        "eval_samples": len(items),
        "eval_source": split,
        "dropped": len(dropped),
        "truncated": truncated,
        "train_tokens": tokens,
        "target_tokens": target_tokens,
        "mean_tokens": round(tokens / n, 1) if n else 0.0,
        "max_length": max_length,
    }
    if per_source is not None:
        metrics["sources"] = _kept_per_source(clean, per_source)
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def prepare_preferences_in_memory(
    train_path: Path,
    eval_path: Path | None,
    out_dir: Path,
    *,
    eval_split: float,
    seed: int,
    sources: Sequence[TrainSource] | None = None,
    objective: str = "dpo",
) -> dict[str, Any]:
    """The preprocessing stage for preference objectives (``objective``: dpo, orpo, simpo, ...; named in the
    metrics): a ``datasets`` dataset of prompt/chosen/rejected conversations
    (TRL tokenizes it with the chat template) and evaluation items whose reference is the chosen answer.
    ``sources`` weights the training pairs as in :func:`prepare_dataset`."""
    import datasets

    datasets.disable_progress_bars()
    out_dir = Path(out_dir)
    clean = list(iter_records(train_path))
    train_records, eval_records, split = _split(clean, eval_path, eval_split, seed)
    train_records, per_source = apply_weights(train_records, sources, seed)
    rows = [trl_preference(r) for r in train_records]
    items = [
        {
            "id": f"eval-{i}",
            "line": r.get("_line"),
            "messages": _plain(r["messages"]),
            "reference": r["chosen"][-1]["content"],
        }
        for i, r in enumerate(eval_records)
    ]
    metrics = {
        "objective": objective,
        "train_samples": len(rows),
        "eval_samples": len(items),
        "eval_source": split,
        "dropped": 0,
        "eval_reference": "chosen answer",
    }
    return _write_prepared(
        out_dir, rows, train_records, eval_records, items, metrics, clean=clean, per_source=per_source
    )


def prepare_kto_in_memory(
    train_path: Path,
    eval_path: Path | None,
    out_dir: Path,
    *,
    eval_split: float,
    seed: int,
    sources: Sequence[TrainSource] | None = None,
) -> dict[str, Any]:
    """The preprocessing stage for KTO: a ``datasets`` dataset of prompt/completion/label conversations (TRL
    tokenizes it with the chat template), in a seeded shuffled order, and evaluation items whose reference is a
    desirable answer, so the task suites gate a KTO run as they gate SFT. Without ``eval_path`` the held-out
    share is drawn from the desirable records only (an undesirable answer makes no evaluation item), so every
    undesirable answer trains. ``sources`` weights the training records as in :func:`prepare_dataset`."""
    import datasets

    datasets.disable_progress_bars()
    clean = list(iter_records(train_path))
    if eval_path is None:
        kept, eval_records, split = _split([r for r in clean if r["label"]], None, eval_split, seed)
        kept_ids = {id(r) for r in kept}
        train_records = [r for r in clean if not r["label"] or id(r) in kept_ids]
        split = split.replace("of train", "of the desirable train records")
    else:
        train_records, eval_records, split = _split(clean, eval_path, eval_split, seed)
    train_records, per_source = apply_weights(train_records, sources, seed)
    rows = [trl_unpaired(r) for r in train_records]
    random.Random(f"kto order:{seed}").shuffle(rows)
    items = _eval_items(eval_records)
    desirable = sum(1 for r in rows if r["label"])
    metrics = {
        "objective": "kto",
        "train_samples": len(rows),
        "desirable": desirable,
        "undesirable": len(rows) - desirable,
        "eval_samples": len(items),
        "eval_source": split,
        "dropped": 0,
        "eval_reference": "desirable answer",
    }
    return _write_prepared(
        Path(out_dir), rows, train_records, eval_records, items, metrics, clean=clean, per_source=per_source
    )


def _write_prepared(
    out_dir: Path,
    rows: list[dict[str, Any]],
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]],
    items: list[dict[str, Any]],
    metrics: dict[str, Any],
    *,
    clean: list[dict[str, Any]],
    per_source: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """Write what a TRL objective's preprocessing stage hands on: ``train/`` (a ``datasets`` dataset of ``rows``),
    the canonical train and eval records, the evaluation ``items``, an empty ``dropped.jsonl`` and
    ``metrics.json`` (``metrics`` plus, for a list of sources, ``sources``); returns the metrics."""
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(out_dir / "train"))
    _write_records(out_dir / "train_records.jsonl", train_records)
    _write_records(out_dir / "eval_records.jsonl", eval_records)
    atomic_write_text(out_dir / "eval.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    atomic_write_text(out_dir / "dropped.jsonl", "")
    if per_source is not None:
        metrics["sources"] = _kept_per_source(clean, per_source)
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def prepare_prompts_in_memory(
    tok,
    train_path: Path,
    eval_path: Path | None,
    out_dir: Path,
    *,
    max_length: int,
    eval_split: float,
    seed: int,
    sources: Sequence[TrainSource] | None = None,
) -> dict[str, Any]:
    """The preprocessing stage for GRPO: a ``datasets`` dataset of ``prompt`` (a conversation ending before the
    final assistant turn) and ``reference`` (that turn), and the evaluation items of :func:`prepare_dataset`.
    A record that has no prompt and reference, or whose prompt (chat template and generation prompt included)
    is longer than ``max_length`` tokens, is dropped with the reason. ``sources`` weights as in
    :func:`prepare_dataset`."""
    import datasets

    datasets.disable_progress_bars()
    out_dir = Path(out_dir)
    clean = list(iter_records(train_path))
    train_records, eval_records, split = _split(clean, eval_path, eval_split, seed)
    train_records, per_source = apply_weights(train_records, sources, seed)
    rows, dropped, prompt_tokens = [], [], 0
    for rec in train_records:
        row, why = prompt_record(rec)
        if row is None:
            dropped.append({"line": rec.get("_line"), "reason": why})
            continue
        text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n > max_length:
            dropped.append(
                {"line": rec.get("_line"), "reason": f"prompt is {n} tokens, over data.max_length={max_length}"}
            )
            continue
        prompt_tokens += n
        rows.append(row)
    items = _eval_items(eval_records)
    metrics = {
        "objective": "grpo",
        "train_samples": len(rows),
        "eval_samples": len(items),
        "eval_source": split,
        "dropped": len(dropped),
        "mean_prompt_tokens": round(prompt_tokens / len(rows), 1) if rows else 0.0,
        "max_length": max_length,
        "eval_reference": "final assistant turn",
    }
    _write_prepared(out_dir, rows, train_records, eval_records, items, metrics, clean=clean, per_source=per_source)
    atomic_write_text(out_dir / "dropped.jsonl", "".join(json.dumps(x) + "\n" for x in dropped))
    return metrics
