"""``train.backend: mlx``: supervised fine-tuning (LoRA or full) with MLX, the adapter converted to PEFT.

Entry points: :func:`train_mlx` (the training stage's work for this backend) and :func:`mlx_problems` (its
preflight: what must be installed, which settings it cannot honour; exit 2 before any work).

MLX runs on Metal on Apple silicon and on the CPU elsewhere (``mlx[cpu]`` on Linux, which is how CI tests it).
The base model is loaded from its Hugging Face directory by mlx-lm (``mlx_lm.utils.load_model``; a
transformers-5 ``rope_parameters`` block is passed on as ``rope_theta``/``rope_scaling``, which mlx-lm's Llama
does not read itself) and trained in float32, with mlx-lm's LoRA layers (``mlx_lm.tuner.linear_to_lora_layers``).

What it trains on is what :func:`tuneloop.train.sft.train_sft` trains on, so the two backends can be compared step
by step:

* the preprocessing stage's dataset (the same token ids and completion-only ``labels``) in right-padded batches,
  the collator :func:`tuneloop.train.sft.make_collator` gives with packing off (``train.packing`` is a speed
  setting of the transformers backend that does not change which tokens are trained on);
* the samples of each step: the Trainer's seeded sampler order (``torch.randperm`` seeded with ``seed + epoch``,
  as accelerate's ``SeedableRandomSampler`` does), ``batch_size`` samples a micro-batch, ``gradient_accumulation_steps``
  micro-batches a step, the last step of an epoch shorter;
* the loss: cross-entropy summed over the tokens whose label is not -100, divided by those tokens in the whole step
  (transformers' ``num_items_in_batch``); gradients clipped to norm 1.0 (the Trainer's ``max_grad_norm``);
  AdamW with bias correction, ``train.weight_decay`` on the parameters the Trainer decays (not norms or biases),
  and the learning rate of each step from transformers' own scheduler (``train.lr_scheduler``, ``warmup_steps``);
* LoRA: rank ``lora_r``, scale ``lora_alpha / lora_r`` (``/ sqrt(lora_r)`` with ``use_rslora``), dropout
  ``lora_dropout``, on the modules PEFT would pick for ``target_modules`` (``all-linear``: every linear layer but
  the output head).

The loop is ours rather than ``mlx_lm.tuner.trainer.train`` because that trainer sorts samples by length into
batches, averages accumulated micro-batches instead of weighting them by tokens, does not clip gradients and prints
its own progress UI; the model, the LoRA layers and the optimiser are mlx-lm's and MLX's.

Output, as the other backends write it: ``work_dir/model`` holds a PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT's key names, ``lora_A`` = mlx-lm's ``lora_a`` transposed, float32) or, for
``train.method: full``, a transformers safetensors model (the MLX weights loaded into the transformers model and
saved by it); with the tokenizer and the resolved config beside it. ``work_dir/train_metrics.jsonl`` has one row per
step (step, epoch, loss, learning_rate, grad_norm, tokens_per_s). Resumable: every ``save_steps`` steps the trainable
weights and the optimiser state go to ``work_dir/checkpoints/step-N`` (written whole, then renamed); a run that finds
one continues from the newest, with the same losses (each step's dropout masks are seeded by ``seed`` and the step).

Speed: on Linux the ``mlx[cpu]`` wheel (0.32) multiplies matrices with the reference BLAS it bundles, about 25 times
slower than torch on the same CPU; fine for tests on tiny models, slow for real ones (see docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tuneloop.config import PipelineConfig
from tuneloop.data.prepare import IGNORE_INDEX
from tuneloop.errors import StageError
from tuneloop.fsutil import atomic_write_json, replace_dir

log = logging.getLogger(__name__)

INSTALL = "pip install 'tuneloop[mlx]'"
MAX_GRAD_NORM = 1.0  # transformers' TrainingArguments.max_grad_norm default, which train_sft uses
# Parameter names transformers' Trainer does not decay (Trainer.get_decay_parameter_names).
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
_CKPT = re.compile(r"step-(\d+)")


# ------------------------------------------------------------------------------------------- preflight


def mlx_problems(cfg: PipelineConfig) -> list[str]:
    """What keeps ``train.backend: mlx`` from running this config (empty when nothing does)."""
    t = cfg.train
    problems = []
    missing = [m for m in ("mlx", "mlx_lm") if importlib.util.find_spec(m) is None]
    if missing:
        problems.append(
            f"train.backend: mlx needs the packages {' and '.join(m.replace('_', '-') for m in missing)}: "
            f"{INSTALL} (mlx with Metal on Apple silicon, mlx[cpu] on Linux)"
        )
    if t.objective != "sft":
        problems.append(
            f"train.objective: {t.objective} is not available with train.backend mlx (it trains sft only); "
            "use train.backend: transformers for it"
        )
    if t.method == "qlora":
        problems.append(
            "train.method: qlora is not available with train.backend mlx (QLoRA's 4-bit base is bitsandbytes "
            "on CUDA); use method lora or full"
        )
    if t.use_dora:
        problems.append(
            "train.use_dora: DoRA is not available with train.backend mlx (its adapters are not converted to "
            "PEFT's DoRA layout); set use_dora: false or use train.backend: transformers"
        )
    if t.num_processes > 1 or t.accelerate_config:
        problems.append(
            "train.num_processes / train.accelerate_config: train.backend mlx trains in one process on one "
            "device; set num_processes: 1 and no accelerate_config"
        )
    if t.precision in ("bf16", "fp16"):
        problems.append(
            f"train.precision: {t.precision} is not available with train.backend mlx (it trains in float32); "
            "use auto or fp32"
        )
    if t.report_to != "none":
        problems.append(
            f"train.report_to: {t.report_to} is not available with train.backend mlx (its per-step metrics "
            "are in the run's train_metrics.jsonl); set report_to: none"
        )
    if not missing:
        problems += _architecture_problems(cfg.base_model)
    return problems


def _architecture_problems(base_model: str) -> list[str]:
    """The base's ``model_type`` must be one mlx-lm has a model for (checked for local directories only)."""
    config = Path(base_model) / "config.json"
    if not config.is_file():
        return []
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError):
        return []  # the base model's own checks report an unreadable config
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    if not name or importlib.util.find_spec(f"mlx_lm.models.{name}") is None:
        return [
            f"base_model: model_type {model_type!r} ({config}) has no model in mlx-lm, so train.backend mlx cannot "
            "train it; use train.backend: transformers"
        ]
    return []


