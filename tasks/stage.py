"""Running one stage: plan (cache key + verified slot), execute, commit, record lineage.

`execute_stage` is the plain function; `stage_task` is its thin Prefect task wrapper whose
cache policy computes the same verified key, so a Prefect cache hit is always an intact artifact.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tasks import lineage
from tasks.cache import CacheSlot, StageCachePolicy, code_version, git_revision, resolve_slot, stage_cache_key
from tasks.config import RuntimeConfig, Section
from tasks.hashing import hash_value
from tasks.progress import Progress, publish_summary_table
from tasks.secrets import redact
from pydantic import BaseModel

from tasks.store import Manifest, Store, TableRecord

log = logging.getLogger("tok1d")

# Set to a file path; a stage whose name is a line of that file fails (for tests of reruns).
FAULT_FILE_ENV = "TOK1D_FAULT_FILE"


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
    runtime: RuntimeConfig
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
        import torch

        if self.runtime.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.runtime.device


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its name, the stages it reads, the modules its output depends on."""

    name: str
    description: str
    inputs: tuple[str, ...]
    code: tuple[str, ...]
    run: Callable[[StageContext], StageOutput]
    # What the stage reads from outside the store (e.g. an image folder), as a short hash: part
    # of the cache key, so changed source files are ingested again.
    fingerprint: Callable[[Any], str] | None = None


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    config_hash: str
    code_version: str
    slot: CacheSlot


@dataclass(frozen=True)
class StageResult:
    manifest: Manifest
    cache_hit: bool
    stage_run_id: str


def plan_stage_run(stage_name: str, section: Section, inputs: dict[str, Manifest], store: Store) -> StagePlan:
    from tasks.registry import get_stage

    stage = get_stage(stage_name)
    missing = set(stage.inputs) - set(inputs)
    if missing:
        raise ValueError(f"stage {stage_name} needs the outputs of {sorted(missing)}")
    config_hash = section.digest()
    if stage.fingerprint is not None:
        config_hash = hash_value([config_hash, stage.fingerprint(section)])
    version = code_version(stage.code)
    key = stage_cache_key(stage.name, version, config_hash, {name: inputs[name] for name in stage.inputs})
    return StagePlan(stage, config_hash, version, resolve_slot(store, stage.name, key))


def _check_injected_fault(stage: str) -> None:
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if fault_file and Path(fault_file).exists():
        if stage in Path(fault_file).read_text().split():
            raise RuntimeError(f"injected fault in stage {stage} ({FAULT_FILE_ENV}={fault_file})")


def _current_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def record_cache_hit(
    plan: StagePlan, manifest: Manifest, inputs: dict[str, Manifest], store: Store, run_id: str | None
) -> str:
    stage_run_id = lineage.new_id()
    moment = lineage.now()
    lineage.record_stage_event(
        store,
        stage_run_id=stage_run_id,
        run_id=run_id,
        flow_run_id=_current_flow_run_id(),
        stage=plan.stage.name,
        status="completed",
        cache_hit=True,
        cache_key=plan.slot.slot_key,
        config_hash=plan.config_hash,
        code_version=plan.code_version,
        git_revision=git_revision(),
        started_at=moment,
        ended_at=moment,
        output=manifest,
        inputs=inputs,
    )
    return stage_run_id


