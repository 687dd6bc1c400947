"""Direct preference optimisation with TRL's ``DPOTrainer`` (LoRA or full), resumable like SFT.

Entry point: :func:`train_dpo`. Input is the preprocessing stage's dataset of conversational preference
records (``prompt`` / ``chosen`` / ``rejected`` message lists); TRL applies the chat template and tokenizes.
With LoRA the reference model is the base itself (the adapter disabled), so no second copy is held; with
``full`` TRL keeps a frozen copy. Checkpoints, resume, per-step metrics (with ``rewards/*`` and ``logps/*``)
and the final ``model/`` directory work as in :mod:`tuneloop.train.sft`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

from tuneloop.config import PipelineConfig
from tuneloop.errors import StageError
from tuneloop.modeling import load_causal_lm, require_cuda_for_qlora
from tuneloop.train.sft import (
    checkpointing_args,
    precision_args,
    read_metric_rows,
    run_resumable,
    save_final_model,
    step_logger,
    world_size,
)

log = logging.getLogger("tuneloop")


def train_dpo(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train the candidate on preference pairs; returns the training metrics (``model/`` in ``work_dir``)."""
    from datasets import load_from_disk
    from transformers import PrinterCallback, set_seed
    from trl import DPOConfig, DPOTrainer

    t = cfg.train
    if t.method == "qlora":
        require_cuda_for_qlora()
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = work_dir / "train_metrics.jsonl"
    dataset = load_from_disk(str(dataset_dir))
    if len(dataset) == 0:
        raise StageError("no preference pairs left after preprocessing; see the data_validation quarantine file")

    set_seed(cfg.seed)
    model = load_causal_lm(cfg.base_model)
    model.config.use_cache = False
    peft_config = None
    if t.method in ("lora", "qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=t.target_modules,
            use_rslora=t.use_rslora, use_dora=t.use_dora, task_type="CAUSAL_LM",
        )
    per_step = t.batch_size * t.gradient_accumulation_steps * world_size()
    steps_per_epoch = math.ceil(len(dataset) / per_step)
    max_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.num_epochs))
    args = DPOConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        beta=t.dpo_beta,
        max_length=cfg.data.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        dataset_num_proc=None,
        **checkpointing_args(DPOConfig, t.gradient_checkpointing),
        **precision_args(t.precision),
    )
    # Tokens per step for the throughput column: real tokens of the rendered pairs (both answers), counted on
    # up to 64 pairs and capped at max_length as TRL truncates.
    def n_tokens(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return min(cfg.data.max_length, len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    sample = dataset.select(range(min(len(dataset), 64)))
    mean_tokens = sum(n_tokens(r["prompt"] + r["chosen"]) + n_tokens(r["prompt"] + r["rejected"]) for r in sample) / max(1, len(sample))
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[step_logger(metrics_path, progress, mean_tokens * per_step), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    out, resumed_from, seconds = run_resumable(trainer, ckpt_dir, metrics_path)
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the model and reports
    save_final_model(trainer, tokenizer, cfg, work_dir)

    rows = read_metric_rows(metrics_path)
    last = rows[-1] if rows else {}
    result = {
        "objective": "dpo",
        "method": t.method,
        "steps": max_steps,
        "epochs": round(max_steps / steps_per_epoch, 3),
        "train_pairs": len(dataset),
        "trainable_params": trainable,
        "total_params": total,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": last.get("loss"),
        "train_loss": round(out.training_loss, 6),
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
    }
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        if key in last:
            result["final_" + key.replace("/", "_")] = last[key]
    return result