# ------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StepPlan:
    """Which samples each optimiser step trains on: ``steps[k]`` is step k+1's micro-batches (sample indices)."""

    steps: list[list[list[int]]]
    steps_per_epoch: int
    batches_per_epoch: int

    def epoch_at(self, step: int) -> float:
        """Epochs done after ``step``, counted in micro-batches as the Trainer logs it."""
        return round(sum(len(s) for s in self.steps[:step]) / self.batches_per_epoch, 4)


def step_plan(n: int, *, batch_size: int, accumulation: int, seed: int, max_steps: int) -> StepPlan:
    """The Trainer's sample order: each epoch a ``torch.randperm(n)`` seeded with ``seed + epoch``, cut into
    micro-batches of ``batch_size`` (the last one shorter) and those into steps of ``accumulation`` micro-batches."""
    import torch

    steps: list[list[list[int]]] = []
    epoch = 0
    while len(steps) < max_steps:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        steps += [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)]
        epoch += 1
    batches = math.ceil(n / batch_size)
    return StepPlan(steps[:max_steps], math.ceil(batches / accumulation), batches)


def learning_rates(cfg: PipelineConfig, max_steps: int) -> list[float]:
    """The learning rate of each step, from transformers' scheduler for ``train.lr_scheduler`` (as the Trainer has it)."""
    import torch
    from transformers import get_scheduler

    t = cfg.train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.warmup_steps, num_training_steps=max_steps)
    rates = []
    for _ in range(max_steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


# ------------------------------------------------------------------------------------------- the model


def model_dir(base_model: str) -> Path:
    """The base model's local Hugging Face directory (a hub id: its snapshot, fetched as transformers would)."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]))
    except Exception as exc:  # noqa: BLE001  (hub errors have many types; all mean the same here)
        raise StageError(
            f"base_model {base_model!r}: cannot get its files for mlx ({exc}); point base_model at a local "
            "Hugging Face model directory"
        ) from None


def load_mlx_model(base_model: str):
    """The base as an mlx-lm model in float32, every parameter frozen; and its directory."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    path = model_dir(base_model)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    overrides: dict[str, Any] = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config:  # transformers 5 moved these under rope_parameters
        overrides["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            overrides["rope_scaling"] = rope
    try:
        model, _ = load_model(path, model_config=overrides)
    except (ValueError, FileNotFoundError) as exc:
        raise StageError(f"mlx-lm cannot load base_model {base_model!r}: {exc}") from None
    model.set_dtype(mx.float32)
    model.freeze()
    return model, path


def checkpoint_keys(path: Path) -> set[str]:
    """Tensor names in the base's safetensors files."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            keys.update(st.keys())
    return keys


def lora_targets(model, target_modules: str | list[str]) -> list[str]:
    """Names of the linear layers PEFT would give adapters for ``train.target_modules``: ``all-linear`` is every
    linear layer but the output head; a list matches a module's name or its last parts (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``); another string is a regular expression the whole name must match."""
    import mlx.nn as nn

    linear = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    if target_modules == "all-linear":
        names = [n for n in linear if n.split(".")[-1] != "lm_head"]
    elif isinstance(target_modules, str):
        names = [n for n in linear if re.fullmatch(target_modules, n)]
    else:
        names = [n for n in linear if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not names:
        raise StageError(
            f"train.target_modules: {target_modules!r} matches no linear layer of the base model; its "
            f"linear layers are named like {', '.join(sorted({n.split('.')[-1] for n in linear}))}"
        )
    return sorted(names)


def lora_scale(cfg: PipelineConfig) -> float:
    """PEFT's scaling of the LoRA branch: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); mlx-lm calls it ``scale``."""
    t = cfg.train
    return t.lora_alpha / (math.sqrt(t.lora_r) if t.use_rslora else t.lora_r)


def add_lora(model, cfg: PipelineConfig, base_path: Path) -> list[str]:
    """Replace the target linear layers by mlx-lm's ``LoRALinear`` (seeded init); returns their names."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    t = cfg.train
    names = lora_targets(model, t.target_modules)
    keys = checkpoint_keys(base_path)
    unknown = [n for n in names if f"{n}.weight" not in keys]
    if unknown:  # PEFT names modules as transformers does; the adapter would not load there
        raise StageError(
            f"mlx-lm names these layers differently from the checkpoint ({', '.join(unknown[:3])}); the "
            "adapter could not be converted to PEFT: use train.backend: transformers for this model"
        )
    mx.random.seed(cfg.seed)
    # num_layers 0 and full module names: mlx-lm converts exactly the modules named in `keys`.
    linear_to_lora_layers(
        model, 0, {"rank": t.lora_r, "scale": lora_scale(cfg), "dropout": t.lora_dropout, "keys": set(names)}
    )
    missed = [n for n in names if not hasattr(_module(model, n), "lora_a")]
    if missed:  # an mlx-lm that converts only layer-relative keys
        raise StageError(
            f"mlx-lm did not put LoRA layers on {', '.join(missed[:3])}; tuneloop is tested with mlx-lm 0.32: "
            "pip install -U 'tuneloop[mlx]'"
        )
    return names


def _module(model, name: str):
    m = model
    for part in name.split("."):
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m


def peft_tensors(model, names: list[str]) -> dict[str, Any]:
    """The LoRA weights under PEFT's names and layout (``lora_A``: r x in, ``lora_B``: out x r), float32 numpy."""
    import mlx.core as mx
    import numpy as np

    out = {}
    for name in names:
        m = _module(model, name)
        # Contiguous copies: numpy views MLX's transpose through its strides, and safetensors writes raw buffers.
        out[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(np.array(m.lora_a.astype(mx.float32)).T)
        out[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(np.array(m.lora_b.astype(mx.float32)).T)
    return out


def load_peft_adapter(model, names: list[str], adapter_dir: Path) -> None:
    """Set the LoRA layers' weights from a PEFT adapter (same rank and targets)."""
    import mlx.core as mx
    import numpy as np
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    for name in names:
        m = _module(model, name)
        a, b = (tensors.get(f"base_model.model.{name}.lora_{x}.weight") for x in "AB")
        if a is None or b is None or a.T.shape != m.lora_a.shape or b.T.shape != m.lora_b.shape:
            raise StageError(f"adapter {adapter_dir} has no LoRA weights of rank {m.lora_a.shape[1]} for {name}")
        m.lora_a, m.lora_b = mx.array(np.ascontiguousarray(a.T)), mx.array(np.ascontiguousarray(b.T))


def save_peft_adapter(model, names: list[str], cfg: PipelineConfig, out_dir: Path) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` that PEFT loads onto ``cfg.base_model``."""
    from peft import LoraConfig
    from safetensors.numpy import save_file

    t = cfg.train
    short = sorted({n.split(".")[-1] for n in names})
    # Short names when they select exactly these layers (as PEFT writes `all-linear`), else the full names.
    every = {
        n
        for n, _ in model.named_modules()
        if n.split(".")[-1] in short and not n.endswith(tuple(".lora_" + x for x in "ab"))
    }
    targets = short if every == set(names) else list(names)
    LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=targets,
        use_rslora=t.use_rslora,
        task_type="CAUSAL_LM",
        base_model_name_or_path=cfg.base_model,
    ).save_pretrained(str(out_dir))
    save_file(peft_tensors(model, names), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def _flat(tree: Any) -> list[tuple[str, Any]]:
    """``mlx.utils.tree_flatten(tree)``: (dotted name, leaf) pairs. Without ``destination`` it returns this list;
    its annotation also allows the dict form, hence the cast."""
    from mlx.utils import tree_flatten

    return cast("list[tuple[str, Any]]", tree_flatten(tree))


def save_full_model(model, base_model: str, out_dir: Path) -> None:
    """The trained MLX weights loaded into the transformers model of the base and saved by it (safetensors)."""
    import mlx.core as mx
    import numpy as np
    import torch

    from tuneloop.modeling import load_causal_lm

    hf = load_causal_lm(base_model)
    state = {
        k: torch.from_numpy(np.ascontiguousarray(np.array(v.astype(mx.float32)))) for k, v in _flat(model.parameters())
    }
    result = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(hf.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise StageError(
            f"the MLX weights do not map onto the transformers model of {base_model} (missing "
            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}); use train.backend: transformers"
        )
    hf.save_pretrained(str(out_dir), safe_serialization=True)


# ------------------------------------------------------------------------------------------- training


def _optimizer(cfg: PipelineConfig):
    """AdamW as torch's (bias correction); no decay on norms and biases, as the Trainer."""
    import mlx.optimizers as optim

    t = cfg.train
    adamw = optim.AdamW(
        learning_rate=t.learning_rate, betas=[0.9, 0.999], eps=1e-8, weight_decay=t.weight_decay, bias_correction=True
    )
    if t.weight_decay == 0:
        return adamw
    plain = optim.Adam(learning_rate=t.learning_rate, betas=[0.9, 0.999], eps=1e-8, bias_correction=True)
    return optim.MultiOptimizer([plain, adamw], [lambda path, _: bool(_NO_DECAY.search(path))])


def _set_learning_rate(optimizer, lr: float) -> None:
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        opt.learning_rate = lr


def masked_loss(model, ids, labels):
    """(sum of the cross-entropy over tokens whose label is not -100, number of those tokens): a causal LM's loss
    with labels shifted by one, as transformers computes it."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(ids[:, :-1]).astype(mx.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0), reduction="none")
    return (ce * mask).sum(), mask.sum()


def train_mlx(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    init_adapter: Path | None = None,
) -> dict[str, Any]:
    """Train the candidate with MLX; returns the training metrics (``kind``: adapter or model). The model ends up
    in ``work_dir/model``.

    ``init_adapter``: a PEFT adapter directory whose weights replace the LoRA layers' initial ones (same rank and
    targets), e.g. the one PEFT initialises for the transformers backend, to compare the two backends from the same
    start.

    The steps: the samples and their schedule, the model (LoRA layers added or every weight unfrozen), the resumed
    optimiser state, the training steps, then the saved model and the metrics.
    """
    import mlx.core as mx
    import mlx.nn as nn

    problems = mlx_problems(cfg)
    if problems:
        raise StageError("; ".join(problems))
    t = cfg.train
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = work_dir / "train_metrics.jsonl"
    schedule = _schedule(cfg, dataset_dir, tokenizer)

    model, names = _model_to_train(cfg, init_adapter)
    trainable = sum(v.size for _, v in _flat(model.trainable_parameters()))
    total = sum(v.size for _, v in _flat(model.parameters()))
    optimizer = _optimizer(cfg)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    resumed_from = _resume(model, optimizer, ckpt_dir, metrics_path)
    seconds = _train_steps(
        cfg, model, loss_and_grad, optimizer, schedule, resumed_from, ckpt_dir, metrics_path, progress
    )

    _save_final(model, names, cfg, tokenizer, work_dir)
    max_steps, steps_run = schedule.max_steps, schedule.max_steps - resumed_from
    return {
        "backend": "mlx",
        "device": mx.default_device().type.name,
        "kind": "model" if t.method == "full" else "adapter",
        "method": t.method,
        "steps": max_steps,
        "epochs": round(max_steps / schedule.plan.steps_per_epoch, 3),
        "train_samples": len(schedule.samples),
        "trainable_params": trainable,
        "total_params": total,
        **_loss_summary(metrics_path),
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
        "samples_per_s": round(steps_run * schedule.per_step / seconds, 2) if seconds > 0 else None,
    }


@dataclass(frozen=True)
class _Schedule:
    """What the training steps draw on: the samples, the collator, which samples each step takes, each step's
    learning rate, and the samples per step."""

    samples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict]
    plan: StepPlan
    rates: list[float]
    per_step: int

    @property
    def max_steps(self) -> int:
        return len(self.rates)


def _schedule(cfg: PipelineConfig, dataset_dir: Path, tokenizer) -> _Schedule:
    """The prepared SFT records (``StageError`` when there are none), the step budget (``train.max_steps``, else
    ``train.num_epochs`` of steps), the Trainer's sample order and learning rates, and the transformers backend's
    collator with packing off (right-padded rows, labels -100 on the padding)."""
    from datasets import load_from_disk

    from tuneloop.train.sft import make_collator

    t = cfg.train
    dataset = load_from_disk(str(dataset_dir))
    if len(dataset) == 0:
        raise StageError("no training samples left after preprocessing; see the preprocessing stage's dropped.jsonl")
    samples = [{"input_ids": x, "labels": y} for x, y in zip(dataset["input_ids"], dataset["labels"], strict=True)]
    per_step = t.batch_size * t.gradient_accumulation_steps
    max_steps = t.max_steps or max(1, math.ceil(math.ceil(len(samples) / per_step) * t.num_epochs))
    plan = step_plan(
        len(samples),
        batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps,
        seed=cfg.seed,
        max_steps=max_steps,
    )
    rates = learning_rates(cfg, max_steps)
    collate = make_collator(
        cfg.model_copy(update={"train": t.model_copy(update={"packing": False})}), tokenizer.pad_token_id
    )
    return _Schedule(samples, collate, plan, rates, per_step)


def _model_to_train(cfg: PipelineConfig, init_adapter: Path | None) -> tuple[Any, list[str]]:
    """(the base model with every weight trainable (``full``) or with LoRA layers added, optionally starting from
    ``init_adapter``'s weights; the LoRA layers' names, empty for ``full``), checkpointed per layer with
    ``train.gradient_checkpointing``."""
    model, base_path = load_mlx_model(cfg.base_model)
    if cfg.train.method == "full":
        model.unfreeze()
        names: list[str] = []
    else:
        names = add_lora(model, cfg, base_path)
        if init_adapter is not None:
            load_peft_adapter(model, names, Path(init_adapter))
    if cfg.train.gradient_checkpointing:
        _checkpoint_layers(model)
    return model, names


def _train_steps(
    cfg: PipelineConfig,
    model,
    loss_and_grad,
    optimizer,
    schedule: _Schedule,
    resumed_from: int,
    ckpt_dir: Path,
    metrics_path: Path,
    progress: Callable[[int, int, dict], None] | None,
) -> float:
    """The steps after ``resumed_from`` up to ``schedule.max_steps``: each one's metrics row appended to
    ``metrics_path`` and passed to ``progress``, a checkpoint every ``train.save_steps`` and at the end. Returns the
    seconds they took; the model is left in eval mode."""
    model.train()
    t0 = time.perf_counter()
    for step in range(resumed_from + 1, schedule.max_steps + 1):
        row = _train_step(cfg, model, loss_and_grad, optimizer, schedule, step)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if step % cfg.train.save_steps == 0 or step == schedule.max_steps:
            _save_checkpoint(model, optimizer, ckpt_dir, step)
        if progress:
            progress(step, schedule.max_steps, row)
    seconds = time.perf_counter() - t0
    model.eval()
    return seconds


def _train_step(cfg: PipelineConfig, model, loss_and_grad, optimizer, schedule: _Schedule, step: int) -> dict[str, Any]:
    """Optimiser step ``step`` on its micro-batches (dropout seeded by ``cfg.seed`` and ``step``); its metrics row
    (``tokens_per_s`` timed from the batches' collation). ``StageError`` when the loss is not finite."""
    import mlx.core as mx

    t_step = time.perf_counter()
    mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout masks of a step, the same after a resume
    batches = [schedule.collate([schedule.samples[i] for i in micro]) for micro in schedule.plan.steps[step - 1]]
    lr = schedule.rates[step - 1]
    loss, grad_norm, n_tokens = _optimizer_step(model, loss_and_grad, optimizer, batches, lr)
    if not math.isfinite(loss):
        raise StageError(f"training diverged at step {step} (loss {loss}); lower train.learning_rate")
    return {
        "step": step,
        "epoch": schedule.plan.epoch_at(step),
        "loss": loss,
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": round(n_tokens / max(time.perf_counter() - t_step, 1e-9), 1),
    }


def _loss_summary(metrics_path: Path) -> dict[str, float | None]:
    """``first_loss``, ``final_loss`` and ``train_loss`` (the mean) over the metrics file's rows."""
    from tuneloop.train.sft import read_metric_rows

    losses = [r["loss"] for r in read_metric_rows(metrics_path)]
    return {
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": round(sum(losses) / len(losses), 6) if losses else None,
    }


def _optimizer_step(model, loss_and_grad, optimizer, batches: list[dict], lr: float) -> tuple[float, float, int]:
    """One optimiser step over its micro-batches: gradients of the summed token losses, divided by the step's
    tokens, clipped to ``MAX_GRAD_NORM``, applied at ``lr``. Returns (mean token loss, gradient norm before
    clipping, tokens)."""
    import mlx.core as mx
    import mlx.optimizers as optim

    grads, loss_sum, n_tokens = None, 0.0, 0
    for batch in batches:
        ids, labels = mx.array(batch["input_ids"].numpy()), mx.array(batch["labels"].numpy())
        (loss, tokens), g = loss_and_grad(model, ids, labels)
        grads = g if grads is None else _tree_add(grads, g)
        mx.eval(loss, tokens, grads)
        loss_sum += loss.item()
        n_tokens += tokens.item()
    if n_tokens == 0:
        raise StageError(
            "a training step has no token to train on (every label is -100); check train.train_on_inputs "
            "and the preprocessing stage's dropped.jsonl"
        )
    grads, grad_norm = optim.clip_grad_norm(_tree_scale(grads, 1.0 / n_tokens), MAX_GRAD_NORM)
    _set_learning_rate(optimizer, lr)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    return loss_sum / n_tokens, grad_norm.item(), n_tokens


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, factor: float):
    from mlx.utils import tree_map

    return tree_map(lambda x: x * factor, a)


def _checkpoint_layers(model) -> None:
    """Recompute each transformer block's activations in the backward pass (mlx-lm's ``grad_checkpoint``, which
    patches the block's class: done once per class)."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    layer = model.layers[0]
    if not getattr(type(layer), "_tuneloop_checkpointed", False):
        grad_checkpoint(layer)
        type(layer)._tuneloop_checkpointed = True


def _save_final(model, names: list[str], cfg: PipelineConfig, tokenizer, work_dir: Path) -> None:
    """The adapter or model, its tokenizer, the optional merged model and the resolved config into ``model.partial/``,
    then renamed to ``model/``."""
    from tuneloop.modeling import save_tokenizer
    from tuneloop.train.sft import merge_adapter

    tmp = work_dir / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if cfg.train.method == "full":
            save_full_model(model, cfg.base_model, tmp)
        else:
            save_peft_adapter(model, names, cfg, tmp)
        save_tokenizer(tokenizer, tmp)
        if cfg.train.merge and cfg.train.method != "full":
            merge_adapter(cfg.base_model, tmp, tmp / "merged", tokenizer)
        atomic_write_json(tmp / "tuneloop_config.json", cfg.to_dict())
        replace_dir(tmp, work_dir / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(model, optimizer, ckpt_dir: Path, step: int) -> None:
    """Trainable weights and optimiser state after ``step``, written whole then renamed; two are kept."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    staging = ckpt_dir / f".partial-step-{step}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    mx.save_safetensors(str(staging / "weights.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    atomic_write_json(staging / "state.json", {"step": step})
    replace_dir(staging, ckpt_dir / f"step-{step}")
    for _, old in _checkpoints(ckpt_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = [
        (int(m.group(1)), p)
        for p in ckpt_dir.iterdir()
        if (m := _CKPT.fullmatch(p.name)) and (p / "state.json").is_file()
    ]
    return sorted(found)


def _keep_rows(metrics_path: Path, step: int) -> None:
    """Keep the metric rows up to ``step`` (the steps after the checkpoint run again)."""
    from tuneloop.fsutil import atomic_lines
    from tuneloop.train.sft import read_metric_rows

    rows = [r for r in read_metric_rows(metrics_path) if r["step"] <= step] if metrics_path.exists() else []
    with atomic_lines(metrics_path) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _resume(model, optimizer, ckpt_dir: Path, metrics_path: Path) -> int:
    """Continue from the newest checkpoint in ``ckpt_dir`` (returns its step; 0 without one), keeping the metric rows
    up to it."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    for staging in ckpt_dir.glob(".partial-*"):  # a kill while writing one
        shutil.rmtree(staging, ignore_errors=True)
    for step, path in reversed(_checkpoints(ckpt_dir)):
        try:
            weights = mx.load(str(path / "weights.safetensors"))
            state = mx.load(str(path / "optimizer.safetensors"))
            if not isinstance(weights, dict) or not isinstance(state, dict):  # mx.load gives a dict for safetensors
                raise ValueError("not a safetensors dict of arrays")
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            log.warning("checkpoint %s cannot be read (%s); removed", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            continue
        model.load_weights(list(weights.items()), strict=False)
        optimizer.state = tree_unflatten(list(state.items()))
        _keep_rows(metrics_path, step)
        log.info("resuming mlx training from %s (step %d)", path, step)
        return step
    metrics_path.unlink(missing_ok=True)
    return 0
