"""A reward model on preference pairs with TRL's ``RewardTrainer`` (LoRA or full), resumable like SFT, and the
loader that scores answers with a trained or registered one.

Entry points: :func:`train_reward` (the trainer of ``train.objective: reward``, same shape as
:func:`tuneloop.train.sft.train_sft`) and :func:`load_reward_model` (a model directory or a registry ref ->
:class:`RewardModel`, whose ``score(prompts, completions)`` returns one float per completion).

The model: the base causal LM loaded as ``AutoModelForSequenceClassification`` with ``num_labels=1``: the
transformer's weights are kept, the LM head is dropped and a one-output ``score`` head is initialised at random
(seeded by ``seed``). A pair's loss is ``-log sigmoid(r(chosen) - r(rejected))`` (Bradley-Terry). With ``lora``
(PEFT task ``SEQ_CLS``) the adapters train and the head trains in full (``modules_to_save=["score"]``, saved in
the adapter); with ``full`` every weight trains.

What is scored: the prompt and the answer rendered together by the chat template, exactly as TRL tokenizes a
conversational pair (:func:`reward_input_ids`); the score is read at the last token that is not padding
(transformers' sequence classification), with the tokenizer's pad token, the same in training and scoring.
Pairs longer than ``data.max_length`` tokens are left out of training (TRL drops them; counted in
``overlong_pairs_dropped``); when scoring, a longer text keeps its last ``data.max_length`` tokens, where the
score is read.

The artifact (``work_dir/model``, written whole or not at all): with LoRA ``adapter_config.json`` +
``adapter_model.safetensors`` (adapters and the ``score`` head) + the tokenizer; plain transformers loads it as
``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), dir)``
(set ``model.config.pad_token_id = tokenizer.pad_token_id`` to score batches: the base's config may have none).
With ``full``, or in ``merged/`` with ``train.merge``, a whole sequence-classification model (``config.json``
with ``num_labels: 1`` and the pad token id) that ``AutoModelForSequenceClassification.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneloop.config import PipelineConfig
from tuneloop.errors import InputError, StageError
from tuneloop.fsutil import atomic_write_json, replace_dir
from tuneloop.modeling import attach_adapter, load_tokenizer, require_cuda_for_qlora, save_tokenizer
from tuneloop.train.dpo import TrlRun
from tuneloop.train.sft import read_metric_rows, run_resumable, step_logger, world_size

log = logging.getLogger(__name__)

#: TRL's per-step reward-model metrics, recorded in the metrics rows as ``rewards/<name>``.
LOGGED = ("accuracy", "margin", "mean_reward", "min_reward", "max_reward")
DEFAULT_MAX_LENGTH = 1024


def train_reward(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train a reward model on the preference pairs in ``dataset_dir``; returns the training metrics
    (``model/`` in ``work_dir``).

    The steps: the pairs tokenized (over-long ones left out), the scorer and its LoRA config, TRL's trainer over
    the step budget, the resumable run, then (rank 0) the saved model and the metrics."""
    t = cfg.train
    if t.method == "qlora":
        require_cuda_for_qlora()
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = work_dir / "train_metrics.jsonl"
    dataset, overlong = _training_pairs(cfg, dataset_dir, tokenizer)
    model, peft_config = _scorer_to_train(cfg, tokenizer)
    per_step = t.batch_size * t.gradient_accumulation_steps * world_size()
    steps_per_epoch = math.ceil(len(dataset) / per_step)
    max_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.num_epochs))
    run = TrlRun(
        cfg=cfg,
        work_dir=work_dir,
        ckpt_dir=ckpt_dir,
        metrics_path=metrics_path,
        dataset=dataset,
        model=model,
        peft_config=peft_config,
        per_step=per_step,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
    )
    trainer = _reward_trainer(run, tokenizer, progress, callbacks)

    wrapped = trainer.model  # the trainer's model (PEFT-wrapped), typed Optional by transformers
    assert wrapped is not None  # the trainer was given one above
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    out, resumed_from, seconds = run_resumable(trainer, ckpt_dir, metrics_path)
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the model and reports
    save_reward_model(trainer, tokenizer, cfg, work_dir)

    return _reward_metrics(run, overlong, trainable, total, out.training_loss, resumed_from, seconds)


