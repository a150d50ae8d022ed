"""Run the pipeline's stages in order inside a Prefect flow and record the run in lineage."""

from __future__ import annotations

import logging

from flows.stage_task import current_flow_run_id, run_stage_in_flow
from tasks import lineage
from tasks.cache import git_revision
from tasks.pipeline_config import PipelineConfig
from tasks.registry import STAGE_ORDER, get_stage
from tasks.runner import StageResult
from tasks.store import Store

log = logging.getLogger("tok1d")


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


def run_pipeline(
    config: PipelineConfig, store: Store, *, preset: str, flow: str, until: str | None = None
) -> dict[str, StageResult]:
    run_id = lineage.new_id()
    started = lineage.now()
    record = dict(
        run_id=run_id,
        flow_run_id=current_flow_run_id(),
        flow=flow,
        preset=preset,
        config_hash=config.digest(),
        git_revision=git_revision(),
        started_at=started,
        config=config.model_dump_json(),
    )
    lineage.ensure_database(store)
    lineage.record_run(store, status="running", **record)
    results: dict[str, StageResult] = {}
    try:
        for name in stages_to_run(config, until):
            inputs = {upstream: results[upstream].manifest for upstream in get_stage(name).inputs(config)}
            results[name] = run_stage_in_flow(name, config.section(name), inputs, store, config.runtime, run_id)
    except BaseException as error:
        lineage.record_run(store, status="failed", ended_at=lineage.now(), error=repr(error), **record)
        raise
    lineage.record_run(store, status="completed", ended_at=lineage.now(), **record)
    return results
