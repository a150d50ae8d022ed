"""torchrun entry point of the train-tokenizer stage: one process of a DDP training run.

    python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.train_tokenizer.worker JOB.json

JOB.json is written by `launch_workers`; the main process (rank 0) writes result.json next to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tasks.store import write_json
from tasks.train_tokenizer.stage import RESULT_FILE, TrainJob, fit
from tasks.training.distributed import setup, teardown


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tasks.train_tokenizer.worker JOB.json (started by torchrun)", file=sys.stderr)
        return 2
    job_path = Path(argv[0])
    job = TrainJob.from_json(job_path.read_text())
    if job.runtime.threads:
        torch.set_num_threads(job.runtime.threads)
    processes = setup(job.runtime.device)
    try:
        result = fit(job, processes)
        if result is not None:
            write_json(job_path.parent / RESULT_FILE, result)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
