"""Training checkpoints that are whole or absent, and the choice of the one to resume from.

Entry points: :func:`write_atomically` (makes a transformers ``Trainer`` write each checkpoint into a staging
directory and rename it into place when it is complete) and :func:`resume_plan` (the newest checkpoint that
validates, after removing those that do not).

The Trainer writes ``checkpoint-<step>/`` file by file (weights, optimizer, scheduler, RNG state, and
``trainer_state.json`` last); a full disk or a crash of the machine can leave any of them cut short. Here the
Trainer writes into ``checkpoints/.partial/checkpoint-<step>/``; when every process has finished, rank 0 flushes
the files to the disk, renames the directory to ``checkpoints/checkpoint-<step>`` and then applies
``save_total_limit`` (by step number). A save that fails removes its staging directory, so a full disk is not
left fuller, and a failure with under :data:`~tuneloop.fsutil.LOW_SPACE_BYTES` free is reported as the disk being
full (torch's writer says ``unexpected pos ...`` where the OS said ENOSPC).

On resume every ``checkpoint-<step>`` is validated newest first (:func:`checkpoint_problem`: its JSON files parse,
``trainer_state.json`` names its step, the files a weights index names exist, each safetensors file is as long as
its header says, each torch file's zip directory reads); an invalid one is removed, saying why, and the next
older one is tried; with none valid training starts from step 0, saying so.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.fsutil import LOW_SPACE_BYTES, free_bytes, fsync_dir, fsync_tree, is_disk_full, read_json, replace_dir

log = logging.getLogger(__name__)

STAGING = ".partial"  # under the checkpoint directory; not matched by transformers' `checkpoint-*` globs
_NAME = re.compile(r"checkpoint-(\d+)")
_MAX_HEADER = 100 << 20  # safetensors refuses headers over 100 MB


@dataclass
class ResumePlan:
    """Where training resumes: ``checkpoint`` (None: from step 0) and what was decided on the way (one line each)."""

    checkpoint: Path | None
    step: int = 0
    notes: list[str] = field(default_factory=list)  # removed checkpoints and why, then which one is used
    removed: list[str] = field(default_factory=list)  # names of the checkpoints removed as invalid


def checkpoint_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory, newest first."""
    found = []
    for d in Path(ckpt_dir).glob("checkpoint-*"):
        m = _NAME.fullmatch(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def checkpoint_problem(d: Path) -> str | None:
    """Why the checkpoint directory ``d`` cannot be resumed from, or None when it is whole."""
    d = Path(d)
    state_path = d / "trainer_state.json"
    if not state_path.is_file():
        return "trainer_state.json is missing"
    for f in sorted(d.glob("*.json")):
        try:
            json.loads(f.read_bytes())
        except (OSError, ValueError) as exc:
            return f"{f.name} does not parse ({f.stat().st_size} bytes: {exc})"
    m = _NAME.fullmatch(d.name)
    state = read_json(state_path)
    step = state.get("global_step") if isinstance(state, dict) else None
    if m and step != int(m.group(1)):
        return f"trainer_state.json says global_step {step!r}, not {m.group(1)}"
    weights = _weight_files(d)
    if not weights:
        return "it holds no model weights (no *.safetensors, pytorch_model*.bin or sharded model directory)"
    for idx in sorted(d.glob("*.index.json")):
        index = read_json(idx)
        missing = sorted({str(v) for v in (index.get("weight_map") or {}).values() if not (d / str(v)).is_file()})
        if missing:
            return f"{idx.name} names files that are missing: {', '.join(missing[:5])}"
    for f in sorted(d.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    for f in sorted([*d.glob("*.pt"), *d.glob("*.pth"), *d.glob("*.bin")]):
        problem = torch_file_problem(f)
        if problem:
            return problem
    return None


def _weight_files(d: Path) -> list[Path]:
    return [
        *d.glob("*.safetensors"),
        *d.glob("pytorch_model*.bin"),
        *d.glob("adapter_model.bin"),
        *(p for p in d.glob("pytorch_model_fsdp_*") if p.is_dir()),  # FSDP sharded state
        *(p for p in d.glob("global_step*") if p.is_dir()),  # DeepSpeed
    ]


def safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is whole: its header parses and the data it describes ends at the file's end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is cut short ({size} bytes, shorter than a safetensors header)"
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            return f"{path.name} is cut short ({size} bytes; its header alone would take {n + 8})"
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            return f"{path.name}: its header does not parse ({exc})"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return f"{path.name}: its header is not a safetensors header"
    if 8 + n + end != size:
        return f"{path.name} is cut short ({size} bytes; its header describes {8 + n + end})"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Whether a ``torch.save`` file (a zip archive: optimizer, scheduler, RNG state) has a readable zip directory.

    The directory is at the end of the file, so a file cut short fails here; the contents are not unpickled.
    """
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{path.name} is not a whole torch file ({path.stat().st_size} bytes: {exc})"
    return None


def resume_plan(ckpt_dir: Path, *, clean: bool = True) -> ResumePlan:
    """The newest valid checkpoint in ``ckpt_dir`` to resume from, with one note per decision.

    ``clean`` (rank 0, or the process that launches the workers): remove the staging directory a killed save
    left and every invalid checkpoint newer than the one chosen (or all of them when none is valid), so the
    Trainer's rotation and a later resume never meet them. Other ranks only read.
    """
    ckpt_dir = Path(ckpt_dir)
    plan = ResumePlan(None)
    staging = ckpt_dir / STAGING
    if clean and staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        plan.notes.append(f"removed {staging}: a checkpoint whose save did not finish")
    candidates = checkpoint_dirs(ckpt_dir)
    for step, d in candidates:
        problem = checkpoint_problem(d)
        if problem is None:
            plan.checkpoint, plan.step = d, step
            break
        plan.removed.append(d.name)
        if clean:
            shutil.rmtree(d, ignore_errors=True)
            plan.notes.append(f"checkpoint {d} cannot be resumed from: {problem}; removed it")
        else:
            plan.notes.append(f"checkpoint {d} cannot be resumed from: {problem}; skipped it")
    if plan.checkpoint is not None:
        newer = f" (the newer {', '.join(plan.removed)} did not validate)" if plan.removed else ""
        plan.notes.append(f"resuming training from {plan.checkpoint.name} (step {plan.step}){newer}")
    elif candidates:
        plan.notes.append(f"no valid checkpoint in {ckpt_dir}: training starts again from step 0")
    return plan


def write_atomically(trainer: Any) -> None:
    """Make ``trainer`` (a transformers ``Trainer`` or a TRL trainer) write checkpoints whole or not at all.

    Its ``_save_checkpoint`` is wrapped on this instance: the Trainer's own save runs with its output directory
    pointed at ``<output_dir>/.partial``; then rank 0 flushes the new ``checkpoint-<step>`` to the disk, renames it
    into ``<output_dir>`` and keeps the newest ``save_total_limit`` of them (by step). Every process waits for the
    others before and after, so no rank writes into a directory being moved.
    """
    save = trainer._save_checkpoint  # the bound method of the trainer's class (TRL's calls the Trainer's)

    def _save_checkpoint(model, trial):
        out_dir = Path(trainer._get_output_dir(trial))
        staging = out_dir / STAGING
        name = f"checkpoint-{trainer.state.global_step}"
        main = trainer.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        trainer._get_output_dir = lambda trial=None: str(staging)  # shadows the method for this one save
        try:
            save(model, trial)
        except BaseException as exc:
            _raise_save_failed(exc, staging, name, main)
        finally:
            del trainer._get_output_dir
        trainer.accelerator.wait_for_everyone()
        if main:
            try:
                fsync_tree(staging / name)
                replace_dir(staging / name, out_dir / name)
                fsync_dir(out_dir)
                shutil.rmtree(staging, ignore_errors=True)
            except BaseException as exc:
                _raise_save_failed(exc, staging, name, main)
            _rotate(trainer, out_dir)
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = _save_checkpoint


def _rotate(trainer: Any, out_dir: Path) -> None:
    """Keep the newest ``save_total_limit`` checkpoints, by step (transformers 5's function; 4.x's method)."""
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # transformers 4.x
        trainer._rotate_checkpoints(use_mtime=False, output_dir=str(out_dir))
        return
    rotate_checkpoints(
        str(out_dir), trainer.args.save_total_limit, trainer.state.best_model_checkpoint, use_mtime=False
    )


def _raise_save_failed(exc: BaseException, staging: Path, name: str, main: bool) -> None:
    """Remove the unfinished checkpoint and re-raise; a failure with the disk (nearly) full is raised as ENOSPC,
    whatever the writer said (free space is measured before the removal frees some)."""
    free = free_bytes(staging)
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    if isinstance(exc, Exception) and not is_disk_full(exc) and free is not None and free < LOW_SPACE_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while writing {name} ({free} bytes were free; the writer said "
            f"{type(exc).__name__}: {str(exc)[:200]})",
            str(staging),
        ) from exc
    raise exc
