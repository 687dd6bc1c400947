"""backend unsloth on a machine without a GPU: the mapping of a config onto Unsloth's and TRL's arguments, the preflight
(through the real CLI: exit 2, nothing created), and the child process that imports unsloth first, up to that import.

The training itself needs a CUDA GPU and the unsloth package; benchmarks/gpu_unsloth.py runs it there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneloop.config import build_config
from tuneloop.errors import StageError
from tuneloop.train import unsloth_backend as ub
from tuneloop.train.sft import checkpointing_args

# What this machine lacks, as CPU CI does; where it has them, the tests that rely on their absence are skipped.
no_unsloth_here = pytest.mark.skipif(
    importlib.util.find_spec("unsloth") is not None, reason="unsloth is installed here"
)
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present here")
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The parameters of Unsloth 2026.8.19's FastLanguageModel.from_pretrained (unsloth/models/loader.py) and
# FastLanguageModel.get_peft_model (FastLlamaModel's, unsloth/models/llama.py), read from its source with ast; a plan
# key outside them would reach transformers' from_pretrained (or PEFT's LoraConfig) through **kwargs instead.
FROM_PRETRAINED = {
    "model_name",
    "max_seq_length",
    "dtype",
    "load_in_4bit",
    "load_in_8bit",
    "load_in_16bit",
    "full_finetuning",
    "token",
    "device_map",
    "rope_scaling",
    "fix_tokenizer",
    "trust_remote_code",
    "use_gradient_checkpointing",
    "resize_model_vocab",
    "revision",
    "use_exact_model_name",
    "offload_embedding",
    "float32_mixed_precision",
    "fast_inference",
    "gpu_memory_utilization",
    "float8_kv_cache",
    "random_state",
    "max_lora_rank",
    "disable_log_stats",
    "qat_scheme",
    "load_in_fp8",
    "unsloth_tiled_mlp",
    "text_only",
}
GET_PEFT_MODEL = {
    "r",
    "target_modules",
    "lora_alpha",
    "lora_dropout",
    "bias",
    "layers_to_transform",
    "layers_pattern",
    "finetune_last_n_layers",
    "use_gradient_checkpointing",
    "random_state",
    "max_seq_length",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "loftq_config",
    "temporary_location",
    "qat_scheme",
    "target_parameters",
    "ensure_weight_tying",
}


@pytest.fixture
def gpu(monkeypatch):
    """The plan is made on the GPU machine, where TRL's precision and device arguments follow torch.cuda. A GPU is a
    boundary this machine cannot cross, so torch.cuda's answers are stood in for (a bf16-capable GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=600,
        max_position_embeddings=256,
    )


def config(**train):
    return build_config(
        {
            "name": "bot",
            "base_model": "/models/tiny",
            "seed": 7,
            "data": {"train_data": "train.jsonl", "max_length": 96},
            "train": {
                "backend": "unsloth",
                "lora_r": 4,
                "lora_alpha": 8,
                "learning_rate": 1e-3,
                "batch_size": 4,
                "gradient_accumulation_steps": 2,
                "num_epochs": 1.5,
                "lr_scheduler": "cosine",
                "warmup_steps": 3,
                "weight_decay": 0.01,
                **train,
            },
        }
    )


def plan(cfg, records=50):
    return ub.unsloth_plan(cfg, train_records=records, work_dir="/run/train", model_config=tiny_llama())


def common_trainer(cfg):
    """The TRL arguments every objective gets, as backend transformers gives them (train/dpo.py TrlRun.args)."""
    args_cls = ub._trl_config_class(cfg.train.objective)
    return {
        "output_dir": "/run/train/checkpoints",
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 11,  # 50 records / 8 per step = 7 steps an epoch; 1.5 epochs = ceil(10.5)
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 3,
        "weight_decay": 0.01,
        "max_length": 96,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 25,
        "save_total_limit": 2,
        "seed": 7,
        "data_seed": 7,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": False,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
        "bf16": True,
        **checkpointing_args(args_cls, False),
    }


