"""The trainer interface every training stage implements, and `fit`, which drives one.

A trainer is one training process's state (model, EMA, optimizers, data) built from a
`TrainingJob`; `step` computes one training step on this process's rows of the global batch,
`export` writes the artifact's files once training is done. The shared loop
(`tasks.training.loop.train`) does everything between: schedule, checkpoints, exact resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from tasks.config import Section, TrainConfig
from tasks.allocator import reuse_freed_memory
from tasks.cores import ThreadGovernor
from tasks.stage import StageOutput
from tasks.training.data import EpochOrder
from tasks.training.distributed import Processes, barrier
from tasks.training.job import TrainingJob
from tasks.training.loop import TrainingResult, TrainingRun, train


def check_train_config(config: TrainConfig, section: str, world: int) -> None:
    """A clear error for a `train` section the loop cannot run with `world` processes."""
    if config.steps < 1:
        raise ValueError(f"{section}.train.steps must be >= 1, got {config.steps}")
    if config.batch_size < 1 or config.batch_size % world:
        raise ValueError(f"{section}.train.batch_size={config.batch_size} must be a positive multiple of the "
                         f"{world} training processes (runtime.processes)")
    if config.checkpoint_every < 1 or config.log_every < 1:
        raise ValueError(f"{section}.train.checkpoint_every and log_every must be >= 1")
    if len(config.betas) != 2:
        raise ValueError(f"{section}.train.betas must hold two numbers, got {config.betas}")


class Trainer(ABC):
    """One training process of a stage. Subclasses build, in `__init__`, the modules and
    optimizers that checkpoints hold (by name, unwrapped) and the data order of the train rows."""

    #: the stage's config section type; it has a `train: TrainConfig` field
    config_type: ClassVar[type[Section]]

    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    order: EpochOrder

    def __init__(self, job: TrainingJob, processes: Processes):
        self.job, self.config, self.processes = job, job.config, processes

    @classmethod
    def check(cls, job: TrainingJob, world: int) -> None:
        """Fail on a bad config before any process starts (the default checks the `train` section)."""
        check_train_config(job.config.train, job.section, world)

    @abstractmethod
    def step(self, rows: np.ndarray, step: int) -> dict[str, float]:
        """Train on this process's `rows` of the global batch of (0-based) `step`; returns the logs."""

    @abstractmethod
    def export(self, result: TrainingResult) -> StageOutput:
        """Write the artifact's files into `job.output_dir` (main process only); tables and summary."""

    def close(self) -> None:
        """Release what the trainer holds beyond memory (e.g. loader threads)."""

    def training_run(self) -> TrainingRun:
        return TrainingRun.from_config(self.job.stage, self.job.work_dir, self.config.train, self.modules,
                                       self.optimizers, self.processes, self.order, self.step)


def fit(job: TrainingJob, processes: Processes) -> StageOutput | None:
    """Train (or resume) this process's part of the job; the main process exports and returns the output."""
    threads = ThreadGovernor(job.stage, job.runtime.threads, share=processes.local_world)
    threads.start()
    if job.runtime.reuse_freed_memory:  # torchrun workers are processes of their own
        reuse_freed_memory()
    trainer = job.trainer_class()(job, processes)
    try:
        result = train(trainer.training_run(), on_step=threads.tick)
    finally:
        trainer.close()
    barrier(processes)  # every process has finished its last step before the main one exports
    return trainer.export(result) if processes.is_main else None