def execute_stage(
    stage_name: str,
    section: Section,
    inputs: dict[str, Manifest],
    store: Store,
    runtime: RuntimeConfig = RuntimeConfig(),
    run_id: str | None = None,
) -> StageResult:
    """Return the stage's verified cached output, or compute, commit and record it."""
    plan = plan_stage_run(stage_name, section, inputs, store)
    stage = plan.stage
    stage_inputs = {name: inputs[name] for name in stage.inputs}
    if plan.slot.manifest is not None:
        log.info("%s: cache hit (%s)", stage_name, plan.slot.manifest.artifact_id)
        stage_run_id = record_cache_hit(plan, plan.slot.manifest, stage_inputs, store, run_id)
        return StageResult(plan.slot.manifest, True, stage_run_id)

    locked_slot = plan.slot.slot_key
    work_dir = store.work_dir(stage_name, locked_slot)
    with _exclusive(work_dir / ".lock"):
        # Another process may have finished this very run while we waited for the lock.
        plan = plan_stage_run(stage_name, section, inputs, store)
        if plan.slot.manifest is not None:
            stage_run_id = record_cache_hit(plan, plan.slot.manifest, stage_inputs, store, run_id)
            return StageResult(plan.slot.manifest, True, stage_run_id)
        if plan.slot.slot_key == locked_slot:
            return _compute(plan, section, stage_inputs, store, runtime, run_id, work_dir)
    # The slot moved on while we waited (the other run was recorded incomplete): start over.
    return execute_stage(stage_name, section, inputs, store, runtime, run_id)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One process at a time computes a given cache slot (others wait, then hit the cache)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compute(
    plan: StagePlan,
    section: Section,
    stage_inputs: dict[str, Manifest],
    store: Store,
    runtime: RuntimeConfig,
    run_id: str | None,
    work_dir: Path,
) -> StageResult:
    stage = plan.stage
    stage_name = stage.name
    stage_run_id = lineage.new_id()
    started = lineage.now()
    common = dict(
        stage_run_id=stage_run_id,
        run_id=run_id,
        flow_run_id=_current_flow_run_id(),
        stage=stage_name,
        cache_hit=False,
        cache_key=plan.slot.slot_key,
        config_hash=plan.config_hash,
        code_version=plan.code_version,
        git_revision=git_revision(),
        started_at=started,
    )
    lineage.record_stage_event(store, status="running", **common)
    context = StageContext(stage_name, section, stage_inputs, store, runtime, plan.slot.slot_key, work_dir)
    if runtime.threads:
        import torch

        torch.set_num_threads(runtime.threads)
    try:
        _check_injected_fault(stage_name)
        output = stage.run(context)
        for leftover in list(context.output_dir.rglob(".*")):
            # Temporary files of interrupted writes never become part of an artifact.
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        manifest = store.commit_artifact(
            stage_name,
            context.output_dir,
            tables=output.tables,
            config_hash=plan.config_hash,
            cache_key=plan.slot.slot_key,
            code_version=plan.code_version,
            summary=output.summary,
        )
        store.write_cache_record(stage_name, plan.slot.key, plan.slot.slot, manifest, complete=output.complete)
    except BaseException as error:
        message = redact("".join(traceback.format_exception_only(type(error), error)).strip())
        lineage.record_stage_event(store, status="failed", ended_at=lineage.now(), error=message, **common)
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    lineage.record_stage_event(
        store, status="completed", ended_at=lineage.now(), output=manifest, inputs=stage_inputs, **common
    )
    publish_summary_table(stage_name, {"artifact": manifest.artifact_id, "rows": manifest.rows, **manifest.summary})
    log.info("%s: done in %.1fs -> %s", stage_name, (lineage.now() - started).total_seconds(), manifest.root)
    return StageResult(manifest, False, stage_run_id)


# ---------------------------------------------------------------------------- Prefect


class StageTaskResult(BaseModel):
    """What the Prefect task returns (and persists): the manifest and whether it was a hit."""

    manifest: Manifest
    cache_hit: bool


def _stage_task_fn(
    stage: str,
    section: Section,
    inputs: dict[str, Manifest],
    store_root: str,
    runtime: RuntimeConfig,
    run_id: str | None,
) -> StageTaskResult:
    result = execute_stage(stage, section, inputs, Store(store_root), runtime, run_id)
    return StageTaskResult(manifest=result.manifest, cache_hit=result.cache_hit)


def result_storage_block(store: Store) -> str:
    """A saved LocalFileSystem block for the store's Prefect results (Prefect needs it saved).

    Results live in the store, so every process and worker sharing the store shares the hits.
    """
    from prefect.filesystems import LocalFileSystem

    name = f"tok1d-results-{hash_value(str(store.results_dir))[:12]}"
    try:
        LocalFileSystem.load(name)
    except ValueError:
        try:
            LocalFileSystem(basepath=str(store.results_dir)).save(name, overwrite=True)
        except Exception:  # a concurrent process saved it first
            LocalFileSystem.load(name)
    return f"local-file-system/{name}"


def make_stage_task(store: Store):
    """The Prefect task running one stage, with results stored in (and shared through) the store."""
    from prefect import task

    return task(
        _stage_task_fn,
        name="stage",
        task_run_name="{stage}",
        cache_policy=StageCachePolicy(),
        persist_result=True,
        result_serializer="json",
        result_storage=result_storage_block(store),
    )


def run_stage_in_flow(
    stage_name: str,
    section: Section,
    inputs: dict[str, Manifest],
    store: Store,
    runtime: RuntimeConfig,
    run_id: str | None,
) -> StageResult:
    """Submit the stage task; when Prefect answers from its cache, record that hit in lineage."""
    state = make_stage_task(store)(
        stage_name, section, inputs, str(store.root), runtime, run_id, return_state=True
    )
    outcome = state.result()  # raises the stage's exception if it failed
    if isinstance(outcome, dict):
        outcome = StageTaskResult.model_validate(outcome)
    if state.name == "Cached":
        plan = plan_stage_run(stage_name, section, inputs, store)
        stage_inputs = {name: inputs[name] for name in plan.stage.inputs}
        stage_run_id = record_cache_hit(plan, outcome.manifest, stage_inputs, store, run_id)
        return StageResult(outcome.manifest, True, stage_run_id)
    return StageResult(outcome.manifest, outcome.cache_hit, "")
