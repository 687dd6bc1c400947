"""Kahneman-Tversky optimisation with TRL's ``KTOTrainer`` (LoRA or full), resumable like SFT and DPO.

Entry point: :func:`train_kto`. Input is the preprocessing stage's dataset of conversational unpaired records
(``prompt`` / ``completion`` message lists and a boolean ``label``: desirable or not; see
:func:`tuneloop.data.prepare.prepare_kto`); TRL applies the chat template and tokenizes. KTO needs no pairs: a
thumbs up or down on one answer is a record. The policy is pushed towards the desirable answers and away from
the undesirable ones relative to a reference model -- with LoRA the base itself (the adapter disabled), with
``full`` a frozen copy TRL loads -- and a KL estimate from each batch's answers paired with the batch's other
prompts (so ``train.batch_size`` is at least 2, and TRL reads the data in the order preprocessing shuffled it).
``train.kto_beta``, ``kto_desirable_weight`` and ``kto_undesirable_weight`` are TRL's ``beta``,
``desirable_weight`` and ``undesirable_weight``. Checkpoints, resume, per-step metrics (with ``rewards/*`` and
``logps/*`` of the desirable = ``chosen`` and undesirable = ``rejected`` answers) and the final ``model/``
work as in :mod:`tuneloop.train.dpo` (:class:`~tuneloop.train.dpo.TrlRun`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig
from tuneloop.train.dpo import TrlRun, chat_tokens


def train_kto(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train the candidate on labelled answers; returns the training metrics (``model/`` in ``work_dir``)."""
    from trl import KTOConfig, KTOTrainer

    t = cfg.train
    run = TrlRun.start(cfg, dataset_dir, work_dir, what="labelled answers")
    args = KTOConfig(
        **run.args(KTOConfig),
        beta=t.kto_beta,
        desirable_weight=t.kto_desirable_weight,
        undesirable_weight=t.kto_undesirable_weight,
    )
    # Tokens for the throughput column: the answer in its prompt (TRL also scores it under another prompt for the KL
    # estimate, which this leaves out).
    count = chat_tokens(tokenizer, cfg.data.max_length)
    result = run.fit(
        KTOTrainer,
        args,
        tokenizer=tokenizer,
        tokens=lambda r: count(r["prompt"] + r["completion"]),
        progress=progress,
        callbacks=callbacks,
    )
    if result is None:
        return {}  # rank 0 writes the model and reports
    desirable = sum(run.dataset["label"])
    return {"objective": "kto", **result, "desirable": desirable, "undesirable": len(run.dataset) - desirable}
