"""The ``train:`` section: :class:`TrainConfig`, and :class:`RewardSpec`, one item of ``train.rewards`` (GRPO).

Field descriptions are the configuration reference (docs/configuration.md).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.schema_base import ItemProblem, Section

_REWARD_FUNCTION = re.compile(r"^(?P<file>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
REWARD_KINDS = ("metric", "function", "model", "judge")


class RewardSpec(Section):
    """One item of `train.rewards` (`train.objective: grpo`): exactly one of `metric`, `function`, `model` or `judge`, and its weight."""

    metric: Literal["exact", "contains", "regex", "token_f1", "chrf"] | None = Field(
        None,
        description="A verifiable reward: the task metric of each completion against the prompt's reference (the final "
        "assistant turn of its record), scored by the same code as the `task` suite: `exact`, `contains`, `regex` (`pattern`, "
        "else the reference as a regex) and `chrf` (pass at `threshold`) give 0 or 1, `token_f1` a value in [0, 1].",
    )
    pattern: str | None = Field(
        None, description="`metric: regex`: the regex searched in each completion (default: the reference)."
    )
    threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="`metric: chrf`: the chrF at which a completion scores 1 (default 0.4, as the task suite).",
    )
    function: str | None = Field(
        None,
        description="A Python reward function, `FILE.py:NAME` (the file relative to the config's directory; its sha256 goes "
        "into the training cache key and the version's lineage). It is called as TRL calls reward functions: "
        "`NAME(prompts=..., completions=..., reference=..., **kwargs)` with one batch (conversational: each completion is "
        '`[{"role": "assistant", "content": ...}]`) and returns one number per completion (`None`: no reward for that '
        "item). An exception, a wrong length, NaN or a non-number fails the training stage naming the function and the item.",
    )
    model: str | None = Field(
        None,
        description="A registered reward model (`train.objective: reward`), e.g. `bot-rm@champion`: its score of each prompt + completion.",
    )
    judge: Literal[True] | None = Field(
        None,
        description="`true`: the configured `eval.judge` (`kind: openai`, an OpenAI-compatible endpoint) rates each completion "
        "from 0 to 10 against the prompt and its reference; the reward is the rating / 10.",
    )
    weight: float = Field(
        1.0,
        ge=-1000.0,
        le=1000.0,
        allow_inf_nan=False,
        description="Weight of this reward in the sum GRPO normalises within each group of completions (TRL `reward_weights`).",
    )
    # The function as the config wrote it (set when relative paths are resolved): its name in messages and lineage.
    _written: str | None = None

    @field_validator("function")
    @classmethod
    def _function_spec(cls, v: str | None) -> str | None:
        if v is not None and not _REWARD_FUNCTION.match(v.strip()):
            raise ItemProblem(
                "",
                f"{v!r} is not FILE.py:FUNCTION; give a Python file (relative to the config) and the name "
                'of a function in it, e.g. "rewards.py:score"',
            )
        return v.strip() if v is not None else v

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> RewardSpec:
        given = [k for k in REWARD_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none of them" if not given else " and ".join(given)
            raise ItemProblem(
                "",
                f"give exactly one of `metric`, `function`, `model`, `judge: true` per reward (this one has "
                f"{what}); list two rewards as two items",
            )
        if self.pattern is not None and self.metric != "regex":
            raise ItemProblem(".pattern", "only `metric: regex` uses a pattern; remove it or set metric: regex")
        if self.threshold is not None and self.metric != "chrf":
            raise ItemProblem(".threshold", "only `metric: chrf` uses a threshold; remove it or set metric: chrf")
        return self

    @property
    def kind(self) -> str:
        """``metric``, ``function``, ``model`` or ``judge``."""
        return next(k for k in REWARD_KINDS if getattr(self, k) is not None)

    @property
    def label(self) -> str:
        """The reward as the config wrote it, for messages: ``metric exact``, ``function rewards.py:score``, ``judge``."""
        if self.kind == "function":
            return f"function {self._written or self.function}"
        if self.kind == "judge":
            return "judge"
        return f"{self.kind} {getattr(self, self.kind)}"

    def function_parts(self) -> tuple[str, str]:
        """(file, function name) of a ``function`` reward."""
        m = _REWARD_FUNCTION.match(self.function or "")
        if m is None:
            raise ValueError(f"not a function reward: {self.label}")
        return m.group("file"), m.group("name")


class TrainConfig(Section):
    """How the candidate model is trained."""

    objective: Literal["sft", "dpo", "orpo", "simpo", "grpo", "reward", "kto"] = Field(
        "sft",
        description="`sft` (supervised fine-tuning on conversations) or `dpo` (direct preference optimisation on "
        "prompt/chosen/rejected records, via TRL; with LoRA the reference model is the base with the adapter disabled). "
        "`orpo` (odds-ratio preference optimisation, TRL's ORPOTrainer: the SFT loss on the chosen answer plus "
        "`orpo_beta` times the odds-ratio loss) and `simpo` (SimPO: length-normalised log-likelihood margin with the target "
        "margin `simpo_gamma`, TRL's CPOTrainer with `loss_type: simpo`) train on the same records with no reference model; "
        "`dpo`, `orpo` and `simpo` runs are gated by `gates.min_preference_accuracy` / `max_preference_accuracy_drop`. "
        "`grpo`: group relative policy optimisation (TRL's GRPOTrainer) on the prompts of conversation records, scored "
        "by `train.rewards` (the final assistant turn is each prompt's reference for verifiable rewards). "
        "`reward`: a reward model on prompt/chosen/rejected records (TRL's RewardTrainer; the base gets a one-output "
        "sequence-classification head, trained with LoRA or in full), registered with `kind: reward` in its lineage and "
        "gated by `gates.min_reward_accuracy` on the held-out pairs instead of the generation gates. "
        "`kto`: Kahneman-Tversky optimisation (TRL's KTOTrainer) on unpaired answers labelled desirable or not (the `kto` "
        "data format: messages ending with an assistant turn + a boolean `label`, e.g. `tuneloop feedback export`'s "
        "kto.jsonl); the reference model is as for `dpo`; the task suites gate it as they gate `sft` (their references "
        "are desirable answers).",
    )
    dpo_beta: float = Field(0.1, gt=0.0, description="DPO beta: how far the policy may move from the reference model.")
    kto_beta: float = Field(
        0.1,
        gt=0.0,
        le=100.0,
        description="`kto`: TRL's `beta`, how far the policy may move from the reference model (higher: less far).",
    )
    kto_desirable_weight: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="`kto`: weight of the desirable answers' loss (TRL's `desirable_weight`). With unequal numbers of "
        "desirable (D) and undesirable (U) answers, the KTO paper advises desirable_weight x D / (undesirable_weight x U) "
        "between 1 and 4/3, e.g. desirable_weight: 3 for one desirable answer to three undesirable ones; the training "
        "metrics record D and U.",
    )
    kto_undesirable_weight: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="`kto`: weight of the undesirable answers' loss (TRL's `undesirable_weight`); see `kto_desirable_weight`.",
    )
    orpo_beta: float = Field(
        0.1,
        gt=0.0,
        le=100.0,
        description="`orpo`: weight of the odds-ratio term against the SFT loss (lambda in the ORPO paper, `beta` in TRL's "
        "ORPOConfig, `orpo_alpha` in Axolotl, `pref_beta` in LLaMA-Factory); 0.1 is TRL's default.",
    )
    simpo_beta: float = Field(
        2.0,
        gt=0.0,
        le=100.0,
        description="`simpo`: scale of the reward, beta times the mean log-probability of an answer's tokens (TRL's CPOConfig "
        "`beta`, LLaMA-Factory's `pref_beta`, Axolotl's `rl_beta`); the SimPO authors' configs use 2.0 to 2.5, some later runs 10.",
    )
    simpo_gamma: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="`simpo`: target reward margin gamma by which the chosen answer's reward should exceed the rejected one's "
        "(TRL's, Axolotl's and LLaMA-Factory's `simpo_gamma`); tune it with `simpo_beta`: 1.0 is gamma/beta = 0.5 at beta 2.0, "
        "as in the SimPO authors' configs.",
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="`reward`: weight of the loss term mean((r_chosen + r_rejected)^2) that keeps the scores centred on 0 "
        "(TRL's `center_rewards_coefficient`, Eisenstein et al. 2023); `null` (default) adds none; TRL recommends 0.01.",
    )
    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="`lora` (PEFT adapter), `qlora` (4-bit base, needs CUDA + bitsandbytes), or `full` fine-tuning.",
    )
    lora_r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, le=65536, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get LoRA adapters: `all-linear` or a list of module names."
    )
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    num_epochs: float = Field(
        3, gt=0.0, le=10000, description="Passes over the training data (ignored when `max_steps` is set)."
    )
    max_steps: int | None = Field(None, ge=1, le=10**9, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, le=65536, description="Samples per device per step.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=65536, description="Steps of gradient accumulation per optimizer step."
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    warmup_steps: int = Field(0, ge=0, le=10**9, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="AdamW weight decay.")
    save_steps: int = Field(
        25, ge=1, le=10**9, description="Write a resumable checkpoint every this many steps (and at the end)."
    )
    train_on_inputs: bool = Field(
        False, description="Also compute the loss on prompt tokens (default: completion-only loss)."
    )
    packing: bool = Field(
        True,
        description="SFT: pack the samples of each batch into rows of up to `pack_length` tokens with no padding and no "
        "attention across samples (position_ids restart per sample). `batch_size` still counts samples, so packing "
        "changes speed, not results. (DPO batches are padded by TRL.)",
    )
    pack_length: int | None = Field(
        None,
        ge=16,
        le=2**20,
        description="Tokens per packed row; default `data.max_length`. A longer sample gets a row of its own.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)), PEFT `use_rslora`.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA), PEFT `use_dora`.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Mixed precision for training: `auto` uses bf16 on a CUDA GPU that supports it and fp32 otherwise; "
        "`bf16`/`fp16` need a GPU that supports them.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    merge: bool = Field(
        False, description="Also write the base model with the LoRA adapter merged in (safetensors) to `model/merged/`."
    )
    backend: Literal["transformers", "mlx", "unsloth", "command"] = Field(
        "transformers",
        description="`transformers`: tuneloop trains (Trainer/TRL + PEFT). `mlx`: SFT with mlx-lm's model and LoRA "
        "layers under tuneloop's training loop (Metal on Apple silicon, the CPU elsewhere; extra `tuneloop[mlx]`), the "
        "adapter converted to a PEFT adapter. `unsloth`: "
        "Unsloth's FastLanguageModel + TRL on a CUDA GPU (extra `tuneloop[unsloth]`). `command`: run `train.command` "
        "(an external trainer such as Axolotl, LLaMA-Factory or OpenRLHF) and pick up the adapter or model it writes to "
        "`{output_dir}`.",
    )
    command: str | None = Field(
        None,
        description="The training command for `backend: command`, run by the shell, with placeholders {base_model} "
        "{train_file} {eval_file} {output_dir} {config_file} {seed} {method} {objective} {learning_rate} {num_epochs} "
        "{max_steps} {batch_size} {gradient_accumulation_steps} {lora_r} {lora_alpha} {lora_dropout} {max_length}.",
    )
    num_processes: int = Field(
        1,
        ge=1,
        le=4096,
        description="Training processes. Above 1 the training stage runs under `accelerate launch --multi_gpu` (CUDA, "
        "one process per GPU) or `torch.distributed.run` (CPU, gloo), data-parallel; `batch_size` is per process.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An `accelerate config` YAML passed to `accelerate launch --config_file` (FSDP, DeepSpeed, "
        "multi-node, mixed precision). Setting it runs training through accelerate even with `num_processes: 1`.",
    )
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="Also send training metrics to this tracker (its package must be installed)."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="`grpo`: the rewards that score each completion, each `{metric: ...}`, `{function: FILE.py:NAME}`, "
        "`{model: REF}` or `{judge: true}` with an optional `weight` (default 1), e.g. `[{metric: exact}, {function: "
        "rewards.py:score, weight: 0.5}]`. The run records each one's mean per step (`rewards/<name>/mean` in the "
        "training metrics).",
    )
    num_generations: int = Field(
        8,
        ge=2,
        le=1024,
        description="`grpo`: completions sampled per prompt; each is scored against the others of its group. `batch_size` "
        "counts prompts, so a step trains on `batch_size` x `num_generations` completions (TRL's default 8).",
    )
    max_completion_length: int = Field(
        512,
        ge=1,
        le=2**20,
        description="`grpo`: the most tokens generated per completion (TRL's default 512). The report flags a run where most "
        "completions reach it.",
    )
    grpo_beta: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="`grpo`: KL coefficient against the reference model (TRL `beta`). 0 (TRL's default) loads no reference "
        "model and logs no `kl`; with LoRA the reference is the base with the adapter disabled.",
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo",
        description="`grpo`: TRL's GRPO loss formulation (default `dapo`, TRL's: token losses normalised over the whole "
        "batch; `grpo` normalises per sequence; `luspo` uses sequence-level importance sampling). See TRL's GRPOConfig.",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="`grpo`: sampling temperature of the completions (TRL's default 1.0)."
    )
    use_vllm: bool = Field(
        False,
        description="`grpo`: generate the completions with vLLM colocated on the training GPU (TRL's `use_vllm` with "
        "`vllm_mode: colocate`, 30 % of the GPU's memory for vLLM). Needs CUDA and the `vllm` package; checked before the run. "
        "Off: transformers' `generate` (the CPU path, tested in CI). The vLLM path has not been run in tuneloop's CI (no GPU).",
    )

    @model_validator(mode="after")
    def _grpo_rewards(self) -> TrainConfig:
        if self.objective == "grpo" and not self.rewards:
            raise ItemProblem(
                ".rewards",
                "train.objective grpo needs at least one reward, e.g. `rewards: [{metric: exact}]` "
                "(a task metric against each prompt's reference), `{function: rewards.py:score}`, "
                "`{model: REF}` or `{judge: true}`",
            )
        if self.rewards and self.objective != "grpo":
            raise ItemProblem(
                ".rewards",
                f"rewards score GRPO completions; train.objective is {self.objective}: remove "
                "`rewards` or set train.objective: grpo",
            )
        return self

    @model_validator(mode="after")
    def _kto_batch(self) -> TrainConfig:
        if self.objective == "kto" and self.batch_size < 2:
            raise ItemProblem(
                ".batch_size",
                "train.objective kto needs batch_size 2 or more: KTO estimates its KL term from "
                "each answer paired with another prompt of the same (per-device) batch; raise "
                "batch_size (lower gradient_accumulation_steps to keep the effective batch)",
            )
        return self