def _training_pairs(cfg: PipelineConfig, dataset_dir: Path, tokenizer) -> tuple[Any, int]:
    """The prepared pairs of ``dataset_dir`` tokenized (:func:`tokenize_pairs`) and how many were left out as
    longer than ``data.max_length``; ``StageError`` when none are left."""
    from datasets import load_from_disk

    pairs = load_from_disk(str(dataset_dir))
    if len(pairs) == 0:
        raise StageError("no preference pairs left after preprocessing; see the data_validation quarantine file")
    dataset, overlong = tokenize_pairs(pairs, tokenizer, cfg.data.max_length)
    if len(dataset) == 0:
        raise StageError(
            f"all {len(pairs)} preference pairs are longer than data.max_length ({cfg.data.max_length} tokens, prompt and "
            "answer rendered by the chat template); raise data.max_length"
        )
    if overlong:
        log.warning(
            "reward model: %d of %d preference pairs are longer than data.max_length (%d tokens) and are left out of training",
            overlong,
            len(pairs),
            cfg.data.max_length,
        )
    return dataset, overlong


def _scorer_to_train(cfg: PipelineConfig, tokenizer) -> tuple[Any, Any]:
    """(the base model as a one-output scorer, seeded; 4-bit and ready for k-bit training with ``qlora``, the PEFT
    ``LoraConfig`` for ``lora``/``qlora`` or None for ``full``)."""
    from transformers import set_seed

    t = cfg.train
    set_seed(cfg.seed)  # the new score head is initialised at random
    if t.method == "qlora":  # a 4-bit base, made ready for k-bit training; the adapter goes on top as for lora
        from peft import prepare_model_for_kbit_training

        from tuneloop.modeling import qlora_quantization_config

        model = load_scorer(cfg.base_model, quantization_config=qlora_quantization_config())
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    else:
        model = load_scorer(cfg.base_model)
    model.config.pad_token_id = tokenizer.pad_token_id
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
            task_type="SEQ_CLS",
            modules_to_save=["score"],
        )
    return model, peft_config


def _reward_metrics(
    run: TrlRun, overlong: int, trainable: int, total: int, train_loss: float, resumed_from: int, seconds: float
) -> dict[str, Any]:
    """The training metrics :func:`train_reward` returns, from ``run``'s metrics rows and the run's totals."""
    rows = read_metric_rows(run.metrics_path)
    last = rows[-1] if rows else {}
    result = {
        "objective": "reward",
        "method": run.cfg.train.method,
        "steps": run.max_steps,
        "epochs": round(run.max_steps / run.steps_per_epoch, 3),
        "train_pairs": len(run.dataset),
        "overlong_pairs_dropped": overlong,
        "trainable_params": trainable,
        "total_params": total,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": last.get("loss"),
        "train_loss": round(train_loss, 6),
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
    }
    for name in ("accuracy", "margin"):
        if f"rewards/{name}" in last:
            result[f"final_rewards_{name}"] = last[f"rewards/{name}"]
    return result


def _reward_trainer(run: TrlRun, tokenizer, progress: Callable[[int, int, dict], None] | None, callbacks: list | None):
    """TRL's ``RewardTrainer`` for ``run``: the reward metrics renamed for, and logged by, the step logger (whose
    tokens per step come from the pairs' mean length), no console printer."""
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    dataset = run.dataset
    args = RewardConfig(**run.args(RewardConfig), center_rewards_coefficient=run.cfg.train.center_rewards_coefficient)
    mean_tokens = sum(
        len(a) + len(b) for a, b in zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ) / len(dataset)
    trainer = RewardTrainer(
        model=run.model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=run.peft_config,
        callbacks=[
            _reward_log_names(),
            step_logger(run.metrics_path, progress, mean_tokens * run.per_step),
            *(callbacks or []),
        ],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def reward_input_ids(tok, prompt: list[dict[str, str]], answer: list[dict[str, str]]) -> list[int]:
    """The token ids a reward model scores for ``answer`` after ``prompt``: the conversation rendered and
    tokenized by the chat template, as TRL's ``RewardTrainer`` tokenizes a conversational pair."""
    return list(tok.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"])


def tokenize_pairs(pairs, tok, max_length: int):
    """(the pairs as TRL's processed columns ``chosen_ids``/``rejected_ids``, how many were longer than
    ``max_length`` and left out). TRL would drop those itself; doing it here counts them and sizes the steps."""
    from datasets import Dataset

    rows, overlong = [], 0
    for r in pairs:
        chosen, rejected = (
            reward_input_ids(tok, r["prompt"], r["chosen"]),
            reward_input_ids(tok, r["prompt"], r["rejected"]),
        )
        if len(chosen) > max_length or len(rejected) > max_length:
            overlong += 1
            continue
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"chosen_ids": [], "rejected_ids": []}), overlong


