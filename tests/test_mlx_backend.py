"""``train.backend: mlx`` (train/mlx_backend.py) on the tiny model, on this machine's CPU (``mlx[cpu]``).

What is checked, with the tolerances and what was measured on a shared 2-vCPU x86 CPU (float32 everywhere):

* the PEFT adapter converted from MLX's LoRA weights gives the logits MLX gives: max abs diff < 1e-4 (measured
  8.6e-7 for the trained adapter, whose logits moved 0.87 from the base's); also random LoRA weights on an untied
  model with ``rope_parameters.rope_theta`` 50000 and ``target_modules`` lists, a fully fine-tuned model saved
  through transformers (1.8e-7), and on the real SmolLM2-135M (``real_model``; < 1e-3, measured 2.5e-4 on logits
  of magnitude ~30 through 30 layers; without mapping ``rope_parameters`` to mlx-lm's ``rope_theta`` it was 10);
* the losses: from the same start (the LoRA weights PEFT initialises for the transformers backend under the same
  seed, or the base weights for full fine-tuning) both backends train on the same samples per step with the same
  loss, optimiser, schedule and clipping, so every step's loss agrees to 1e-5 (measured 2.4e-6 LoRA, 3.8e-6 full)
  and its gradient norm to 1e-4 relative (measured 1.7e-5, 3.0e-5). With MLX's own LoRA init (the same
  distribution, other random numbers) step 1 is the same (B = 0, so the base's loss on the same batch: 1e-5,
  measured 2.6e-7) and later steps differ by what the init does: < 3 % (measured at most 1.2 %, step 4 of 8,
  learning rate 0.01);
* a run killed after a checkpoint resumes to the same losses; the whole pipeline (``tuneloop run``) with
  ``backend: mlx`` (slow); without mlx installed, exit 2 before any work with the install line.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.config import load_config

HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
needs_mlx = pytest.mark.skipif(not HAVE_MLX, reason="mlx and mlx-lm are not installed: pip install 'tuneloop[mlx]'")

LOGITS_TOL = 1e-4  # max abs logit difference, float32 (measured ~1e-6)


def _cfg(make_config, **train):
    """The tiny config with ``train`` overrides (dotted CLI overrides, so the rest of the section stays)."""
    return load_config(make_config(), [f"train.{k}={v}" for k, v in train.items()])


def _rows(work: Path) -> list[dict]:
    return [json.loads(x) for x in (work / "train_metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model, task_data):
    """The tiny task tokenized as the preprocessing stage does it (both backends train on this)."""
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.data.validate import validate_dataset
    from tuneloop.modeling import load_tokenizer

    d = tmp_path_factory.mktemp("mlx-prep")
    tok = load_tokenizer(str(tiny_model))
    clean = validate_dataset(task_data[0], d / "valid", fmt="auto", name="train")["clean_path"]
    prepare_dataset(tok, clean, None, d / "prep", max_length=96, eval_split=0.1, seed=0)
    return tok, d / "prep" / "train"


@pytest.fixture(scope="module")
def module_config(tmp_path_factory, tiny_model, task_data):
    """``make_config`` for module-scoped fixtures (conftest's is function-scoped)."""
    import yaml

    d = tmp_path_factory.mktemp("mlx-config")

    def make() -> Path:
        cfg = {
            "name": "tiny-bot",
            "base_model": str(tiny_model),
            "seed": 0,
            "data": {"train_data": str(task_data[0]), "eval_data": str(task_data[1]), "max_length": 96},
            "train": {
                "method": "lora",
                "lora_r": 4,
                "lora_alpha": 8,
                "learning_rate": 1e-3,
                "max_steps": 6,
                "batch_size": 8,
                "save_steps": 3,
            },
        }
        path = d / "tuneloop.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make


def _train(backend: str, cfg, prepared, out: Path, **kwargs) -> tuple[dict, list[dict]]:
    tok, dataset = prepared
    shutil.rmtree(out, ignore_errors=True)
    if backend == "mlx":
        from tuneloop.train.mlx_backend import train_mlx

        metrics = train_mlx(cfg, dataset, out, tokenizer=tok, **kwargs)
    else:
        from tuneloop.train.sft import train_sft

        metrics = train_sft(cfg, dataset, out, tokenizer=tok)
    return metrics, _rows(out)


def _peft_init(cfg, out: Path) -> Path:
    """The LoRA weights train_sft starts from: PEFT's init after ``set_seed(seed)`` and loading the base, as there."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from tuneloop.modeling import load_causal_lm

    t = cfg.train
    set_seed(cfg.seed)
    model = get_peft_model(
        load_causal_lm(cfg.base_model),
        LoraConfig(
            r=t.lora_r,
            lora_alpha=t.lora_alpha,
            lora_dropout=t.lora_dropout,
            target_modules=t.target_modules,
            use_rslora=t.use_rslora,
            task_type="CAUSAL_LM",
        ),
    )
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def trained_lora(module_config, prepared, tmp_path_factory):
    """An adapter trained by the mlx backend (a high learning rate, so it really moves the logits)."""
    cfg = load_config(module_config(), ["train.learning_rate=0.02", "train.lora_dropout=0.0", "train.max_steps=6"])
    out = tmp_path_factory.mktemp("mlx-lora")
    metrics, rows = _train("mlx", cfg, prepared, out)
    return cfg, out, metrics, rows


def _prompts(tok) -> list[list[int]]:
    texts = ["Where is my refund for order 1234?", "hello", "The quick brown fox jumps over the lazy dog " * 3]
    return [tok(t)["input_ids"] for t in texts]


def _max_logit_diff(hf_model, mlx_model, prompts) -> float:
    import mlx.core as mx
    import numpy as np
    import torch

    worst = 0.0
    for ids in prompts:
        with torch.no_grad():
            a = hf_model(torch.tensor([ids])).logits[0].numpy()
        b = np.array(mlx_model(mx.array([ids]))[0])
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


# ------------------------------------------------------------------------------------------- conversion


@needs_mlx
def test_trained_adapter_gives_the_same_logits_in_peft_as_in_mlx(trained_lora, prepared):
    import mlx.core as mx

    from tuneloop.modeling import load_causal_lm
    from tuneloop.train.mlx_backend import add_lora, load_mlx_model

    cfg, out, metrics, rows = trained_lora
    tok = prepared[0]
    assert metrics["backend"] == "mlx" and metrics["kind"] == "adapter" and metrics["steps"] == 6
    adapter = out / "model"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == cfg.base_model
    assert sorted(conf["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tuneloop_config.json").is_file()

    # MLX with the trained weights as MLX holds them (the last checkpoint: mlx-lm's lora_a / lora_b names).
    model, path = load_mlx_model(cfg.base_model)
    add_lora(model, cfg, path)
    model.load_weights(list(mx.load(str(out / "checkpoints" / "step-6" / "weights.safetensors")).items()), strict=False)
    model.eval()
    peft = load_causal_lm(cfg.base_model, adapter=str(adapter))
    base = load_causal_lm(cfg.base_model)
    prompts = _prompts(tok)
    diff = _max_logit_diff(peft, model, prompts)
    moved = _max_logit_diff(base, model, prompts)
    assert diff < LOGITS_TOL, diff
    assert moved > 100 * LOGITS_TOL, moved  # the adapter changes the logits far beyond the tolerance


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory, tiny_model):
    """A tiny Llama with its own output head and rope_theta 50000 (transformers 5 writes it as rope_parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneloop.modeling import load_tokenizer, save_tokenizer

    tok = load_tokenizer(str(tiny_model))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("untied")
    LlamaForCausalLM(config).save_pretrained(str(out))
    save_tokenizer(tok, out)
    assert "rope_theta" not in json.loads((out / "config.json").read_text())  # what load_mlx_model has to map
    return out


@needs_mlx
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["model.layers.1.mlp.down_proj"]])
def test_random_lora_weights_convert_exactly(untied_model, module_config, prepared, tmp_path, targets):
    """LoRA weights far from the init (random A and B) on an untied model with rope_theta 50000; a target list
    of short names (written as such) and one naming a single layer (written as its full name)."""
    import mlx.core as mx

    from tuneloop.modeling import load_causal_lm
    from tuneloop.train.mlx_backend import _module, add_lora, load_mlx_model, save_peft_adapter

    cfg = load_config(
        module_config(),
        [
            f"base_model={untied_model}",
            "train.lora_r=3",
            "train.lora_alpha=5",
            f"train.target_modules=[{','.join(targets)}]",
        ],
    )
    assert cfg.train.target_modules == targets
    model, path = load_mlx_model(cfg.base_model)
    base_diff = _max_logit_diff(load_causal_lm(str(untied_model)), model, _prompts(prepared[0]))
    assert base_diff < LOGITS_TOL, base_diff  # the base as MLX loads it (rope_theta 50000 mapped)
    names = add_lora(model, cfg, path)
    mx.random.seed(7)
    for name in names:
        m = _module(model, name)
        m.lora_a = mx.random.normal(m.lora_a.shape) * 0.3
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.3
    model.eval()
    save_peft_adapter(model, names, cfg, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["r"] == 3 and conf["lora_alpha"] == 5
    assert sorted(conf["target_modules"]) == sorted(targets)
    peft = load_causal_lm(str(untied_model), adapter=str(tmp_path))
    lora_keys = [k for k in peft.state_dict() if "lora_A" in k]
    assert len(lora_keys) == len(names) == (4 if len(targets) == 2 else 1)
    diff = _max_logit_diff(peft, model, _prompts(prepared[0]))
    moved = _max_logit_diff(load_causal_lm(str(untied_model)), model, _prompts(prepared[0]))
    assert diff < LOGITS_TOL and moved > 100 * LOGITS_TOL, (diff, moved)


@needs_mlx
@pytest.mark.real_model
def test_real_model_base_and_adapter_logits_agree(real_model_dir, module_config, tmp_path):
    """SmolLM2-135M (GQA, rope_theta 100000 under ``rope_parameters``, tied embeddings): the base as MLX loads it
    and a converted adapter (random B on every linear layer) give transformers' logits to 1e-3 (measured 1.3e-4 and
    2.5e-4 on two 37-token chat prompts, logits of magnitude ~30)."""
    import mlx.core as mx
    import numpy as np
    import torch

    from tuneloop.modeling import load_causal_lm, load_tokenizer
    from tuneloop.train.mlx_backend import _module, add_lora, load_mlx_model, save_peft_adapter

    tok = load_tokenizer(str(real_model_dir))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = [tok(text, add_special_tokens=False)["input_ids"]]  # one short prompt: mlx[cpu]'s reference BLAS is slow

    def hf_logits(model):
        with torch.no_grad():
            return model(torch.tensor(ids)).logits[0].numpy()

    cfg = load_config(module_config(), [f"base_model={real_model_dir}", "train.lora_r=8", "train.lora_alpha=16"])
    base = hf_logits(load_causal_lm(str(real_model_dir)))
    model, path = load_mlx_model(cfg.base_model)
    assert float(np.abs(np.array(model(mx.array(ids))[0]) - base).max()) < 1e-3
    names = add_lora(model, cfg, path)
    assert len(names) == 30 * 7
    mx.random.seed(3)
    for name in names:
        m = _module(model, name)
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.02
    model.eval()
    save_peft_adapter(model, names, cfg, tmp_path)
    ours = np.array(model(mx.array(ids))[0])
    diff = float(np.abs(hf_logits(load_causal_lm(str(real_model_dir), adapter=str(tmp_path))) - ours).max())
    moved = float(np.abs(base - ours).max())
    assert diff < 1e-3 and moved > 1.0, (diff, moved)


# ------------------------------------------------------------------------------------------- losses


@needs_mlx
def test_lora_losses_match_the_transformers_backend_from_the_same_start(module_config, prepared, tmp_path):
    """Gradient accumulation with a short last step per epoch (43 samples, 4 x 3 per step), cosine with warm-up and
    weight decay: the same samples, loss, clipping, optimiser and schedule in both backends."""
    settings = [
        "train.batch_size=4",
        "train.gradient_accumulation_steps=3",
        "train.lr_scheduler=cosine",
        "train.warmup_steps=2",
        "train.weight_decay=0.1",
        "train.lora_dropout=0.0",
        "train.max_steps=8",
        "train.learning_rate=0.01",
    ]
    cfg = load_config(module_config(), settings)
    _, ours = _train("transformers", cfg, prepared, tmp_path / "hf")
    _, mlx = _train("mlx", cfg, prepared, tmp_path / "mlx", init_adapter=_peft_init(cfg, tmp_path / "init"))
    assert [r["step"] for r in mlx] == list(range(1, 9))
    for a, b in zip(ours, mlx, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-6, abs=1e-12)
        assert b["epoch"] == pytest.approx(a["epoch"], abs=1e-3)
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05  # it trained, so the comparison could fail


@needs_mlx
def test_lora_losses_with_mlx_own_init_stay_close(module_config, prepared, tmp_path):
    settings = ["train.learning_rate=0.01", "train.max_steps=8", "train.batch_size=6"]  # lora_dropout 0.05 (default)
    cfg = load_config(module_config(), settings)
    _, ours = _train("transformers", cfg, prepared, tmp_path / "hf")
    metrics, mlx = _train("mlx", cfg, prepared, tmp_path / "mlx")
    assert mlx[0]["loss"] == pytest.approx(ours[0]["loss"], abs=1e-5)  # B = 0: the base's loss on the same batch
    rel = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(ours, mlx, strict=True)]
    assert max(rel) < 0.03, rel  # the init's random numbers differ; measured at most 1.2 %
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05 and mlx[-1]["loss"] < mlx[0]["loss"] - 0.05
    assert metrics["trainable_params"] == 4352 and metrics["first_loss"] == mlx[0]["loss"]


