"""Supervised fine-tuning (LoRA or full) with transformers' Trainer and PEFT.

Entry point: :func:`train_sft`. It is resumable: checkpoints go to ``work_dir/checkpoints`` every
``save_steps`` steps, each written whole or not at all, and a call that finds one there (a previous run was killed)
continues from the newest that validates (:mod:`tuneloop.train.checkpoints`).
The final adapter or model is written to ``work_dir/model`` only when training completes, with the resolved
config and the per-step metrics beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tuneloop.config import PipelineConfig
from tuneloop.data.prepare import IGNORE_INDEX
from tuneloop.errors import StageError
from tuneloop.fsutil import atomic_lines, atomic_write_json, replace_dir
from tuneloop.modeling import load_causal_lm, load_training_base, require_cuda_for_qlora, save_tokenizer
from tuneloop.train.checkpoints import resume_plan, write_atomically

log = logging.getLogger(__name__)


class _Collator:
    """Right-pads ``input_ids`` / ``labels`` to the longest sample in the batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices of ``lengths`` grouped into rows of at most ``capacity`` tokens.

    Longest first, each into the row whose free space it fills best; a sample longer than ``capacity`` gets a
    row of its own. Deterministic: ties keep the original order.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        best = -1
        for r, space in enumerate(free):
            if n <= space and (best < 0 or space < free[best]):
                best = r
        if best < 0:
            rows.append([i])
            free.append(capacity - n)
        else:
            rows[best].append(i)
            free[best] -= n
    return rows


class PackingCollator:
    """Padding-free batches: the samples of a batch are packed into rows of at most ``capacity`` tokens.

    Rows are filled best-fit-decreasing (:func:`pack_rows`), at the row length up to ``capacity`` that
    leaves the least padding (:meth:`layout`).

    Each packed sample gets ``position_ids`` restarting at 0 and no ``attention_mask`` is passed, so
    transformers builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices`` for
    sdpa/eager; variable-length kernels for flash attention): no token attends to another sample. The label of
    each sample's first token is masked, so no sample is predicted from the end of the previous one. The
    samples of a step are the same as without packing, so packing changes speed, not the optimisation.
    Rows are right-padded to the longest row; the padding is a separate segment with labels -100.
    """

    def __init__(self, pad_id: int, capacity: int, attn_cost: float = 0.0):
        self.pad_id = pad_id
        self.capacity = capacity
        self.attn_cost = attn_cost

    def layout(self, lengths: list[int]) -> tuple[list[list[int]], int]:
        """Rows (sample indices) and their padded width: the cheapest packing by a simple cost model.

        Row lengths from the longest sample up to ``capacity`` are tried. A layout of ``r`` rows of width ``w``
        costs ``r * w * (1 + attn_cost * w)``: per-token work (padding included) plus attention, which sdpa
        and eager compute densely over each row (``attn_cost`` is one query-key pair's work relative to one
        token's, see :func:`attention_cost`; 0 counts padding only).
        """
        longest = max(lengths)
        top = max(self.capacity, longest)
        caps = {top} | {min(top, int(longest * f)) for f in (1, 1.125, 1.25, 1.5, 1.75, 2, 2.5, 3, 4)}
        layouts: list[tuple[tuple[float, int], list[list[int]], int]] = []
        for cap in sorted(caps):
            rows = pack_rows(lengths, cap)
            width = max(sum(lengths[i] for i in row) for row in rows)
            layouts.append(((len(rows) * width * (1.0 + self.attn_cost * width), width), rows, width))
        _, rows, width = min(layouts, key=lambda layout: layout[0])  # the first of equal costs
        return rows, width

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, width = self.layout([len(b["input_ids"]) for b in batch])
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                x, y = batch[i]["input_ids"], batch[i]["labels"]
                n = len(x)
                ids[r, at : at + n] = torch.tensor(x)
                labels[r, at + 1 : at + n] = torch.tensor(y[1:], dtype=torch.long)
                pos[r, at : at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)  # padding: its own segment, attended by nothing real
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def attention_cost(config) -> float:
    """Work of one attention query-key pair relative to one token's work in the linear layers, per forward.

    Dense attention over a row of ``w`` tokens costs ``~4 * layers * hidden * w`` FLOPs per token; the
    projections, MLP and LM head ``~2 * (layers * (4 * hidden^2 + 3 * hidden * intermediate) + vocab * hidden)``.
    Variable-length flash attention does no work across samples, so there it is 0.
    """
    if getattr(config, "_attn_implementation", "") in ("flash_attention_2", "flash_attention_3"):
        return 0.0
    try:
        h, n_layers = config.hidden_size, config.num_hidden_layers
        inter = getattr(config, "intermediate_size", 4 * h)
        linear = 2 * (n_layers * (4 * h * h + 3 * h * inter) + config.vocab_size * h)
        return 4 * n_layers * h / linear
    except (AttributeError, TypeError):
        return 0.0


