"""Running one stage: plan (cache key + verified slot), execute, commit, record lineage.

Plain Python with no Prefect in it: flows/stage_task.py wraps `execute_stage` in a Prefect task
whose cache policy computes the same verified slot key (`plan_stage_run`), and passes the flow
run's id in, so lineage can point at the Prefect run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from tasks import lineage
from tasks.allocator import reuse_freed_memory
from tasks.cache import CacheSlot, git_revision, resolve_slot, stage_cache_key
from tasks.code_version import code_version
from tasks.config import RuntimeConfig, Section
from tasks.cores import ThreadGovernor
from tasks.fingerprints import record_commit, stat_folder
from tasks.hashing import hash_value
from tasks.leases import Lease
from tasks.progress import publish_summary_table
from tasks.registry import get_stage
from tasks.secrets import redact
from tasks.stage import Stage, StageContext
from tasks.store import Manifest, Store, exclusive_lock

log = logging.getLogger("tok1d")

# Set to a file path; a stage whose name is a line of that file fails (for tests of reruns).
FAULT_FILE_ENV = "TOK1D_FAULT_FILE"


@dataclass(frozen=True)
class StagePlan:
    """Where a stage run's output lives (or will): its verified cache slot and the key's parts."""

    stage: Stage
    config_hash: str
    code_version: str
    slot: CacheSlot


@dataclass(frozen=True)
class StageResult:
    manifest: Manifest
    cache_hit: bool
    stage_run_id: str


def stage_code_version(stage: Stage) -> str:
    """The hash of the stage's package and everything it imports within tasks/ and models/."""
    return code_version(stage.package, stage.extra_files)


def plan_stage_run(stage_name: str, section: Section, inputs: dict[str, Manifest], store: Store) -> StagePlan:
    """The cache slot of running `stage_name` on `section` and exactly these `inputs`.

    `inputs` are the outputs the stage reads in this run (`Stage.inputs` of the run's config):
    their artifact ids and names are part of the key.
    """
    stage = get_stage(stage_name)
    config_hash = section.digest()
    if stage.fingerprint is not None:
        config_hash = hash_value([config_hash, stage.fingerprint(section)])
    version = stage_code_version(stage)
    key = stage_cache_key(stage.name, version, config_hash, inputs)
    return StagePlan(stage, config_hash, version, resolve_slot(store, stage.name, key))


def _check_injected_fault(stage: str) -> None:
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if fault_file and Path(fault_file).exists():
        if stage in Path(fault_file).read_text().split():
            raise RuntimeError(f"injected fault in stage {stage} ({FAULT_FILE_ENV}={fault_file})")


def _event_fields(plan: StagePlan, run_id: str | None, flow_run_id: str | None, cache_hit: bool) -> dict:
    """The lineage fields every event of one stage run shares (a new stage run id, its start time)."""
    return dict(
        stage_run_id=lineage.new_id(),
        run_id=run_id,
        flow_run_id=flow_run_id,
        stage=plan.stage.name,
        cache_hit=cache_hit,
        cache_key=plan.slot.slot_key,
        config_hash=plan.config_hash,
        code_version=plan.code_version,
        git_revision=git_revision(),
        started_at=lineage.now(),
    )


def record_cache_hit(
    plan: StagePlan, manifest: Manifest, inputs: dict[str, Manifest], store: Store, run_id: str | None,
    flow_run_id: str | None = None,
) -> str:
    fields = _event_fields(plan, run_id, flow_run_id, cache_hit=True)
    lineage.record_stage_event(store, status="completed", ended_at=fields["started_at"], output=manifest,
                               inputs=inputs, **fields)
    return fields["stage_run_id"]


def execute_stage(
    stage_name: str,
    section: Section,
    inputs: dict[str, Manifest],
    store: Store,
    runtime: RuntimeConfig = RuntimeConfig(),
    run_id: str | None = None,
    flow_run_id: str | None = None,
) -> StageResult:
    """Return the stage's verified cached output, or compute, commit and record it."""
    plan = plan_stage_run(stage_name, section, inputs, store)
    if plan.slot.manifest is not None:
        log.info("%s: cache hit (%s)", stage_name, plan.slot.manifest.artifact_id)
        stage_run_id = record_cache_hit(plan, plan.slot.manifest, inputs, store, run_id, flow_run_id)
        return StageResult(plan.slot.manifest, True, stage_run_id)
    if runtime.node_rank > 0 and plan.stage.multinode is not None and plan.stage.multinode(section):
        return _follow_node_zero(plan, section, inputs, store, runtime, run_id, flow_run_id)

    locked_slot = plan.slot.slot_key
    work_dir = store.work_dir(stage_name, locked_slot)
    # One process at a time computes a given cache slot (others wait, then hit the cache).
    with store.slot_lock(stage_name, locked_slot):
        # Another process may have finished this very run while we waited for the lock.
        plan = plan_stage_run(stage_name, section, inputs, store)
        if plan.slot.manifest is not None:
            stage_run_id = record_cache_hit(plan, plan.slot.manifest, inputs, store, run_id, flow_run_id)
            return StageResult(plan.slot.manifest, True, stage_run_id)
        if plan.slot.slot_key == locked_slot:
            return _compute(plan, section, inputs, store, runtime, run_id, flow_run_id, work_dir)
    # The slot moved on while we waited (the other run was recorded incomplete): start over.
    return execute_stage(stage_name, section, inputs, store, runtime, run_id, flow_run_id)


