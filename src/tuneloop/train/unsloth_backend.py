"""``train.backend: unsloth``: training through Unsloth's ``FastLanguageModel`` + TRL on one CUDA GPU.

Entry points: :func:`unsloth_problems` (preflight, exit 2), :func:`unsloth_plan` (the mapping of a tuneloop config
onto Unsloth's and TRL's arguments, pure: CPU-testable) and :func:`train_unsloth` (the training stage's call).

The data is the same as for ``backend: transformers``: the preprocessing stage's records (SFT: ``input_ids`` and
``labels`` with the prompt masked unless ``train.train_on_inputs``, built with the run's chat template; DPO: the
conversational prompt/chosen/rejected pairs that TRL templates and tokenizes). Unsloth only replaces how the model is
loaded and patched; TRL's ``SFTTrainer``/``DPOTrainer`` train it, through the same :class:`tuneloop.train.dpo.TrlRun`
as the other TRL trainers (common arguments, checkpoints written whole, resume, per-step metrics, final ``model/``).

Unsloth patches transformers, TRL and PEFT when it is imported, and must be imported before them. The process that
runs a pipeline has imported transformers long before training starts (tokenizer, preprocessing), and Unsloth's
patches are global (its fast forward would also be used by the evaluation afterwards). So :func:`train_unsloth` runs
the training in a child process, ``python -m tuneloop.train.unsloth_backend SPEC.json`` (:func:`main`), which imports
``unsloth`` first; it streams its log and each step's metrics back (as :mod:`tuneloop.train.launch` does for
distributed workers) and writes ``train_result.json``.

API followed: unslothai/unsloth at commit 015bdef (version 2026.8.19): ``unsloth/models/loader.py``
(``FastLanguageModel.from_pretrained``: ``load_in_4bit`` defaults to True, ``full_finetuning``,
``float32_mixed_precision``, ``use_exact_model_name``), ``unsloth/models/llama.py`` (``get_peft_model``: a list of
``target_modules``, no ``all-linear``; ``loftq_config``, ``use_rslora``; other LoraConfig arguments such as
``use_dora`` pass through ``**kwargs``), ``unsloth/trainer.py`` (a custom data collator turns Unsloth's own packing and
padding-free batching off). Unsloth pins ``trl<=0.24`` and ``transformers<=5.5``; the TRL fields used here exist in
TRL 0.23 and 0.24 as in 1.x. Preflight asks for unsloth >= :data:`MIN_UNSLOTH` (the first release with every keyword
used; ``float32_mixed_precision`` reached ``FastLanguageModel.from_pretrained`` in late October 2025).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.config import PipelineConfig
from tuneloop.errors import StageError, TuneloopError

if TYPE_CHECKING:
    from tuneloop.train.dpo import TrlRun

log = logging.getLogger("tuneloop.train.unsloth_backend")  # __name__ when imported; this file also runs as __main__

#: Objectives this backend maps (the others need a TRL trainer whose Unsloth mapping is not written or not faithful).
OBJECTIVES = ("sft", "dpo")
MIN_UNSLOTH = (2025, 11, 1)
INSTALL = (
    "pip install 'tuneloop[unsloth]' on a machine with an NVIDIA GPU and a CUDA build of torch (Unsloth's own "
    "install note: `pip install unsloth`, or `uv pip install unsloth --torch-backend=auto`; see "
    "https://unsloth.ai/docs/get-started/install)"
)
STEP_PREFIX = "TUNELOOP_STEP "  # the same line protocol as tuneloop.train.launch's workers


@dataclass(frozen=True)
class UnslothPlan:
    """What a tuneloop config asks of Unsloth and TRL, argument for argument."""

    objective: str  # "sft" or "dpo"
    load: dict[str, Any]  # FastLanguageModel.from_pretrained(**load)
    peft: dict[str, Any] | None  # FastLanguageModel.get_peft_model(model, **peft); None: full fine-tuning
    trainer: dict[str, Any]  # trl.SFTConfig(**trainer) or trl.DPOConfig(**trainer)
    per_step: int  # samples (pairs) per optimizer step
    steps_per_epoch: int
    max_steps: int
    completion_only: bool  # SFT: prompt tokens carry no loss (in the prepared labels, as backend transformers)
    notes: tuple[str, ...]  # where the run differs from backend transformers on the same config


# --------------------------------------------------------------------------------------------- preflight


def unsloth_problems(cfg: PipelineConfig) -> list[str]:
    """What stops ``backend: unsloth`` on this machine and config (each with its config key), found before any work."""
    t = cfg.train
    problems = []
    if t.objective not in OBJECTIVES:
        problems.append(
            f"train.objective: backend unsloth trains {' and '.join(OBJECTIVES)}; {t.objective} is not mapped "
            f"onto Unsloth; use backend: transformers for {t.objective}"
        )
    if t.num_processes > 1 or t.accelerate_config:
        key = "train.num_processes" if t.num_processes > 1 else "train.accelerate_config"
        problems.append(
            f"{key}: backend unsloth trains in one process on one GPU; set train.num_processes: 1 without "
            "train.accelerate_config, or use backend: transformers for multi-process training"
        )
    found = cuda_found()
    if found is not None:
        problems.append(
            f"train.backend: backend unsloth needs a CUDA GPU (found: {found}); use backend: transformers on "
            "this machine"
        )
    installed = unsloth_version()
    if installed is None:
        problems.append(f"train.backend: backend unsloth needs the unsloth package, which is not installed: {INSTALL}")
    elif installed < MIN_UNSLOTH:
        problems.append(
            f"train.backend: unsloth {'.'.join(map(str, installed))} is installed; backend unsloth needs "
            f"{'.'.join(map(str, MIN_UNSLOTH))} or later: pip install -U unsloth unsloth_zoo"
        )
    positions = _local_max_positions(cfg.base_model)
    if positions is not None and (problem := context_problem(cfg, positions)):
        problems.append(problem)
    return problems


def cuda_found() -> str | None:
    """None when torch sees a CUDA GPU; otherwise what it found instead, for the message."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        what = f"torch {torch.__version__}, a build without CUDA"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        what = f"torch {torch.__version__} with CUDA {torch.version.cuda} but no visible GPU" + (
            f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        what += "; an Apple GPU (MPS): backend mlx trains on it"
    return what


