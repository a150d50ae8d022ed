"""The two files a launcher and its torchrun workers exchange: the job and the result.

The job (`job.json`) is what one training process needs. It names its trainer class by import
path ("package.module:Class"), so one torchrun entry (`tasks.training.worker`) runs every
stage's trainer, and the trainer's `config_type` parses the config section back. The result
(`result.json`) is the main process's `StageOutput`: table records and the summary.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from tasks.config import RuntimeConfig, Section
from tasks.stage import StageContext, StageOutput
from tasks.store import Manifest, Store, TableRecord, read_json, write_json

JOB_FILE = "job.json"
RESULT_FILE = "result.json"


# Trainer classes are typed `type` here: tasks.training.trainer imports this module.
def trainer_path(trainer: type) -> str:
    return f"{trainer.__module__}:{trainer.__qualname__}"


def import_trainer(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class TrainingJob:
    """One training run of a stage: its trainer, config section, inputs and folders."""

    trainer: str  # import path of the Trainer subclass
    stage: str
    config: Section
    inputs: dict[str, Manifest]
    store_root: str
    runtime: RuntimeConfig
    work_dir: Path  # checkpoints and the loss log: what a rerun resumes from
    output_dir: Path  # the artifact's files

    @classmethod
    def from_context(cls, trainer: type, ctx: StageContext) -> TrainingJob:
        return cls(trainer_path(trainer), ctx.stage, ctx.config, dict(ctx.inputs), str(ctx.store.root), ctx.runtime,
                   Path(ctx.work_dir), ctx.output_dir)

    @property
    def store(self) -> Store:
        return Store(self.store_root)

    @property
    def section(self) -> str:
        """The config section's name, for error messages: train-tokenizer -> train_tokenizer."""
        return self.stage.replace("-", "_")

    def trainer_class(self) -> type:
        return import_trainer(self.trainer)

    def save(self, path: Path) -> None:
        write_json(path, {
            "trainer": self.trainer,
            "stage": self.stage,
            "config": self.config.model_dump(mode="json"),
            "inputs": {name: manifest.model_dump(mode="json") for name, manifest in self.inputs.items()},
            "store_root": self.store_root,
            "runtime": self.runtime.model_dump(mode="json"),
            "work_dir": str(self.work_dir),
            "output_dir": str(self.output_dir),
        })

    @classmethod
    def load(cls, path: Path) -> TrainingJob:
        raw = read_json(Path(path))
        config_type = import_trainer(raw["trainer"]).config_type
        return cls(
            trainer=raw["trainer"],
            stage=raw["stage"],
            config=config_type.model_validate(raw["config"]),
            inputs={name: Manifest.model_validate(value) for name, value in raw["inputs"].items()},
            store_root=raw["store_root"],
            runtime=RuntimeConfig.model_validate(raw["runtime"]),
            work_dir=Path(raw["work_dir"]),
            output_dir=Path(raw["output_dir"]),
        )


def write_result(path: Path, output: StageOutput) -> None:
    tables = {name: record.model_dump(mode="json") for name, record in output.tables.items()}
    write_json(path, {"tables": tables, "summary": output.summary})


def read_result(path: Path) -> StageOutput:
    raw = read_json(path)
    tables = {name: TableRecord.model_validate(record) for name, record in raw["tables"].items()}
    return StageOutput(tables=tables, summary=raw["summary"])
