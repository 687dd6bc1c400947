"""External trainers (train.backend: command) with a stand-in trainer that really trains, and export-config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneloop import FineTunePipeline, load_config
from tuneloop.errors import ConfigError
from tuneloop.registry.db import SqliteRegistry
from tuneloop.workspace import Workspace

STANDIN = Path(__file__).with_name("standin_trainer.py")


def _command(extra: str = "") -> str:
    return f"{sys.executable} {STANDIN} --base {{base_model}} --train {{train_file}} --out {{output_dir}} --seed {{seed}} {extra}"


@pytest.mark.slow
def test_command_backend_registers_the_adapter_it_wrote(make_config, tmp_path):
    path = make_config(train={"backend": "command", "command": _command(), "method": "lora"})
    summary = FineTunePipeline(load_config(path)).run()
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: v["error"] for k, v in st.items()}
    tr = st["training"]["metrics"]
    assert tr["backend"] == "command" and tr["kind"] == "adapter" and tr["exit_code"] == 0
    assert tr["steps"] == 4 and tr["final_loss"] > 0  # read from the trainer_state.json it left
    run_dir = tmp_path / ".tuneloop" / "runs" / summary["run_id"]
    log = (run_dir / "logs" / "training.log").read_text()
    assert "[command] stand-in trainer: done" in log  # its output was streamed into the stage log
    assert len((run_dir / "train_metrics.jsonl").read_text().splitlines()) == 4
    reg = SqliteRegistry(Workspace.for_config(load_config(path)).root)
    v = reg.get("tiny-bot", "champion")
    assert v["artifact_kind"] == "adapter"
    assert (reg.store.open_verified(v["artifact_digest"]) / "adapter_model.safetensors").is_file()
    # The stand-in was given this run's training split: every record the data and preprocessing stages kept.
    stage = json.loads((run_dir / "stages" / "preprocessing.json").read_text())
    kept = len(Path(stage["outputs"]["train_records"]).read_text().splitlines())
    assert kept == st["preprocessing"]["metrics"]["train_samples"] > 40


@pytest.mark.slow
def test_failing_or_empty_commands_fail_the_stage_clearly(make_config):
    summary = FineTunePipeline(load_config(make_config(train={"backend": "command", "command": _command("--fail")}))).run()
    err = summary["stages"]["training"]["error"]
    assert summary["stages"]["training"]["status"] == "failed"
    assert "exited with status 3" in err and "CUDA out of memory (pretend)" in err

    summary = FineTunePipeline(load_config(make_config(train={"backend": "command", "command": "echo hello > {output_dir}/notes.txt"}))).run()
    err = summary["stages"]["training"]["error"]
    assert "holds no model" in err and "adapter_config.json" in err and "notes.txt" in err

    for command, needle in ((None, "train.command: required"), ("train {data_file}", "unknown placeholder(s) {data_file}")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            FineTunePipeline(load_config(make_config(train={"backend": "command", "command": command}))).preflight()


def test_export_config_for_axolotl_and_llamafactory(make_config, tmp_path):
    path = make_config(train={"method": "qlora", "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-4, "use_dora": True})
    ax = tmp_path / "axolotl.yaml"
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "axolotl", "-o", str(ax)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    y = yaml.safe_load(ax.read_text())
    cfg = load_config(path)
    assert y["base_model"] == cfg.base_model and y["adapter"] == "qlora" and y["load_in_4bit"] is True
    assert y["lora_r"] == 8 and y["lora_alpha"] == 16 and y["lora_target_linear"] is True and y["peft_use_dora"] is True
    assert y["datasets"] == [{"path": cfg.data.train_data, "type": "chat_template", "field_messages": "messages",
                              "message_property_mappings": {"role": "role", "content": "content"}}]
    assert y["sequence_len"] == 96 and y["sample_packing"] is True and y["micro_batch_size"] == 4 and y["learning_rate"] == 1e-4

    lf = tmp_path / "lf" / "train.yaml"
    lf.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "llamafactory", "-o", str(lf)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    y = yaml.safe_load(lf.read_text())
    assert y["stage"] == "sft" and y["finetuning_type"] == "lora" and y["quantization_bit"] == 4 and y["lora_target"] == "all"
    assert y["lora_rank"] == 8 and y["cutoff_len"] == 96 and y["neat_packing"] is True and y["use_dora"] is True
    info = json.loads((lf.parent / "dataset_info.json").read_text())
    assert info[y["dataset"]]["file_name"] == cfg.data.train_data and info[y["dataset"]]["formatting"] == "sharegpt"
    assert y["eval_dataset"] in info

    bad = subprocess.run([sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "unsloth"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected axolotl or llamafactory" in bad.stderr


def test_an_interrupted_command_leaves_no_process_behind(tmp_path):
    """Ctrl-C during an external trainer stops its whole process group, not just the shell that started it."""
    import os
    import time

    from tuneloop.train.launch import stream_process

    pidfile = tmp_path / "child.pid"
    command = f"sleep 60 & echo $! > {pidfile}; echo started; wait"

    def on_line(line: str) -> None:
        if line == "started":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_process(command, on_line, env=dict(os.environ), shell=True)
    child = int(pidfile.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"the trainer's child process {child} outlived the interrupted stage")
