"""Direct preference optimisation with TRL's ``DPOTrainer`` (LoRA or full), resumable like SFT.

Entry point: :func:`train_dpo`. Input is the preprocessing stage's dataset of conversational preference
records (``prompt`` / ``chosen`` / ``rejected`` message lists); TRL applies the chat template and tokenizes.
With LoRA the reference model is the base itself (the adapter disabled), so no second copy is held; with
``full`` TRL keeps a frozen copy. Checkpoints, resume, per-step metrics (with ``rewards/*`` and ``logps/*``)
and the final ``model/`` directory work as in :mod:`tuneloop.train.sft`.

:class:`TrlRun` is what every TRL trainer run shares: DPO here, KTO in :mod:`tuneloop.train.kto`, ORPO and SimPO in
:mod:`tuneloop.train.preference_objectives` (through :func:`train_pairs`, the run of a TRL trainer of pairs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneloop.config import PipelineConfig
from tuneloop.errors import StageError
from tuneloop.modeling import load_training_base, require_cuda_for_qlora
from tuneloop.train.sft import (
    checkpointing_args,
    precision_args,
    read_metric_rows,
    run_resumable,
    save_final_model,
    step_logger,
    world_size,
)

log = logging.getLogger(__name__)


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
    from trl import DPOConfig, DPOTrainer

    run = TrlRun.start(cfg, dataset_dir, work_dir, what="preference pairs")
    args = DPOConfig(**run.args(DPOConfig), beta=cfg.train.dpo_beta)
    return train_pairs(run, DPOTrainer, args, "dpo", tokenizer=tokenizer, progress=progress, callbacks=callbacks)


def train_pairs(
    run: TrlRun,
    trainer_cls: type,
    args: Any,
    objective: str,
    *,
    tokenizer,
    progress=None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train ``trainer_cls`` (a TRL trainer of preference pairs: DPO, ORPO, CPO/SimPO) with ``args`` on ``run``'s
    pairs; the common training metrics named with ``objective`` and ``train_pairs`` ({} on ranks other than 0)."""
    count = chat_tokens(tokenizer, run.cfg.data.max_length)  # a pair's tokens: both answers
    result = run.fit(
        trainer_cls,
        args,
        tokenizer=tokenizer,
        tokens=lambda r: count(r["prompt"] + r["chosen"]) + count(r["prompt"] + r["rejected"]),
        progress=progress,
        callbacks=callbacks,
    )
    if result is None:
        return {}  # rank 0 writes the model and reports
    result = {"objective": objective, **result}
    result["train_pairs"] = result.pop("train_records")
    return result


