"""OpenRLHF as an external trainer: ``tuneloop export-config CONFIG --to openrlhf``.

Entry points: :func:`openrlhf_command` (a tuneloop config -> the OpenRLHF command line, written with the
``train.command`` placeholders of :data:`tuneloop.train.external.PLACEHOLDERS`), :func:`export_openrlhf` (the
``train:`` YAML snippet export-config prints: ``backend: command`` and that command, with comment lines for every
setting OpenRLHF has no equivalent for), and ``python -m tuneloop.train.openrlhf`` (:func:`main`) with two small
steps an OpenRLHF command runs beside OpenRLHF itself: ``reward-config DIR`` and ``prompts IN OUT``.

The options are OpenRLHF 0.11's dotted names (``--model.model_name_or_path``, ``--ds.lora.rank``, ...), checked in
tests/test_openrlhf_export.py against the argument parser OpenRLHF's own CLI modules build (on a CPU machine: only
the arguments are validated; OpenRLHF trains on GPUs with DeepSpeed, and PPO also needs Ray and vLLM).

Objectives: ``sft`` -> ``openrlhf.cli.train_sft``, ``dpo`` -> ``train_dpo``, ``reward`` -> ``train_rm`` (full
fine-tuning only, followed by ``reward-config``), each launched with ``deepspeed --num_gpus N --module ...`` as
OpenRLHF documents. ``orpo``, ``simpo``, ``kto`` and ``grpo`` are refused with what to do instead: OpenRLHF 0.11 has
no ORPO, SimPO or KTO trainer, and its GRPO (``train_ppo_ray --algo.advantage.estimator group_norm``) scores with a
reward model or its own reward-function interface, not with ``train.rewards``. PPO is not a tuneloop objective; the
README's "PPO and other RL trainers" gives its command (``prompts`` turns tuneloop's training records into its
prompt data).

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
MODULES = {"sft": "openrlhf.cli.train_sft", "dpo": "openrlhf.cli.train_dpo", "reward": "openrlhf.cli.train_rm"}

#: Why other objectives are not exported, and what to do instead.
_REFUSED = {
    "orpo": "OpenRLHF 0.11 has no ORPO trainer (its CLIs: train_sft, train_dpo, train_rm, train_ppo_ray)",
    "simpo": "OpenRLHF 0.11 has no SimPO trainer (its CLIs: train_sft, train_dpo, train_rm, train_ppo_ray)",
    "kto": "OpenRLHF 0.11 has no KTO trainer (its CLIs: train_sft, train_dpo, train_rm, train_ppo_ray)",
    "grpo": ("OpenRLHF's GRPO (train_ppo_ray --algo.advantage.estimator group_norm) scores completions with a reward "
             "model or its own reward-function file (--reward.remote_url), not with train.rewards, so the rewards "
             "this config names cannot be carried over"),
}


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
    from tuneloop.train.external import export_template

    t, d = cfg.train, cfg.data
    objective = t.objective
    if objective not in MODULES:
        reason = _REFUSED.get(objective, f"OpenRLHF has no trainer for train.objective {objective}")
        raise ConfigError(f"train.objective: {objective} cannot be exported to OpenRLHF: {reason}. Train it with tuneloop "
                          "itself (train.backend: transformers), or export sft, dpo or reward; for PPO see the README "
                          "section 'PPO and other RL trainers'")
    problems: list[str] = []
    notes: list[str] = []
    if t.use_rslora or t.use_dora:
        key = "use_rslora" if t.use_rslora else "use_dora"
        problems.append(f"train.{key}: OpenRLHF's LoRA (--ds.lora.*) has no rank-stabilised or DoRA variant; set it to "
                        "false to export")
    if t.precision == "fp32":
        problems.append("train.precision: fp32 has no OpenRLHF equivalent (--ds.param_dtype takes bf16 or fp16); set bf16, "
                        "fp16 or auto to export")
    if t.method == "qlora" and t.precision == "fp16":
        problems.append("train.precision: OpenRLHF's 4-bit loading (--ds.load_in_4bit) computes in bf16 only; use bf16 or "
                        "auto with method qlora")
    if t.num_epochs != int(t.num_epochs):
        problems.append(f"train.num_epochs: {t.num_epochs:g} is not a whole number; OpenRLHF trains whole epochs "
                        f"(--train.max_epochs); set {math.ceil(t.num_epochs)} or another whole number to export")
    fmt = "preference" if objective != "sft" else _sft_format(cfg)
    if objective == "sft":
        if t.train_on_inputs and fmt != "text":
            problems.append("train.train_on_inputs: OpenRLHF's SFT computes the loss on the answers only (its pretrain mode "
                            "drops the chat template); set it to false to export")
        if fmt in ("kto", "preference"):
            problems.append(f"data.train_data: {fmt} records cannot be exported for train.objective sft (OpenRLHF's SFT "
                            "would train on every answer, labelled or rejected ones too); export conversations")
    if objective == "reward":
        if t.method != "full":
            problems.append(f"train.method: {t.method} cannot be exported for a reward model: OpenRLHF's LoRA reward "
                            "model saves an adapter without its score head (no task type, the head not saved with it), "
                            "which no one can score with; use method full")
        if t.center_rewards_coefficient is not None:
            problems.append("train.center_rewards_coefficient: OpenRLHF's reward trainer has no centring term; remove it to "
                            "export")
    if problems:
        raise ConfigError(problems)

    world = t.num_processes
    parts = [f"deepspeed --num_gpus {world} --module {MODULES[objective]}",
             "--model.model_name_or_path {base_model}",
             "--data.dataset {train_file}", "--eval.dataset {eval_file}", "--eval.split train"]
    if fmt == "text":
        parts.append("--data.input_key text --model.pretrain_mode_enable")
    else:
        if objective == "sft":
            # Every assistant turn is trained on, as tuneloop's SFT does (the prompt turns are masked).
            parts.append("--data.input_key messages --data.apply_chat_template --data.multiturn")
        else:
            parts.append("--data.prompt_key messages --data.chosen_key chosen --data.rejected_key rejected "
                         "--data.apply_chat_template")
        tpl = export_template(cfg)
        if tpl.source != "tokenizer":
            parts.append(f"--data.tokenizer_chat_template {_q(tpl.text)}")
            which = ("data.chat_template" if tpl.source == "data.chat_template"
                     else "tuneloop's ChatML default (the base tokenizer has none)")
            notes.append(f"chat template: {which}, passed as --data.tokenizer_chat_template")
        else:
            notes.append("chat template: the base model tokenizer's own, as tuneloop uses it (OpenRLHF's "
                         "--data.apply_chat_template renders with it)")
    parts.append("--data.max_len {max_length}")
    if objective == "dpo":
        parts.append(f"--model.beta {t.dpo_beta:g}")
    if objective == "reward":
        parts.append("--model.loss_type sigmoid")  # Bradley-Terry, as TRL's RewardTrainer
    if t.method in ("lora", "qlora"):
        lora = "--ds.lora.rank {lora_r} --ds.lora.alpha {lora_alpha} --ds.lora.dropout {lora_dropout}"
        if t.target_modules != "all-linear":  # OpenRLHF's default is the string all-linear, as PEFT wants it
            names = [t.target_modules] if isinstance(t.target_modules, str) else list(t.target_modules)
            lora += " --ds.lora.target_modules " + " ".join(_q(n) for n in names)
        parts.append(lora)
        if t.method == "qlora":
            parts.append("--ds.load_in_4bit")
    batch = t.batch_size * t.gradient_accumulation_steps * world
    parts.append(f"--train.micro_batch_size {{batch_size}} --train.batch_size {batch}")
    parts.append(f"--train.max_epochs {int(t.num_epochs)} --train.seed {{seed}}")
    parts.append(f"--adam.lr {{learning_rate}} --adam.betas 0.9 0.999 --adam.weight_decay {t.weight_decay:g}")
    parts.append(f"--lr_scheduler {t.lr_scheduler}")
    if t.warmup_steps == 0:
        parts.append("--lr_warmup_ratio 0")
    else:
        notes.append(f"train.warmup_steps {t.warmup_steps} is not carried: OpenRLHF takes a share of all steps "
                     "(--lr_warmup_ratio, default 0.03); add --lr_warmup_ratio (warm-up steps / total steps) by hand")
    if t.precision == "auto":
        notes.append("train.precision auto -> --ds.param_dtype bf16: OpenRLHF trains on GPUs, where tuneloop's auto is "
                     "bf16 on a bf16 GPU (OpenRLHF has no fp32)")
    parts.append(f"--ds.param_dtype {'fp16' if t.precision == 'fp16' else 'bf16'} --ds.zero_stage 2")
    if t.gradient_checkpointing:
        parts.append("--model.gradient_checkpointing_enable")
    if t.packing and objective == "sft":
        parts.append("--ds.packing_samples")
        notes.append("train.packing -> --ds.packing_samples (needs flash-attn; OpenRLHF then switches to "
                     "flash_attention_2)" + (f"; train.pack_length {t.pack_length} has no equivalent" if t.pack_length else ""))
    parts.append("--logger.logging_steps 1 --ckpt.output_dir {output_dir}")
    command = " ".join(parts)
    if objective == "reward":
        command += " && python -m tuneloop.train.openrlhf reward-config {output_dir}"
        notes.append("reward: `python -m tuneloop.train.openrlhf reward-config` re-labels OpenRLHF's RewardModel as the "
                     "sequence-classification model its weights are, so tuneloop can score it (`python` must be the "
                     "interpreter tuneloop is installed in)")
        notes.append("reward: OpenRLHF reads the score at the EOS token after dropping the chat template's trailing "
                     "newline; tuneloop scores the whole rendering, so tuneloop's held-out accuracy (the gate) can differ "
                     "from OpenRLHF's own eval accuracy")
    notes.append(f"batch: --train.micro_batch_size is train.batch_size per GPU; --train.batch_size {batch} is the global "
                 f"batch (batch_size x gradient_accumulation_steps x num_processes {world}); OpenRLHF derives the "
                 "accumulation from them")
    notes.append("literals (not placeholders): global batch, epochs, GPUs, weight decay, scheduler"
                 + (", beta" if objective == "dpo" else "") + "; export again after changing them")
    if t.max_steps:
        notes.append(f"train.max_steps {t.max_steps} is not carried: OpenRLHF's SFT/DPO/reward trainers stop after whole "
                     f"epochs (--train.max_epochs {int(t.num_epochs)})")
    notes.append(f"train.save_steps {t.save_steps} is not carried: a killed command starts again from the beginning "
                 "(tuneloop clears {output_dir}); OpenRLHF writes no trainer_state.json, so the run's metrics have no "
                 "per-step loss (OpenRLHF's log lines are in the stage log)")
    if t.report_to != "none":
        notes.append(f"train.report_to {t.report_to} is not carried: add --logger.wandb.key or --logger.tensorboard_dir "
                     "by hand")
    if t.accelerate_config:
        notes.append("train.accelerate_config is not carried: DeepSpeed's launcher takes --hostfile / --num_nodes for "
                     "several machines")
    return OpenRLHFExport(command, notes)


def openrlhf_command(cfg: PipelineConfig) -> str:
    """The OpenRLHF command line equivalent to ``cfg``, with ``train.command`` placeholders (see :func:`openrlhf_export`)."""
    return openrlhf_export(cfg).command


def export_openrlhf(cfg: PipelineConfig) -> str:
    """The ``train:`` YAML snippet for ``cfg``'s config: ``backend: command`` and the OpenRLHF command, after comment
    lines on how it was made and what it does not carry."""
    exp = openrlhf_export(cfg)
    head = [f"Generated by `tuneloop export-config --to openrlhf` from tuneloop config `{cfg.name}` "
            f"(OpenRLHF 0.11 option names).",
            "Put these keys in the config's `train:` section: tuneloop then runs OpenRLHF as an external trainer and "
            "evaluates, gates and registers what it writes to {output_dir}. OpenRLHF needs NVIDIA GPUs and DeepSpeed."]
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
        raise InputError(f"{model_dir}: no config.json; expected the full reward model OpenRLHF's train_rm saves with "
                         "--ckpt.output_dir (LoRA reward models are not supported)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(raw.get("model_type", ""))
    if cls is None:
        raise InputError(f"{path}: model_type {raw.get('model_type')!r} has no transformers sequence-classification class")
    head = raw.get("value_head_prefix", "score")
    if head != "score":
        raise InputError(f"{path}: the value head is named {head!r}; transformers' sequence-classification models read "
                         "`score` (train with OpenRLHF's default --ds.value_head_prefix score)")
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
        raise InputError(f"{model_dir}: not a {cls} with one output: {len(missing)} of its weights are missing from the "
                         f"safetensors files (first: {', '.join(missing[:3])})")
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
    ``{"prompt": [messages before the final assistant turn], "reference": that turn}`` per line (for
    ``--data.input_key prompt``, and ``--data.label_key reference`` with a reward function). Returns how many."""
    from tuneloop.fsutil import atomic_write_text

    lines = []
    with open(records, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            msgs = rec.get("messages")
            if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
                raise InputError(f"{records}:{n}: expected conversation records (`messages` ending with an assistant "
                                 "turn); PPO prompts come from train.objective sft data")
            plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
            lines.append(json.dumps({"prompt": plain[:-1], "reference": plain[-1]["content"]}, ensure_ascii=False) + "\n")
    if not lines:
        raise InputError(f"{records}: no records")
    atomic_write_text(Path(out), "".join(lines))
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m tuneloop.train.openrlhf reward-config DIR | prompts IN OUT``; exit 2 with the reason on bad input."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2 and args[0] == "reward-config":
            print(f"reward-config: {args[1]} is now a {reward_config(Path(args[1]))} with one output")
            return 0
        if len(args) == 3 and args[0] == "prompts":
            print(f"prompts: wrote {ppo_prompts(Path(args[1]), Path(args[2]))} prompts to {args[2]}")
            return 0
    except (InputError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("usage: python -m tuneloop.train.openrlhf reward-config MODEL_DIR | prompts RECORDS.jsonl OUT.jsonl", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