def test_sft_lora_maps_onto_unsloth_and_sft_config(gpu):
    cfg = config()
    p = plan(cfg)
    assert p.objective == "sft" and (p.per_step, p.steps_per_epoch, p.max_steps) == (8, 7, 11)
    assert p.load == {
        "model_name": "/models/tiny",
        "max_seq_length": 96,
        "dtype": torch.bfloat16,
        "load_in_4bit": False,
        "full_finetuning": False,
        "use_gradient_checkpointing": False,
        "random_state": 7,
        "use_exact_model_name": True,
    }
    assert p.peft == {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "target_modules": LLAMA_PROJECTIONS,
        "bias": "none",
        "use_gradient_checkpointing": False,
        "random_state": 7,
        "use_rslora": False,
        "loftq_config": None,
    }
    assert p.trainer == {
        **common_trainer(cfg),
        "packing": False,
        "padding_free": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "remove_unused_columns": False,
    }
    assert p.completion_only is True
    assert any("padded" in n for n in p.notes) and any("lora_dropout" in n for n in p.notes)
    assert set(p.load) <= FROM_PRETRAINED and set(p.peft) <= GET_PEFT_MODEL


def test_qlora_loads_4bit_with_unsloth_checkpointing_and_the_precision_asked(gpu):
    cfg = config(
        method="qlora",
        gradient_checkpointing=True,
        precision="fp16",
        lora_dropout=0.0,
        use_rslora=True,
        use_dora=True,
        target_modules=["q_proj", "v_proj"],
        train_on_inputs=True,
        packing=False,
    )
    p = plan(cfg)
    assert p.load["load_in_4bit"] is True and p.load["full_finetuning"] is False
    assert p.load["dtype"] == torch.float16 and p.trainer["fp16"] is True and p.trainer["bf16"] is False
    assert p.load["use_gradient_checkpointing"] == "unsloth" == p.peft["use_gradient_checkpointing"]
    assert p.trainer == {
        **common_trainer(cfg),
        "bf16": False,
        "fp16": True,
        "packing": False,
        "padding_free": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "remove_unused_columns": False,
    }
    assert p.peft["target_modules"] == ["q_proj", "v_proj"] and p.peft["use_rslora"] is True
    assert p.peft["use_dora"] is True  # not a get_peft_model parameter: Unsloth hands it on to PEFT's LoraConfig
    assert p.completion_only is False
    assert not any("padded" in n or "lora_dropout" in n for n in p.notes) and any("4-bit NF4" in n for n in p.notes)


def test_dpo_maps_beta_and_counts_pairs(gpu):
    cfg = config(objective="dpo", dpo_beta=0.25)
    p = plan(cfg, records=50)
    assert p.objective == "dpo" and p.max_steps == 11
    assert p.trainer == {**common_trainer(cfg), "beta": 0.25}
    assert p.peft["target_modules"] == LLAMA_PROJECTIONS and p.load["load_in_4bit"] is False


def test_full_fine_tuning_uses_unsloths_full_finetuning_in_fp32_master_weights(gpu):
    cfg = config(method="full", max_steps=5)
    p = plan(cfg)
    assert p.peft is None and p.max_steps == 5
    assert p.load == {
        "model_name": "/models/tiny",
        "max_seq_length": 96,
        "dtype": torch.bfloat16,
        "load_in_4bit": False,
        "full_finetuning": True,
        "use_gradient_checkpointing": False,
        "random_state": 7,
        "use_exact_model_name": True,
        "float32_mixed_precision": True,
    }
    assert set(p.load) <= FROM_PRETRAINED
    fp32 = plan(config(method="full", precision="fp32"))
    assert fp32.load["dtype"] == torch.float32 and "float32_mixed_precision" not in fp32.load
    assert fp32.trainer["bf16"] is False and fp32.trainer["fp16"] is False


def test_trainer_arguments_are_fields_of_trls_configs(gpu):
    import dataclasses

    from trl import DPOConfig, SFTConfig

    for cls, cfg in ((SFTConfig, config()), (DPOConfig, config(objective="dpo"))):
        assert set(plan(cfg).trainer) <= {f.name for f in dataclasses.fields(cls)}


def test_all_linear_is_every_linear_layer_but_the_output_layer():
    assert ub.resolve_target_modules("all-linear", tiny_llama()) == LLAMA_PROJECTIONS
    assert ub.resolve_target_modules(["q_proj"], tiny_llama()) == ["q_proj"]


def test_a_context_longer_than_the_model_is_refused(gpu, tmp_path):
    cfg = config()
    long = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": 512})})
    with pytest.raises(StageError, match="data.max_length: 512 is longer than the base model's context .256"):
        plan(long)


