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
from tuneloop.registry.sqlite import SqliteRegistry
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
    assert v.artifact_kind == "adapter"
    assert (reg.store.open_verified(v.artifact_digest) / "adapter_model.safetensors").is_file()
    # The stand-in was given this run's training split: every record the data and preprocessing stages kept.
    stage = json.loads((run_dir / "stages" / "preprocessing.json").read_text())
    kept = len(Path(stage["outputs"]["train_records"]).read_text().splitlines())
    assert kept == st["preprocessing"]["metrics"]["train_samples"] > 40


@pytest.mark.slow
def test_failing_or_empty_commands_fail_the_stage_clearly(make_config):
    summary = FineTunePipeline(
        load_config(make_config(train={"backend": "command", "command": _command("--fail")}))
    ).run()
    err = summary["stages"]["training"]["error"]
    assert summary["stages"]["training"]["status"] == "failed"
    assert "exited with status 3" in err and "CUDA out of memory (pretend)" in err

    summary = FineTunePipeline(
        load_config(make_config(train={"backend": "command", "command": "echo hello > {output_dir}/notes.txt"}))
    ).run()
    err = summary["stages"]["training"]["error"]
    assert "holds no model" in err and "adapter_config.json" in err and "notes.txt" in err

    for command, needle in (
        (None, "train.command: required"),
        ("train {data_file}", "unknown placeholder(s) {data_file}"),
    ):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            FineTunePipeline(load_config(make_config(train={"backend": "command", "command": command}))).preflight()


