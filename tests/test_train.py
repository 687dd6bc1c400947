"""Training internals on the tiny model: packing without leakage, reproducibility."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tuneloop.data.prepare import IGNORE_INDEX
from tuneloop.train.sft import PackingCollator, _Collator, pack_rows


def test_best_fit_decreasing_fills_rows():
    lengths = [50, 30, 70, 20, 10, 60, 40]
    rows = pack_rows(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 3  # 280 tokens need at least 3 rows of 100
    assert pack_rows([150, 10], 100) == [[0], [1]]  # too long: a row of its own


def _samples(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = n // 2  # prompt tokens carry no loss, as preprocessing writes them
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_each_sample_alone(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    model.config.use_cache = False  # as in training: with a KV cache transformers does not look for packing
    samples = _samples(model.config.vocab_size, [23, 9, 17, 31, 5, 12])
    batch = PackingCollator(pad_id=0, capacity=48)(samples)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape[0] < len(samples)  # several samples share a row
    # Recover where each sample landed from the position ids (a new segment starts at 0).
    placed = {}
    for r in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][r].tolist()
        starts = [j for j, p in enumerate(pos) if p == 0]
        for s, e in zip(starts, starts[1:] + [len(pos)], strict=True):
            seg = batch["input_ids"][r, s:e].tolist()
            for k, smp in enumerate(samples):
                if smp["input_ids"] == seg:
                    placed[k] = (r, s, e)
    assert sorted(placed) == list(range(len(samples)))

    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        naive = model(input_ids=batch["input_ids"]).logits  # concatenation without position ids: leaks
        leaked = False
        for k, smp in enumerate(samples):
            r, s, e = placed[k]
            alone = model(input_ids=torch.tensor([smp["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[r, s:e], alone, atol=1e-5, rtol=0)
            leaked |= s > 0 and not torch.allclose(naive[r, s:e], alone, atol=1e-3)
            # The first token of a packed sample never predicts from the previous sample.
            assert batch["labels"][r, s].item() == IGNORE_INDEX
            assert batch["labels"][r, s + 1 : e].tolist() == smp["labels"][1:]
        assert leaked, "the leakage check would not notice attention across samples"

        # Same loss as the padded batch: same tokens, same mean.
        padded = _Collator(pad_id=0)(samples)
        loss_packed = model(**batch).loss
        loss_padded = model(**padded).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)
    assert (batch["labels"] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_padding_free_gradients_match_padded(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    model.config.use_cache = False
    samples = _samples(model.config.vocab_size, [19, 7, 26, 11], seed=1)
    grads = []
    for batch in (PackingCollator(0, 64)(samples), _Collator(0)(samples)):
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def prepared(tmp_path, tiny_model, task_data):
    """The tiny task tokenized as the preprocessing stage does it."""
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.data.validate import validate_dataset
    from tuneloop.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    clean = validate_dataset(task_data[0], tmp_path / "valid", fmt="auto", name="train")["clean_path"]
    prepare_dataset(tok, clean, None, tmp_path / "prep", max_length=96, eval_split=0.1, seed=0)
    return tok, tmp_path / "prep" / "train"


def _train(make_config, prepared, out, **overrides):
    from tuneloop.config import load_config
    from tuneloop.train.sft import train_sft

    tok, dataset = prepared
    cfg = load_config(make_config(), [f"{k}={v}" for k, v in overrides.items()])
    metrics = train_sft(cfg, dataset, out, tokenizer=tok)
    rows = [json.loads(x) for x in (out / "train_metrics.jsonl").read_text().splitlines()]
    return metrics, rows


@pytest.mark.slow
def test_same_config_and_data_give_the_same_losses_and_packing_does_not_change_them(make_config, prepared, tmp_path):
    settings = {"train.max_steps": 8, "train.batch_size": 6, "train.lora_dropout": 0.1}
    m1, first = _train(make_config, prepared, tmp_path / "a", **settings)
    m2, second = _train(make_config, prepared, tmp_path / "b", **settings)
    assert [r["step"] for r in first] == list(range(1, 9))
    for a, b in zip(first, second, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
    assert len({r["loss"] for r in first}) > 1  # it really trained
    assert m1["final_loss"] == pytest.approx(m2["final_loss"], abs=1e-5)

    # Padding instead of packing: the same samples per step, so the same losses (without dropout, whose
    # random masks depend on the tensor shapes).
    no_dropout = {**settings, "train.lora_dropout": 0.0}
    _, packed = _train(make_config, prepared, tmp_path / "c", **no_dropout)
    _, padded = _train(make_config, prepared, tmp_path / "e", **no_dropout, **{"train.packing": "false"})
    for a, b in zip(packed, padded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    # A different seed gives a different run (the comparison above can fail).
    _, other = _train(make_config, prepared, tmp_path / "d", **settings, seed=1)
    assert any(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(first, other, strict=True))


def test_dora_rslora_checkpointing_and_merged_model(make_config, prepared, tmp_path):
    from tuneloop.modeling import load_causal_lm

    settings = {
        "train.max_steps": 3,
        "train.use_dora": "true",
        "train.use_rslora": "true",
        "train.gradient_checkpointing": "true",
        "train.merge": "true",
        "train.lora_dropout": 0.0,
    }
    metrics, rows = _train(make_config, prepared, tmp_path / "m", **settings)
    model_dir = tmp_path / "m" / "model"
    cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    assert (model_dir / "merged" / "model.safetensors").is_file() and len(rows) == 3
    tok, _ = prepared
    ids = torch.tensor([tok("my parcel is late")["input_ids"]])
    base = json.loads((model_dir / "tuneloop_config.json").read_text())["base_model"]
    with torch.no_grad():
        adapted = load_causal_lm(base, adapter=str(model_dir))(ids).logits
        merged = load_causal_lm(str(model_dir / "merged"))(ids).logits
        plain = load_causal_lm(base)(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, adapted, atol=1e-4)  # the adapter changed the model


def test_tracker_and_precision_are_checked_before_any_work(make_config):
    import importlib.util

    from tuneloop import FineTunePipeline, load_config
    from tuneloop.errors import ConfigError

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            FineTunePipeline(load_config(make_config(), ["train.report_to=tensorboard"])).preflight()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.precision: bf16 needs a GPU that supports it"):
            FineTunePipeline(load_config(make_config(), ["train.precision=bf16"])).preflight()


def test_precision_follows_transformers_device_checks(monkeypatch):
    """bf16 is refused only where transformers' TrainingArguments would refuse it: an Apple MPS device on macOS
    14+ (which transformers accepts for bf16) passes the preflight, a plain CPU does not."""
    import transformers.utils

    from tuneloop.train.sft import precision_problem

    assert precision_problem("fp32") is None and precision_problem("auto") is None
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: True)  # e.g. MPS on macOS 14
    assert precision_problem("bf16") is None
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    assert "use `auto`" in precision_problem("bf16")
