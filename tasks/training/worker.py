"""torchrun entry point of every training stage: one process of a DDP training run.

    python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.training.worker JOB.json

(on several nodes `--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT` for `--standalone`).
JOB.json is written by `tasks.training.launch.launch_workers` and names the trainer class; the
main process (global rank 0, on any node) writes result.json next to it, and its log lines to
worker-log.jsonl for the stage's process to show (tasks/training/worker_logs.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.training.distributed import setup, teardown
from tasks.training.job import RESULT_FILE, TrainingJob, write_result
from tasks.training.trainer import fit
from tasks.training.worker_logs import LOG_FILE, send_lines_to


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tasks.training.worker JOB.json (started by torchrun)", file=sys.stderr)
        return 2
    job_path = Path(argv[0])
    job = TrainingJob.load(job_path)
    processes = setup(job.runtime.device)
    if processes.is_main:
        send_lines_to(job_path.parent / LOG_FILE)
    try:
        output = fit(job, processes)
        if output is not None:
            write_result(job_path.parent / RESULT_FILE, output)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