def _reward_log_names():
    """A callback, placed before the step logger, that copies TRL's reward-model metrics (``accuracy``, ``margin``,
    ``mean_reward``, ...) to ``rewards/<name>`` in the logged row, the names the step logger keeps."""
    from transformers import TrainerCallback

    class RewardLogNames(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for name in LOGGED:
                if logs is not None and name in logs:
                    logs[f"rewards/{name}"] = logs[name]

    return RewardLogNames()


def save_reward_model(trainer, tokenizer, cfg: PipelineConfig, work_dir: Path) -> None:
    """Write the adapter (with the score head) or the whole model (safetensors only), its tokenizer, the merged
    model with ``train.merge`` and the resolved config to ``model.partial/``, then move it into place as
    ``model/`` in one rename (as :func:`tuneloop.train.sft.save_final_model`, with a sequence-classification merge)."""
    tmp = Path(work_dir) / "model.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the registry stores safetensors only
        save_tokenizer(tokenizer, tmp)
        if cfg.train.merge and cfg.train.method != "full":
            merged = load_scorer(cfg.base_model, adapter=str(tmp)).merge_and_unload()
            merged.config.pad_token_id = tokenizer.pad_token_id
            merged.save_pretrained(str(tmp / "merged"), safe_serialization=True)
            save_tokenizer(tokenizer, tmp / "merged")
        atomic_write_json(tmp / "tuneloop_config.json", cfg.to_dict())
        replace_dir(tmp, Path(work_dir) / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ loading


def load_scorer(
    path: str, *, adapter: str | None = None, dtype: torch.dtype = torch.float32, quantization_config: Any = None
):
    """A one-output sequence-classification model from a directory (or cached hub id): a causal LM gets a new,
    randomly initialised ``score`` head; a saved reward model keeps its own. Optionally with a PEFT adapter (which
    carries its trained head). Safetensors only, like :func:`tuneloop.modeling.load_causal_lm`.
    ``quantization_config``: the 4-bit base of ``method: qlora`` (on the GPU)."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import (
        suppress_seqcls_warning,  # the expected "score.weight newly initialised" notice
    )

    extra: dict[str, Any] = {}
    if quantization_config is not None:
        extra = {"quantization_config": quantization_config, "device_map": {"": torch.cuda.current_device()}}
    try:
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, use_safetensors=True, **extra
            )
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot load {path!r} as a reward model (sequence classification, one output): {exc}"
        ) from None
    if adapter:
        return attach_adapter(model, adapter, "default")  # PEFT reads the task (SEQ_CLS) and the trained head from it
    model.eval()
    return model


@dataclass
class RewardModel:
    """A loaded reward model. ``score(prompts, completions)``: one float per completion, higher is better."""

    model: Any
    tokenizer: Any
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 16
    source: str = ""  # what was loaded: a ref (``bot-rm:2``) or a directory

    @torch.inference_mode()
    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """The score of each completion after its prompt, in order. A prompt is a string (one user turn) or chat
        messages; a completion a string (one assistant turn) or chat messages. Rendered by the chat template as in
        training (:func:`reward_input_ids`), cut to the last ``max_length`` tokens, scored in batches of
        ``batch_size`` (similar lengths together)."""
        if len(prompts) != len(completions):
            raise InputError(
                f"reward model {self.source}: {len(prompts)} prompts but {len(completions)} completions; give one prompt per completion"
            )
        ids = [
            reward_input_ids(self.tokenizer, as_messages(p, "user"), as_messages(c, "assistant"))[-self.max_length :]
            for p, c in zip(prompts, completions, strict=True)
        ]
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        scores = [0.0] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                x[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            logits = self.model(input_ids=x.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
            for i, value in zip(batch, logits.tolist(), strict=True):
                scores[i] = value
        return scores


def as_messages(value: Any, role: str) -> list[dict[str, str]]:
    """A string as one ``role`` turn; a message or a list of messages as they are (role defaulting to ``role``)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and "content" in value:
        return [{"role": value.get("role", role), "content": str(value["content"])}]
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", role), "content": str(m["content"])} for m in value]
    raise InputError(f"expected a string or chat messages ({{role, content}}), got {type(value).__name__}")


def reward_dir_problem(path: Path) -> str | None:
    """Why the directory ``path`` is not a reward model (None when it is): a PEFT adapter of task ``SEQ_CLS``, or a
    model whose ``config.json`` names a ``...ForSequenceClassification`` architecture with one label."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        task = json.loads(adapter.read_text(encoding="utf-8")).get("task_type")
        return (
            None if task == "SEQ_CLS" else f"{path} is a PEFT adapter of task {task}, not a reward model (task SEQ_CLS)"
        )
    config = path / "config.json"
    if not config.is_file():
        return f"{path} is not a model directory (no config.json or adapter_config.json)"
    c = json.loads(config.read_text(encoding="utf-8"))
    archs = c.get("architectures") or []
    labels = c.get("num_labels", len(c.get("id2label") or {}) or None)
    if any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1:
        return None
    return f"{path} is not a reward model: its config.json names {', '.join(archs) or 'no architecture'} with {labels} label(s), not a sequence-classification model with one output"


def load_reward_model(
    ref_or_dir: str | os.PathLike[str],
    *,
    registry: Any = None,
    base_model: str | None = None,
    max_length: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> RewardModel:
    """A reward model to score completions with: a directory (a training run's ``model/``, a registered artifact,
    any Hugging Face reward model directory) or a registry ref (``bot-rm@champion``, ``bot-rm:2``; needs
    ``registry``, e.g. ``tuneloop.registry.api.open_registry(cfg, workspace)``).

    A ref must name a version whose lineage has ``kind: reward`` (else :class:`~tuneloop.errors.InputError`);
    its artifact is verified by the registry and an adapter's base is checked against the recorded digest. An
    adapter directory is applied on ``base_model``, else on the base its ``tuneloop_config.json`` (or its
    ``adapter_config.json``) names; a ``merged/`` model beside an adapter is loaded instead. ``max_length``
    defaults to the ``data.max_length`` the model was trained with.
    """
    saved: dict[str, Any] = {}
    if Path(ref_or_dir).is_dir():
        where = Path(ref_or_dir)
        source = str(where)
        if (where / "tuneloop_config.json").is_file():
            saved = json.loads((where / "tuneloop_config.json").read_text(encoding="utf-8"))
    else:
        ref = str(ref_or_dir)
        if registry is None:
            raise InputError(
                f"{ref!r} is not a directory; to load a registered reward model by its ref, pass "
                "registry=open_registry(cfg, workspace) (tuneloop.registry.api)"
            )
        version = registry.resolve(ref)
        lineage = version.lineage or {}
        if lineage.get("kind") != "reward":
            what = lineage.get("objective") or (lineage.get("config") or {}).get("train", {}).get("objective") or "sft"
            raise InputError(
                f"{version.ref} is not a reward model: its lineage has no `kind: reward` (it was trained with "
                f"train.objective {what}); name a version trained with train.objective: reward"
            )
        where = registry.open_artifact(version.model, version.version)
        source = version.ref
        saved = lineage.get("config") or {}
        if version.artifact_kind == "adapter" and base_model is None:
            from tuneloop.registry.lineage import check_base

            base = lineage.get("base") or version.base_model
            digest = (lineage.get("base") or {}).get("digest") or lineage.get("base_model_fingerprint")
            base_model = check_base(base, digest)
    if (where / "adapter_config.json").is_file() and (where / "merged" / "config.json").is_file():
        where = where / "merged"
    if problem := reward_dir_problem(where):
        raise InputError(problem)
    adapter = None
    if (where / "adapter_config.json").is_file():
        adapter = str(where)
        if base_model is None:
            base_model = saved.get("base_model") or json.loads(
                (where / "adapter_config.json").read_text(encoding="utf-8")
            ).get("base_model_name_or_path")
        if not base_model:
            raise InputError(f"{source}: an adapter without a recorded base model; pass base_model=")
    tok = load_tokenizer(str(where))
    model = load_scorer(
        base_model if adapter and base_model else str(where), adapter=adapter
    )  # an adapter has one (above)
    model.config.pad_token_id = tok.pad_token_id  # where the score is read; a base's config may have none
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    length = max_length or (saved.get("data") or {}).get("max_length") or DEFAULT_MAX_LENGTH
    return RewardModel(model, tok, int(length), batch_size, source)