def unsloth_version() -> tuple[int, ...] | None:
    """The installed unsloth's version as numbers (read from its metadata: unsloth is not imported here), or None."""
    if importlib.util.find_spec("unsloth") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("unsloth")
    except PackageNotFoundError:  # importable but not installed as a distribution (a source checkout)
        return MIN_UNSLOTH
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def context_problem(cfg: PipelineConfig, max_positions: int) -> str | None:
    """Unsloth stretches RoPE (linear scaling) when ``max_seq_length`` exceeds the model's context, which trains a
    different model from the one the evaluation loads; refused instead."""
    if cfg.data.max_length <= max_positions:
        return None
    return (
        f"data.max_length: {cfg.data.max_length} is longer than the base model's context ({max_positions} positions); "
        f"Unsloth would rescale its RoPE to fit, so the adapter would be trained for another model than the one "
        f"evaluated and served; set data.max_length to {max_positions} or less"
    )


def _local_max_positions(base_model: str) -> int | None:
    path = Path(base_model) / "config.json"
    if not path.is_file():
        return None  # a hub id or a registry reference: checked when the model is loaded
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


# --------------------------------------------------------------------------------------------- the mapping


def unsloth_plan(cfg: PipelineConfig, *, train_records: int, work_dir: Path, model_config: Any = None) -> UnslothPlan:
    """The arguments of Unsloth's loader and LoRA wrapper and of TRL's config for ``cfg``'s training.

    ``train_records``: the prepared samples (SFT) or pairs (DPO), for the step budget (``train.num_epochs`` becomes
    ``max_steps`` as in :class:`~tuneloop.train.dpo.TrlRun`). ``model_config``: the base model's transformers config
    (default: read from ``base_model``), for ``target_modules: all-linear`` and the context check. The common TRL
    arguments are :meth:`TrlRun.args`'s, so they follow the machine as backend transformers' do (``precision: auto``
    is bf16 where the GPU supports it).

    The steps: the objective and the context checked, the step budget, TRL's arguments, then Unsloth's loader and
    LoRA arguments in the training precision, and the notes on where the run differs from backend transformers.
    """
    t = cfg.train
    model_config = _mappable_model_config(cfg, model_config)
    run = _step_budget(cfg, train_records, Path(work_dir))
    trainer = _trl_arguments(run)
    checkpointing: str | bool = "unsloth" if t.gradient_checkpointing else False
    load = _load_arguments(cfg, _dtype(trainer), checkpointing)
    peft = None if t.method == "full" else _peft_arguments(cfg, model_config, checkpointing)
    return UnslothPlan(
        t.objective,
        load,
        peft,
        trainer,
        run.per_step,
        run.steps_per_epoch,
        run.max_steps,
        completion_only=not t.train_on_inputs,
        notes=_plan_notes(cfg),
    )


