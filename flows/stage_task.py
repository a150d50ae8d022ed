"""The Prefect side of running a stage: the task, and how a tok1d cache hit shows in the UI.

The task calls the plain runner (tasks/runner.py) with the flow run's id. Prefect caches and
persists nothing: tok1d's own verified cache decides every hit, and Prefect result files are a
hazard besides a duplicate (each names its own deserializer, so whoever can write to a result
folder could make the next run unpickle code). A hit is returned as a Completed state named
Cached, so the UI and its Retry button still show which stages came back from the cache.
"""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Completed
from pydantic import BaseModel

from flows.fanout import PrefectFanOut
from flows.rate_limits import PrefectRateLimits
from flows.prefect_secrets import PrefectSecrets
from flows.ui import PrefectArtifacts, publish_images
from tasks.config import RuntimeConfig, Section
from tasks.progress import attached_ui, publish_summary_table
from tasks.rate_limits import attached_rate_limits
from tasks.runner import StageResult, execute_stage
from tasks.secrets import attached_vault
from tasks.shards import attached_fanout
from tasks.store import Manifest, Store
from tasks.summary_table import headline

log = logging.getLogger("tok1d")


def current_flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


class StageTaskResult(BaseModel):
    """What the Prefect task returns (kept in memory only): the manifest, whether it was a hit."""

    manifest: Manifest
    cache_hit: bool
    stage_run_id: str


def _stage_task_fn(
    stage: str,
    section: Section,
    inputs: dict[str, Manifest],
    store_root: str,
    runtime: RuntimeConfig,
    run_id: str | None,
) -> StageTaskResult:
    with attached_ui(PrefectArtifacts()), attached_vault(PrefectSecrets()), attached_rate_limits(PrefectRateLimits()), \
            attached_fanout(PrefectFanOut()):
        store = Store(store_root)
        result = execute_stage(stage, section, inputs, store, runtime, run_id, current_flow_run_id())
        manifest = result.manifest
        if result.cache_hit:  # a computed stage's table is the runner's; a hit shows what it answers with
            publish_summary_table(stage, {"artifact": manifest.artifact_id, "rows": manifest.rows, **manifest.summary})
        publish_images(stage, store, manifest)
    measured = headline(result.manifest.summary)
    if measured:
        log.info("%s: %s", stage, measured)
    outcome = StageTaskResult(manifest=result.manifest, cache_hit=result.cache_hit, stage_run_id=result.stage_run_id)
    if result.cache_hit:
        return Completed(name="Cached", data=outcome, message=f"tok1d cache hit: {result.manifest.root}")
    return outcome


def make_stage_task():
    """The Prefect task running one stage: no Prefect cache and no persisted result (see above)."""
    return task(_stage_task_fn, name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)


def run_stage_in_flow(
    stage_name: str,
    section: Section,
    inputs: dict[str, Manifest],
    store: Store,
    runtime: RuntimeConfig,
    run_id: str | None,
) -> StageResult:
    """Run the stage task in the current flow; the runner records the run (or hit) in lineage."""
    state = make_stage_task()(stage_name, section, inputs, str(store.root), runtime, run_id, return_state=True)
    outcome = state.result()  # raises the stage's exception if it failed
    return StageResult(outcome.manifest, outcome.cache_hit, outcome.stage_run_id)
