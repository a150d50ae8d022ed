"""The one training harness of every training stage.

    launch.py       run a trainer in the stage's process or as torchrun workers (die with the stage)
    worker.py       the torchrun entry: JOB.json -> the named trainer -> result.json
    job.py          the job and result files a launcher and its workers exchange
    trainer.py      the `Trainer` interface (step, export) and `fit`, which drives one
    loop.py         the loop: schedule, exact resume, loss log; per-step seeds, autocast, optimize
    checkpoint.py   atomic safetensors + JSON checkpoints
    export.py       atomic weight files and copies into the stage's output
    data.py         deterministic, shard-aware epoch order;  distributed.py  process group setup
"""
