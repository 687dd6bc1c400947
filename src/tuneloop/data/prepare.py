"""Preprocessing: chat template, tokenization with the prompt masked from the loss, max length, split.

Entry points: :func:`prepare_dataset` (SFT), :func:`prepare_preferences` (DPO and the other pair objectives:
ORPO, SimPO, ..., and the reward model), :func:`prepare_kto` (KTO) and :func:`prepare_prompts` (GRPO). Input is
the canonical records written by data validation (``{"messages": [...]}`` per line in ``clean.jsonl``, or Parquet
shards from ``data.engine: ray``; for SFT, preference records train on prompt + chosen, kto records with ``label:
false`` are dropped, ``{"text": ...}`` records train on every token). Every objective streams through one pass
(:func:`_stream` over :mod:`tuneloop.data.stream`): memory does not grow with the number of records, so a
10 M-record set is prepared on one machine. Output, in ``out_dir``:

* ``train/`` — a ``datasets`` dataset: SFT's ``input_ids`` and ``labels`` (-100 on tokens that carry no loss), or
  the TRL objective's conversational rows (TRL applies the chat template and tokenizes);
* ``eval.jsonl`` — evaluation items: ``id``, ``messages`` (the prompt) and ``reference`` (the expected answer);
* ``train_records.jsonl`` / ``eval_records.jsonl`` — the canonical records of each split (external trainers);
* ``dropped.jsonl`` — training records that could not be used, with the reason (never dropped silently);
* ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import TrainSource
from tuneloop.data.formats import sft_messages
from tuneloop.data.rules import encode_prefix
from tuneloop.data.stream import RowWriter, Weigher, count_records, held_out_mask, iter_records, split_description
from tuneloop.fsutil import atomic_lines, atomic_write_json

IGNORE_INDEX = -100


def apply_weights(
    records: list[dict[str, Any]], sources: Sequence[TrainSource] | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The training records with each source's weight applied, and per-source counts (``None`` without a
    list of sources): :class:`~tuneloop.data.stream.Weigher` over a list.

    A record of a source of weight ``w`` (its ``_source`` index into ``sources``) appears ``floor(w)`` times,
    plus once more with probability ``w - floor(w)``, drawn from a generator seeded by ``seed``: the same
    data and seed give the same set. Copies stay next to each other (the trainer shuffles)."""
    if not sources:
        return records, None
    weigh = Weigher(sources, seed)
    out = [rec for rec in records for _ in range(weigh(rec))]
    rows = weigh.per_source() or []
    return out, [{k: v for k, v in row.items() if k != "records"} for row in rows]


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


# ------------------------------------------------------------------------------------------- the one pass


def _msg_type() -> Any:
    """Arrow type of a conversation as :func:`_plain` gives it (what ``Dataset.from_list`` infers for it)."""
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _schema(*columns: tuple[str, str]) -> Any:
    """The train dataset's Arrow schema: per column ``conversation``, ``string``, ``bool``, ``int32 list`` or
    ``int64 list`` (the types ``Dataset.from_dict``/``from_list`` infer for the in-memory rows)."""
    import pyarrow as pa

    types = {
        "conversation": _msg_type,
        "string": pa.string,
        "bool": pa.bool_,
        "int32 list": lambda: pa.list_(pa.int32()),
        "int64 list": lambda: pa.list_(pa.int64()),
    }
    return pa.schema([(name, types[kind]()) for name, kind in columns])


@dataclass
class _Objective:
    """How one objective's preparation turns canonical records into ``train/`` rows and evaluation items.

    ``row`` is called once per training record (before its weighted copies): the row (a dict with at least the
    schema's columns; other keys are for ``count``) or ``(None, why it is dropped)``. ``count`` sees every row
    written (once per copy). ``item`` makes the evaluation item of the ``n``-th eval record (id ``eval-<n>``) or
    ``None``. ``holdable`` says which records the held-out split draws from (default: all). ``shuffle``: the seed
    of a shuffle of the rows (KTO)."""

    columns: tuple[tuple[str, str], ...]
    row: Callable[[dict[str, Any]], tuple[dict[str, Any] | None, str]]
    item: Callable[[dict[str, Any], int], dict[str, Any] | None]
    count: Callable[[dict[str, Any]], None] = lambda row: None
    holdable: Callable[[dict[str, Any]], bool] | None = None
    shuffle: str | None = None


@dataclass
class _Streamed:
    """What one pass produced, for the objective's metrics."""

    samples: int = 0
    eval_records: int = 0
    items: int = 0
    dropped: int = 0
    eval_source: str = "given"
    per_source: list[dict[str, Any]] | None = field(default=None)


