"""Training under faults (issue 21): checkpoints whole or absent, and a stage's own error surviving a full disk.

- The checkpoint checks on hand-made checkpoints: a state file cut at 4,096 bytes, cut weights and optimizer
  files, an index naming a missing shard; the resume plan falls back to the previous valid checkpoint.
- The pipeline after a crash cut the newest checkpoint's ``trainer_state.json``: the next run resumes from the
  checkpoint before it, says so, and ends where an uninterrupted run does.
- ENOSPC at a checkpoint write, faked where the process meets the disk (``torch.save`` raising the OS error), in a
  real ``tuneloop run --json``: exit 1, the training stage's own error, the JSON summary, ``run.json`` failed; the
  next run resumes from the last complete checkpoint.
- The stage log failing to flush and close while a stage fails on its own (faked at ``logging.FileHandler``):
  the stage's error is what the run reports.
- A real full filesystem (a small tmpfs mounted over the workspace; skipped where mounting is not permitted):
  the disk fills during training; the run reports the stage's own error, run.json says failed, the next run
  (space freed) resumes and passes; ``models list`` on the full disk says the disk is full, not damaged.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneloop.train.checkpoints import checkpoint_problem, resume_plan

TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]


def tl(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------- hand-made checkpoints


def _checkpoint(d: Path, step: int, *, log_rows: int = 40) -> Path:
    """A checkpoint laid out as the Trainer writes one for a LoRA run (real safetensors and torch files)."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    save_file({"lora_A": torch.randn(4, 32), "lora_B": torch.zeros(32, 4)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    torch.save({"state": {0: {"exp_avg": torch.randn(64)}}}, d / "optimizer.pt")
    torch.save({"last_epoch": step}, d / "scheduler.pt")
    history = [
        {"step": i, "loss": 5.0 - i / 10, "learning_rate": 1e-3, "grad_norm": 1.25, "epoch": i / 8}
        for i in range(1, log_rows)
    ]
    (d / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "max_steps": 24, "log_history": history}, indent=2)
    )
    return d


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_whole_checkpoint_validates_and_each_cut_file_is_named(tmp_path):
    whole = _checkpoint(tmp_path / "checkpoint-8", 8)
    assert (whole / "trainer_state.json").stat().st_size > 4096
    assert checkpoint_problem(whole) is None

    state = _checkpoint(tmp_path / "a" / "checkpoint-8", 8)
    _cut(state / "trainer_state.json", 4096)  # what a full disk left in the issue
    assert "trainer_state.json does not parse (4096 bytes" in checkpoint_problem(state)

    weights = _checkpoint(tmp_path / "b" / "checkpoint-8", 8)
    _cut(weights / "adapter_model.safetensors", (weights / "adapter_model.safetensors").stat().st_size - 100)
    assert "adapter_model.safetensors is cut short" in checkpoint_problem(weights)

    optim = _checkpoint(tmp_path / "c" / "checkpoint-8", 8)
    _cut(optim / "optimizer.pt", 1000)
    assert "optimizer.pt is not a whole torch file" in checkpoint_problem(optim)

    missing = _checkpoint(tmp_path / "d" / "checkpoint-8", 8)
    (missing / "trainer_state.json").unlink()
    assert checkpoint_problem(missing) == "trainer_state.json is missing"

    shard = _checkpoint(tmp_path / "e" / "checkpoint-8", 8)
    (shard / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})
    )
    assert "names files that are missing: model-00002-of-00002.safetensors" in checkpoint_problem(shard)

    other_step = _checkpoint(tmp_path / "f" / "checkpoint-16", 8)
    assert "global_step 8, not 16" in checkpoint_problem(other_step)

    no_weights = _checkpoint(tmp_path / "g" / "checkpoint-8", 8)
    (no_weights / "adapter_model.safetensors").unlink()
    assert "no model weights" in checkpoint_problem(no_weights)


def test_resume_plan_falls_back_to_the_previous_valid_checkpoint_and_removes_the_rest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _checkpoint(ckpts / "checkpoint-8", 8)
    _checkpoint(ckpts / "checkpoint-16", 16)
    _cut(ckpts / "checkpoint-16" / "trainer_state.json", 4096)
    _checkpoint(ckpts / ".partial" / "checkpoint-24", 24)  # a save that was killed

    # Another rank only reads: same choice, nothing removed.
    look = resume_plan(ckpts, clean=False)
    assert look.checkpoint == ckpts / "checkpoint-8" and (ckpts / "checkpoint-16").is_dir()

    plan = resume_plan(ckpts)
    assert plan.checkpoint == ckpts / "checkpoint-8" and plan.step == 8 and plan.removed == ["checkpoint-16"]
    text = "\n".join(plan.notes)
    assert "checkpoint-16 cannot be resumed from: trainer_state.json does not parse" in text and "removed it" in text
    assert "resuming training from checkpoint-8 (step 8) (the newer checkpoint-16 did not validate)" in text
    assert ".partial: a checkpoint whose save did not finish" in text
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-8"]

    _cut(ckpts / "checkpoint-8" / "adapter_model.safetensors", 10)
    none = resume_plan(ckpts)
    assert none.checkpoint is None and none.step == 0
    assert "training starts again from step 0" in none.notes[-1]
    assert list(ckpts.iterdir()) == []
    assert resume_plan(ckpts).notes == []  # nothing left to say


