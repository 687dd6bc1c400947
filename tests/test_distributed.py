"""Data-parallel training in 2 CPU processes (torch.distributed, gloo) through the real pipeline."""

from __future__ import annotations

import json

import pytest

from tuneloop import FineTunePipeline, load_config
from tuneloop.modeling import load_causal_lm


@pytest.mark.slow
def test_two_cpu_processes_train_the_tiny_model(make_config, tmp_path):
    path = make_config(
        train={
            "method": "lora",
            "lora_r": 4,
            "lora_alpha": 8,
            "learning_rate": 3e-3,
            "max_steps": 6,
            "batch_size": 4,
            "save_steps": 3,
            "num_processes": 2,
        }
    )
    summary = FineTunePipeline(load_config(path)).run()
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: v["error"] for k, v in st.items()}
    tr = st["training"]["metrics"]
    # 48 samples, 4 per process per step, 2 processes: 6 steps are one epoch (one process would need 12).
    assert tr["steps"] == 6 and tr["epochs"] == 1.0
    run_dir = tmp_path / ".tuneloop" / "runs" / summary["run_id"]
    log = (run_dir / "logs" / "training.log").read_text()
    assert "launching 2 training processes" in log and "torch.distributed.run" in log
    rows = [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the metrics
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) < sum(losses[:2])  # it learned
    stage = json.loads((run_dir / "stages" / "training.json").read_text())
    model = load_causal_lm(load_config(path).base_model, adapter=stage["outputs"]["model_dir"])
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
