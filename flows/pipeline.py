"""Run the pipeline's stages in order inside a Prefect flow and record the run in lineage."""

from __future__ import annotations

import logging

from tasks import lineage
from tasks.cache import git_revision
from tasks.config import STAGE_ORDER, PipelineConfig
from tasks.registry import get_stage
from tasks.stage import StageResult, run_stage_in_flow
from tasks.store import Store

log = logging.getLogger("tok1d")


def stages_to_run(config: PipelineConfig, until: str | None = None) -> list[str]:
    """The preset's stages in pipeline order; with `until`, that stage and what it needs."""
    if until is None:
        return [stage for stage in STAGE_ORDER if stage in config.stages]
    needed: list[str] = []

    def visit(name: str) -> None:
        for upstream in get_stage(name).inputs:
            visit(upstream)
        if name not in needed:
            needed.append(name)

    visit(until)
    return [stage for stage in STAGE_ORDER if stage in needed]


def run_pipeline(
    config: PipelineConfig, store: Store, *, preset: str, flow: str, until: str | None = None
) -> dict[str, StageResult]:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
    run_id = lineage.new_id()
    started = lineage.now()
    record = dict(
        run_id=run_id,
        flow_run_id=flow_run_id,
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
            stage = get_stage(name)
            missing = [upstream for upstream in stage.inputs if upstream not in results]
            if missing:
                raise ValueError(f"stage {name} needs {missing}; add them to `stages` in the preset")
            inputs = {upstream: results[upstream].manifest for upstream in stage.inputs}
            results[name] = run_stage_in_flow(name, config.section(name), inputs, store, config.runtime, run_id)
    except BaseException as error:
        lineage.record_run(store, status="failed", ended_at=lineage.now(), error=repr(error), **record)
        raise
    lineage.record_run(store, status="completed", ended_at=lineage.now(), **record)
    return results
