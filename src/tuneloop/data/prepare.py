"""Preprocessing: chat template, tokenization with the prompt masked from the loss, max length, split.

Entry point: :func:`prepare_dataset`. Input is the canonical records written by data validation
(``{"messages": [...]}`` per line); output, in ``out_dir``:

* ``train/`` — a ``datasets`` dataset of ``input_ids`` and ``labels`` (-100 on tokens that carry no loss);
* ``eval.jsonl`` — evaluation items: ``id``, ``messages`` (the prompt) and ``reference`` (the expected answer);
* ``dropped.jsonl`` — training records that could not be used, with the reason (never dropped silently).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tuneloop.fsutil import atomic_write_json, atomic_write_text

IGNORE_INDEX = -100


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Canonical records of one split as JSONL (without tuneloop's bookkeeping fields)."""
    text = "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
        ids = tok(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
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
) -> dict[str, Any]:
    """Tokenize the training records and write the evaluation items. Returns the stage metrics."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()

    out_dir = Path(out_dir)
    train_records = read_jsonl(train_path)
    if eval_path is not None:
        eval_records = read_jsonl(eval_path)
        split = "given"
    else:
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * eval_split))
        if len(order) - n_eval < 1:
            n_eval = 0
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
        split = f"held out {eval_split:.0%} of train (seed {seed})"

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    dropped, truncated, tokens, target_tokens = [], 0, 0, 0
    for rec in train_records:
        ex = tokenize_conversation(tok, rec["messages"], max_length=max_length, train_on_inputs=train_on_inputs)
        n_target = sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
        if n_target == 0:
            dropped.append({"line": rec.get("_line"), "reason": f"no answer tokens left within max_length={max_length}"})
            continue
        truncated += ex["truncated"]
        tokens += len(ex["input_ids"])
        target_tokens += n_target
        rows["input_ids"].append(ex["input_ids"])
        rows["labels"].append(ex["labels"])

    Dataset.from_dict(rows).save_to_disk(str(out_dir / "train"))
    _write_records(out_dir / "train_records.jsonl", train_records)  # for external trainers (train.backend: command)
    _write_records(out_dir / "eval_records.jsonl", eval_records)
    items = []
    for i, rec in enumerate(eval_records):
        msgs = rec["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            continue
        items.append({"id": f"eval-{i}", "line": rec.get("_line"), "messages": msgs[:-1], "reference": msgs[-1]["content"]})
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
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


# ------------------------------------------------------------------------------------------- preferences
#
# Minimal loading of preference data for `train.objective: dpo` (the data stage's own preference format may
# replace this). Accepted records:
#
# * ``{"prompt": str | messages, "chosen": str | message | messages, "rejected": ...}`` (TRL's standard or
#   conversational preference format; ``system`` optional for a string prompt);
# * sharegpt style: ``{"conversations": [{"from": "human", "value": ...}, ...], "chosen": {"from": "gpt",
#   "value": ...}, "rejected": {...}}`` (``system`` optional), as in LLaMA-Factory's dpo_en_demo.json.
#
# Each becomes TRL's conversational preference record: ``{"prompt": [messages], "chosen": [assistant message],
# "rejected": [assistant message]}``.

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _pref_messages(value: Any, where: str, reasons: list[str], *, answer: bool) -> list[dict[str, str]]:
    """A string, one message or a list of messages (role/content or from/value) as role/content messages."""
    if isinstance(value, str):
        if not value.strip():
            reasons.append(f"empty_content: {where} is empty")
        return [{"role": "assistant" if answer else "user", "content": value}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        reasons.append(f"bad_structure: {where} must be a string, a message or a non-empty list of messages")
        return []
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            reasons.append(f"not_an_object: {where}[{i}] is not an object")
            continue
        role = m.get("role", _SHAREGPT_ROLES.get(m.get("from", ""), m.get("from")))
        content = m.get("content", m.get("value"))
        if role not in ("system", "user", "assistant"):
            reasons.append(f"bad_role: {where}[{i}] has role {role!r}; expected system, user, assistant (or human/gpt)")
        if not isinstance(content, str):
            reasons.append(f"non_string_content: {where}[{i}] content is not a string")
        elif not content.strip():
            reasons.append(f"empty_content: {where}[{i}] content is empty")
        out.append({"role": role, "content": content})
    return out


def preference_record(rec: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """One raw preference record -> (TRL conversational preference record, []) or (None, reasons)."""
    if not isinstance(rec, dict):
        return None, ["not_an_object: the record is not a JSON object"]
    reasons: list[str] = []
    for key in ("chosen", "rejected"):
        if key not in rec:
            reasons.append(f"missing_field: {key!r} is missing")
    if "conversations" in rec:
        prompt = _pref_messages(rec["conversations"], "conversations", reasons, answer=False)
    elif "prompt" in rec:
        prompt = _pref_messages(rec["prompt"], "prompt", reasons, answer=False)
    else:
        reasons.append("missing_field: 'prompt' (or sharegpt 'conversations') is missing")
        prompt = []
    if isinstance(rec.get("system"), str) and rec["system"].strip() and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": rec["system"]}] + prompt
    if prompt and prompt[-1]["role"] != "user":
        reasons.append("role_order: the prompt must end with a user turn")
    out = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        if key in rec:
            msgs = _pref_messages(rec[key], key, reasons, answer=True)
            if msgs and msgs[-1]["role"] != "assistant":
                reasons.append(f"role_order: {key} must be an assistant answer")
            out[key] = msgs[-1:]  # the answer; earlier turns of an implicit-prompt record are not supported here
    if not reasons and out["chosen"][0]["content"] == out["rejected"][0]["content"]:
        reasons.append("bad_structure: chosen and rejected are the same answer")
    return (None, reasons) if reasons else (out, [])


def _raw_records(path: Path) -> list[tuple[int, Any]]:
    """(line or 1-based index, record) pairs of a .jsonl or .json (array) file; InputError on a malformed file."""
    from tuneloop.errors import InputError

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: a .json dataset must be an array of records")
        return list(enumerate(data, 1))
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                out.append((n, _BadLine(exc.msg)))
    return out


class _BadLine:
    def __init__(self, msg: str):
        self.msg = msg


def validate_preferences(path: Path, out_dir: Path, *, name: str = "train") -> dict[str, Any]:
    """The data_validation stage for preference data: clean records, quarantine with reasons, digest."""
    import hashlib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean, quarantine, seen = [], [], set()
    rules: dict[str, int] = {}
    duplicates = 0
    records = _raw_records(path)
    for line, raw in records:
        if isinstance(raw, _BadLine):
            rec, reasons = None, [f"invalid_json: {raw.msg}"]
        else:
            rec, reasons = preference_record(raw)
        if rec is not None:
            key = json.dumps(rec, sort_keys=True, ensure_ascii=False)
            if key in seen:
                rec, reasons = None, ["exact_duplicate: same prompt, chosen and rejected as an earlier record"]
                duplicates += 1
            seen.add(key)
        if rec is None:
            quarantine.append({"line": line, "reasons": reasons})
            for r in reasons:
                code = r.split(":", 1)[0]
                rules[code] = rules.get(code, 0) + 1
            continue
        clean.append({**rec, "_line": line})
    clean_path, quarantine_path = out_dir / f"{name}.clean.jsonl", out_dir / f"{name}.quarantine.jsonl"
    atomic_write_text(clean_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean))
    atomic_write_text(quarantine_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in quarantine))
    n_invalid = len(quarantine) - duplicates
    return {
        "format": "preference",
        "records": len(records),
        "valid": len(clean),
        "invalid": n_invalid,
        "duplicates": duplicates,
        "valid_ratio": round(len(clean) / (len(clean) + n_invalid), 4) if (clean or n_invalid) else 0.0,
        "digest": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "rules": rules,
        "clean_path": str(clean_path),
        "quarantine_path": str(quarantine_path),
    }


def prepare_preferences(
    train_path: Path, eval_path: Path | None, out_dir: Path, *, eval_split: float, seed: int
) -> dict[str, Any]:
    """The preprocessing stage for DPO: a ``datasets`` dataset of prompt/chosen/rejected conversations
    (TRL tokenizes it with the chat template) and evaluation items whose reference is the chosen answer."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()
    out_dir = Path(out_dir)
    train_records = read_jsonl(train_path)
    if eval_path is not None:
        eval_records, split = read_jsonl(eval_path), "given"
    else:
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * eval_split)) if len(order) > 1 else 0
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
        split = f"held out {eval_split:.0%} of train (seed {seed})"
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in train_records]
    Dataset.from_list(rows).save_to_disk(str(out_dir / "train"))
    _write_records(out_dir / "train_records.jsonl", train_records)
    _write_records(out_dir / "eval_records.jsonl", eval_records)
    items = [
        {"id": f"eval-{i}", "line": r.get("_line"), "messages": r["prompt"], "reference": r["chosen"][0]["content"]}
        for i, r in enumerate(eval_records)
    ]
    atomic_write_text(out_dir / "eval.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    atomic_write_text(out_dir / "dropped.jsonl", "")
    metrics = {
        "objective": "dpo",
        "train_samples": len(rows),
        "eval_samples": len(items),
        "eval_source": split,
        "dropped": 0,
        "eval_reference": "chosen answer",
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