def _mappable_model_config(cfg: PipelineConfig, model_config: Any) -> Any:
    """``model_config`` (read from ``base_model`` when None) once the objective is one this backend maps and
    ``data.max_length`` fits the model's context; ``StageError`` otherwise."""
    t = cfg.train
    if t.objective not in OBJECTIVES:
        raise StageError(f"train.objective: backend unsloth trains {' and '.join(OBJECTIVES)}, not {t.objective}")
    if model_config is None:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(cfg.base_model)
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and (problem := context_problem(cfg, positions)):
        raise StageError(problem)
    return model_config


def _step_budget(cfg: PipelineConfig, train_records: int, work_dir: Path) -> TrlRun:
    """The :class:`~tuneloop.train.dpo.TrlRun` (no dataset or model: only its step budget and paths) whose TRL
    arguments the plan takes."""
    from tuneloop.train.dpo import TrlRun
    from tuneloop.train.sft import world_size

    t = cfg.train
    per_step = t.batch_size * t.gradient_accumulation_steps * world_size()
    steps_per_epoch = math.ceil(train_records / per_step)
    max_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.num_epochs))
    return TrlRun(
        cfg,
        work_dir,
        work_dir / "checkpoints",
        work_dir / "train_metrics.jsonl",
        None,
        None,
        None,
        per_step,
        steps_per_epoch,
        max_steps,
    )


def _trl_arguments(run: TrlRun) -> dict[str, Any]:
    """``trl.SFTConfig``/``DPOConfig`` arguments: :meth:`TrlRun.args`'s, the Trainer's checkpointing off, and the
    objective's own."""
    from tuneloop.train.sft import checkpointing_args

    t = run.cfg.train
    args_cls = _trl_config_class(t.objective)
    trainer = run.args(args_cls)
    # Unsloth does the activation checkpointing (below, use_gradient_checkpointing); the Trainer's own stays off.
    trainer.update(checkpointing_args(args_cls, False))
    if t.objective == "sft":
        # Our prepared input_ids/labels go through our padding collator as they are: TRL neither re-tokenizes nor packs,
        # and a custom collator keeps Unsloth's own packing and padding-free batching off (unsloth/trainer.py).
        trainer.update(
            packing=False,
            padding_free=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
        )
    else:
        trainer.update(beta=t.dpo_beta)
    return trainer


def _load_arguments(cfg: PipelineConfig, dtype: Any, checkpointing: str | bool) -> dict[str, Any]:
    """``FastLanguageModel.from_pretrained`` arguments."""
    t = cfg.train
    load: dict[str, Any] = dict(
        model_name=cfg.base_model,
        max_seq_length=cfg.data.max_length,
        dtype=dtype,
        load_in_4bit=t.method == "qlora",  # Unsloth's default is True: always said
        full_finetuning=t.method == "full",
        use_gradient_checkpointing=checkpointing,
        random_state=cfg.seed,
        use_exact_model_name=True,  # the configured base model, not a pre-quantized copy from Unsloth's name map
    )
    if t.method == "full":
        import torch

        if dtype == torch.bfloat16:
            load["float32_mixed_precision"] = True  # fp32 weights under bf16 autocast, as backend transformers
    return load


def _peft_arguments(cfg: PipelineConfig, model_config: Any, checkpointing: str | bool) -> dict[str, Any]:
    """``FastLanguageModel.get_peft_model`` arguments (``lora`` and ``qlora``)."""
    t = cfg.train
    peft = dict(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=resolve_target_modules(t.target_modules, model_config),
        bias="none",
        use_gradient_checkpointing=checkpointing,
        random_state=cfg.seed,
        use_rslora=t.use_rslora,
        loftq_config=None,
    )
    if t.use_dora:
        peft["use_dora"] = True  # passed on to PEFT's LoraConfig by Unsloth
    return peft


