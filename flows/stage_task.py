"""The Prefect side of running a stage: the task, its cache policy and its result storage.

The task calls the plain runner (tasks/runner.py) with the flow run's id; its cache policy is the
runner's verified slot key, so a Prefect cache hit always names an intact artifact (Prefect's own
record lives apart from our files and would happily point at deleted ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import FlowRunContext, TaskRunContext
from prefect.filesystems import LocalFileSystem
from pydantic import BaseModel

from flows.secrets import PrefectSecrets
from flows.ui import PrefectArtifacts
from tasks.config import RuntimeConfig, Section
from tasks.hashing import hash_value
from tasks.progress import attached_ui
from tasks.runner import StageResult, execute_stage, plan_stage_run, record_cache_hit
from tasks.secrets import attached_vault
from tasks.store import Manifest, Store


def current_flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache policy: the verified slot key of the stage run the task would perform.

    The task's parameters must include `stage` (name), `section` (config section), `inputs`
    (manifests) and `store_root`.
    """

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        plan = plan_stage_run(inputs["stage"], inputs["section"], inputs["inputs"], Store(inputs["store_root"]))
        return f"tok1d-{inputs['stage']}-{plan.slot.slot_key}"


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
    with attached_ui(PrefectArtifacts()), attached_vault(PrefectSecrets()):
        result = execute_stage(stage, section, inputs, Store(store_root), runtime, run_id, current_flow_run_id())
    return StageTaskResult(manifest=result.manifest, cache_hit=result.cache_hit)


def result_storage_block(store: Store) -> str:
    """A saved LocalFileSystem block for the store's Prefect results (Prefect needs it saved).

    Results live in the store, so every process and worker sharing the store shares the hits.
    """
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
        stage_run_id = record_cache_hit(plan, outcome.manifest, inputs, store, run_id, current_flow_run_id())
        return StageResult(outcome.manifest, True, stage_run_id)
    return StageResult(outcome.manifest, outcome.cache_hit, "")
