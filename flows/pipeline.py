"""Run the pipeline's stages in order inside a Prefect flow and record the run in lineage."""

from __future__ import annotations

import logging

from flows.fanout import local_ray_per_run
from flows.reconcile import reconcile
from flows.run_logs import tok1d_logs_in_flow_run
from flows.run_plan import run_record, stages_to_run
from flows.stage_task import current_flow_run_id, run_stage_in_flow
from flows.status import ARTIFACT_METRICS_SQL
from flows.ui import publish_run_metrics
from tasks import lineage
from tasks.pipeline_config import PipelineConfig
from tasks.leases import Lease
from tasks.registry import get_stage
from tasks.runner import StageResult
from tasks.store import Store

log = logging.getLogger("tok1d")


def run_pipeline(
    config: PipelineConfig, store: Store, *, preset: str, flow: str, until: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, StageResult]:
    with tok1d_logs_in_flow_run(), local_ray_per_run():
        results = _run_stages(config, store, preset=preset, flow=flow, until=until, overrides=overrides)
        _publish_headline(store, results)
    return results


def _run_stages(
    config: PipelineConfig, store: Store, *, preset: str, flow: str, until: str | None, overrides: list[str] | None
) -> dict[str, StageResult]:
    record = run_record(config, preset=preset, flow=flow, flow_run_id=current_flow_run_id(), overrides=overrides)
    run_id = record["run_id"]
    lineage.ensure_database(store)
    reconcile(store, found_by=f"run {run_id}")
    results: dict[str, StageResult] = {}
    with Lease(store, "run", run_id, record) as lease:  # before `running`: a kill is always found
        lineage.record_run(store, status="running", **record)
        try:
            for name in stages_to_run(config, until):
                inputs = {upstream: results[upstream].manifest for upstream in get_stage(name).inputs(config)}
                results[name] = run_stage_in_flow(name, config.section(name), inputs, store, config.runtime, run_id)
        except BaseException as error:
            try:
                lineage.record_run(store, status="failed", ended_at=lineage.now(), error=repr(error), **record)
            except OSError as unrecorded:  # a full disk: the next reconcile records it as killed
                log.warning("could not record the run's failure in lineage (%s)", unrecorded)
                lease.keep()
            raise
        lineage.record_run(store, status="completed", ended_at=lineage.now(), **record)
    return results


def _publish_headline(store: Store, results: dict[str, StageResult]) -> None:
    """The run's headline metrics (what `tok1d run` ends with) as a table of the flow run."""
    try:
        connection = lineage.connect(store)
        try:
            artifacts = [result.manifest.artifact_id for result in results.values()]
            rows = connection.execute(ARTIFACT_METRICS_SQL, {"artifacts": artifacts}).fetchall()
        finally:
            connection.close()
    except Exception as error:  # the run is recorded and complete; a table in the UI is not worth failing it
        log.warning("could not read the run's metrics for the UI: %s", error)
        return
    publish_run_metrics(rows)
