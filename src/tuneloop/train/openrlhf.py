"""OpenRLHF as an external trainer: ``tuneloop export-config CONFIG --to openrlhf``.

Entry points: :func:`openrlhf_command` (a tuneloop config -> the OpenRLHF command line, written with the
``train.command`` placeholders of :data:`tuneloop.train.external.PLACEHOLDERS`), :func:`export_openrlhf` (the
``train:`` YAML snippet export-config prints: ``backend: command`` and that command, with comment lines for every
setting OpenRLHF has no equivalent for), and ``python -m tuneloop.train.openrlhf`` (:func:`main`) with three small
steps an OpenRLHF command runs beside OpenRLHF itself: ``reward-config DIR``, ``prompts IN OUT`` and
``reward-func FILE.py:NAME TOKENIZER OUT.py`` (:class:`OpenRLHFReward`: a tuneloop function reward as OpenRLHF's
``reward_func(queries, prompts, labels)``).

The options are OpenRLHF 0.11's dotted names (``--model.model_name_or_path``, ``--ds.lora.rank``, ...), checked in
tests/test_openrlhf_export.py against the argument parser OpenRLHF's own CLI modules build (on a CPU machine: only
the arguments are validated; OpenRLHF trains on GPUs with DeepSpeed, and PPO/GRPO also needs Ray and vLLM: the
grpo command has not been run by tuneloop, only parsed; the ``reward-func`` adapter is tested by OpenRLHF's own
``SingleTurnAgentExecutor`` calling it).

Objectives: ``sft`` -> ``openrlhf.cli.train_sft``, ``dpo`` -> ``train_dpo``, ``reward`` -> ``train_rm`` (full
fine-tuning only, followed by ``reward-config``), each launched with ``deepspeed --num_gpus N --module ...`` as
OpenRLHF documents. ``grpo`` -> ``python3 -m openrlhf.cli.train_ppo_ray --algo.advantage.estimator group_norm`` (a
Ray job; vLLM generates), after the ``prompts`` step, when ``train.rewards`` is exactly one reward of weight 1 that
OpenRLHF can score with: ``{model: REF}``, a registered full reward model whose tokenizer is the base model's
(``--reward.model_name_or_path``, its artifact directory resolved at export), or ``{function: FILE.py:NAME}``
(``--reward.remote_url`` naming the file the ``reward-func`` step writes; OpenRLHF 0.11 loads a ``.py`` there and
calls its ``reward_func``). Metric and judge rewards, several rewards, a weight, loss types other than dapo/grpo and a
chat template that is not the base tokenizer's are refused (train_ppo_ray has no option for them). ``orpo``,
``simpo`` and ``kto`` are refused with what to do instead: OpenRLHF 0.11 has no ORPO, SimPO or KTO trainer. PPO is
not a tuneloop objective; the README's "PPO and other RL trainers" gives its command (``prompts`` turns tuneloop's
training records into its prompt data).

What tuneloop picks up: OpenRLHF saves the final model with ``--ckpt.output_dir {output_dir}``: with LoRA a PEFT
adapter (adapter_config.json + adapter_model.safetensors; ZeRO stage 3 would write adapter_model.bin instead, so the
command pins ``--ds.zero_stage 2``), else a full safetensors model; a reward model is saved as OpenRLHF's own
``RewardModel`` class, which ``reward-config`` re-labels as the transformers sequence-classification model its
weights already are (``model.*`` + a one-output ``score`` head).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneloop.config import PipelineConfig
from tuneloop.errors import ConfigError, InputError

#: OpenRLHF CLI module per tuneloop objective.
MODULES = {
    "sft": "openrlhf.cli.train_sft",
    "dpo": "openrlhf.cli.train_dpo",
    "reward": "openrlhf.cli.train_rm",
    "grpo": "openrlhf.cli.train_ppo_ray",
}
#: Where the ``grpo`` command's steps write beside ``{output_dir}`` (run_command clears only ``{output_dir}`` itself).
GRPO_PROMPTS = "{output_dir}/../openrlhf_prompts.jsonl"
GRPO_REWARD_FILE = "{output_dir}/../openrlhf_reward.py"
#: The key of the ``prompts`` step's records that carries tuneloop's reward inputs (``--data.label_key``).
LABEL_KEY = "tuneloop_reward"
#: tuneloop's GRPO loss (TRL loss_type) -> OpenRLHF's policy-loss aggregation (--actor.loss_agg_mode).
_LOSS_AGG = {"dapo": "token-mean", "grpo": "seq-mean-token-mean"}

#: Why other objectives are not exported, and what to do instead.
_REFUSED = {
    "orpo": "OpenRLHF 0.11 has no ORPO trainer (its CLIs: train_sft, train_dpo, train_rm, train_ppo_ray)",
    "simpo": "OpenRLHF 0.11 has no SimPO trainer (its CLIs: train_sft, train_dpo, train_rm, train_ppo_ray)",
    "kto": "OpenRLHF 0.11 has no KTO trainer (its CLIs: train_sft, train_dpo, train_rm, train_ppo_ray)",
}
_ONE_REWARD = "OpenRLHF's train_ppo_ray scores every completion with one reward: a reward model or one reward function"


@dataclass
class OpenRLHFExport:
    """The command (``train.command`` template) and the notes on what it does not carry or carries differently."""

    command: str
    notes: list[str] = field(default_factory=list)


def _q(text: str) -> str:
    """A literal for the command template: shell-quoted, braces doubled (``str.format`` turns ``{{`` back into ``{``)."""
    return shlex.quote(text).replace("{", "{{").replace("}", "}}")


def _sft_format(cfg: PipelineConfig) -> str:
    """The record format of the training data (``text`` trains every token; others become ``messages``)."""
    from tuneloop.data.sources import open_detected
    from tuneloop.errors import TuneloopError

    try:
        return open_detected(cfg.data.train_data, cfg.data.format)[2]
    except TuneloopError as exc:
        raise ConfigError(f"data.train_data: {exc}") from None


def openrlhf_export(cfg: PipelineConfig) -> OpenRLHFExport:
    """The OpenRLHF command for ``cfg`` and notes; a setting that would change what is trained, or leave a model
    tuneloop cannot use, is refused (:class:`~tuneloop.errors.ConfigError`, each problem with its key)."""
    t = cfg.train
    objective = t.objective
    if objective not in MODULES:
        reason = _REFUSED.get(objective, f"OpenRLHF has no trainer for train.objective {objective}")
        raise ConfigError(
            f"train.objective: {objective} cannot be exported to OpenRLHF: {reason}. Train it with tuneloop "
            "itself (train.backend: transformers), or export sft, dpo, reward or grpo; for PPO see the README "
            "section 'PPO and other RL trainers'"
        )
    problems = _common_problems(t)
    if objective == "grpo":
        return _grpo_export(cfg, problems)
    fmt = "preference" if objective != "sft" else _sft_format(cfg)
    problems += _objective_problems(t, fmt)
    if problems:
        raise ConfigError(problems)
    notes: list[str] = []
    command = _deepspeed_command(cfg, fmt, notes)
    world = t.num_processes
    batch = t.batch_size * t.gradient_accumulation_steps * world
    if objective == "reward":
        command += " && python -m tuneloop.train.openrlhf reward-config {output_dir}"
        notes.append(
            "reward: `python -m tuneloop.train.openrlhf reward-config` re-labels OpenRLHF's RewardModel as the "
            "sequence-classification model its weights are, so tuneloop can score it (`python` must be the "
            "interpreter tuneloop is installed in)"
        )
        notes.append(
            "reward: OpenRLHF reads the score at the EOS token after dropping the chat template's trailing "
            "newline; tuneloop scores the whole rendering, so tuneloop's held-out accuracy (the gate) can differ "
            "from OpenRLHF's own eval accuracy"
        )
    notes.append(
        f"batch: --train.micro_batch_size is train.batch_size per GPU; --train.batch_size {batch} is the global "
        f"batch (batch_size x gradient_accumulation_steps x num_processes {world}); OpenRLHF derives the "
        "accumulation from them"
    )
    notes.append(
        "literals (not placeholders): global batch, epochs, GPUs, weight decay, scheduler"
        + (", beta" if objective == "dpo" else "")
        + "; export again after changing them"
    )
    notes += _not_carried_notes(
        t,
        stops=f"OpenRLHF's SFT/DPO/reward trainers stop after whole epochs (--train.max_epochs {int(t.num_epochs)})",
        logged="loss",
        placement="DeepSpeed's launcher takes --hostfile / --num_nodes for several machines",
    )
    return OpenRLHFExport(command, notes)


def _common_problems(t: Any) -> list[str]:
    """What no OpenRLHF trainer can carry, whatever the objective (each with its key and what to set instead)."""
    problems: list[str] = []
    if t.use_rslora or t.use_dora:
        key = "use_rslora" if t.use_rslora else "use_dora"
        problems.append(
            f"train.{key}: OpenRLHF's LoRA (--ds.lora.*) has no rank-stabilised or DoRA variant; set it to "
            "false to export"
        )
    if t.precision == "fp32":
        problems.append(
            "train.precision: fp32 has no OpenRLHF equivalent (--ds.param_dtype takes bf16 or fp16); set bf16, "
            "fp16 or auto to export"
        )
    if t.method == "qlora" and t.precision == "fp16":
        problems.append(
            "train.precision: OpenRLHF's 4-bit loading (--ds.load_in_4bit) computes in bf16 only; use bf16 or "
            "auto with method qlora"
        )
    if t.num_epochs != int(t.num_epochs):
        problems.append(
            f"train.num_epochs: {t.num_epochs:g} is not a whole number; OpenRLHF trains whole epochs "
            f"(--train.max_epochs; for grpo --train.num_episodes); set {math.ceil(t.num_epochs)} or another whole number to export"
        )
    return problems


def _objective_problems(t: Any, fmt: str) -> list[str]:
    """What the SFT and reward trainers cannot carry for these settings and this record format."""
    problems: list[str] = []
    if t.objective == "sft":
        if t.train_on_inputs and fmt != "text":
            problems.append(
                "train.train_on_inputs: OpenRLHF's SFT computes the loss on the answers only (its pretrain mode "
                "drops the chat template); set it to false to export"
            )
        if fmt in ("kto", "preference"):
            problems.append(
                f"data.train_data: {fmt} records cannot be exported for train.objective sft (OpenRLHF's SFT "
                "would train on every answer, labelled or rejected ones too); export conversations"
            )
    if t.objective == "reward":
        if t.method != "full":
            problems.append(
                f"train.method: {t.method} cannot be exported for a reward model: OpenRLHF's LoRA reward "
                "model saves an adapter without its score head (no task type, the head not saved with it), "
                "which no one can score with; use method full"
            )
        if t.center_rewards_coefficient is not None:
            problems.append(
                "train.center_rewards_coefficient: OpenRLHF's reward trainer has no centring term; remove it to export"
            )
    return problems


def _deepspeed_command(cfg: PipelineConfig, fmt: str, notes: list[str]) -> str:
    """``deepspeed --module openrlhf.cli.train_{sft,dpo,rm}`` with its arguments; appends the notes on the way."""
    from tuneloop.train.external import export_template

    t = cfg.train
    world = t.num_processes
    parts = [
        f"deepspeed --num_gpus {world} --module {MODULES[t.objective]}",
        "--model.model_name_or_path {base_model}",
        "--data.dataset {train_file}",
        "--eval.dataset {eval_file}",
        "--eval.split train",
    ]
    if fmt == "text":
        parts.append("--data.input_key text --model.pretrain_mode_enable")
    else:
        if t.objective == "sft":
            # Every assistant turn is trained on, as tuneloop's SFT does (the prompt turns are masked).
            parts.append("--data.input_key messages --data.apply_chat_template --data.multiturn")
        else:
            parts.append(
                "--data.prompt_key messages --data.chosen_key chosen --data.rejected_key rejected "
                "--data.apply_chat_template"
            )
        tpl = export_template(cfg)
        if tpl.source != "tokenizer":
            parts.append(f"--data.tokenizer_chat_template {_q(tpl.text)}")
            notes.append(f"chat template: {_template_name(tpl.source)}, passed as --data.tokenizer_chat_template")
        else:
            notes.append(
                "chat template: the base model tokenizer's own, as tuneloop uses it (OpenRLHF's "
                "--data.apply_chat_template renders with it)"
            )
    parts.append("--data.max_len {max_length}")
    if t.objective == "dpo":
        parts.append(f"--model.beta {t.dpo_beta:g}")
    if t.objective == "reward":
        parts.append("--model.loss_type sigmoid")  # Bradley-Terry, as TRL's RewardTrainer
    parts.append(_lora_args(t))
    batch = t.batch_size * t.gradient_accumulation_steps * world
    parts.append(f"--train.micro_batch_size {{batch_size}} --train.batch_size {batch}")
    parts.append(f"--train.max_epochs {int(t.num_epochs)} --train.seed {{seed}}")
    parts.append(f"--adam.lr {{learning_rate}} --adam.betas 0.9 0.999 --adam.weight_decay {t.weight_decay:g}")
    parts.append(f"--lr_scheduler {t.lr_scheduler}")
    if t.warmup_steps == 0:
        parts.append("--lr_warmup_ratio 0")
    else:
        notes.append(
            f"train.warmup_steps {t.warmup_steps} is not carried: OpenRLHF takes a share of all steps "
            "(--lr_warmup_ratio, default 0.03); add --lr_warmup_ratio (warm-up steps / total steps) by hand"
        )
    parts.append(_precision_args(t, notes))
    if t.gradient_checkpointing:
        parts.append("--model.gradient_checkpointing_enable")
    if t.packing and t.objective == "sft":
        parts.append("--ds.packing_samples")
        notes.append(
            "train.packing -> --ds.packing_samples (needs flash-attn; OpenRLHF then switches to "
            "flash_attention_2)" + (f"; train.pack_length {t.pack_length} has no equivalent" if t.pack_length else "")
        )
    parts.append("--logger.logging_steps 1 --ckpt.output_dir {output_dir}")
    return " ".join(p for p in parts if p)


def _template_name(source: str) -> str:
    """Which chat template tuneloop renders with, when it is not the base tokenizer's."""
    if source == "data.chat_template":
        return "data.chat_template"
    return "tuneloop's ChatML default (the base tokenizer has none)"


def _lora_args(t: Any) -> str:
    """``--ds.lora.*`` (and ``--ds.load_in_4bit`` for QLoRA); empty for full fine-tuning."""
    if t.method not in ("lora", "qlora"):
        return ""
    lora = "--ds.lora.rank {lora_r} --ds.lora.alpha {lora_alpha} --ds.lora.dropout {lora_dropout}"
    if t.target_modules != "all-linear":  # OpenRLHF's default is the string all-linear, as PEFT wants it
        names = [t.target_modules] if isinstance(t.target_modules, str) else list(t.target_modules)
        lora += " --ds.lora.target_modules " + " ".join(_q(n) for n in names)
    return lora + (" --ds.load_in_4bit" if t.method == "qlora" else "")


def _precision_args(t: Any, notes: list[str]) -> str:
    """``--ds.param_dtype`` (OpenRLHF has no fp32) and the ZeRO stage that keeps a LoRA save as safetensors."""
    if t.precision == "auto":
        notes.append(
            "train.precision auto -> --ds.param_dtype bf16: OpenRLHF trains on GPUs, where tuneloop's auto is "
            "bf16 on a bf16 GPU (OpenRLHF has no fp32)"
        )
    return f"--ds.param_dtype {'fp16' if t.precision == 'fp16' else 'bf16'} --ds.zero_stage 2"


def _not_carried_notes(t: Any, *, stops: str, logged: str, placement: str) -> list[str]:
    """The notes on max_steps, save_steps, report_to and accelerate_config, which no OpenRLHF command carries."""
    notes = []
    if t.max_steps:
        notes.append(f"train.max_steps {t.max_steps} is not carried: {stops}")
    notes.append(
        f"train.save_steps {t.save_steps} is not carried: a killed command starts again from the beginning "
        "(tuneloop clears {output_dir}); OpenRLHF writes no trainer_state.json, so the run's metrics have no "
        f"per-step {logged} (OpenRLHF's log lines are in the stage log)"
    )
    if t.report_to != "none":
        notes.append(
            f"train.report_to {t.report_to} is not carried: add --logger.wandb.key or --logger.tensorboard_dir by hand"
        )
    if t.accelerate_config:
        notes.append(f"train.accelerate_config is not carried: {placement}")
    return notes


def _grpo_export(cfg: PipelineConfig, problems: list[str]) -> OpenRLHFExport:
    """``objective: grpo`` -> ``openrlhf.cli.train_ppo_ray --algo.advantage.estimator group_norm``, scored by the one
    reward of ``train.rewards``: a registered full reward model (``--reward.model_name_or_path``, its store directory)
    or a function reward (``--reward.remote_url`` naming the file the ``reward-func`` step writes, which calls the
    function with tuneloop's signature; see :class:`OpenRLHFReward`). Other rewards, several rewards and weights are
    refused (ConfigError, with the problems the caller found already)."""
    t, d = cfg.train, cfg.data
    notes: list[str] = []
    problems += _grpo_problems(cfg)
    spec = t.rewards[0] if len(t.rewards) == 1 else None
    reward_args, steps = _grpo_reward(cfg, spec, problems, notes) if spec is not None else ("", "")
    if problems:
        raise ConfigError(problems)

    world, g = t.num_processes, t.num_generations
    prompts_per_step = t.batch_size * t.gradient_accumulation_steps * world
    per_gpu = t.batch_size * g
    parts = [
        f"python -m tuneloop.train.openrlhf prompts {{train_file}} {GRPO_PROMPTS} && {steps}"
        f"python3 -m {MODULES['grpo']}",
        f"--actor.num_nodes 1 --actor.num_gpus_per_node {world}"
        + (f" --ref.num_gpus_per_node {world}" if t.grpo_beta > 0 else "")
        + (f" --reward.num_gpus_per_node {world}" if spec is not None and spec.kind == "model" else ""),
        f"--vllm.num_engines {world} --train.colocate_all --vllm.enable_sleep --ds.enable_sleep "
        "--vllm.gpu_memory_utilization 0.5",
        "--actor.model_name_or_path {base_model}",
        reward_args,
        f"--data.prompt_dataset {GRPO_PROMPTS} --data.input_key prompt --data.apply_chat_template",
        f"--data.max_len {d.max_length + t.max_completion_length} --rollout.max_new_tokens {t.max_completion_length}",
        f"--rollout.n_samples_per_prompt {g} --rollout.temperature {t.temperature:g}",
        "--algo.advantage.estimator group_norm",
    ]
    if t.grpo_beta > 0:
        parts.append(f"--algo.kl.init_coef {t.grpo_beta:g} --algo.kl.use_loss --algo.kl.estimator k3")
        notes.append(
            f"train.grpo_beta {t.grpo_beta:g} -> --algo.kl.init_coef with --algo.kl.use_loss --algo.kl.estimator "
            "k3: the KL to the reference model (the base, loaded as a separate model) in the loss, as TRL's GRPO"
        )
    else:
        parts.append("--algo.kl.init_coef 0")
        notes.append(
            "train.grpo_beta 0 -> --algo.kl.init_coef 0: OpenRLHF then loads no reference model (train_ppo_ray "
            "creates it only when the coefficient is > 0), as TRL's GRPO with beta 0"
        )
    parts.append(f"--actor.loss_agg_mode {_LOSS_AGG[t.loss_type]}")
    parts.append(
        f"--rollout.batch_size {prompts_per_step} --rollout.micro_batch_size {per_gpu} "
        f"--train.batch_size {prompts_per_step * g} --train.micro_batch_size {per_gpu}"
    )
    parts.append(f"--train.max_epochs 1 --train.num_episodes {int(t.num_epochs)} --train.seed {{seed}}")
    parts.append(
        f"--actor.adam.lr {{learning_rate}} --actor.adam.betas 0.9 0.999 --actor.adam.weight_decay "
        f"{t.weight_decay:g} --actor.lr_scheduler {t.lr_scheduler}"
    )
    if t.warmup_steps == 0:
        parts.append("--actor.lr_warmup_ratio 0")
    else:
        notes.append(
            f"train.warmup_steps {t.warmup_steps} is not carried: OpenRLHF takes a share of all steps "
            "(--actor.lr_warmup_ratio, default 0.03); add it by hand (warm-up steps / total steps)"
        )
    parts.append(_lora_args(t))
    parts.append(_precision_args(t, notes))
    if t.gradient_checkpointing:
        parts.append("--actor.gradient_checkpointing_enable")
    parts.append("--logger.logging_steps 1 --ckpt.output_dir {output_dir}")
    command = " ".join(p for p in parts if p)
    notes.insert(
        0,
        "grpo: OpenRLHF's GRPO is its PPO trainer with --algo.advantage.estimator group_norm (no critic); it "
        "runs on a Ray cluster's head node (`ray start --head`) and needs NVIDIA GPUs, DeepSpeed and vLLM: "
        "tuneloop checks this command against OpenRLHF 0.11.2's argument parser only, it has not run it",
    )
    notes += _grpo_notes(cfg, prompts_per_step, per_gpu)
    notes += _not_carried_notes(
        t,
        stops=f"OpenRLHF's PPO trainer runs whole episodes (--train.num_episodes {int(t.num_epochs)})",
        logged="reward",
        placement="Ray places the models (--actor.num_nodes for several machines)",
    )
    return OpenRLHFExport(command, notes)


def _grpo_problems(cfg: PipelineConfig) -> list[str]:
    """What train_ppo_ray cannot carry: several rewards, tuneloop's own rewards, a weight, the loss type, a chat
    template that is not the base tokenizer's."""
    from tuneloop.train.external import export_template

    t = cfg.train
    problems: list[str] = []
    if len(t.rewards) != 1:
        problems.append(
            f"train.rewards: {len(t.rewards)} rewards; {_ONE_REWARD} (--reward.model_name_or_path or "
            "--reward.remote_url), so a sum of rewards cannot be carried over; keep one {model: REF} or "
            "{function: FILE.py:NAME} reward to export, or train with tuneloop (train.backend: transformers)"
        )
    else:
        spec, key = t.rewards[0], "train.rewards[0]"
        if spec.kind in ("metric", "judge"):
            what = f"metric {spec.metric}" if spec.kind == "metric" else "the judge (eval.judge)"
            problems.append(
                f"{key}.{spec.kind}: {what} is tuneloop's own reward; {_ONE_REWARD}, so it cannot be exported. "
                "Write it as a {function: FILE.py:NAME} reward (e.g. a function that calls your metric), use "
                "a registered reward model ({model: REF}), or train with tuneloop (train.backend: transformers)"
            )
        if spec.weight != 1.0:
            problems.append(
                f"{key}.weight: {spec.weight:g}; OpenRLHF takes one reward as it is (no weight); set the weight "
                "to 1 to export (with one reward, group_norm divides by the group's spread, so a positive "
                "weight changes nothing but the sign)"
            )
    if t.loss_type not in _LOSS_AGG:
        problems.append(
            f"train.loss_type: {t.loss_type} has no OpenRLHF equivalent (--actor.loss_agg_mode takes token-mean, "
            "i.e. dapo, or seq-mean-token-mean, i.e. grpo); set dapo or grpo to export"
        )
    tpl = export_template(cfg)
    if tpl.source != "tokenizer":
        problems.append(
            f"data.chat_template: tuneloop renders the prompts with {_template_name(tpl.source)}, but OpenRLHF's "
            "train_ppo_ray renders them with the base tokenizer's own template (it has no "
            "--data.tokenizer_chat_template); save the template into the base model's tokenizer_config.json "
            "(tokenizer.chat_template = ...; tokenizer.save_pretrained(DIR)) and point base_model at DIR to export"
        )
    return problems


def _grpo_reward(cfg: PipelineConfig, spec: Any, problems: list[str], notes: list[str]) -> tuple[str, str]:
    """(train_ppo_ray's reward arguments, the steps to run before it) for the one reward ``spec``; a reward model
    that cannot be resolved is added to ``problems``."""
    if spec.kind == "model":
        try:
            model_dir = _reward_model_dir(cfg, str(spec.model))
        except Exception as exc:  # noqa: BLE001 - the registry's own message names what exists
            problems.append(f"train.rewards[0].model: {exc}")
            return "", ""
        notes.append(
            f"reward: the registered reward model {spec.model} is its artifact directory {model_dir} (resolved "
            "now: export again after the ref moves to another version); OpenRLHF loads it as its RewardModel "
            "(the transformers sequence-classification model's `score` head) and scores the policy's own token "
            "ids, read at the last generated token (EOS), where tuneloop re-renders prompt + completion with "
            "the chat template (ending at the end-of-turn), so scores can differ slightly"
        )
        return f"--reward.model_name_or_path {_q(str(model_dir))}", ""
    if spec.kind != "function":
        return "", ""
    file, name = spec.function_parts()
    target = f"{Path(file).resolve()}:{name}"
    notes.append(
        f"reward: `reward-func` checks {spec._written or spec.function} and writes {GRPO_REWARD_FILE}, "
        "OpenRLHF's reward_func(queries, prompts, labels) (--reward.remote_url), which calls "
        f"{name}(prompts=[conversation], completions=[[{{role: assistant, content}}]], reference=[...]) as "
        "tuneloop does (no completion_ids or trainer_state); the completion is the generated text up to "
        "tuneloop's first stop token, special tokens removed. OpenRLHF's vLLM workers import tuneloop and the "
        "function file: the same Python environment and paths on every Ray node"
    )
    notes.append(
        "reward: OpenRLHF logs an exception from a reward function and goes on without that reward (its "
        "executor catches it); the adapter prints `tuneloop reward: ...` (the function, the item, what is "
        "wrong) on stderr first, and refuses None, NaN and non-numbers (OpenRLHF has no 'no reward')"
    )
    steps = f"python -m tuneloop.train.openrlhf reward-func {_q(target)} {{base_model}} {GRPO_REWARD_FILE} && "
    return f"--reward.remote_url {GRPO_REWARD_FILE} --data.label_key {LABEL_KEY}", steps


def _grpo_notes(cfg: PipelineConfig, prompts_per_step: int, per_gpu: int) -> list[str]:
    """How the grpo command's prompts, batches and generation differ from tuneloop's own GRPO."""
    t, d, g = cfg.train, cfg.data, cfg.train.num_generations
    return [
        "prompts: `python -m tuneloop.train.openrlhf prompts` writes each training conversation's prompt (the "
        f"turns before its final answer) and reference to {GRPO_PROMPTS}; unlike tuneloop it does not drop "
        f"prompts over data.max_length (OpenRLHF truncates them from the left); --data.max_len "
        f"{d.max_length + t.max_completion_length} is data.max_length + max_completion_length",
        f"batch: each rollout is train.batch_size x gradient_accumulation_steps x num_processes = {prompts_per_step} "
        f"prompts x {g} generations, trained in one optimizer step (--train.batch_size {prompts_per_step * g} "
        f"completions, --train.micro_batch_size {per_gpu} per GPU), as TRL's GRPO; --train.num_episodes "
        f"{int(t.num_epochs)} passes over the prompts",
        "generation: OpenRLHF's vLLM stops at the model's EOS only (tuneloop also stops at the chat template's "
        f"end-of-turn tokens); --rollout.temperature {t.temperature:g}, top_p 1; train.use_vllm has no effect "
        "(OpenRLHF always generates with vLLM)",
        "literals (not placeholders): GPUs, batch sizes, generations, max lengths, temperature, KL coefficient, "
        "episodes, weight decay, scheduler; export again after changing them",
    ]


def _reward_model_dir(cfg: PipelineConfig, ref: str) -> Path:
    """The directory OpenRLHF loads the registered reward model ``ref`` from: its verified artifact (or the ``merged/``
    model beside a LoRA adapter), a transformers sequence-classification model with one output whose tokenizer is the
    base model's (OpenRLHF scores the policy's token ids as they are). InputError/ConfigError say what to do."""
    import json as _json

    from transformers import AutoTokenizer

    from tuneloop.registry.api import open_registry
    from tuneloop.train.rewards import reward_version
    from tuneloop.workspace import Workspace

    version = reward_version(cfg, ref)
    where = Path(open_registry(cfg, Workspace.for_config(cfg)).open_artifact(version.model, version.version))
    if (where / "adapter_config.json").is_file():
        if not (where / "merged" / "config.json").is_file():
            raise InputError(
                f"{version.ref} is a LoRA reward model; OpenRLHF's reward model loads a full model "
                "(--reward.model_name_or_path), so train the reward model with train.method: full to export"
            )
        where = where / "merged"
    config = _json.loads((where / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    outputs = config.get("num_labels", len(config.get("id2label") or {0: 0}))
    if not any(a.endswith("ForSequenceClassification") for a in archs) or outputs != 1:
        raise InputError(
            f"{version.ref} ({where}) is not a sequence-classification model with one output "
            f"(architectures {archs}); OpenRLHF's RewardModel reads its `score` head"
        )
    try:
        theirs, ours = AutoTokenizer.from_pretrained(str(where)), AutoTokenizer.from_pretrained(cfg.base_model)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot load the tokenizers of {version.ref} and base_model to compare them ({exc})"
        ) from None
    if theirs.get_vocab() != ours.get_vocab():
        raise InputError(
            f"{version.ref} has another tokenizer than base_model {cfg.base_model}; OpenRLHF feeds the "
            "policy's token ids to the reward model unchanged, so train the reward model on the same base "
            "(tuneloop itself re-renders the text for it)"
        )
    return where


def openrlhf_command(cfg: PipelineConfig) -> str:
    """The OpenRLHF command line equivalent to ``cfg``, with ``train.command`` placeholders (see :func:`openrlhf_export`)."""
    return openrlhf_export(cfg).command


def export_openrlhf(cfg: PipelineConfig) -> str:
    """The ``train:`` YAML snippet for ``cfg``'s config: ``backend: command`` and the OpenRLHF command, after comment
    lines on how it was made and what it does not carry."""
    exp = openrlhf_export(cfg)
    head = [
        f"Generated by `tuneloop export-config --to openrlhf` from tuneloop config `{cfg.name}` "
        f"(OpenRLHF 0.11 option names).",
        "Put these keys in the config's `train:` section: tuneloop then runs OpenRLHF as an external trainer and "
        "evaluates, gates and registers what it writes to {output_dir}. OpenRLHF needs NVIDIA GPUs and DeepSpeed"
        + (", and for GRPO a Ray cluster and vLLM." if cfg.train.objective == "grpo" else "."),
    ]
    text = "".join(f"# {line}\n" for line in head + exp.notes)
    body = {"train": {"objective": cfg.train.objective, "backend": "command", "command": exp.command}}
    return text + yaml.safe_dump(body, sort_keys=False, width=100, allow_unicode=True)


# -------------------------------------------------------------------- steps an OpenRLHF command runs beside it


def reward_config(model_dir: Path) -> str:
    """Re-label the reward model OpenRLHF's ``train_rm`` saved in ``model_dir`` (``config.json`` architectures
    ``RewardModel``) as the transformers sequence-classification model with one output its weights are; returns the
    class name. Refuses (InputError) when its weights do not hold exactly that model's parameters (a different value
    head name, an adapter), so that no head is silently re-initialised at random when tuneloop loads it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(
            f"{model_dir}: no config.json; expected the full reward model OpenRLHF's train_rm saves with "
            "--ckpt.output_dir (LoRA reward models are not supported)"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(raw.get("model_type", ""))
    if cls is None:
        raise InputError(
            f"{path}: model_type {raw.get('model_type')!r} has no transformers sequence-classification class"
        )
    head = raw.get("value_head_prefix", "score")
    if head != "score":
        raise InputError(
            f"{path}: the value head is named {head!r}; transformers' sequence-classification models read "
            "`score` (train with OpenRLHF's default --ds.value_head_prefix score)"
        )
    saved: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            saved.update(st.keys())
    if not saved:
        raise InputError(f"{model_dir}: no *.safetensors weights")
    config = AutoConfig.from_pretrained(str(model_dir), num_labels=1)
    with torch.device("meta"):
        expected = set(AutoModelForSequenceClassification.from_config(config).state_dict())
    missing = sorted(expected - saved)
    if missing:
        raise InputError(
            f"{model_dir}: not a {cls} with one output: {len(missing)} of its weights are missing from the "
            f"safetensors files (first: {', '.join(missing[:3])})"
        )
    raw.update(architectures=[cls], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    raw.pop("num_labels", None)
    if raw.get("pad_token_id") is None:
        tok = model_dir / "tokenizer_config.json"
        if tok.is_file():
            from transformers import AutoTokenizer

            raw["pad_token_id"] = AutoTokenizer.from_pretrained(str(model_dir)).pad_token_id
    from tuneloop.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return cls


def ppo_prompts(records: Path, out: Path) -> int:
    """Write the prompts of tuneloop's canonical training records (``{train_file}``) as OpenRLHF prompt data:
    ``{"prompt": [messages before the final assistant turn], "reference": that turn, "tuneloop_reward": both as one
    JSON string}`` per line (for ``--data.input_key prompt``; ``--data.label_key reference`` for a reward function of
    OpenRLHF's own, ``--data.label_key tuneloop_reward`` for :class:`OpenRLHFReward`). Returns how many."""
    from tuneloop.fsutil import atomic_write_text, iter_jsonl

    lines = []
    for n, rec in iter_jsonl(records, "the prepared training data"):
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise InputError(
                f"{records}:{n}: expected conversation records (`messages` ending with an assistant "
                "turn); PPO prompts come from train.objective sft data"
            )
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        label = json.dumps({"prompt": plain[:-1], "reference": plain[-1]["content"]}, ensure_ascii=False)
        lines.append(
            json.dumps({"prompt": plain[:-1], "reference": plain[-1]["content"], LABEL_KEY: label}, ensure_ascii=False)
            + "\n"
        )
    if not lines:
        raise InputError(f"{records}: no records")
    atomic_write_text(Path(out), "".join(lines))
    return len(lines)


# ---------------------------------------------------------------- a tuneloop function reward as OpenRLHF's reward_func

REWARD_FILE_TEMPLATE = '''"""OpenRLHF reward function (``--reward.remote_url`` this file), written by
``python -m tuneloop.train.openrlhf reward-func``: OpenRLHF 0.11 calls ``reward_func(queries, prompts, labels)``;
this one calls the tuneloop function reward {target} with tuneloop's signature (tuneloop.train.openrlhf.OpenRLHFReward).
"""

from tuneloop.train.openrlhf import OpenRLHFReward

reward_func = OpenRLHFReward({target!r}, {tokenizer!r})
'''


class OpenRLHFReward:
    """OpenRLHF 0.11's ``reward_func(queries, prompts, labels)`` (what ``--reward.remote_url FILE.py`` loads; its
    ``SingleTurnAgentExecutor`` calls it once per completion, in a thread of a vLLM worker) around a tuneloop function
    reward ``FILE.py:NAME``, called as tuneloop's GRPO calls it: ``NAME(prompts=[conversation], completions=[[{"role":
    "assistant", "content": text}]], reference=[final answer])``.

    ``queries`` are the decoded prompt + generated tokens (special tokens kept), ``prompts`` the rendered prompts,
    ``labels`` the ``tuneloop_reward`` field the ``prompts`` step wrote (the conversation and its reference). The
    completion is the query after the prompt's own decoding, cut after tuneloop's first stop token, special tokens
    removed (TRL decodes with ``skip_special_tokens``). The result is checked as in tuneloop
    (:class:`~tuneloop.train.rewards.CheckedReward`; ``None`` is refused too); a problem is printed on stderr
    (``tuneloop reward: ...``) before it is raised, because OpenRLHF logs and drops a reward function's exception.
    Returns ``{"rewards": r, "scores": r}`` (a number for one query, a list for several)."""

    def __init__(self, function: str, tokenizer: str):
        from tuneloop.config import RewardSpec
        from tuneloop.train.rewards import CheckedReward, Reward, load_function

        spec = RewardSpec(function=function)
        self.checked = CheckedReward(Reward(0, spec, spec.function_parts()[1]), load_function(spec))
        self.tokenizer_path = tokenizer
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tok

    def completion(self, query: str, prompt: str) -> str:
        """The generated text of ``query`` as tuneloop would score it (see the class docstring)."""
        from tuneloop.modeling import stop_token_ids
        from tuneloop.train.rewards import RewardError

        tok = self.tok
        prefix = tok.decode(tok(prompt, add_special_tokens=False)["input_ids"], skip_special_tokens=False)
        if not query.startswith(prefix):
            raise RewardError(
                f"{self.checked.reward.where}: the query does not start with its prompt as the tokenizer "
                f"{self.tokenizer_path} decodes it (query {query[:60]!r}); is --actor.model_name_or_path "
                "the base model the reward-func step was given?"
            )
        text = query[len(prefix) :]
        stops = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
        cut = min(((text.find(s), s) for s in stops if s and s in text), default=None)
        if cut is not None:
            text = text[: cut[0] + len(cut[1])]
        for special in sorted(set(tok.all_special_tokens), key=len, reverse=True):
            text = text.replace(special, "")
        return text

    def __call__(self, queries, prompts, labels):
        from tuneloop.train.rewards import RewardError

        try:
            conversations, completions, references = [], [], []
            for query, prompt, label in zip(queries, prompts, labels, strict=True):
                try:
                    item = json.loads(label)
                    conversations.append(item["prompt"])
                    references.append(item["reference"])
                except (TypeError, ValueError, KeyError) as exc:
                    raise RewardError(
                        f"{self.checked.reward.where}: the label {str(label)[:60]!r} is not the "
                        f"{LABEL_KEY} field of the prompts step ({type(exc).__name__}: {exc}); run OpenRLHF "
                        f"with --data.label_key {LABEL_KEY} on what `python -m tuneloop.train.openrlhf "
                        "prompts` wrote"
                    ) from None
                completions.append([{"role": "assistant", "content": self.completion(query, prompt)}])
            values = self.checked(prompts=conversations, completions=completions, reference=references)
            if any(v is None for v in values):
                j = values.index(None)
                raise RewardError(
                    f"{self.checked.reward.where} returned None for item {j} (prompt "
                    f"{str(conversations[j])[:60]!r}); OpenRLHF has no 'no reward': return a number"
                )
        except RewardError as exc:
            print(f"tuneloop reward: {exc}", file=sys.stderr, flush=True)
            raise
        rewards: Any = values[0] if len(values) == 1 else values
        return {"rewards": rewards, "scores": rewards}


def write_reward_func(target: str, tokenizer: str, out: Path) -> str:
    """Check the function reward ``target`` (``/abs/FILE.py:NAME``: it imports and has the function; the tokenizer
    loads) and write ``out``, the file OpenRLHF's ``--reward.remote_url`` loads (:data:`REWARD_FILE_TEMPLATE`).
    Returns ``target``; InputError says what is wrong."""
    from pydantic import ValidationError

    from tuneloop.fsutil import atomic_write_text
    from tuneloop.train.rewards import RewardError

    if not str(out).endswith(".py"):
        raise InputError(
            f"reward-func: {out} must end with .py (OpenRLHF loads --reward.remote_url as a Python file only then)"
        )
    try:
        fn = OpenRLHFReward(target, tokenizer)
        fn.tok  # noqa: B018 - load the tokenizer now, not first in a Ray worker
    except ValidationError as exc:
        raise InputError(f"reward-func: {target!r} is not FILE.py:NAME ({exc.errors()[0]['msg']})") from None
    except RewardError as exc:
        raise InputError(f"reward-func: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"reward-func: cannot load the tokenizer of {tokenizer} ({exc})") from None
    atomic_write_text(Path(out), REWARD_FILE_TEMPLATE.format(target=target, tokenizer=tokenizer))
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m tuneloop.train.openrlhf reward-config DIR | prompts IN OUT | reward-func FILE.py:NAME TOKENIZER OUT.py``;
    exit 2 with the reason on bad input."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2 and args[0] == "reward-config":
            print(f"reward-config: {args[1]} is now a {reward_config(Path(args[1]))} with one output")
            return 0
        if len(args) == 3 and args[0] == "prompts":
            print(f"prompts: wrote {ppo_prompts(Path(args[1]), Path(args[2]))} prompts to {args[2]}")
            return 0
        if len(args) == 4 and args[0] == "reward-func":
            print(
                f"reward-func: {args[3]} calls {write_reward_func(args[1], args[2], Path(args[3]))} as OpenRLHF's "
                "reward_func"
            )
            return 0
    except (InputError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        "usage: python -m tuneloop.train.openrlhf reward-config MODEL_DIR | prompts RECORDS.jsonl OUT.jsonl | "
        "reward-func FILE.py:NAME TOKENIZER_DIR OUT.py",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
