"""How often do the judges agree with a careful reader on real model outputs? Rules judge vs keyword judge.

Data: ``benchmarks/data/judge_labels.jsonl`` (see ``benchmarks/data/README.md``): responses of
SmolLM2-135M-Instruct (base and three LoRA fine-tunes) and of the demo's tiny model (base and a fine-tune)
to the shipped red-team and benign look-alike prompts, English and Chinese, each labelled ``refused`` /
``harmful`` by reading it. The ``heldout`` split (about 40 % of the prompts, by a seeded hash of the prompt
id) was not looked at while the rules judge was built; the ``dev`` split was.

Both judges run through :func:`tuneloop.evaluate.judgefile.judge_records` (what ``tuneloop judge`` runs):
``refused`` is scored on every record, ``harmful`` on the red-team records (the evaluation asks it of those
only). Accuracy, precision and recall come with 95 % Wilson intervals (:func:`tuneloop.evaluate.stats.wilson`).

    python benchmarks/judge_accuracy.py                     # held-out split; one JSON line
    python benchmarks/judge_accuracy.py --split dev --errors  # the cases a judge gets wrong (dev only!)
    python benchmarks/judge_accuracy.py --write             # also writes src/tuneloop/resources/judge_accuracy.json

The JSON resource is what every evaluation records next to ``metrics["judge"]``
(:func:`tuneloop.evaluate.judges.measured_accuracy`).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from tuneloop.evaluate.judgefile import JudgeRecord, judge_records
from tuneloop.evaluate.judges import KeywordJudge, RulesJudge

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO / "benchmarks" / "data" / "judge_labels.jsonl"
RESOURCE = REPO / "src" / "tuneloop" / "resources" / "judge_accuracy.json"


def load(split: str, path: Path = LABELS) -> list[tuple[dict, JudgeRecord]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        rec = json.loads(line)
        if split in ("all", rec["split"]):
            rows.append(
                (
                    rec,
                    JudgeRecord(
                        line=n,
                        prompt=rec["prompt"],
                        response=rec["response"],
                        kind=rec["kind"],
                        indicators=tuple(rec["indicators"]),
                        refused=rec["refused"],
                        harmful=rec["harmful"],
                        id=rec["id"],
                    ),
                )
            )
    return rows


def measure(judge, rows) -> dict:
    report = judge_records([r for _, r in rows], judge, path=str(LABELS))
    return {"refused": report.refused.to_dict(), "harmful": report.harmful.to_dict()}, report


def composition(rows) -> dict:
    c = collections.Counter(f"{rec['kind']}/{rec['lang']}" for rec, _ in rows)
    models = collections.Counter(rec["model"] for rec, _ in rows)
    positives = {
        "refused": sum(rec["refused"] for rec, _ in rows),
        "harmful": sum(rec["harmful"] for rec, _ in rows if rec["kind"] == "redteam"),
    }
    return {
        "n": len(rows),
        "redteam": sum(rec["kind"] == "redteam" for rec, _ in rows),
        "by_kind_lang": dict(sorted(c.items())),
        "by_model": dict(sorted(models.items())),
        "positives": positives,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="heldout", choices=["heldout", "dev", "all"])
    ap.add_argument("--errors", action="store_true", help="print the records a judge gets wrong (use on dev only)")
    ap.add_argument("--write", action="store_true", help=f"write {RESOURCE.relative_to(REPO)} (held-out figures only)")
    args = ap.parse_args()
    rows = load(args.split)
    t0 = time.perf_counter()
    results = {}
    for judge in (RulesJudge(), KeywordJudge()):
        figures, report = measure(judge, rows)
        results[judge.name] = figures
        for name in ("refused", "harmful"):
            a = figures[name]["accuracy"]
            print(
                f"{judge.name:8s} {name:8s} accuracy {a['value']:.3f} [{a['interval'][0]:.3f}, {a['interval'][1]:.3f}] "
                f"precision {figures[name]['precision']['value']:.3f} recall {figures[name]['recall']['value']:.3f} "
                f"(n={figures[name]['n']})",
                file=sys.stderr,
            )
        if args.errors:
            for (rec, _), item in zip(rows, report.items, strict=True):
                wrong = [
                    q
                    for q in ("refused", "harmful")
                    if item[q] != rec[q] and (q == "refused" or rec["kind"] == "redteam")
                ]
                if wrong:
                    print(
                        f"  {judge.name} wrong on {','.join(wrong)}: {rec['id']} label r={int(rec['refused'])} h={int(rec['harmful'])} "
                        f"| {rec['prompt'][:70]!r} -> {rec['response'][:160]!r}",
                        file=sys.stderr,
                    )
    doc = {
        "benchmark": "judge_accuracy",
        "labels": str(LABELS.relative_to(REPO)),
        "split": args.split,
        "set": composition(rows),
        "judges": results,
        "interval": "Wilson 95%",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if args.write:
        if args.split != "heldout":
            raise SystemExit("--write publishes held-out figures only: run with --split heldout")
        RESOURCE.write_text(
            json.dumps({k: doc[k] for k in ("labels", "split", "set", "judges", "interval")}, indent=1) + "\n",
            encoding="utf-8",
        )
        print(f"wrote {RESOURCE.relative_to(REPO)}", file=sys.stderr)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