def test_preflight_names_each_problem(monkeypatch):
    monkeypatch.setattr(ub, "cuda_found", lambda: None)
    monkeypatch.setattr(ub, "unsloth_version", lambda: (2026, 8, 19))
    assert ub.unsloth_problems(config()) == []
    assert ub.unsloth_problems(config(objective="dpo")) == []

    problems = ub.unsloth_problems(config(objective="kto", num_processes=2))
    assert [p.split(":")[0] for p in problems] == ["train.objective", "train.num_processes"]
    assert "use backend: transformers for kto" in problems[0]

    monkeypatch.setattr(ub, "unsloth_version", lambda: None)  # CUDA there, unsloth not installed
    (problem,) = ub.unsloth_problems(config())
    assert "pip install 'tuneloop[unsloth]'" in problem and "uv pip install unsloth --torch-backend=auto" in problem
    monkeypatch.setattr(ub, "unsloth_version", lambda: (2025, 10, 12))
    (problem,) = ub.unsloth_problems(config())
    assert "unsloth 2025.10.12 is installed" in problem and "2025.11.1 or later" in problem


@no_cuda_here
@no_unsloth_here
def test_cli_refuses_unsloth_without_cuda_or_unsloth_before_any_work(make_config, tmp_path):
    path = make_config(train__backend="unsloth", train__num_processes=2)
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "run", str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())  # Rich wraps long lines
    assert (
        "backend unsloth needs a CUDA GPU (found: torch" in err and "use backend: transformers on this machine" in err
    )
    assert "pip install 'tuneloop[unsloth]'" in err  # this machine has no unsloth either (it pulls CUDA torch)
    assert "train.num_processes" in err
    assert not (tmp_path / ".tuneloop").exists()  # nothing was created


@no_unsloth_here
def test_the_training_child_imports_unsloth_before_anything_else(tiny_model, tmp_path):
    """The child process is started, reads its spec and fails at `import unsloth` here with the install line; the
    stage error carries it and no model is written. Importing the module itself loads no transformers/TRL/PEFT."""
    from tuneloop.modeling import load_tokenizer

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tuneloop.train.unsloth_backend; "
            "print(sorted(m for m in ('transformers', 'trl', 'peft') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "[]", probe.stderr
    cfg = build_config(
        {
            "name": "bot",
            "base_model": str(tiny_model),
            "data": {"train_data": "t.jsonl"},
            "train": {"backend": "unsloth"},
        }
    )
    with pytest.raises(StageError, match=r"unsloth could not be imported .*pip install 'tuneloop\[unsloth\]'"):
        ub.train_unsloth(cfg, tmp_path / "prep", tmp_path / "train", tokenizer=load_tokenizer(str(tiny_model)))
    assert not (tmp_path / "train" / "model").exists()


STANDIN = Path(__file__).resolve().parent / "unsloth_standin"


