"""Reference-free preference objectives on prompt/chosen/rejected pairs: ORPO and SimPO (LoRA or full).

Entry points: :func:`train_orpo` (``train.objective: orpo``) and :func:`train_simpo` (``train.objective:
simpo``), with the signature and behaviour of :func:`tuneloop.train.dpo.train_dpo`: the same preprocessed
pairs, resumable from ``work_dir/checkpoints``, per-step metrics rows (``rewards/*``, ``logps/*``, ``nll_loss``),
the final ``model/`` written by :func:`tuneloop.train.sft.save_final_model`. The run itself is
:class:`tuneloop.train.dpo.TrlRun`, as for DPO and KTO; this module chooses TRL's trainer and its loss settings.

Neither objective has a reference model, so no frozen copy or adapter-disabled pass is needed:

* **ORPO** (Hong et al. 2024) is TRL's ``trl.experimental.orpo.ORPOTrainer``: the SFT loss on the chosen
  answer plus ``train.orpo_beta`` (the paper's lambda, TRL's ``beta``) times the odds-ratio loss
  ``-log sigmoid(log odds(chosen) - log odds(rejected))``, on length-averaged log-probabilities.
* **SimPO** (Meng et al. 2024) is TRL's ``trl.experimental.cpo.CPOTrainer`` with ``loss_type="simpo"`` and
  ``cpo_alpha=0``: ``-log sigmoid(beta * (mean logp(chosen) - mean logp(rejected)) - gamma)`` with
  ``train.simpo_beta`` and ``train.simpo_gamma``. ``cpo_alpha=0`` leaves out CPO's behaviour-cloning (NLL)
  term, which TRL adds by default (``cpo_alpha=1``: "CPO-SimPO"); plain SimPO has none.
  TRL 1.16's ``DPOTrainer`` was read for a SimPO loss and has none: its length-normalised ``sigmoid_norm``
  loss divides the *log-ratios against the reference model* by the answer lengths (so it needs a reference)
  and has no target margin; ``loss_type="simpo"`` exists only in the CPO trainer.

Both TRL trainers put a pair's prompt first and cut only the answers to ``data.max_length``; a pair whose
prompt alone fills ``data.max_length`` would leave no answer token, and its length-averaged log-probability
would be 0/0 (NaN) in both losses. Such pairs are left out before training, counted in the metrics
(``pairs_prompt_too_long``); when none is left the stage fails saying which key to raise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig
from tuneloop.errors import StageError
from tuneloop.train.dpo import TrlRun, train_pairs
from tuneloop.train.sft import read_metric_rows

log = logging.getLogger(__name__)


def train_orpo(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """ORPO on the preference pairs in ``dataset_dir``; returns the training metrics (``model/`` in ``work_dir``)."""
    orpo = _experimental("orpo")
    return _train(
        "orpo",
        orpo.ORPOConfig,
        orpo.ORPOTrainer,
        {"beta": cfg.train.orpo_beta},
        cfg,
        dataset_dir,
        work_dir,
        tokenizer,
        progress,
        callbacks,
    )


def train_simpo(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """SimPO on the preference pairs in ``dataset_dir``; returns the training metrics (``model/`` in ``work_dir``)."""
    cpo = _experimental("cpo")
    t = cfg.train
    settings = {"loss_type": "simpo", "beta": t.simpo_beta, "simpo_gamma": t.simpo_gamma, "cpo_alpha": 0.0}
    return _train(
        "simpo", cpo.CPOConfig, cpo.CPOTrainer, settings, cfg, dataset_dir, work_dir, tokenizer, progress, callbacks
    )


def _experimental(module: str):
    """Import a ``trl.experimental`` module without TRL's "APIs here are unstable" warning on every run
    (tuneloop pins the TRL version it was tested with)."""
    import importlib

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return importlib.import_module(f"trl.experimental.{module}")


def _train(
    objective: str,
    config_cls: type,
    trainer_cls: type,
    settings: dict[str, Any],
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    tokenizer,
    progress,
    callbacks,
) -> dict[str, Any]:
    """One run of ``trainer_cls`` with ``settings`` (the loss's own arguments of ``config_cls``) on the pairs."""
    from datasets import load_from_disk

    pairs = load_from_disk(str(dataset_dir))
    kept, too_long = answerable_pairs(pairs, tokenizer, cfg.data.max_length)
    if too_long:
        log.warning(
            "%s: left out %d of %d pairs whose prompt alone fills data.max_length (%d tokens): no answer "
            "token would be left to score",
            objective,
            too_long,
            len(pairs),
            cfg.data.max_length,
        )
        if len(kept) == 0:
            raise StageError(
                f"data.max_length: the prompt of every one of the {too_long} preference pairs fills "
                f"{cfg.data.max_length} tokens, leaving no answer to train {objective} on; raise "
                "data.max_length or shorten the prompts"
            )
    run = TrlRun.start(cfg, dataset_dir, work_dir, what="preference pairs", dataset=kept)
    # remove_unused_columns=False: what TRL sets itself for these trainers (saying so on every run otherwise)
    args = config_cls(**run.args(config_cls), **settings, remove_unused_columns=False)
    result = train_pairs(run, trainer_cls, args, objective, tokenizer=tokenizer, progress=progress, callbacks=callbacks)
    if not result:
        return result  # not rank 0
    result.update(loss_settings=settings, pairs_prompt_too_long=too_long)
    rows = read_metric_rows(run.metrics_path)
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        if rows and key in rows[-1]:
            result["final_" + key] = rows[-1][key]
    return result


def answerable_pairs(dataset, tokenizer, max_length: int):
    """``(dataset without the pairs whose prompt fills max_length tokens, how many were left out)``.

    The prompt is counted as the TRL trainers build it: the chat template with the generation prompt, tokenized
    without special tokens, plus the BOS token they put first when the tokenizer has one and the text lacks it."""
    bos = tokenizer.bos_token_id

    def fits(row: dict[str, Any]) -> bool:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) + (bos is not None and (not ids or ids[0] != bos)) < max_length

    keep = [i for i, row in enumerate(dataset) if fits(row)]
    if len(keep) == len(dataset):
        return dataset, 0
    return dataset.select(keep), len(dataset) - len(keep)