# ------------------------------------------------------------------------------------- the pipeline


def _training_dir(root: Path) -> Path:
    (d,) = (root / ".tuneloop" / "cache" / "training").iterdir()
    return d


@pytest.mark.slow
def test_a_cut_state_file_in_the_newest_checkpoint_resumes_from_the_one_before(make_config, tmp_path):
    from rich.console import Console

    from tuneloop import FineTunePipeline, load_config

    path = make_config(train__max_steps=24, train__save_steps=8, train__batch_size=4, deploy__auto_deploy=False)
    first = FineTunePipeline(load_config(path), console=Console(file=io.StringIO())).run()
    assert first["overall"] == "passed", first
    work = _training_dir(tmp_path)
    ckpts = work / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-16", "checkpoint-24"]  # rotated, no staging left

    # As the issue met it: the machine went down (or the disk filled) while checkpoint-24's state file was
    # written, before the model and the stage's result.
    shutil.rmtree(work / "model")
    (work / "result.json").unlink()
    _cut(ckpts / "checkpoint-24" / "trainer_state.json", 4096)

    console = io.StringIO()
    again = FineTunePipeline(load_config(path), console=Console(file=console, width=300)).run()
    said = console.getvalue()
    assert again["overall"] == "passed", (again, said)
    tr = again["stages"]["training"]
    assert tr["cached"] is False and tr["metrics"]["resumed_from_step"] == 16
    assert "checkpoint-24 cannot be resumed from: trainer_state.json does not parse (4096 bytes" in said
    assert "resuming training from checkpoint-16 (step 16)" in said
    assert tr["metrics"]["final_loss"] == pytest.approx(first["stages"]["training"]["metrics"]["final_loss"], rel=1e-4)
    assert checkpoint_problem(ckpts / "checkpoint-24") is None  # written again, whole


_FAKE_ENOSPC = """
import errno, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    # The disk refuses the optimizer file of checkpoint-16: what the OS says when it is full.
    if "checkpoint-16" in str(f) and str(f).endswith("optimizer.pt"):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["tuneloop", *sys.argv[1:]]
from tuneloop.cli import main
main()
"""