def _stream(
    objective: _Objective,
    train_path: Path,
    eval_path: Path | None,
    out_dir: Path,
    *,
    eval_split: float,
    seed: int,
    sources: Sequence[TrainSource] | None,
) -> _Streamed:
    """The one preparation pass every objective runs: read the validated set record by record (twice when the eval
    split is held out of it: once to count, once to prepare), hold out the seeded eval split, weight the training
    records by source, and write ``train/`` (rows to Arrow in batches, :class:`~tuneloop.data.stream.RowWriter`),
    ``train_records.jsonl``, ``eval_records.jsonl``, ``eval.jsonl`` and ``dropped.jsonl`` line by line; no record
    set is held whole. The held-out records, the weighted copies and the rows' order are those of the in-memory
    preparation (tests/prepare_in_memory.py; tests/test_prepare_streaming.py and
    tests/test_prepare_objectives_streaming.py compare the outputs)."""
    import datasets

    datasets.disable_progress_bars()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    held, done = None, _Streamed()
    if eval_path is None:
        holdable = objective.holdable
        n = count_records(train_path) if holdable is None else sum(map(holdable, iter_records(train_path)))
        held, done.eval_source = held_out_mask(n, eval_split, seed), split_description(eval_split, seed)
    weigh = Weigher(sources, seed)
    rows = RowWriter(out_dir / ".train.arrow", _schema(*objective.columns))
    try:
        with ExitStack() as stack:
            train_out, eval_out, items_out, dropped_out = (
                stack.enter_context(atomic_lines(out_dir / name))
                for name in ("train_records.jsonl", "eval_records.jsonl", "eval.jsonl", "dropped.jsonl")
            )

            def to_eval(rec: dict[str, Any]) -> None:
                eval_out.write(_record_line(rec))
                if (item := objective.item(rec, done.eval_records)) is not None:
                    items_out.write(json.dumps(item, ensure_ascii=False) + "\n")
                    done.items += 1
                done.eval_records += 1

            k = 0  # the number of the next record the split draws from
            for rec in iter_records(train_path):
                weigh.kept(rec)
                if held is not None and (objective.holdable is None or objective.holdable(rec)):
                    k += 1
                    if held[k - 1]:
                        to_eval(rec)
                        continue
                copies = weigh(rec)
                if copies == 0:
                    continue
                line = _record_line(rec)
                row, why = objective.row(rec)
                for _ in range(copies):  # copies stay next to each other (the trainer shuffles)
                    train_out.write(line)
                    if row is None:
                        done.dropped += 1
                        dropped_out.write(json.dumps({"line": rec.get("_line"), "reason": why}) + "\n")
                    else:
                        objective.count(row)
                        rows.add(row)
            if eval_path is not None:
                for rec in iter_records(eval_path):
                    to_eval(rec)
        done.samples = rows.save(out_dir / "train", shuffle=objective.shuffle)
    except BaseException:
        rows.discard()
        raise
    done.per_source = weigh.per_source()
    return done


@dataclass
class _Sum:
    """A running total of one field over the rows written (KTO's desirable rows, GRPO's prompt tokens)."""

    key: str
    total: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.total += int(row[self.key])


def _finish(out_dir: Path, metrics: dict[str, Any], done: _Streamed) -> dict[str, Any]:
    """``metrics`` plus, for a list of sources, ``sources`` (per source its ``records`` after validation,
    ``train_records`` after the split and ``samples`` after weighting), written to ``metrics.json``."""
    if done.per_source is not None:
        metrics["sources"] = done.per_source
    atomic_write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


def _record_line(rec: dict[str, Any]) -> str:
    """A canonical record as a JSONL line of ``train_records.jsonl`` / ``eval_records.jsonl`` (without tuneloop's
    bookkeeping fields)."""
    return json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}, ensure_ascii=False) + "\n"


