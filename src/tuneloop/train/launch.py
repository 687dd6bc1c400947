"""Multi-process training: ``train.num_processes > 1`` (or ``train.accelerate_config``) runs the training stage
in worker processes and streams their log.

* CUDA: ``accelerate launch --multi_gpu --num_processes N`` (DDP). With ``train.accelerate_config`` the YAML
  written by ``accelerate config`` is passed through (``--config_file``), so FSDP, DeepSpeed, multi-node
  (``num_machines``, ``machine_rank``, ``main_process_ip``) and mixed-precision settings come from there.
* CPU: ``torch.distributed.run --standalone --nproc_per_node N`` (DDP over gloo), which is what
  ``accelerate launch --cpu`` does not offer without MPI.

Each worker runs ``python -m tuneloop.train.worker SPEC.json`` (see :mod:`tuneloop.train.worker`); rank 0
writes the model, the per-step metrics and ``train_result.json``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig
from tuneloop.errors import StageError
from tuneloop.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)
STEP_PREFIX = "TUNELOOP_STEP "


def stream_process(
    cmd: list[str] | str, on_line: Callable[[str], None], *, env: dict[str, str], shell: bool = False
) -> int:
    """Run ``cmd`` in its own process group, hand each output line (stdout + stderr) to ``on_line``, return
    its exit status. If we are interrupted (Ctrl-C, an error in ``on_line``), the whole group is stopped —
    SIGTERM, then SIGKILL after 30 s — so no trainer outlives the stage (a shell's children included)."""
    import signal

    proc = subprocess.Popen(
        cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    assert proc.stdout is not None  # stdout=PIPE
    try:
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        raise


def launch_command(cfg: PipelineConfig, spec_path: Path) -> list[str]:
    """The command line that starts the training workers."""
    import torch

    t = cfg.train
    worker = ["-m", "tuneloop.train.worker", str(spec_path)]
    if t.accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", t.accelerate_config]
        if t.num_processes > 1:
            cmd += ["--num_processes", str(t.num_processes)]
        return cmd + worker
    if torch.cuda.is_available():
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(t.num_processes),
            "--num_machines",
            "1",
            "--dynamo_backend",
            "no",
            "--mixed_precision",
            "no",
            *worker,
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(t.num_processes),
        *worker,
    ]


def train_distributed(
    cfg: PipelineConfig,
    dataset_dir: Path,
    work_dir: Path,
    *,
    tokenizer_dir: str,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """Run the training stage in ``train.num_processes`` workers; returns rank 0's training metrics."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = work_dir / "launch_spec.json"
    atomic_write_json(
        spec,
        {
            "config": cfg.to_dict(),
            "dataset_dir": str(dataset_dir),
            "work_dir": str(work_dir),
            "tokenizer_dir": tokenizer_dir,
        },
    )
    result_path = work_dir / "train_result.json"
    result_path.unlink(missing_ok=True)
    cmd = launch_command(cfg, spec)
    log.info("launching %d training processes: %s", cfg.train.num_processes, " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = str(Path(__file__).resolve().parents[2])  # the tuneloop package must be importable by the workers
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    tail: deque[str] = deque(maxlen=40)

    def on_line(line: str) -> None:
        if line.startswith(STEP_PREFIX):
            step, total, row = json.loads(line[len(STEP_PREFIX) :])
            if progress:
                progress(step, total, row)
            return
        tail.append(line)
        log.info("[worker] %s", line)

    rc = stream_process(cmd, on_line, env=env)
    if rc != 0 or not result_path.is_file():
        raise StageError(f"distributed training failed (exit {rc}); last lines:\n" + "\n".join(tail))
    return read_json(result_path)
