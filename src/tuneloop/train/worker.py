"""One training worker process: ``python -m tuneloop.train.worker SPEC.json`` (started by
:mod:`tuneloop.train.launch` under torch.distributed / accelerate). Rank 0 reports each step on stdout and
writes ``train_result.json`` next to the model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    from tuneloop.config import build_config
    from tuneloop.fsutil import atomic_write_json
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.launch import STEP_PREFIX

    spec = json.loads(Path(spec_path).read_text())
    cfg = build_config(spec["config"])
    rank0 = int(os.environ.get("RANK", "0")) == 0

    def progress(step: int, total: int, row: dict) -> None:
        print(STEP_PREFIX + json.dumps([step, total, row]), flush=True)

    from tuneloop.train.objectives import objective_of

    train = objective_of(cfg).load_trainer()
    tok = load_tokenizer(spec["tokenizer_dir"])
    metrics = train(
        cfg, Path(spec["dataset_dir"]), Path(spec["work_dir"]), tokenizer=tok, progress=progress if rank0 else None
    )
    if rank0:
        atomic_write_json(Path(spec["work_dir"]) / "train_result.json", metrics)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tuneloop.train.worker SPEC.json")
    main(sys.argv[1])