def _eval_item(rec: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The evaluation item (prompt + reference) of a record that ends with an assistant turn; a kto record labelled
    false is no reference and makes none."""
    msgs = sft_messages(rec)
    if not msgs or msgs[-1]["role"] != "assistant" or rec.get("label") is False:
        return None
    return {"id": f"eval-{n}", "line": rec.get("_line"), "messages": msgs[:-1], "reference": msgs[-1]["content"]}


# -------------------------------------------------------------------------------------------------- sft


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

    ``train_path`` is the validated set: ``clean.jsonl`` or Parquet shards (:func:`~tuneloop.data.stream.iter_records`),
    streamed by :func:`_stream`. With ``sources`` (``data.train_data`` as a list; the clean records carry ``_source``)
    the training records are weighted after the eval split, so no copy of an eval record is trained on; the metrics
    then have ``sources``."""
    tally = _Tally()
    sft = _Objective(
        columns=(("input_ids", "int32 list"), ("labels", "int64 list")),
        row=lambda rec: _sample(tok, rec, max_length=max_length, train_on_inputs=train_on_inputs),
        item=_eval_item,
        count=tally.add,
    )
    done = _stream(sft, train_path, eval_path, out_dir, eval_split=eval_split, seed=seed, sources=sources)
    n = done.samples
    metrics = {
        "train_samples": n,
        "eval_samples": done.items,
        "eval_source": done.eval_source,
        "dropped": done.dropped,
        "truncated": tally.truncated,
        "train_tokens": tally.tokens,
        "target_tokens": tally.target_tokens,
        "mean_tokens": round(tally.tokens / n, 1) if n else 0.0,
        "max_length": max_length,
    }
    return _finish(out_dir, metrics, done)


@dataclass
class _Tally:
    """What :func:`prepare_dataset` counts over the samples it writes."""

    truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def add(self, ex: dict[str, Any]) -> None:
        self.truncated += ex["truncated"]
        self.tokens += len(ex["input_ids"])
        self.target_tokens += ex["n_target"]


def _sample(tok, rec: dict[str, Any], *, max_length: int, train_on_inputs: bool) -> tuple[dict[str, Any] | None, str]:
    """(``input_ids``, ``labels``, ``truncated``, ``n_target`` of one training record, "") or (None, why it is dropped)."""
    messages = sft_messages(rec)
    if messages is None:  # a text record: every token is trained on
        ids, _ = encode_prefix(tok, rec["text"], max_length)
        ex: dict[str, Any] = {
            "input_ids": ids[:max_length],
            "labels": ids[:max_length],
            "truncated": len(ids) > max_length,
        }
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


def _preference_item(rec: dict[str, Any], n: int) -> dict[str, Any]:
    """A preference record's evaluation item: its prompt, and the chosen answer as the reference."""
    return {
        "id": f"eval-{n}",
        "line": rec.get("_line"),
        "messages": _plain(rec["messages"]),
        "reference": rec["chosen"][-1]["content"],
    }


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
    ``sources`` weights the training pairs as in :func:`prepare_dataset`. Streams (:func:`_stream`)."""
    pairs = _Objective(
        columns=(("prompt", "conversation"), ("chosen", "conversation"), ("rejected", "conversation")),
        row=lambda rec: (trl_preference(rec), ""),
        item=_preference_item,
    )
    done = _stream(pairs, train_path, eval_path, out_dir, eval_split=eval_split, seed=seed, sources=sources)
    metrics = {
        "objective": objective,
        "train_samples": done.samples,
        "eval_samples": done.items,
        "eval_source": done.eval_source,
        "dropped": 0,
        "eval_reference": "chosen answer",
    }
    return _finish(out_dir, metrics, done)


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
    undesirable answer trains. ``sources`` weights the training records as in :func:`prepare_dataset`. Streams
    (:func:`_stream`; the shuffle is a permutation of the row numbers, 4 bytes a row, applied when ``train/`` is
    saved from the memory-mapped rows)."""
    desirable = _Sum("label")
    unpaired = _Objective(
        columns=(("prompt", "conversation"), ("completion", "conversation"), ("label", "bool")),
        row=lambda rec: (trl_unpaired(rec), ""),
        item=_eval_item,
        count=desirable.add,
        holdable=lambda rec: bool(rec["label"]),
        shuffle=f"kto order:{seed}",
    )
    done = _stream(unpaired, train_path, eval_path, out_dir, eval_split=eval_split, seed=seed, sources=sources)
    split = (
        done.eval_source
        if eval_path is not None
        else done.eval_source.replace("of train", "of the desirable train records")
    )
    metrics = {
        "objective": "kto",
        "train_samples": done.samples,
        "desirable": desirable.total,
        "undesirable": done.samples - desirable.total,
        "eval_samples": done.items,
        "eval_source": split,
        "dropped": 0,
        "eval_reference": "desirable answer",
    }
    return _finish(out_dir, metrics, done)


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
    :func:`prepare_dataset`. Streams (:func:`_stream`)."""
    prompt_tokens = _Sum("n_tokens")

    def row(rec: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        out, why = prompt_record(rec)
        if out is None:
            return None, why
        text = tok.apply_chat_template(out["prompt"], tokenize=False, add_generation_prompt=True)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n > max_length:
            return None, f"prompt is {n} tokens, over data.max_length={max_length}"
        return {**out, "n_tokens": n}, ""

    prompts = _Objective(
        columns=(("prompt", "conversation"), ("reference", "string")),
        row=row,
        item=_eval_item,
        count=prompt_tokens.add,
    )
    done = _stream(prompts, train_path, eval_path, out_dir, eval_split=eval_split, seed=seed, sources=sources)
    n = done.samples
    metrics = {
        "objective": "grpo",
        "train_samples": n,
        "eval_samples": done.items,
        "eval_source": done.eval_source,
        "dropped": done.dropped,
        "mean_prompt_tokens": round(prompt_tokens.total / n, 1) if n else 0.0,
        "max_length": max_length,
        "eval_reference": "final assistant turn",
    }
    return _finish(out_dir, metrics, done)
