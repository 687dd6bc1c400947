"""A dataset with planted problems for the data-pass equality tests (Ray engine, object store): a directory of two
JSONL files and a Parquet file (about 3,000 records) and an eval file."""

from __future__ import annotations

import json
import random
from pathlib import Path


def words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)
    )


def chat(u: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def write_planted(root: Path) -> Path:
    """A directory of two JSONL files and a Parquet file (3,000 records) and an eval file: planted exact copies
    (also across files, one with other whitespace), near copies (one word changed), PII, contamination
    (eval records pasted in), unparseable lines, a wrong structure and a placeholder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    evals = [chat(words(rng, 30), words(rng, 30)) for _ in range(50)]
    base = [chat(words(rng, 25), words(rng, 40)) for _ in range(2500)]
    rows: list[dict | str] = []
    for i, rec in enumerate(base):
        rows.append(rec)
        if i % 25 == 3:  # exact copy (whitespace changed: same dedup key)
            rows.append(chat(base[i // 2]["messages"][0]["content"] + "  ", base[i // 2]["messages"][1]["content"]))
        if i % 17 == 5:  # near copy: one word of the answer replaced
            answer = base[i - 1]["messages"][1]["content"].split()
            answer[rng.randrange(len(answer))] = "changed"
            rows.append(chat(base[i - 1]["messages"][0]["content"], " ".join(answer)))
        if i % 101 == 9:
            rows.append(chat(f"mail me at user{i}@example.org or call +1 415 555 01{i % 100:02d}", words(rng, 20)))
        if i % 250 == 1:
            rows.append(evals[i // 250])
        if i % 400 == 2:
            rows += ["{not json", json.dumps({"messages": []}), json.dumps(chat("fill {{name}} in", "ok"))]
    a, b, c = rows[:1200], rows[1200:2400], rows[2400:]
    (root / "train").mkdir()
    for name, part in (("a.jsonl", a), ("b.jsonl", b)):
        with open(root / "train" / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
                if rng.random() < 0.01:
                    f.write("\n")  # blank lines are skipped, line numbers still count them
    pq.write_table(
        pa.table({"messages": [r["messages"] for r in c if isinstance(r, dict)]}), root / "train" / "c.parquet"
    )
    with open(root / "eval.jsonl", "w", encoding="utf-8") as f:
        for r in evals:
            f.write(json.dumps(r) + "\n")
    return root