def make_collator(cfg: PipelineConfig, pad_id: int, model_config=None):
    """The collator the training stage uses: packing (default) or right-padding."""
    if cfg.train.packing:
        cost = attention_cost(model_config) if model_config is not None else 0.0
        return PackingCollator(pad_id, cfg.train.pack_length or cfg.data.max_length, cost)
    return _Collator(pad_id)


def step_logger(metrics_path: Path, progress: Callable[[int, int, dict], None] | None, tokens_per_step: float):
    """A ``TrainerCallback`` that appends one JSON row per logged step to ``metrics_path`` (SFT and DPO)."""
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):
        """Appends one JSON line per logged step and drives the progress display."""

        def __init__(self) -> None:
            self.t_last = time.perf_counter()
            self.step_last = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            now = time.perf_counter()
            steps = max(1, state.global_step - self.step_last)
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs.get("loss"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_s": round(tokens_per_step * steps / max(now - self.t_last, 1e-9), 1),
            }
            # Preference trainers: rewards and log-probabilities as TRL logs them; ORPO/SimPO also their NLL term and
            # ORPO its log odds ratio.
            row.update({k: v for k, v in logs.items() if k.startswith(("rewards/", "logps/", "nll_loss", "log_odds"))})
            if "kl" in logs:  # KTO: its KL estimate (the reference point of its losses)
                row["kl"] = logs["kl"]
            self.t_last, self.step_last = now, state.global_step
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                progress(state.global_step, state.max_steps, row)

    return StepLogger()


