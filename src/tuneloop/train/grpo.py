"""Group relative policy optimisation with TRL's ``GRPOTrainer`` (LoRA or full), scored by ``train.rewards``.

Entry point: :func:`train_grpo`. Input is the preprocessing stage's dataset of conversational prompts with
their ``reference`` (:func:`tuneloop.data.prepare.prepare_prompts`). Each step samples ``train.num_generations``
completions per prompt (``train.batch_size`` prompts per device), scores them with the checked reward functions
of :mod:`tuneloop.train.rewards` (weighted as configured), and moves the policy towards the completions that
scored above their group's mean. Generation is transformers' ``generate`` (TRL's ``use_vllm`` stays off), stopping
at the same stop tokens as evaluation. With ``train.grpo_beta`` > 0 the KL to the reference model (with LoRA,
the base with the adapter disabled) is in the loss and logged.

Checkpoints, resume and the final ``model/`` directory work as in :mod:`tuneloop.train.sft`. Each step's row in
``train_metrics.jsonl`` has the loss, the mean reward (``reward``) and each reward's mean and spread
(``rewards/<name>/mean``, ``rewards/<name>/std``), completion lengths (``completions/mean_length``,
``completions/clipped_ratio``: the share that reached ``max_completion_length`` without ending) and ``kl``
when ``grpo_beta`` > 0.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tuneloop.config import PipelineConfig
from tuneloop.errors import StageError
from tuneloop.modeling import load_causal_lm, require_cuda_for_qlora, stop_token_ids
from tuneloop.train.rewards import build_rewards, reward_inputs
from tuneloop.train.sft import (
    checkpointing_args,
    precision_args,
    read_metric_rows,
    run_resumable,
    save_final_model,
    world_size,
)

log = logging.getLogger("tuneloop")

#: TRL's logged values a step's metrics row keeps (besides loss, learning rate and grad norm).
LOGGED = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean", "num_tokens")
LOGGED_PREFIXES = ("rewards/", "completions/")


def train_grpo(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train the candidate on the prompts with the configured rewards; returns the training metrics (``model/`` in
    ``work_dir``). A reward function that fails or returns something unusable fails the stage (RewardError)."""
    from datasets import load_from_disk
    from transformers import PrinterCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    t = cfg.train
    if t.method == "qlora":
        require_cuda_for_qlora()
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = work_dir / "train_metrics.jsonl"
    dataset = load_from_disk(str(dataset_dir))
    if len(dataset) == 0:
        raise StageError("no prompts left after preprocessing; see the preprocessing stage's dropped.jsonl")
    reward_funcs, weights = build_rewards(cfg)

    set_seed(cfg.seed)
    model = load_causal_lm(cfg.base_model)
    # Completions end where evaluation's answers end (eos and the chat template's end-of-turn tokens).
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    peft_config = None
    if t.method in ("lora", "qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=t.target_modules,
            use_rslora=t.use_rslora, use_dora=t.use_dora, task_type="CAUSAL_LM",
        )
    prompts_per_step = t.batch_size * t.gradient_accumulation_steps * world_size()
    steps_per_epoch = math.ceil(len(dataset) / prompts_per_step)
    max_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.num_epochs))
    args = GRPOConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.batch_size * t.num_generations,  # TRL counts completions; train.batch_size prompts
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        beta=t.grpo_beta,
        loss_type=t.loss_type,
        importance_sampling_level="sequence" if t.loss_type == "luspo" else "token",
        reward_weights=weights,
        use_vllm=False,
        log_completions=False,
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
        **checkpointing_args(GRPOConfig, t.gradient_checkpointing),
        **precision_args(t.precision),
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[grpo_step_logger(metrics_path, progress), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    out, resumed_from, seconds = run_resumable(trainer, ckpt_dir, metrics_path)
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the model and reports
    save_final_model(trainer, tokenizer, cfg, work_dir)
    return _summary(cfg, read_metric_rows(metrics_path), {
        "objective": "grpo",
        "method": t.method,
        "steps": max_steps,
        "epochs": round(max_steps / steps_per_epoch, 3),
        "train_prompts": len(dataset),
        "num_generations": t.num_generations,
        "trainable_params": trainable,
        "total_params": total,
        "train_loss": round(out.training_loss, 6),
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
        "rewards": reward_inputs(cfg),
    })


def _summary(cfg: PipelineConfig, rows: list[dict[str, Any]], result: dict[str, Any]) -> dict[str, Any]:
    """The training metrics: ``result`` plus the first and last steps' mean reward, each reward's last mean, and
    the last step's completion length, clipped share and KL."""
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    result.update(first_reward=first.get("reward"), final_reward=last.get("reward"),
                  first_loss=first.get("loss"), final_loss=last.get("loss"))
    for r in result["rewards"]:
        key = f"rewards/{r['name']}/mean"
        if key in last:
            result[f"final_reward_{r['name']}"] = last[key]
    for key, name in (("completions/mean_length", "final_completion_length"), ("completions/clipped_ratio", "final_clipped_ratio"), ("kl", "final_kl")):
        if last.get(key) is not None:
            result[name] = last[key]
    result["max_completion_length"] = cfg.train.max_completion_length
    return result


def grpo_step_logger(metrics_path: Path, progress: Callable[[int, int, dict], None] | None):
    """A ``TrainerCallback`` that appends one JSON row per logged GRPO step to ``metrics_path`` (loss, rewards,
    completion lengths, KL, tokens per second) and drives the progress display."""
    from transformers import TrainerCallback

    class GRPOStepLogger(TrainerCallback):
        def __init__(self) -> None:
            self.t_last = time.perf_counter()
            self.tokens_last: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            now = time.perf_counter()
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs.get("loss"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
            }
            tokens = logs.get("num_tokens")
            if tokens is not None and self.tokens_last is not None:
                row["tokens_per_s"] = round((tokens - self.tokens_last) / max(now - self.t_last, 1e-9), 1)
            row.update({k: v for k, v in logs.items() if k in LOGGED or k.startswith(LOGGED_PREFIXES)})
            self.t_last, self.tokens_last = now, tokens
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                progress(state.global_step, state.max_steps, row)

    return GRPOStepLogger()