def test_export_config_for_axolotl_and_llamafactory(make_config, tmp_path):
    path = make_config(
        train={"method": "qlora", "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-4, "use_dora": True}
    )
    ax = tmp_path / "axolotl.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "axolotl", "-o", str(ax)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    y = yaml.safe_load(ax.read_text())
    cfg = load_config(path)
    assert y["base_model"] == cfg.base_model and y["adapter"] == "qlora" and y["load_in_4bit"] is True
    assert y["lora_r"] == 8 and y["lora_alpha"] == 16 and y["lora_target_linear"] is True and y["peft_use_dora"] is True
    assert y["datasets"] == [
        {
            "path": cfg.data.train_data,
            "type": "chat_template",
            "chat_template": "tokenizer_default",
            "field_messages": "messages",
            "message_property_mappings": {"role": "role", "content": "content"},
        }
    ]
    assert (
        y["sequence_len"] == 96
        and y["sample_packing"] is True
        and y["micro_batch_size"] == 4
        and y["learning_rate"] == 1e-4
    )

    lf = tmp_path / "lf" / "train.yaml"
    lf.parent.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "llamafactory", "-o", str(lf)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    y = yaml.safe_load(lf.read_text())
    assert (
        y["stage"] == "sft"
        and y["finetuning_type"] == "lora"
        and y["quantization_bit"] == 4
        and y["lora_target"] == "all"
    )
    assert y["lora_rank"] == 8 and y["cutoff_len"] == 96 and y["neat_packing"] is True and y["use_dora"] is True
    info = json.loads((lf.parent / "dataset_info.json").read_text())
    assert info[y["dataset"]]["file_name"] == cfg.data.train_data and info[y["dataset"]]["formatting"] == "sharegpt"
    assert y["eval_dataset"] in info

    bad = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "unsloth"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "expected axolotl, llamafactory or openrlhf" in bad.stderr


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


# ---------------------------------------------------------------- export-config: precision and chat template

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _exports(path: Path, tmp_path: Path) -> tuple[str, dict, str, dict]:
    """Both exports of the config at ``path``: (axolotl text, its YAML, llamafactory text, its YAML)."""
    from tuneloop.train.external import export_config

    cfg = load_config(path)
    lf_file = tmp_path / "lf" / "train.yaml"
    lf_file.parent.mkdir(exist_ok=True)
    ax, lf = export_config(cfg, "axolotl"), export_config(cfg, "llamafactory", lf_file)
    return ax, yaml.safe_load(ax), lf, yaml.safe_load(lf)


def _tokenizer_copy(tiny_model: Path, dest: Path, template: str | None) -> Path:
    """The tiny model's tokenizer saved to ``dest`` with ``template`` (None: no chat template at all)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = template
    tok.save_pretrained(str(dest))
    for leftover in [dest / "chat_template.jinja"] if template is None else []:
        leftover.unlink(missing_ok=True)
    return dest


def test_export_for_a_cpu_machine_has_no_mixed_precision(make_config, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for precision in ("auto", "fp32"):
        ax_text, ax, lf_text, lf = _exports(make_config(train__precision=precision), tmp_path)
        for text, y in ((ax_text, ax), (lf_text, lf)):
            body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
            assert "bf16: true" not in body and "fp16: true" not in body, text
            assert y["bf16"] is False and y["fp16"] is False
        assert ax["bf16"] != "auto"
        if precision == "auto":
            assert "train.precision auto -> fp32" in ax_text.splitlines()[1]
            assert "train.precision auto -> fp32" in lf_text.splitlines()[1]
    _, ax, _, lf = _exports(make_config(train__precision="bf16"), tmp_path)  # asked for explicitly: kept
    assert ax["bf16"] is True and lf["bf16"] is True and ax["fp16"] is False and lf["fp16"] is False


def test_export_for_a_bf16_gpu_keeps_auto_as_bf16(make_config, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    ax_text, ax, _, lf = _exports(make_config(), tmp_path)
    assert ax["bf16"] is True and lf["bf16"] is True and ax["fp16"] is False and lf["fp16"] is False
    assert "train.precision auto -> bf16" in ax_text


def test_export_maps_the_tokenizers_chatml_template(make_config, tmp_path):
    # The fixture's tokenizer carries tuneloop's ChatML template itself.
    _, ax, lf_text, lf = _exports(make_config(), tmp_path)
    assert ax["chat_template"] == "tokenizer_default" and "chat_template_jinja" not in ax
    assert (
        ax["datasets"][0]["chat_template"] == "tokenizer_default"
        and ax["test_datasets"][0]["chat_template"] == "tokenizer_default"
    )
    assert lf["template"] == "chatml" and "renders as ChatML" in lf_text


def test_export_of_a_non_chatml_tokenizer_template(make_config, tmp_path, tiny_model):
    import shutil

    model = tmp_path / "zephyr-model"
    shutil.copytree(tiny_model, model)
    _tokenizer_copy(tiny_model, model, ZEPHYR_TEMPLATE)
    _, ax, lf_text, lf = _exports(make_config(base_model=str(model)), tmp_path)
    assert ax["chat_template"] == "tokenizer_default"
    assert "template" not in lf and "parses the tokenizer's Jinja template" in lf_text  # LLaMA-Factory parses it


def test_export_of_data_chat_template(make_config, tmp_path):
    from tuneloop.modeling import CHATML_TEMPLATE
    from tuneloop.train.external import export_config, export_template

    # A ChatML template written differently (whitespace control) still maps to LLaMA-Factory's chatml.
    spelled_out = CHATML_TEMPLATE.replace("{% for message in messages %}", "{%- for message in messages -%}")
    _, ax, _, lf = _exports(make_config(data__chat_template=spelled_out), tmp_path)
    assert ax["chat_template"] == "jinja" and ax["chat_template_jinja"] == spelled_out
    # Axolotl defaults a dataset without its own template to the tokenizer's: the dataset must carry it too.
    assert ax["datasets"][0]["chat_template"] == "jinja" and ax["datasets"][0]["chat_template_jinja"] == spelled_out
    assert lf["template"] == "chatml"
    # Anything else: Axolotl takes it verbatim, LLaMA-Factory cannot, and the export says so.
    cfg = load_config(make_config(data__chat_template=ZEPHYR_TEMPLATE))
    assert export_template(cfg).chatml is False and export_template(cfg).source == "data.chat_template"
    ax = yaml.safe_load(export_config(cfg, "axolotl"))
    assert ax["chat_template"] == "jinja" and ax["chat_template_jinja"] == ZEPHYR_TEMPLATE
    with pytest.raises(ConfigError, match="LLaMA-Factory cannot use this template"):
        export_config(cfg, "llamafactory")


def test_export_without_any_template_uses_the_chatml_default(make_config, tmp_path, tiny_model):
    import shutil

    from tuneloop.modeling import CHATML_TEMPLATE

    model = tmp_path / "bare-model"
    shutil.copytree(tiny_model, model)
    _tokenizer_copy(tiny_model, model, None)
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(str(model)).chat_template  # the setup really has no template
    _, ax, _, lf = _exports(make_config(base_model=str(model)), tmp_path)
    assert ax["chat_template"] == "jinja" and ax["chat_template_jinja"] == CHATML_TEMPLATE
    assert lf["template"] == "chatml"
