"""Running a stage's trainer: in the stage's own process, or as torchrun workers.

One process trains in place. Several (`runtime.processes`, or one per visible GPU) run as

    python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.training.worker JOB.json

with the torchrun agent tied to the stage process (it gets SIGTERM when the stage dies), so a
killed stage never leaves workers writing into the work folder that a rerun resumes from.

On several nodes (`runtime.nnodes`) every node's stage starts an agent with `--nnodes M
--rdzv-backend c10d --rdzv-endpoint HOST:PORT` instead of `--standalone`; the agents meet there
and number the workers themselves, so the main worker (global rank 0), which writes the output
and result.json, may run on any node: the work folder must be on the store all nodes share.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from tasks.config import RuntimeConfig
from tasks.stage import StageContext, StageOutput
from tasks.training import worker
from tasks.training.distributed import setup
from tasks.training.job import JOB_FILE, RESULT_FILE, TrainingJob, read_result
from tasks.training.loop import CHECKPOINT_DIR
from tasks.training.trainer import Trainer, fit
from tasks.training.worker_logs import LOG_FILE, following

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
    trainer.check(job, count * ctx.runtime.nnodes)  # before starting workers that would all fail on it
    if count * ctx.runtime.nnodes > 1:
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


def torchrun_arguments(runtime: RuntimeConfig, processes: int, default_rdzv_id: str) -> list[str]:
    """How this node's torchrun agent finds the job's other agents (none on a single node)."""
    if runtime.nnodes == 1:
        return ["--standalone", f"--nproc-per-node={processes}"]
    # No --node-rank: c10d ignores it (torchrun warns); node_rank only says which stage commits.
    return [f"--nnodes={runtime.nnodes}", f"--nproc-per-node={processes}", f"--rdzv-backend={runtime.rdzv_backend}",
            f"--rdzv-endpoint={runtime.rdzv_endpoint}", f"--rdzv-id={runtime.rdzv_id or default_rdzv_id}"]


def launch_workers(job: TrainingJob, processes: int) -> StageOutput:
    """Run the job in `processes` torchrun workers on this node and return the main worker's
    output; on a node other than node 0 return an empty output (node 0 commits the run's)."""
    node = job.runtime.node_rank
    # One job file per node: the nodes share the work folder, and their runtimes differ.
    job_path = job.work_dir / (JOB_FILE if node == 0 else f"node-{node}-{JOB_FILE}")
    result_path = job.work_dir / RESULT_FILE
    job.work_dir.mkdir(parents=True, exist_ok=True)
    job.save(job_path)
    if node == 0:  # before the rendezvous, so no worker of this run has written one yet
        result_path.unlink(missing_ok=True)  # a result of an earlier run must not pass for this one's
    rdzv_id = f"{job.stage}-{job.work_dir.name}"  # the cache slot's work folder: the same on every node
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_arguments(job.runtime, processes, rdzv_id),
               "-m", WORKER_MODULE, str(job_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log.info("%s: starting %d workers: %s", job.stage, processes, " ".join(command))
    # Node 0's stage shows the main worker's lines (it may run on any node: the folder is shared).
    with following(job.work_dir / LOG_FILE) if node == 0 else nullcontext():
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
    elsewhere = " (and on the other nodes)" if job.runtime.nnodes > 1 else ""
    if code != 0:
        raise RuntimeError(
            f"{job.stage}: the {processes} torchrun workers failed (exit code {code}); their output is above"
            f"{elsewhere}. Rerunning resumes from the last checkpoint in {job.work_dir / CHECKPOINT_DIR}"
        )
    if node > 0:
        # Not result.json: node 0's stage may already have committed and removed the work folder.
        return StageOutput(tables={})
    if not result_path.exists():
        shared = " (with several nodes the store must be one folder all nodes share)" if elsewhere else ""
        raise RuntimeError(f"{job.stage}: the {processes} torchrun workers finished without writing {result_path}"
                           f"{shared}. Rerunning resumes from the last checkpoint in {job.work_dir / CHECKPOINT_DIR}")
    return read_result(result_path)

