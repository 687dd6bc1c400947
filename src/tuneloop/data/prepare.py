"""Preprocessing: chat template, tokenization with the prompt masked from the loss, max length, split.

Entry point: :func:`prepare_dataset`. Input is the canonical records written by data validation
(``{"messages": [...]}`` per line in ``clean.jsonl``, or Parquet shards from ``data.engine: ray``; preference
records train on prompt + chosen, kto records with ``label: false`` are dropped, ``{"text": ...}`` records train
on every token). It streams (:mod:`tuneloop.data.stream`): memory does not grow with the number of records, so a
10 M-record set is prepared on one machine. Output, in ``out_dir``:

* ``train/`` — a ``datasets`` dataset of ``input_ids`` and ``labels`` (-100 on tokens that carry no loss);
* ``eval.jsonl`` — evaluation items: ``id``, ``messages`` (the prompt) and ``reference`` (the expected answer);
* ``dropped.jsonl`` — training records that could not be used, with the reason (never dropped silently).

:func:`prepare_kto` is the same stage for ``train.objective: kto`` (TRL's prompt/completion/label records);
it, :func:`prepare_preferences` (DPO and the other pair objectives) and :func:`prepare_prompts` (GRPO) still read
the records into memory (:func:`read_records`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.config import TrainSource
from tuneloop.data.formats import sft_messages
from tuneloop.data.rules import encode_prefix
from tuneloop.data.stream import TokenWriter, Weigher, count_records, held_out_mask, iter_records, split_description
from tuneloop.fsutil import atomic_lines, atomic_write_json, atomic_write_text

IGNORE_INDEX = -100


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Canonical records of one split as JSONL (without tuneloop's bookkeeping fields)."""
    text = "".join(
        json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n" for r in records
    )
    atomic_write_text(path, text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_records(path: Path) -> list[dict[str, Any]]:
    """A validated set's records as a list (``clean.jsonl`` or Parquet shards): the in-memory objectives' reader."""
    return list(iter_records(path))


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
    return train, [r for i, r in enumerate(records) if i in held], split_description(eval_split, seed)


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
        for r, n in zip(rows, counts)
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


def _segments(tok, messages: list[dict[str, str]], train_on_inputs: bool) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trainable) pieces.

    Each assistant turn is trainable; everything else (system, user, the template's role markers and the
    generation prompt) is not, unless ``train_on_inputs``. Works for any template whose renderings of
    successive prefixes extend each other; otherwise only the final assistant turn is trained.
    """
    full = tok.apply_chat_template(messages, tokenize=False)
    if train_on_inputs:
        return [(full, True)]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and upto.startswith(prompt) and full.startswith(upto)):
            # Template is not prefix-stable: fall back to training on the final answer only.
            prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            return [(prompt, False), (full[len(prompt) :], True)] if full.startswith(prompt) else [(full, True)]
        pieces.append((prompt[len(done) :], False))
        pieces.append((upto[len(prompt) :], True))
        done = upto
    if len(full) > len(done):
        pieces.append((full[len(done) :], False))
    return pieces


def tokenize_conversation(tok, messages, *, max_length: int, train_on_inputs: bool = False) -> dict[str, Any]:
    """``input_ids`` and ``labels`` for one conversation; ``truncated`` says whether max_length cut it."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trainable in _segments(tok, messages, train_on_inputs):
        if not text:
            continue
        ids, _ = encode_prefix(tok, text, max_length - len(input_ids))  # stops past max_length: memory stays bounded
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
        if len(input_ids) > max_length:
            break
    truncated = len(input_ids) > max_length
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def prepare_dataset(
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

    ``train_path`` is the validated set: ``clean.jsonl`` or Parquet shards (:func:`~tuneloop.data.stream.iter_records`).
    It is read record by record (twice when the eval split is held out of it: once to count, once to prepare) and
    never held whole: tokenised samples go to Arrow in batches (:class:`~tuneloop.data.stream.TokenWriter`), the
    train, eval and dropped records to their files line by line. The held-out records, the weighted copies and the
    samples' order are those of the in-memory :func:`_split` and :func:`apply_weights` (tests/test_prepare_streaming.py
    compares the outputs with the in-memory implementation's).

    With ``sources`` (``data.train_data`` as a list; the clean records carry ``_source``) the training records
    are weighted as :func:`apply_weights` does after the eval split, so no copy of an eval record is trained on;
    the metrics then have ``sources``: per source its ``records`` after validation, ``train_records`` after
    the split and ``samples`` after weighting (before tokenization drops any)."""
    import datasets

    datasets.disable_progress_bars()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    held = None if eval_path is not None else held_out_mask(count_records(train_path), eval_split, seed)
    weigh, tally = Weigher(sources, seed), _Tally()
    tokens = TokenWriter(out_dir / ".train.arrow")
    try:
        with ExitStack() as stack:
            train_out, eval_out, items_out, dropped_out = (
                stack.enter_context(atomic_lines(out_dir / name))
                for name in ("train_records.jsonl", "eval_records.jsonl", "eval.jsonl", "dropped.jsonl")
            )
            for i, rec in enumerate(iter_records(train_path)):
                weigh.kept(rec)
                if held is not None and held[i]:
                    _write_eval(rec, tally, eval_out, items_out)
                    continue
                copies = weigh(rec)
                if copies == 0:
                    continue
                line = _record_line(rec)
                ex, why = _sample(tok, rec, max_length=max_length, train_on_inputs=train_on_inputs)
                for _ in range(copies):  # copies stay next to each other (the trainer shuffles)
                    train_out.write(line)
                    if ex is None:
                        tally.dropped += 1
                        dropped_out.write(json.dumps({"line": rec.get("_line"), "reason": why}) + "\n")
                    else:
                        tally.add(ex)
                        tokens.add(ex["input_ids"], ex["labels"])
            if eval_path is not None:
                for rec in iter_records(eval_path):
                    _write_eval(rec, tally, eval_out, items_out)
        n = tokens.save(out_dir / "train")
    except BaseException:
        tokens.discard()
        raise
    metrics = {
        "train_samples": n,
        "eval_samples": tally.items,
        "eval_source": "given" if held is None else split_description(eval_split, seed),
        "dropped": tally.dropped,
        "truncated": tally.truncated,
        "train_tokens": tally.tokens,
        "target_tokens": tally.target_tokens,
        "mean_tokens": round(tally.tokens / n, 1) if n else 0.0,
        "max_length": max_length,
    }
    if (per_source := weigh.per_source()) is not None:
        metrics["sources"] = per_source
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


@dataclass
class _Tally:
    """What :func:`prepare_dataset` counts while it streams."""

    eval_records: int = 0
    items: int = 0
    dropped: int = 0
    truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def add(self, ex: dict[str, Any]) -> None:
        self.truncated += ex["truncated"]
        self.tokens += len(ex["input_ids"])
        self.target_tokens += ex["n_target"]


def _record_line(rec: dict[str, Any]) -> str:
    """A canonical record as a JSONL line of ``train_records.jsonl`` / ``eval_records.jsonl`` (as :func:`_write_records`)."""
    return json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}, ensure_ascii=False) + "\n"


def _write_eval(rec: dict[str, Any], tally: _Tally, records_out, items_out) -> None:
    """One eval record to ``eval_records.jsonl`` and, when it makes one, its item to ``eval.jsonl`` (as :func:`_eval_items`:
    the item's id counts every eval record)."""
    records_out.write(_record_line(rec))
    for item in _eval_items([rec]):
        item["id"] = f"eval-{tally.eval_records}"
        items_out.write(json.dumps(item, ensure_ascii=False) + "\n")
        tally.items += 1
    tally.eval_records += 1


def _sample(tok, rec: dict[str, Any], *, max_length: int, train_on_inputs: bool) -> tuple[dict[str, Any] | None, str]:
    """(``input_ids``, ``labels``, ``truncated``, ``n_target`` of one training record, "") or (None, why it is dropped)."""
    messages = sft_messages(rec)
    if messages is None:  # a text record: every token is trained on
        ids, _ = encode_prefix(tok, rec["text"], max_length)
        ex = {"input_ids": ids[:max_length], "labels": ids[:max_length], "truncated": len(ids) > max_length}
    elif rec.get("label") is False:
        return None, "kto label false: supervised fine-tuning does not train on undesirable answers"
    else:
        ex = tokenize_conversation(tok, messages, max_length=max_length, train_on_inputs=train_on_inputs)
    ex["n_target"] = sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
    if ex["n_target"] == 0:
        return None, f"no answer tokens left within max_length={max_length}"
    return ex, ""


# ------------------------------------------------------------------------------------------- preferences
#
# `train.objective: dpo` trains on the data stage's canonical preference records (data/formats.py:
# ``{"messages": prompt ending with a user turn, "chosen": [assistant], "rejected": [assistant]}``), given to
# TRL in its conversational preference shape ``{"prompt": [...], "chosen": [...], "rejected": [...]}``.


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Role/content only (the canonical records may carry ``tool_call`` flags TRL does not know)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def trl_preference(rec: dict[str, Any]) -> dict[str, Any]:
    """A canonical preference record as TRL's conversational preference record."""
    return {"prompt": _plain(rec["messages"]), "chosen": _plain(rec["chosen"]), "rejected": _plain(rec["rejected"])}


def prepare_preferences(
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
    clean = read_records(train_path)
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


# ------------------------------------------------------------------------------------------------- kto
#
# `train.objective: kto` trains on the data stage's canonical kto records (``{"messages": [..., assistant],
# "label": bool}``), given to TRL in its conversational unpaired shape ``{"prompt": [...], "completion":
# [assistant], "label": bool}``. TRL's KTO estimates its KL term from each batch's completions paired with the
# batch's other prompts and reads the data in order (no shuffling), so the records are shuffled here, seeded.


def trl_unpaired(rec: dict[str, Any]) -> dict[str, Any]:
    """A canonical kto record as TRL's conversational unpaired record."""
    return {"prompt": _plain(rec["messages"][:-1]), "completion": _plain(rec["messages"][-1:]), "label": rec["label"]}


def kto_label_counts(path: Path) -> tuple[int, int]:
    """(desirable, undesirable) records of a canonical kto file."""
    desirable = undesirable = 0
    for rec in iter_records(path):
        desirable += rec.get("label") is True
        undesirable += rec.get("label") is False
    return desirable, undesirable


def prepare_kto(
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
    clean = read_records(train_path)
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


# ---------------------------------------------------------------------------------------------- prompts
#
# `train.objective: grpo` trains on prompts: each conversation record's turns before its final assistant turn,
# given to TRL as a conversational prompt; the final assistant turn is kept as the item's ``reference`` (what
# verifiable rewards such as `metric: exact` compare a completion with). The eval items are those of SFT, so
# the task gates apply as they do to an SFT run.


def prompt_record(rec: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(TRL's conversational prompt record ``{"prompt": [...], "reference": str}``, "") for a canonical record,
    or (None, why it cannot be a GRPO prompt)."""
    if rec.get("label") is False:
        return None, "kto label false: its answer is undesirable, so it is no reference for a reward"
    messages = sft_messages(rec)
    if messages is None:
        return None, "a text record has no prompt; GRPO needs conversations (a prompt and its reference answer)"
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return None, "no final assistant turn after a prompt: GRPO keeps it as the prompt's reference"
    return {"prompt": _plain(messages[:-1]), "reference": messages[-1]["content"]}, ""


def prepare_prompts(
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
    clean = read_records(train_path)
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