@dataclass
class TrlRun:
    """What a TRL trainer run of tuneloop shares, whatever its objective (DPO, KTO, ...): the dataset, the policy
    (with LoRA: a PEFT config, so the reference is the base with the adapter disabled), the step budget, the
    common TRL arguments, the per-step metrics file and the resumable training with the final ``model/``."""

    cfg: PipelineConfig
    work_dir: Path
    ckpt_dir: Path
    metrics_path: Path
    dataset: Any
    model: Any
    peft_config: Any
    per_step: int
    steps_per_epoch: int
    max_steps: int

    @classmethod
    def start(cls, cfg: PipelineConfig, dataset_dir: Path, work_dir: Path, *, what: str, dataset: Any = None) -> TrlRun:
        """Load the prepared dataset (or take ``dataset``, loaded from it and filtered; ``what`` names its records in
        the error when it is empty) and the policy."""
        from datasets import load_from_disk
        from transformers import set_seed

        t = cfg.train
        if t.method == "qlora":
            require_cuda_for_qlora()
        work_dir = Path(work_dir)
        ckpt_dir = work_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if dataset is None:
            dataset = load_from_disk(str(dataset_dir))
        if len(dataset) == 0:
            raise StageError(f"no {what} left after preprocessing; see the data_validation quarantine file")
        set_seed(cfg.seed)
        model = load_training_base(cfg)  # 4-bit for qlora
        model.config.use_cache = False
        peft_config = None
        if t.method in ("lora", "qlora"):
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=t.lora_r,
                lora_alpha=t.lora_alpha,
                lora_dropout=t.lora_dropout,
                target_modules=t.target_modules,
                use_rslora=t.use_rslora,
                use_dora=t.use_dora,
                task_type="CAUSAL_LM",
            )
        per_step = t.batch_size * t.gradient_accumulation_steps * world_size()
        steps_per_epoch = math.ceil(len(dataset) / per_step)
        max_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.num_epochs))
        return cls(
            cfg,
            work_dir,
            ckpt_dir,
            work_dir / "train_metrics.jsonl",
            dataset,
            model,
            peft_config,
            per_step,
            steps_per_epoch,
            max_steps,
        )

    def args(self, args_cls) -> dict[str, Any]:
        """The keyword arguments every TRL config (``DPOConfig``, ``KTOConfig``, ...) gets from tuneloop's config."""
        t = self.cfg.train
        return dict(
            output_dir=str(self.ckpt_dir),
            per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            max_steps=self.max_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            max_length=self.cfg.data.max_length,
            logging_steps=1,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=2,
            seed=self.cfg.seed,
            data_seed=self.cfg.seed,
            report_to=[] if t.report_to == "none" else [t.report_to],
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            dataset_num_proc=None,
            **checkpointing_args(args_cls, t.gradient_checkpointing),
            **precision_args(t.precision),
        )

    def fit(
        self,
        trainer_cls: type,
        args: Any,
        *,
        tokenizer,
        tokens: Callable[[dict[str, Any]], int],
        progress=None,
        callbacks: list | None = None,
    ) -> dict[str, Any] | None:
        """Build ``trainer_cls`` (a TRL trainer taking ``model``, ``args``, ``train_dataset``, ``processing_class``,
        ``peft_config`` and ``callbacks``) on this run and :meth:`train` it; ``tokens`` counts a record's tokens for
        the throughput column."""
        trainer = trainer_cls(
            model=self.model,
            args=args,
            train_dataset=self.dataset,
            processing_class=tokenizer,
            peft_config=self.peft_config,
            callbacks=self.callbacks(progress, self.mean_tokens(tokens), callbacks),
        )
        return self.train(trainer, tokenizer)

    def mean_tokens(self, count: Callable[[dict[str, Any]], int]) -> float:
        """Mean of ``count`` (a record's tokens) over up to 64 records, for the throughput column."""
        sample = self.dataset.select(range(min(len(self.dataset), 64)))
        return sum(count(r) for r in sample) / max(1, len(sample))

    def callbacks(self, progress, mean_tokens: float, extra: list | None) -> list:
        """The per-step metrics logger (and progress), then ``extra``."""
        return [step_logger(self.metrics_path, progress, mean_tokens * self.per_step), *(extra or [])]

    def train(self, trainer, tokenizer) -> dict[str, Any] | None:
        """Train resumably and save ``model/``; the common training metrics (with ``final_rewards_*`` where TRL logs
        ``rewards/*``), or None on the ranks other than 0."""
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        out, resumed_from, seconds = run_resumable(trainer, self.ckpt_dir, self.metrics_path)
        if not trainer.is_world_process_zero():
            return None
        save_final_model(trainer, tokenizer, self.cfg, self.work_dir)
        rows = read_metric_rows(self.metrics_path)
        last = rows[-1] if rows else {}
        result = {
            "method": self.cfg.train.method,
            "steps": self.max_steps,
            "epochs": round(self.max_steps / self.steps_per_epoch, 3),
            "train_records": len(self.dataset),
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


def chat_tokens(tokenizer, max_length: int) -> Callable[[list[dict[str, str]]], int]:
    """Tokens of a conversation rendered with the chat template, capped at ``max_length`` as TRL truncates."""

    def count(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return min(max_length, len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    return count