@no_unsloth_here
def test_sft_through_the_child_with_a_standin_for_unsloth_matches_backend_transformers(
    tiny_model, task_data, tmp_path, monkeypatch, caplog
):
    """Everything but Unsloth's own code runs: the child process, the plan, TRL's SFTTrainer on the prepared samples with
    our collator, checkpoints, progress, the saved adapter and metrics. Unsloth is replaced by tests/unsloth_standin
    (transformers + PEFT under Unsloth's keywords), since it needs a CUDA GPU. With the same seed the per-step losses are
    those of backend transformers on the same config (which packs; the child pads)."""
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.sft import read_metric_rows, train_sft

    tok = load_tokenizer(str(tiny_model))
    prepare_dataset(tok, task_data[0], task_data[1], tmp_path / "prep", max_length=96, eval_split=0.1, seed=0)
    raw = {
        "name": "bot",
        "base_model": str(tiny_model),
        "seed": 0,
        "data": {"train_data": str(task_data[0]), "max_length": 96},
        "train": {
            "backend": "unsloth",
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "learning_rate": 1e-3,
            "max_steps": 4,
            "batch_size": 8,
            "save_steps": 2,
        },
    }
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))  # the child (only) finds the stand-in as `unsloth`
    caplog.set_level(logging.INFO, logger="tuneloop")
    steps = []
    m = ub.train_unsloth(
        build_config(raw),
        tmp_path / "prep" / "train",
        tmp_path / "u",
        tokenizer=tok,
        progress=lambda step, total, row: steps.append((step, total)),
    )
    assert "unsloth stand-in imported; before it: []" in caplog.text  # imported before transformers, TRL and PEFT
    assert m["kind"] == "adapter" and m["backend"] == "unsloth" and m["unsloth_version"] == "0.0-standin"
    assert m["objective"] == "sft" and m["steps"] == 4 and m["train_samples"] > 0 and m["resumed_from_step"] == 0
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    adapter = json.loads((tmp_path / "u" / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model) and sorted(adapter["target_modules"]) == sorted(
        LLAMA_PROJECTIONS
    )
    assert (tmp_path / "u" / "model" / "adapter_model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "u" / "checkpoints").glob("checkpoint-*")] != []

    raw["train"]["backend"] = "transformers"
    ref = train_sft(build_config(raw), tmp_path / "prep" / "train", tmp_path / "t", tokenizer=tok)
    ours = [r["loss"] for r in read_metric_rows(tmp_path / "u" / "train_metrics.jsonl")]
    theirs = [r["loss"] for r in read_metric_rows(tmp_path / "t" / "train_metrics.jsonl")]
    assert len(ours) == len(theirs) == 4
    assert ours == pytest.approx(theirs, rel=1e-4), (ours, theirs)
    assert m["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-4)


@no_unsloth_here
def test_dpo_through_the_child_with_a_standin_matches_backend_transformers_and_resumes(
    tiny_model, task_data, tmp_path, monkeypatch
):
    """DPO the same way (TRL's DPOTrainer through train_pairs, the base with the adapter disabled as the reference):
    the per-step losses are backend transformers' ones; a run killed after its step-2 checkpoint resumes from it."""
    import shutil

    from tuneloop.data.prepare import prepare_preferences
    from tuneloop.data.validate import validate_dataset
    from tuneloop.fsutil import read_jsonl
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.dpo import train_dpo
    from tuneloop.train.sft import read_metric_rows

    recs = read_jsonl(task_data[0])[:24]
    pairs = [
        {
            "prompt": r["messages"][-2]["content"],
            "chosen": r["messages"][-1]["content"],
            "rejected": recs[(i + 5) % len(recs)]["messages"][-1]["content"],
        }
        for i, r in enumerate(recs)
    ]
    pairs = [p for p in pairs if p["chosen"] != p["rejected"]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rep = validate_dataset(tmp_path / "pairs.jsonl", tmp_path / "valid", fmt="preference")
    prepare_preferences(Path(rep["clean_path"]), None, tmp_path / "prep", eval_split=0.1, seed=0)
    tok = load_tokenizer(str(tiny_model))
    raw = {
        "name": "bot",
        "base_model": str(tiny_model),
        "seed": 0,
        "data": {"train_data": str(tmp_path / "pairs.jsonl"), "max_length": 96},
        "train": {
            "backend": "unsloth",
            "objective": "dpo",
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "learning_rate": 5e-3,
            "max_steps": 4,
            "batch_size": 4,
            "save_steps": 2,
        },
    }
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))
    work = tmp_path / "u"
    m = ub.train_unsloth(build_config(raw), tmp_path / "prep" / "train", work, tokenizer=tok)
    assert m["kind"] == "adapter" and m["objective"] == "dpo" and m["train_pairs"] > 0 and "final_rewards_margins" in m

    raw["train"]["backend"] = "transformers"
    ref = train_dpo(build_config(raw), tmp_path / "prep" / "train", tmp_path / "t", tokenizer=tok)
    ours = [r["loss"] for r in read_metric_rows(work / "train_metrics.jsonl")]
    theirs = [r["loss"] for r in read_metric_rows(tmp_path / "t" / "train_metrics.jsonl")]
    assert len(ours) == 4 and ours == pytest.approx(theirs, rel=1e-4), (ours, theirs)
    assert m["final_rewards_margins"] == pytest.approx(ref["final_rewards_margins"], rel=1e-3, abs=1e-6)

    # As if killed after the step-2 checkpoint: later checkpoints and the model never got written.
    shutil.rmtree(work / "checkpoints" / "checkpoint-4")
    shutil.rmtree(work / "model")
    raw["train"]["backend"] = "unsloth"
    again = ub.train_unsloth(build_config(raw), tmp_path / "prep" / "train", work, tokenizer=tok)
    assert again["resumed_from_step"] == 2 and again["final_loss"] == pytest.approx(m["final_loss"], abs=1e-5)
    assert [r["step"] for r in read_metric_rows(work / "train_metrics.jsonl")] == [1, 2, 3, 4]