@needs_mlx
def test_full_fine_tuning_matches_and_saves_a_transformers_model(module_config, prepared, tmp_path):
    import mlx.core as mx

    from tuneloop.modeling import load_causal_lm
    from tuneloop.train.mlx_backend import load_mlx_model

    cfg = load_config(
        module_config(),
        [
            "train.method=full",
            "train.learning_rate=0.003",
            "train.weight_decay=0.1",
            "train.max_steps=4",
            "train.save_steps=2",
        ],
    )
    _, ours = _train("transformers", cfg, prepared, tmp_path / "hf")
    metrics, mlx = _train("mlx", cfg, prepared, tmp_path / "mlx")
    for a, b in zip(ours, mlx, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    assert metrics["kind"] == "model" and metrics["trainable_params"] == metrics["total_params"]
    saved = tmp_path / "mlx" / "model"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    model, _ = load_mlx_model(cfg.base_model)
    model.load_weights(list(mx.load(str(tmp_path / "mlx" / "checkpoints" / "step-4" / "weights.safetensors")).items()))
    diff = _max_logit_diff(load_causal_lm(str(saved)), model, _prompts(prepared[0]))
    moved = _max_logit_diff(load_causal_lm(cfg.base_model), model, _prompts(prepared[0]))
    assert diff < LOGITS_TOL and moved > 100 * LOGITS_TOL, (diff, moved)


@needs_mlx
def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_losses(module_config, prepared, tmp_path):
    cfg = load_config(module_config(), ["train.lora_dropout=0.2", "train.max_steps=7", "train.learning_rate=0.01"])
    _, whole = _train("mlx", cfg, prepared, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_at_5(step, total, row):
        if step == 5:
            raise Killed

    tok, dataset = prepared
    from tuneloop.train.mlx_backend import train_mlx

    with pytest.raises(Killed):
        train_mlx(cfg, dataset, tmp_path / "cut", tokenizer=tok, progress=kill_at_5)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-3"]
    assert not (tmp_path / "cut" / "model").exists()
    metrics = train_mlx(cfg, dataset, tmp_path / "cut", tokenizer=tok)
    assert metrics["resumed_from_step"] == 3
    resumed = _rows(tmp_path / "cut")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    for a, b in zip(whole, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)  # dropout masks included (seeded per step)


# ------------------------------------------------------------------------------------------- preflight


def test_settings_the_mlx_backend_cannot_honour_are_problems(make_config, tmp_path):
    from tuneloop.train.mlx_backend import mlx_problems

    if HAVE_MLX:
        assert mlx_problems(_cfg(make_config, backend="mlx")) == []  # the tiny Llama with the defaults: nothing
    cases = {
        "method": ("qlora", "train.method: qlora"),
        "use_dora": ("true", "train.use_dora"),
        "num_processes": ("2", "train.num_processes"),
        "precision": ("bf16", "train.precision: bf16"),
        "report_to": ("tensorboard", "train.report_to: tensorboard"),
    }
    for key, (value, needle) in cases.items():
        problems = mlx_problems(_cfg(make_config, backend="mlx", **{key: value}))
        assert any(needle in p for p in problems), (key, problems)
    dpo = load_config(make_config(), ["train.backend=mlx", "train.objective=dpo"])
    assert any("train.objective: dpo" in p for p in mlx_problems(dpo))
    if HAVE_MLX:
        odd = tmp_path / "odd-model"
        odd.mkdir()
        (odd / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
        cfg = load_config(make_config(), ["train.backend=mlx", f"base_model={odd}"])
        assert any("model_type 'no_such_arch'" in p for p in mlx_problems(cfg))


def test_mlx_missing_is_a_problem_naming_the_install_line(make_config, monkeypatch):
    from tuneloop.train import mlx_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(
        mlx_backend.importlib.util,
        "find_spec",
        lambda name, *a: None if name.split(".")[0] in ("mlx", "mlx_lm") else real(name, *a),
    )
    problems = mlx_backend.mlx_problems(_cfg(make_config, backend="mlx"))
    assert problems == [
        "train.backend: mlx needs the packages mlx and mlx-lm: pip install 'tuneloop[mlx]' (mlx with "
        "Metal on Apple silicon, mlx[cpu] on Linux)"
    ]


_WITHOUT_MLX = """
import sys
sys.modules["mlx"] = None      # importlib.util.find_spec gives None, import raises ImportError: as if not installed
sys.modules["mlx_lm"] = None
sys.argv = ["tuneloop", *sys.argv[1:]]
from tuneloop.cli import main
main()
"""


def test_run_without_mlx_exits_2_before_any_work(make_config, tmp_path):
    path = make_config(train__backend="mlx")
    r = subprocess.run(
        [sys.executable, "-c", _WITHOUT_MLX, "run", str(path)], capture_output=True, text=True, timeout=300
    )
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr
    assert "train.backend: mlx needs the packages mlx and mlx-lm: pip install 'tuneloop[mlx]'" in err
    runs = tmp_path / ".tuneloop" / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no run was started


# ------------------------------------------------------------------------------------------- the pipeline


@needs_mlx
@pytest.mark.slow
def test_pipeline_with_the_mlx_backend_registers_a_gated_adapter(make_config, tmp_path):
    from tuneloop.registry.sqlite import SqliteRegistry
    from tuneloop.workspace import Workspace

    path = make_config(train__backend="mlx")
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "run", str(path), "--json"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    st = summary["stages"]
    assert summary["overall"] == "passed" and all(s["status"] == "passed" for s in st.values()), st
    tr = st["training"]["metrics"]
    assert tr["backend"] == "mlx" and tr["kind"] == "adapter" and tr["steps"] == 6 and tr["final_loss"] > 0
    ev = st["evaluation"]["metrics"]
    assert ev["eval_items"] == 12 and 0.0 <= ev["accuracy"] <= 1.0
    run_dir = tmp_path / ".tuneloop" / "runs" / summary["run_id"]
    assert len((run_dir / "train_metrics.jsonl").read_text().splitlines()) == 6
    reg = SqliteRegistry(Workspace.for_config(load_config(path)).root)
    v = reg.get("tiny-bot", "champion")
    assert v.artifact_kind == "adapter" and not any(g["blocks"] for g in v.gates.values()), v.gates
    assert v.gates["min_accuracy"]["verdict"] == "PASS"
    stored = reg.store.open_verified(v.artifact_digest)
    assert (stored / "adapter_model.safetensors").is_file()
    assert json.loads((stored / "tuneloop_config.json").read_text())["train"]["backend"] == "mlx"
