"""What a run of the pipeline consists of, and the answer to a run whose every stage is cached.

A fully cached run needs no orchestrator: each stage's verified cache slot already names its
artifact. Starting Prefect's ephemeral server for it costs ~10 s of a ~15 s warm rerun, so
`tok1d run` / `tok1d stage` plan the run here first (no Prefect import) and, when every stage is a
verified hit, record the run and its cache hits in lineage exactly as the flow would and print
the same table. Anything to compute, or `--flow`, goes through the Prefect flow as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.reconcile import reconcile
from tasks import lineage
from tasks.cache import git_revision
from tasks.leases import Lease
from tasks.pipeline_config import PipelineConfig
from tasks.registry import STAGE_ORDER, get_stage
from tasks.runner import StagePlan, StageResult, plan_stage_run, record_cache_hit
from tasks.store import Manifest, Store


def stages_to_run(config: PipelineConfig, until: str | None = None) -> list[str]:
    """The preset's stages (or, with `until`, that stage) and every stage they read, in pipeline order.

    What a stage reads depends on the config (a text-free tokenizer reads no captions), so a
    preset lists the stages it wants and the run adds their inputs.
    """
    needed: list[str] = []

    def visit(name: str) -> None:
        for upstream in get_stage(name).inputs(config):
            visit(upstream)
        if name not in needed:
            needed.append(name)

    for name in [until] if until is not None else config.stages:
        visit(name)
    return [stage for stage in STAGE_ORDER if stage in needed]


def run_record(
    config: PipelineConfig, *, preset: str, flow: str, flow_run_id: str | None, overrides: list[str] | None = None
) -> dict:
    """The fields every lineage record of one run shares (a new run id, its start time)."""
    return dict(
        run_id=lineage.new_id(),
        flow_run_id=flow_run_id,
        flow=flow,
        preset=preset,
        config_hash=config.digest(),
        git_revision=git_revision(),
        started_at=lineage.now(),
        config=config.model_dump_json(),
        overrides=list(overrides or []),  # the `--set` list, as given: what the run changed from its preset
    )


@dataclass(frozen=True)
class CachedStage:
    """A stage of the run whose verified cache slot holds its artifact, and the inputs it read."""

    name: str
    plan: StagePlan
    inputs: dict[str, Manifest]

    @property
    def manifest(self) -> Manifest:
        assert self.plan.slot.manifest is not None
        return self.plan.slot.manifest


def plan_cached_run(config: PipelineConfig, store: Store, until: str | None = None) -> list[CachedStage] | None:
    """Every stage of the run as a verified cache hit, in order; None as soon as one is not."""
    cached: dict[str, CachedStage] = {}
    for name in stages_to_run(config, until):
        inputs = {upstream: cached[upstream].manifest for upstream in get_stage(name).inputs(config)}
        plan = plan_stage_run(name, config.section(name), inputs, store)
        if plan.slot.manifest is None:
            return None
        cached[name] = CachedStage(name, plan, inputs)
    return list(cached.values())


def record_cached_run(
    config: PipelineConfig, store: Store, stages: list[CachedStage], *, preset: str, flow: str,
    overrides: list[str] | None = None,
) -> dict[str, StageResult]:
    """Record a run answered from the cache (no flow run) and its stages' hits in lineage."""
    record = run_record(config, preset=preset, flow=flow, flow_run_id=None, overrides=overrides)
    lineage.ensure_database(store)
    reconcile(store, found_by=f"run {record['run_id']}")
    results = {}
    with Lease(store, "run", record["run_id"], record):  # before `running`: a kill is always found
        lineage.record_run(store, status="running", **record)
        for stage in stages:
            stage_run_id = record_cache_hit(stage.plan, stage.manifest, stage.inputs, store, record["run_id"])
            results[stage.name] = StageResult(stage.manifest, True, stage_run_id)
        lineage.record_run(store, status="completed", ended_at=lineage.now(), **record)
    return results


def summaries(results: dict[str, StageResult]) -> dict[str, dict]:
    """What a flow returns per stage: its artifact, rows, whether it was a hit, its summary."""
    return {
        name: {"artifact": r.manifest.root, "rows": r.manifest.rows, "cache_hit": r.cache_hit, **r.manifest.summary}
        for name, r in results.items()
    }
