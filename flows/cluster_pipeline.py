"""`cluster-pipeline`: the stages of `full-pipeline`, each on the work pool that fits it (CPU or GPU).

Every stage already has its own flow and deployment (`stage-<name>`, flows/full_pipeline.py),
and a stage flow runs the stages it reads first, as verified cache hits when they are done. So
splitting a run over pools needs no new stage code: this flow starts, in pipeline order, one
deployment run per group of consecutive stages on one pool and waits for each. The store is
shared by every pool's containers (deployments/pools/*.json mount it at /store), so what the CPU
pool computed is a cache hit in the GPU pool's pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows.full_pipeline import pipeline_run_name
from flows.run_plan import stages_to_run
from tasks.pipeline_config import PipelineConfig
from tasks.presets import load_config

# Which kind of pool each stage of the registry runs on. Ingest and captions are I/O and API
# bound; embed-text runs a text encoder, the rest train or run the tokenizer and generator.
STAGE_POOLS: dict[str, str] = {
    "ingest": "cpu",
    "caption": "cpu",
    "embed-text": "gpu",
    "train-tokenizer": "gpu",
    "pretokenize": "gpu",
    "train-generator": "gpu",
    "evaluate": "gpu",
}


@dataclass(frozen=True)
class PoolRun:
    """One deployment run of a cluster pipeline: the flow of `stage` on a `pool` ("cpu" or "gpu").

    It computes `stages` (its group's stages that it reads, and itself); whatever else it reads
    was computed by an earlier run and comes back from the cache.
    """

    stage: str
    pool: str
    stages: tuple[str, ...]

    def deployment(self, suffix: str) -> str:
        return f"stage-{self.stage}/{suffix}"


def pool_of(stage: str) -> str:
    if stage not in STAGE_POOLS:
        raise KeyError(f"stage {stage!r} has no pool in flows/cluster_pipeline.py STAGE_POOLS; add it there")
    return STAGE_POOLS[stage]


def plan_pool_runs(config: PipelineConfig) -> list[PoolRun]:
    """The deployment runs of the config's stages, in order: consecutive stages on one pool share
    a run, which is the stage flow of each stage in the group that no later stage of it reads
    (one run when the group is a chain, more when it has branches)."""
    runs: list[PoolRun] = []
    for pool, members in groupby(stages_to_run(config), key=pool_of):
        group = list(members)
        needs = {stage: set(stages_to_run(config, until=stage)) & set(group) for stage in group}
        for stage in group:
            if not any(stage in needs[later] for later in group if later != stage):
                runs.append(PoolRun(stage, pool, tuple(s for s in group if s in needs[stage])))
    return runs


@flow(name="cluster-pipeline", flow_run_name=pipeline_run_name)
def cluster_pipeline(
    preset: str = "default",
    store: str = "/store",
    overrides: list[str] | None = None,
    deployment: str = "kubernetes",
) -> dict[str, dict]:
    """Every stage of the preset, each group of stages as a run of `stage-<name>/<deployment>` on its pool."""
    logger = get_run_logger()
    config = load_config(preset, overrides or [])
    parameters = {"preset": preset, "store": store, "overrides": overrides or []}
    ran: dict[str, dict] = {}
    for run in plan_pool_runs(config):
        name = run.deployment(deployment)
        logger.info("%s on the %s pool: %s", name, run.pool, ", ".join(run.stages))
        # timeout=None: wait however long training takes; the child shows as a subflow in the UI.
        child = run_deployment(name, parameters=parameters, timeout=None)
        state = child.state
        if state is None or not state.is_completed():
            label = state.name if state else "without a state"
            raise RuntimeError(f"{name} (flow run {child.id}) ended {label}: {state.message if state else ''}".rstrip(": "))
        for stage in run.stages:
            ran[stage] = {"pool": run.pool, "deployment": name, "flow_run_id": str(child.id)}
    return ran
