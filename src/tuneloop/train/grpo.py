"""Group relative policy optimisation with TRL's ``GRPOTrainer`` (LoRA or full), scored by ``train.rewards``.

Entry point: :func:`train_grpo`. Input is the preprocessing stage's dataset of conversational prompts with
their ``reference`` (:func:`tuneloop.data.prepare.prepare_prompts`). Each step samples ``train.num_generations``
completions per prompt (``train.batch_size`` prompts per device), scores them with the checked reward functions
of :mod:`tuneloop.train.rewards` (weighted as configured), and moves the policy towards the completions that
scored above their group's mean. Generation is transformers' ``generate`` (or vLLM colocated on the GPU with ``train.use_vllm``), stopping
at the same stop tokens as evaluation. With ``train.grpo_beta`` > 0 the KL to the reference model (with LoRA,
the base with the adapter disabled) is in the loss and logged.

Checkpoints, resume and the final ``model/`` directory work as in :mod:`tuneloop.train.sft`, through
:class:`tuneloop.train.dpo.TrlRun` (what every TRL trainer run shares). Each step's row in
``train_metrics.jsonl`` has the loss, the mean reward (``reward``) and each reward's mean and spread
(``rewards/<name>/mean``, ``rewards/<name>/std``), completion lengths (``completions/mean_length``,
``completions/clipped_ratio``: the share that reached ``max_completion_length`` without ending) and ``kl``
when ``grpo_beta`` > 0.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig
from tuneloop.modeling import stop_token_ids
from tuneloop.train.dpo import TrlRun
from tuneloop.train.rewards import build_rewards, reward_inputs
from tuneloop.train.sft import read_metric_rows

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
    from trl import GRPOConfig, GRPOTrainer

    reward_funcs, weights = build_rewards(cfg)
    run = TrlRun.start(cfg, dataset_dir, work_dir, what="prompts")  # per_step and the step budget count prompts
    run.model.config.use_cache = True  # generation reuses its KV cache
    # Completions end where evaluation's answers end (eos and the chat template's end-of-turn tokens).
    run.model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    t = cfg.train
    not_grpo = ("max_length", "dataset_num_proc")
    shared = {k: v for k, v in run.args(GRPOConfig).items() if k not in not_grpo}
    vllm: dict[str, Any] = {"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if t.use_vllm else {}
    args = GRPOConfig(
        **{**shared, "per_device_train_batch_size": t.batch_size * t.num_generations},  # TRL counts completions
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        beta=t.grpo_beta,
        loss_type=t.loss_type,
        importance_sampling_level="sequence" if t.loss_type == "luspo" else "token",
        reward_weights=weights,
        use_vllm=t.use_vllm,  # checked before the run: CUDA and vllm present (preflight._vllm_problems)
        **vllm,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=run.model,
        reward_funcs=list(reward_funcs),  # typed as TRL's list (invariant: a list[CheckedReward] is not one)
        args=args,
        train_dataset=run.dataset,
        processing_class=tokenizer,
        peft_config=run.peft_config,
        callbacks=[grpo_step_logger(run.metrics_path, progress), *(callbacks or [])],
    )
    result = run.train(trainer, tokenizer)
    if result is None:
        return {}  # rank 0 writes the model and reports
    result.update(
        objective="grpo",
        train_prompts=result.pop("train_records"),
        num_generations=t.num_generations,
        rewards=reward_inputs(cfg),
    )
    return _summary(cfg, read_metric_rows(run.metrics_path), result)


def _summary(cfg: PipelineConfig, rows: list[dict[str, Any]], result: dict[str, Any]) -> dict[str, Any]:
    """The training metrics: ``result`` plus the first and last steps' mean reward, each reward's last mean, and
    the last step's completion length, clipped share and KL."""
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    result.update(first_reward=first.get("reward"), final_reward=last.get("reward"))
    for r in result["rewards"]:
        key = f"rewards/{r['name']}/mean"
        if key in last:
            result[f"final_reward_{r['name']}"] = last[key]
    for key, name in (
        ("completions/mean_length", "final_completion_length"),
        ("completions/clipped_ratio", "final_clipped_ratio"),
        ("kl", "final_kl"),
    ):
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
