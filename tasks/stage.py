"""The stage contract: what a stage declares (`Stage`), what it is given (`StageContext`) and what
it returns (`StageOutput`).

A leaf: it imports nothing of the pipeline beyond the store and progress helpers, so every stage
module can import it without pulling in the runner, the registry or Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tasks.progress import Progress
from tasks.store import Manifest, Store, TableRecord


@dataclass
class StageOutput:
    """What a stage's run function returns: tables written into `ctx.output_dir` and a summary."""

    tables: dict[str, TableRecord]
    summary: dict[str, Any] = field(default_factory=dict)
    # False when some records are still missing (e.g. captions that failed and should be
    # retried): the output is handed on in this run, but the next run computes again.
    complete: bool = True


@dataclass
class StageContext:
    """Everything a stage may use: its own config section, its input manifests, the store."""

    stage: str
    config: Any
    inputs: dict[str, Manifest]
    store: Store
    runtime: Any  # tasks.config.RuntimeConfig: how to run, never part of a cache key
    cache_key: str
    work_dir: Path

    @property
    def output_dir(self) -> Path:
        """Where the stage writes its final files; survives a kill so a rerun can resume."""
        path = self.work_dir / "output"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, total: int | None, desc: str, unit: str = "it", initial: int = 0) -> Progress:
        return Progress(self.stage, total, desc, unit=unit, initial=initial)

    @property
    def device(self) -> str:
        import torch  # only stages that compute on a device pay for torch

        if self.runtime.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.runtime.device


def fixed_inputs(*names: str) -> Callable[[Any], tuple[str, ...]]:
    """`Stage.inputs` for a stage that always reads the same upstream outputs."""
    return lambda _config: names


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its name, its config section, the outputs it reads, how it runs.

    `inputs` maps the run's `PipelineConfig` to the upstream stages whose outputs this stage
    reads: a tokenizer without text reads no captions, so editing captions cannot invalidate it.
    The stage's code version is computed from the import closure of its package (see
    tasks/code_version.py); `extra_files` names files outside the Python imports that its
    output depends on (paths relative to the repository root).
    """

    name: str
    description: str
    config: type  # the stage's config Section; the preset key is the name with "_" for "-"
    inputs: Callable[[Any], tuple[str, ...]]
    run: Callable[[StageContext], StageOutput]
    # What the stage reads from outside the store (e.g. an image folder), as a short hash: part
    # of the cache key, so changed source files are ingested again.
    fingerprint: Callable[[Any], str] | None = None
    # Raises ValueError, naming the key, for a section the stage cannot run with (e.g. a plug-in
    # name missing from its table); called when the config loads, before any stage runs.
    check: Callable[[Any], None] | None = None
    extra_files: tuple[str, ...] = ()
    # The module or package whose import closure is the stage's code; None = the package of `run`.
    code: str | None = None
    # True (for a section) when a run on several nodes (runtime.nnodes > 1) runs this stage on
    # every node: torchrun training whose nodes join one rendezvous, node 0 committing. Other
    # stages run once, on whichever node takes the slot's lock first; the rest find it cached.
    multinode: Callable[[Any], bool] | None = None

    @property
    def package(self) -> str:
        return self.code or self.run.__module__.rsplit(".", 1)[0]

    @property
    def section_key(self) -> str:
        return self.name.replace("-", "_")