@pytest.mark.slow
def test_enospc_at_a_checkpoint_is_the_training_stage_error_and_the_next_run_resumes(make_config, tmp_path):
    path = make_config(train__max_steps=24, train__save_steps=8, train__batch_size=4, deploy__auto_deploy=False)
    r = subprocess.run(
        [sys.executable, "-c", _FAKE_ENOSPC, "run", str(path), "--json"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    summary = json.loads(r.stdout)  # the --json summary is printed
    tr = summary["stages"]["training"]
    assert summary["overall"] == "failed" and tr["status"] == "failed"
    assert "OSError: [Errno 28] No space left on device" in tr["error"] and "optimizer.pt" in tr["error"]
    assert (
        "free space there and run the same command again" in tr["error"] and "last complete checkpoint" in tr["error"]
    )
    assert summary["stages"]["evaluation"]["status"] == "skipped"
    run = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
    assert run["status"] == "failed" and run["stages"]["training"]["error"] == tr["error"]
    ckpts = _training_dir(tmp_path) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-8"]  # the failed save left nothing behind

    r = tl("run", path, "--json")  # the disk has room again
    assert r.returncode == 0, r.stderr
    tr = json.loads(r.stdout)["stages"]["training"]
    assert tr["metrics"]["resumed_from_step"] == 8 and tr["metrics"]["steps"] == 24
    assert "resuming training from checkpoint-8 (step 8)" in r.stderr
    statuses = [x["status"] for x in json.loads(tl("status", "--json", cwd=tmp_path).stdout)]
    assert statuses == ["passed", "failed"]


def test_a_stage_log_that_cannot_be_written_or_closed_does_not_replace_the_stage_error(
    make_config, tmp_path, monkeypatch
):
    """The disk is full for the preprocessing stage: its dataset write and its log file both fail (faked where
    the process writes: ``Dataset.save_to_disk`` and ``logging.FileHandler.flush``); the data_validation log fails
    only when it is closed, after the stage passed."""
    import logging

    import datasets
    from rich.console import Console

    from tuneloop import FineTunePipeline, load_config

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_flush, real_close = logging.FileHandler.flush, logging.FileHandler.close

    def flush(self):
        if self.baseFilename.endswith("preprocessing.log") and self.stream is not None:
            full()
        real_flush(self)

    def close(self):
        real_close(self)
        if self.baseFilename.endswith("data_validation.log"):
            full()

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    monkeypatch.setattr(logging.FileHandler, "flush", flush)
    monkeypatch.setattr(logging.FileHandler, "close", close)
    console = io.StringIO()
    summary = FineTunePipeline(load_config(make_config()), console=Console(file=console, width=300)).run()
    said = console.getvalue()
    st = summary["stages"]
    assert summary["overall"] == "failed"
    assert st["data_validation"]["status"] == "passed"
    assert st["preprocessing"]["status"] == "failed" and st["training"]["status"] == "skipped"
    err = st["preprocessing"]["error"]
    assert err.startswith("OSError: [Errno 28] No space left on device") and "free space there" in err
    assert "its traceback could not be written to" in err and "preprocessing.log" in err
    assert "data_validation.log is incomplete" in said and "preprocessing.log is incomplete" in said
    run = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
    assert run["status"] == "failed" and run["stages"]["preprocessing"]["error"] == err
    assert not (Path(summary["run_dir"]) / ".reserve").exists()


_RUN_JSON_REFUSED = """
import errno, sys
import tuneloop.pipeline as pipeline
real_write = pipeline.atomic_write_json
def write(path, obj):
    # The disk takes the run's first record, then refuses every later run.json (the reserve does not help).
    if path.name == "run.json" and obj.get("status") != "running":
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_write(path, obj)
pipeline.atomic_write_json = write
sys.argv = ["tuneloop", *sys.argv[1:]]
from tuneloop.cli import main
main()
"""


def test_a_run_json_the_disk_refuses_keeps_the_stage_error_and_reads_as_not_running(make_config, tmp_path, task_data):
    bad = tmp_path / "train.jsonl"
    bad.write_text(task_data[0].read_text() + '{"messages": []}\n')
    path = make_config(data__train_data=str(bad), data__min_valid_ratio=1.0)
    r = subprocess.run(
        [sys.executable, "-c", _RUN_JSON_REFUSED, "run", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    summary = json.loads(r.stdout)
    dv = summary["stages"]["data_validation"]
    assert summary["overall"] == "failed" and dv["status"] == "failed" and "min_valid_ratio" in dv["error"]
    said = " ".join(r.stderr.split())
    assert "could not record that this run failed: [Errno 28] No space left on device" in said
    assert "reads it as interrupted once this process has ended" in said
    assert json.loads((Path(summary["run_dir"]) / "run.json").read_text())["status"] == "running"  # what the disk kept
    (run,) = json.loads(tl("status", "--json", cwd=tmp_path).stdout)
    assert run["run_id"] == summary["run_id"] and run["status"] == "interrupted"  # not running: nothing waits on it


# --------------------------------------------------------------------------------- a real full disk


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full filesystem needs root to mount a tmpfs")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")


def _fill(where: Path) -> Path:
    """Take every free byte of the filesystem holding ``where``."""
    filler = where / "filler"
    # Unbuffered: a buffered writer keeps the bytes a short write left over and raises ENOSPC again on close.
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\1" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(pattern)):
        assert proc.poll() is None, (
            f"the run ended before {pattern} appeared: {proc.stderr.read() if proc.stderr else ''}"
        )
        assert time.time() < deadline, f"{pattern} did not appear"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_disk_that_fills_during_training_then_is_freed(make_config, tmp_path):
    ws = tmp_path / "ws"
    _mount_tmpfs(ws, "16m")
    try:
        path = make_config(
            workspace=str(ws), train__max_steps=80, train__save_steps=8, train__batch_size=4, deploy__auto_deploy=False
        )
        proc = subprocess.Popen(
            [*TUNELOOP, "run", str(path), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _wait_for("cache/training/*/checkpoints/checkpoint-8", ws, proc)
        proc.send_signal(signal.SIGSTOP)  # hold training while the disk fills
        filler = _fill(ws)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        summary = json.loads(out)
        tr = summary["stages"]["training"]
        assert summary["overall"] == "failed" and tr["status"] == "failed", summary
        assert "No space left on device" in tr["error"] and "free space there" in tr["error"], tr["error"]
        run = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
        assert (
            run["status"] == "failed" and run["stages"]["training"]["error"] == tr["error"]
        )  # written in the reserve's room
        assert not list(ws.glob("cache/training/*/checkpoints/.partial"))

        filler.unlink()  # space freed: the same command continues, nothing deleted by hand
        again = tl("run", path, "--json")
        assert again.returncode == 0, again.stderr
        tr = json.loads(again.stdout)["stages"]["training"]
        keys = sorted(
            p.name for p in (ws / "cache" / "training").iterdir()
        )  # two: tuneloop's sources changed meanwhile
        assert tr["metrics"]["resumed_from_step"] >= 8 and tr["metrics"]["steps"] == 80, (keys, again.stderr[-3000:])
        assert [x["status"] for x in json.loads(tl("status", "-c", path, "--json").stdout)] == ["passed", "failed"]

        filler = _fill(ws)  # full again: the registry is intact, and the message says so
        listed = tl("models", "list", "-w", ws)
        assert listed.returncode == 1
        message = " ".join(listed.stderr.split())
        assert "the disk holding it is full" in message and "no sign of damage" in message, message
        assert "Traceback" not in listed.stderr
        filler.unlink()
        assert tl("models", "list", "-w", ws, "--json").returncode == 0
    finally:
        subprocess.run(["umount", str(ws)], capture_output=True)