def _plan_notes(cfg: PipelineConfig) -> tuple[str, ...]:
    """Where the run differs from backend transformers on the same config."""
    t = cfg.train
    notes = (
        [
            "SFT batches are padded: train.packing (a speed setting) does not apply, since Unsloth's attention "
            "separates packed samples only with its own metadata"
        ]
        if t.objective == "sft" and t.packing
        else []
    )
    if t.method != "full":
        notes.append(
            "the base weights are held in the training precision (Unsloth's kernels), not in fp32 under autocast"
        )
        if t.method == "qlora":
            notes.append(
                "QLoRA: Unsloth's 4-bit NF4 base with double quantization, computing in the training precision"
            )
        if t.lora_dropout:
            notes.append(
                f"lora_dropout {t.lora_dropout}: Unsloth's fast LoRA kernels need 0 (set train.lora_dropout: 0 "
                "for full speed)"
            )
    return tuple(notes)


def resolve_target_modules(target: str | list[str], model_config: Any) -> list[str]:
    """``train.target_modules`` as the list Unsloth's ``get_peft_model`` needs: ``all-linear`` is PEFT's meaning (the
    names of every linear layer except the output layer), found on the architecture built on the meta device."""
    if not isinstance(target, str):
        return list(target)
    if target != "all-linear":
        return [target]
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    output = model.get_output_embeddings()
    names = [
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    ]
    return list(dict.fromkeys(names))


def _trl_config_class(objective: str):
    from trl import DPOConfig, SFTConfig

    return SFTConfig if objective == "sft" else DPOConfig


def _dtype(trainer: dict[str, Any]):
    import torch

    if trainer.get("bf16"):
        return torch.bfloat16
    if trainer.get("fp16"):
        return torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------------- training


