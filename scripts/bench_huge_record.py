"""Time and peak memory of validating one huge record with a tokenizer (issue 14, data point 16).

Run: ``PYTHONPATH=src python scripts/bench_huge_record.py [MB] [max_length]``. Builds the tiny tokenizer the
tests use (tests/conftest.py: ``make_tokenizer`` on the demo corpus, vocab 600), writes one chat record of
about MB megabytes and runs ``validate_dataset`` with the over-long rule on, in a fresh subprocess; prints
wall time and the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time, json
from pathlib import Path
from tuneloop.demo.base_model import make_tokenizer
from tuneloop.demo.corpus import general_corpus
from tuneloop.demo.tickets import task_records
from tuneloop.data.validate import Checks, validate_dataset
texts = general_corpus(300, seed=1) + [m["content"] for r in task_records(200, seed=1) for m in r["messages"]]
tok = make_tokenizer(texts, vocab_size=600)
path, out, max_length = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
rep = validate_dataset(path, out, checks=Checks(max_length=max_length, near_dup_threshold=None, num_workers=1), tokenizer=tok)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "rules": rep["rules"], "examples": rep["examples"]}))
"""


def main() -> None:
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 30
    max_length = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "huge.jsonl"
        words = "the customer asked about a double charge on the card and the refund "
        content = words * int(mb * 1e6 / len(words))
        path.write_text(
            json.dumps({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]})
            + "\n"
        )
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(Path(d) / "out"), str(max_length)],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if res.returncode:
            sys.exit(res.stderr[-2000:])
        child = json.loads(res.stdout.strip().splitlines()[-1])
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"record {path.stat().st_size / 1e6:.1f} MB, max_length {max_length}: validate_dataset {child['seconds']} s "
            f"(process {wall:.1f} s), peak RSS {peak_mb:.0f} MB; reason: {child['examples'].get('overlong', [{}])[0].get('reason')}"
        )


if __name__ == "__main__":
    main()