def prepared_tokens(dataset) -> int:
    """Tokens in the ``input_ids`` of a prepared dataset as ``load_from_disk`` gives it, summed in Arrow over the
    memory-mapped table (a 10 M-sample set is never turned into Python lists)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def train_sft(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train the candidate; returns the training metrics. The model ends up in ``work_dir/model``.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (benchmarks use one to time training).
    """
    from datasets import load_from_disk
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    t = cfg.train
    if t.method == "qlora":
        require_cuda_for_qlora()  # before any work
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = work_dir / "train_metrics.jsonl"

    dataset = load_from_disk(str(dataset_dir))
    if len(dataset) == 0:
        raise StageError("no training samples left after preprocessing; see the preprocessing stage's dropped.jsonl")

    set_seed(cfg.seed)
    model = load_training_base(cfg)  # 4-bit for qlora
    model.config.use_cache = False  # with a KV cache, transformers would not detect packed sequences
    base_config = model.config
    if t.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=t.lora_r,
            lora_alpha=t.lora_alpha,
            lora_dropout=t.lora_dropout,
            target_modules=t.target_modules,
            use_rslora=t.use_rslora,
            use_dora=t.use_dora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    per_step = t.batch_size * t.gradient_accumulation_steps * world_size()
    steps_per_epoch = math.ceil(len(dataset) / per_step)
    max_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.num_epochs))
    mean_tokens = prepared_tokens(dataset) / len(dataset)

    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        **checkpointing_args(TrainingArguments, t.gradient_checkpointing),
        **precision_args(t.precision),
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=make_collator(cfg, tokenizer.pad_token_id, base_config),
        callbacks=[step_logger(metrics_path, progress, mean_tokens * per_step), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; we log per step ourselves
    out, resumed_from, seconds = run_resumable(trainer, ckpt_dir, metrics_path)
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the model and reports
    save_final_model(trainer, tokenizer, cfg, work_dir)

    losses = [r["loss"] for r in read_metric_rows(metrics_path)]
    steps_run = max_steps - resumed_from
    return {
        "method": t.method,
        "steps": max_steps,
        "epochs": round(max_steps / steps_per_epoch, 3),
        "train_samples": len(dataset),
        "trainable_params": trainable,
        "total_params": total,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": round(out.training_loss, 6),
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
        "samples_per_s": round(steps_run * per_step / seconds, 2) if seconds > 0 else None,
    }


def checkpointing_args(args_cls, enabled: bool) -> dict[str, Any]:
    """Activation-checkpointing ``TrainingArguments`` under the name ``args_cls`` knows.

    transformers 5 renamed ``gradient_checkpointing(_kwargs)`` to ``activation_checkpointing(_kwargs)`` and
    warns (``FutureWarning``) whenever the old name is passed; 4.x knows only the old name.
    """
    fields = getattr(args_cls, "__dataclass_fields__", {})
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def world_size() -> int:
    """Processes training together (set by torch.distributed / accelerate launchers; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def precision_problem(precision: str) -> str | None:
    """Why ``train.precision`` cannot train on this machine, or None. bf16 and fp16 are asked of transformers'
    own device checks (the ones TrainingArguments applies), so a CUDA GPU, or Apple silicon's MPS on macOS 14+
    for bf16, passes; a plain CPU does not."""
    if precision not in ("bf16", "fp16"):
        return None
    from transformers.utils import (
        is_torch_bf16_gpu_available,
        is_torch_fp16_available_on_device,
        is_torch_mps_available,
    )

    if precision == "bf16" and is_torch_bf16_gpu_available():
        return None
    if precision == "fp16" and (
        torch.cuda.is_available() or (is_torch_mps_available() and is_torch_fp16_available_on_device("mps"))
    ):
        return None
    return (
        f"train.precision: {precision} needs a GPU that supports it (CUDA, or Apple MPS on macOS 14+ for bf16) and this "
        "machine has none; use `auto` (bf16 on a CUDA GPU that has it, fp32 elsewhere) or `fp32`"
    )


def precision_args(precision: str) -> dict[str, Any]:  # Any: keyword arguments for TrainingArguments(**...)
    """``bf16``/``fp16`` TrainingArguments for ``train.precision`` (``auto``: bf16 where CUDA supports it; on
    MPS ``auto`` stays fp32, since M1/M2 emulate bf16 in fp32)."""
    if precision == "auto":
        cuda = torch.cuda.is_available()
        return {"bf16": bool(cuda and torch.cuda.is_bf16_supported())}
    problem = precision_problem(precision)
    if problem:
        raise StageError(problem)
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def run_resumable(trainer, ckpt_dir: Path, metrics_path: Path) -> tuple[Any, int, float]:
    """Train from the newest valid checkpoint in ``ckpt_dir`` (if any; invalid newer ones are removed, saying
    why), keeping the per-step metrics file in step with it; new checkpoints are written whole or not at all.
    Returns (trainer output, step resumed from, seconds). Shared by SFT and DPO."""
    plan = resume_plan(ckpt_dir, clean=trainer.is_world_process_zero())
    level = logging.WARNING if len(plan.notes) > 1 or plan.checkpoint is None else logging.INFO
    for note in plan.notes:
        log.log(level, note)
    resume, resumed_from = plan.checkpoint, plan.step
    write_atomically(trainer)
    if trainer.is_world_process_zero():
        if resume:
            _truncate_metrics(metrics_path, resumed_from)
        elif metrics_path.exists():
            metrics_path.unlink()
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    if not math.isfinite(out.training_loss):
        raise StageError(f"training diverged (loss {out.training_loss}); lower train.learning_rate")
    return out, resumed_from, seconds


def save_final_model(trainer, tokenizer, cfg: PipelineConfig, work_dir: Path) -> None:
    """Write the final adapter/model (safetensors only), its tokenizer, the optional merged model and the
    resolved config to ``model.partial/``, then move it into place as ``model/`` in one rename."""
    tmp = work_dir / "model.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the registry stores safetensors only
        save_tokenizer(tokenizer, tmp)
        if cfg.train.merge and cfg.train.method != "full":
            merge_adapter(cfg.base_model, tmp, tmp / "merged", tokenizer)
        atomic_write_json(tmp / "tuneloop_config.json", cfg.to_dict())
        replace_dir(tmp, work_dir / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk is not left fuller; the next run saves it again
        raise


def merge_adapter(base_model: str, adapter_dir: Path, out_dir: Path, tokenizer) -> None:
    """Write the base model with the adapter in ``adapter_dir`` merged into its weights (safetensors)."""
    model = load_causal_lm(base_model, adapter=str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (steps after the checkpoint will be re-run)."""
    if not path.exists():
        return
    keep = [r for r in read_metric_rows(path) if r["step"] <= step]
    with atomic_lines(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


def read_metric_rows(path: Path) -> list[dict[str, Any]]:
    """Metric rows; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