def _follow_node_zero(
    plan: StagePlan,
    section: Section,
    inputs: dict[str, Manifest],
    store: Store,
    runtime: RuntimeConfig,
    run_id: str | None,
    flow_run_id: str | None,
) -> StageResult:
    """Node K > 0 of a multi-node stage: train beside node 0, then return the artifact node 0 commits.

    Node 0's stage holds the slot's lock from before its torchrun agent starts until it has
    committed, so this node must not wait for the lock first: node 0's rendezvous waits for it.
    Its workers write only into the shared work dir (the main worker, global rank 0, may be one
    of them: c10d numbers the nodes itself); node 0 alone commits and records the computed run.
    Afterwards the lock is free once node 0 has committed or failed, and this node records the
    artifact as a cache hit, like any run that waited for another process to compute its slot.
    """
    stage = plan.stage
    work_dir = store.work_dir(stage.name, plan.slot.slot_key)
    _check_injected_fault(stage.name)
    stage.run(StageContext(stage.name, section, inputs, store, runtime, plan.slot.slot_key, work_dir))
    with exclusive_lock(work_dir / ".lock"):
        plan = plan_stage_run(stage.name, section, inputs, store)
    if plan.slot.manifest is None:
        raise RuntimeError(
            f"{stage.name}: node {runtime.node_rank} finished training but node 0 committed no artifact to "
            f"{store.root} (see node 0's log); run the stage on every node again to resume from the checkpoints"
        )
    stage_run_id = record_cache_hit(plan, plan.slot.manifest, inputs, store, run_id, flow_run_id)
    return StageResult(plan.slot.manifest, True, stage_run_id)


def _compute(
    plan: StagePlan,
    section: Section,
    inputs: dict[str, Manifest],
    store: Store,
    runtime: RuntimeConfig,
    run_id: str | None,
    flow_run_id: str | None,
    work_dir: Path,
) -> StageResult:
    stage = plan.stage
    stage_name = stage.name
    common = _event_fields(plan, run_id, flow_run_id, cache_hit=False)
    stage_run_id, started = common["stage_run_id"], common["started_at"]
    # Held until the end event is written: a process that dies holding it is found and recorded
    # killed. Taken before the `running` event, so no kill leaves that event without a lease.
    with Lease(store, "stage", stage_run_id, common) as lease:
        lineage.record_stage_event(store, status="running", **common)
        context = StageContext(stage_name, section, inputs, store, runtime, plan.slot.slot_key, work_dir)
        if "torch" in sys.modules:  # a run of ingest or caption alone never imports torch
            ThreadGovernor(stage_name, runtime.threads).start()
            if runtime.reuse_freed_memory:
                reuse_freed_memory()
        try:
            _check_injected_fault(stage_name)
            output = stage.run(context)
            for leftover in list(context.output_dir.rglob(".*")):
                # Temporary files of interrupted writes never become part of an artifact.
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            # Taken before the commit hashes the files: what later cache hits compare with.
            before = stat_folder(context.output_dir)
            manifest = store.commit_artifact(
                stage_name,
                context.output_dir,
                tables=output.tables,
                config_hash=plan.config_hash,
                cache_key=plan.slot.slot_key,
                code_version=plan.code_version,
                summary=output.summary,
            )
            record_commit(store, manifest, before)
            store.write_cache_record(stage_name, plan.slot.key, plan.slot.slot, manifest, complete=output.complete)
        except BaseException as error:
            message = redact("".join(traceback.format_exception_only(type(error), error)).strip())
            try:
                lineage.record_stage_event(store, status="failed", ended_at=lineage.now(), error=message, **common)
            except OSError as unrecorded:  # the disk that failed the stage fails its record too
                log.warning("%s: could not record the failure in lineage (%s); the next run or `tok1d gc` "
                            "records this stage run as killed", stage_name, unrecorded)
                lease.keep()
            raise
        shutil.rmtree(work_dir, ignore_errors=True)
        lineage.record_train_steps(store, stage_run_id, run_id, manifest)
        lineage.record_stage_event(
            store, status="completed", ended_at=lineage.now(), output=manifest, inputs=inputs, **common
        )
        publish_summary_table(stage_name, {"artifact": manifest.artifact_id, "rows": manifest.rows, **manifest.summary})
        log.info("%s: done in %.1fs -> %s", stage_name, (lineage.now() - started).total_seconds(), manifest.root)
    return StageResult(manifest, False, stage_run_id)
