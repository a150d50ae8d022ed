"""Running a stage's trainer: in the stage's own process, or as torchrun workers.

One process trains in place. Several (`runtime.processes`, or one per visible GPU) run as

    python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.training.worker JOB.json

with the torchrun agent tied to the stage process (it gets SIGTERM when the stage dies), so a
killed stage never leaves workers writing into the work folder that a rerun resumes from.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tasks.config import RuntimeConfig
from tasks.stage import StageContext, StageOutput
from tasks.training import worker
from tasks.training.distributed import setup
from tasks.training.job import JOB_FILE, RESULT_FILE, TrainingJob, read_result
from tasks.training.loop import CHECKPOINT_DIR
from tasks.training.trainer import Trainer, fit

log = logging.getLogger("tok1d")

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_MODULE = worker.__name__  # imported, so the worker is part of every training stage's code version


def process_count(runtime: RuntimeConfig, device: str) -> int:
    """runtime.processes, or one process per visible GPU when training on CUDA (else one)."""
    if runtime.processes is not None:
        if runtime.processes < 1:
            raise ValueError(f"runtime.processes must be >= 1, got {runtime.processes}")
        return runtime.processes
    return max(1, torch.cuda.device_count()) if device == "cuda" else 1


def run_training(ctx: StageContext, trainer: type[Trainer]) -> StageOutput:
    """Train (or resume) the stage's run with `trainer` and return the artifact's tables and summary."""
    job = TrainingJob.from_context(trainer, ctx)
    count = process_count(ctx.runtime, ctx.device)
    trainer.check(job, count)  # before starting workers that would all fail on it
    if count > 1:
        return launch_workers(job, count)
    output = fit(job, setup(ctx.runtime.device))
    assert output is not None  # a single process is the main one
    return output


# Resolved before any fork: between fork and exec the child may only make plain C calls.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # SIGTERM makes the torchrun agent stop its workers before it exits.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def launch_workers(job: TrainingJob, processes: int) -> StageOutput:
    """Run the job in `processes` torchrun workers and return the main worker's output."""
    job_path, result_path = job.work_dir / JOB_FILE, job.work_dir / RESULT_FILE
    job.work_dir.mkdir(parents=True, exist_ok=True)
    job.save(job_path)
    result_path.unlink(missing_ok=True)  # a result of an earlier run must not pass for this one's
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", WORKER_MODULE, str(job_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log.info("%s: starting %d workers: %s", job.stage, processes, " ".join(command))
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, preexec_fn=_die_with_parent)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:  # interrupted while waiting (e.g. KeyboardInterrupt): stop the workers
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    if code != 0 or not result_path.exists():
        raise RuntimeError(
            f"{job.stage}: the {processes} torchrun workers failed (exit code {code}); their output is above. "
            f"Rerunning resumes from the last checkpoint in {job.work_dir / CHECKPOINT_DIR}"
        )
    return read_result(result_path)

