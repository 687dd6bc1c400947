"""The training objectives in one table: what data each one trains on and which function trains it.

Entry points: :func:`objective_of` (a config -> its :class:`Objective`), :func:`uses_preferences`. The stages
ask this table instead of comparing ``train.objective`` with names, so a new objective is one row here, its
trainer module and its data preparation.

Each trainer has the shape of :func:`tuneloop.train.sft.train_sft`:
``train(cfg, dataset_dir, work_dir, *, tokenizer, progress=None) -> metrics`` (resumable from the
checkpoints in ``work_dir/checkpoints``, the final model in ``work_dir/model``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

DataKind = Literal["conversations", "preferences", "kto", "prompts"]

#: Per data kind, the data formats (tuneloop.data.formats) each split may have, and how to say what is needed;
#: a kind not listed takes any format. kto: unpaired answers with a desirable/undesirable label for training;
#: its eval data may also be plain conversations (the final assistant turn is the task suite's reference).
DATA_FORMATS: dict[str, tuple[dict[str, tuple[str, ...]], str]] = {
    "preferences": ({"train": ("preference",), "eval": ("preference",)}, "preference data (prompt/chosen/rejected)"),
    "kto": (
        {"train": ("kto",), "eval": ("kto", "messages", "sharegpt", "alpaca")},
        "kto data (messages ending with an assistant turn + a boolean label)",
    ),
}


@dataclass(frozen=True)
class Objective:
    name: str
    data: (
        DataKind  # conversations: SFT-style records; preferences: prompt/chosen/rejected pairs; kto: labelled answers;
    )
    # prompts: the prompts of conversations, their final assistant turn kept as the reference (grpo)
    trainer: str  # "module:function"
    summary: str  # one line for messages and docs
    # What the evaluation stage does with the trained model: ``generation`` (it answers the suites; the gates on its
    # answers and, for preference data, its log-likelihoods) or ``reward`` (a reward model: it scores the held-out
    # pairs, gated by ``gates.min_reward_accuracy``; the generation gates do not apply).
    evaluates: Literal["generation", "reward"] = "generation"

    def format_problem(self, split: str, fmt: str, path: Any) -> str | None:
        """The problem (with its config key) of data ``path`` of format ``fmt`` as this objective's ``split``
        (``train`` or ``eval``), or None when the objective takes that format there."""
        allowed, needs = DATA_FORMATS.get(self.data, ({}, ""))
        if split not in allowed or fmt in allowed[split]:
            return None
        want = allowed[split][0]
        return (
            f"data.{split}_data: train.objective {self.name} needs {needs}, but {path} is {fmt}; set data.format: "
            f"{want} or point the data at {want} records"
        )

    def load_trainer(self) -> Callable[..., dict[str, Any]]:
        module, _, function = self.trainer.partition(":")
        return getattr(importlib.import_module(module), function)


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("sft", "conversations", "tuneloop.train.sft:train_sft", "supervised fine-tuning on conversations"),
    "dpo": Objective("dpo", "preferences", "tuneloop.train.dpo:train_dpo", "direct preference optimisation (TRL)"),
    "orpo": Objective(
        "orpo",
        "preferences",
        "tuneloop.train.preference_objectives:train_orpo",
        "odds-ratio preference optimisation, no reference model (TRL ORPOTrainer)",
    ),
    "simpo": Objective(
        "simpo",
        "preferences",
        "tuneloop.train.preference_objectives:train_simpo",
        "SimPO: length-normalised preference optimisation, no reference model (TRL CPOTrainer, loss_type simpo)",
    ),
    "kto": Objective(
        "kto", "kto", "tuneloop.train.kto:train_kto", "Kahneman-Tversky optimisation on unpaired good/bad answers (TRL)"
    ),
    "grpo": Objective(
        "grpo",
        "prompts",
        "tuneloop.train.grpo:train_grpo",
        "group relative policy optimisation scored by train.rewards (TRL)",
    ),
    "reward": Objective(
        "reward",
        "preferences",
        "tuneloop.train.reward:train_reward",
        "a reward model on preference pairs (TRL RewardTrainer, sequence-classification head)",
        evaluates="reward",
    ),
}


def objective_of(cfg) -> Objective:
    """The :class:`Objective` of ``cfg.train.objective``."""
    return OBJECTIVES[cfg.train.objective]


def uses_preferences(cfg) -> bool:
    """Whether the run trains on preference pairs (its held-out pairs are then evaluated and gated too)."""
    return objective_of(cfg).data == "preferences"


def cache_tag(cfg) -> dict[str, str]:
    """What a stage adds to its cache inputs for the objective: nothing for ``sft`` (keys made before this table
    stay valid), ``{"objective": name}`` otherwise."""
    name = cfg.train.objective
    return {} if name == "sft" else {"objective": name}


def kto_label_problem(path: Any, desirable: int, undesirable: int) -> str | None:
    """KTO learns from both kinds of answer: the problem (naming ``data.train_data``) when one kind is missing."""
    if desirable and undesirable:
        return None
    missing = "false (undesirable)" if desirable else "true (desirable)"
    return (
        f"data.train_data: train.objective kto needs both desirable (label: true) and undesirable (label: false) "
        f"answers, but {path} has {desirable} desirable and {undesirable} undesirable; add answers labelled "
        f"{missing} (thumbs-down answers are in `tuneloop feedback export`'s kto.jsonl) or train with "
        f"train.objective: sft"
    )


def data_problems(cfg) -> list[str]:
    """Problems of the data for the objective, found before any work (the run's preflight; exit 2): each split's
    format, detected from its first records as data validation detects it, and for ``kto`` both labels among the
    training records (read until both are seen). Data that cannot be read is left to the path checks; data
    validation checks the validated records again."""
    import json

    from tuneloop.data.sources import open_detected
    from tuneloop.errors import InputError

    obj, d = objective_of(cfg), cfg.data
    if obj.data not in DATA_FORMATS:
        return []
    problems = []
    for split, source in (("train", d.train_data), ("eval", d.eval_data)):
        if not source:
            continue
        shown = ", ".join(s.label for s in d.train_sources) if split == "train" else source
        try:
            items, _, fmt = open_detected(source, d.format)
        except InputError:
            continue
        if problem := obj.format_problem(split, fmt, shown):
            problems.append(problem)
        elif split == "train" and obj.data == "kto":
            seen = {True: 0, False: 0}
            for item in items:
                try:
                    value = json.loads(item.payload) if item.kind == 0 else item.payload if item.kind == 1 else None
                except ValueError:
                    continue
                label = value.get("label") if isinstance(value, dict) else None
                if isinstance(label, bool):
                    seen[label] += 1
                    if seen[True] and seen[False]:
                        break
            if problem := kto_label_problem(shown, seen[True], seen[False]):
                problems.append(problem)
    return problems
