"""`train.method: qlora` loads the base in 4 bits (NF4, double quantisation) and prepares it for k-bit training.

The 4-bit load itself needs CUDA and bitsandbytes (benchmarks/gpu_train.py exercises it on a GPU); on CPU this
checks what the trainers ask transformers for, and that ``lora`` still loads the full-precision base.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tuneloop import modeling


def _cfg(method: str, checkpointing: bool = False):
    return SimpleNamespace(
        base_model="base-dir", train=SimpleNamespace(method=method, gradient_checkpointing=checkpointing)
    )


def test_qlora_loads_a_4bit_nf4_base_and_prepares_it(monkeypatch):
    calls = {}
    monkeypatch.setattr(modeling, "require_cuda_for_qlora", lambda: None)
    monkeypatch.setattr(modeling, "load_causal_lm", lambda path, **kw: calls.setdefault("load", (path, kw)) and "model")
    import peft

    monkeypatch.setattr(
        peft,
        "prepare_model_for_kbit_training",
        lambda model, use_gradient_checkpointing: (
            calls.setdefault("prepare", (model, use_gradient_checkpointing)) and "prepared"
        ),
    )
    assert modeling.load_training_base(_cfg("qlora", checkpointing=True)) == "prepared"
    path, kw = calls["load"]
    q = kw["quantization_config"]
    assert path == "base-dir" and q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert calls["prepare"] == ("model", True)


def test_lora_loads_the_full_precision_base(monkeypatch):
    seen = []
    monkeypatch.setattr(modeling, "load_causal_lm", lambda path, **kw: seen.append(kw) or "model")
    assert modeling.load_training_base(_cfg("lora")) == "model"
    assert seen == [{}]


def test_qlora_without_cuda_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(modeling, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(modeling.StageError, match="CUDA"):
        modeling.load_training_base(_cfg("qlora"))