def train_unsloth(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train with Unsloth in a child process that imports it first; returns the training metrics (with ``kind``,
    ``adapter`` or ``model``). The model is in ``work_dir/model`` and the per-step rows in
    ``work_dir/train_metrics.jsonl``, as with the other trainers; a killed run resumes from its checkpoints."""
    from collections import deque

    from tuneloop.fsutil import atomic_write_json, read_json
    from tuneloop.modeling import save_tokenizer
    from tuneloop.train.launch import stream_process

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = work_dir / "unsloth_tokenizer"
    save_tokenizer(tokenizer, tok_dir)
    spec = work_dir / "unsloth_spec.json"
    atomic_write_json(
        spec,
        {
            "config": cfg.to_dict(),
            "dataset_dir": str(dataset_dir),
            "work_dir": str(work_dir),
            "tokenizer_dir": str(tok_dir),
        },
    )
    result_path = work_dir / "train_result.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = str(Path(__file__).resolve().parents[2])  # the child must import this tuneloop
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    tail: deque[str] = deque(maxlen=40)

    def on_line(line: str) -> None:
        if line.startswith(STEP_PREFIX):
            step, total, row = json.loads(line[len(STEP_PREFIX) :])
            if progress:
                progress(step, total, row)
            return
        tail.append(line)
        log.info("[unsloth] %s", line)

    cmd = [sys.executable, "-m", "tuneloop.train.unsloth_backend", str(spec)]
    log.info("training with Unsloth in a child process: %s", " ".join(cmd))
    rc = stream_process(cmd, on_line, env=env)
    result = read_json(result_path) if result_path.is_file() else None
    if isinstance(result, dict) and "error" in result:
        raise StageError(result["error"])
    if rc != 0 or result is None:
        raise StageError(f"Unsloth training failed (exit {rc}); last lines:\n" + "\n".join(tail))
    return result


def run_in_child(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """The training itself, in the process that imported unsloth before transformers (:func:`main`)."""
    import torch
    import unsloth
    from datasets import load_from_disk
    from transformers import set_seed
    from unsloth import FastLanguageModel

    from tuneloop.train.dpo import TrlRun, train_pairs

    dataset = load_from_disk(str(dataset_dir))
    what = "training samples" if cfg.train.objective == "sft" else "preference pairs"
    if len(dataset) == 0:
        raise StageError(f"no {what} left after preprocessing; see the preprocessing stage's dropped.jsonl")
    plan = unsloth_plan(cfg, train_records=len(dataset), work_dir=work_dir)
    for note in plan.notes:
        log.info("note: %s", note)
    set_seed(cfg.seed)
    cuda = torch.cuda.is_available()  # always, but for the CPU test with a stand-in for unsloth
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, _ = FastLanguageModel.from_pretrained(**plan.load)  # Unsloth's tokenizer is not used: ours has the template
    model.config.use_cache = False  # training, as TrlRun.start and train_sft set it
    if plan.peft is not None:
        model = FastLanguageModel.get_peft_model(model, **plan.peft)
    run = TrlRun(
        cfg,
        Path(work_dir),
        Path(work_dir) / "checkpoints",
        Path(work_dir) / "train_metrics.jsonl",
        dataset,
        model,
        None,
        plan.per_step,
        plan.steps_per_epoch,
        plan.max_steps,
    )
    if plan.objective == "sft":
        result = _train_sft(run, plan, tokenizer, progress)
    else:
        from trl import DPOConfig, DPOTrainer

        result = train_pairs(run, DPOTrainer, DPOConfig(**plan.trainer), "dpo", tokenizer=tokenizer, progress=progress)
    kind = "adapter" if (Path(work_dir) / "model" / "adapter_config.json").is_file() else "model"
    return {
        **result,
        "kind": kind,
        "backend": "unsloth",
        "unsloth_version": unsloth.__version__,
        **({"peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)} if cuda else {}),
    }


def _train_sft(run, plan: UnslothPlan, tokenizer, progress) -> dict[str, Any]:
    """TRL's SFTTrainer on the prepared samples with tuneloop's padding collator; the SFT metrics' names."""
    from trl import SFTConfig, SFTTrainer

    from tuneloop.train.sft import make_collator

    unpacked = run.cfg.model_copy(update={"train": run.cfg.train.model_copy(update={"packing": False})})
    trainer = SFTTrainer(
        model=run.model,
        args=SFTConfig(**plan.trainer),
        train_dataset=run.dataset,
        processing_class=tokenizer,
        data_collator=make_collator(unpacked, tokenizer.pad_token_id),
        callbacks=run.callbacks(progress, run.mean_tokens(lambda r: len(r["input_ids"])), None),
    )
    result = {"objective": "sft", **run.train(trainer, tokenizer)}
    result["train_samples"] = result.pop("train_records")
    if result["seconds"]:
        steps_run = run.max_steps - result["resumed_from_step"]
        result["samples_per_s"] = round(steps_run * run.per_step / result["seconds"], 2)
    return result


def main(spec_path: str) -> None:
    """``python -m tuneloop.train.unsloth_backend SPEC.json``: import unsloth first, train, write ``train_result.json``
    (``{"error": ...}`` when training could not be done)."""
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["work_dir"]) / "train_result.json"
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    early = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    if early:
        log.warning("%s imported before unsloth: Unsloth's patches to them may be incomplete", ", ".join(early))
    from tuneloop.fsutil import atomic_write_json

    try:
        import unsloth  # noqa: F401  first: it patches transformers, TRL and PEFT as they are imported
    except ImportError as exc:
        atomic_write_json(result_path, {"error": f"train.backend: unsloth could not be imported ({exc}); {INSTALL}"})
        sys.exit(1)

    from tuneloop.config import build_config
    from tuneloop.modeling import load_tokenizer

    def progress(step: int, total: int, row: dict) -> None:
        print(STEP_PREFIX + json.dumps([step, total, row]), flush=True)

    cfg = build_config(spec["config"])
    tok = load_tokenizer(spec["tokenizer_dir"])
    try:
        metrics = run_in_child(cfg, Path(spec["dataset_dir"]), Path(spec["work_dir"]), tokenizer=tok, progress=progress)
    except TuneloopError as exc:
        atomic_write_json(result_path, {"error": str(exc)})
        sys.exit(1)
    atomic_write_json(result_path, metrics)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tuneloop.train.unsloth_backend SPEC.json")
    main(sys.argv[1])
