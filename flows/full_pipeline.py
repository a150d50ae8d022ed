"""The `full-pipeline` flow and one flow per stage (for rerunning a stage and what it needs)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.pipeline import run_pipeline
from flows.run_plan import summaries
from tasks.presets import load_config
from tasks.registry import STAGE_ORDER
from tasks.store import Store

# Prefect keeps names short in its lists; a run with many overrides ends in an ellipsis there.
MAX_RUN_NAME = 240


def run_name(preset: str, overrides: list[str] | None) -> str:
    """`smoke +train_tokenizer.use_text=true`: the preset and every override, so a smoke-sized or
    changed run never passes for the preset's own."""
    name = " ".join([preset, *(f"+{override}" for override in overrides or [])])
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 1] + "…"


def pipeline_run_name() -> str:
    """The name of a run of a flow with `preset` and `overrides` parameters (Prefect's `flow_run_name`)."""
    parameters = flow_run.parameters
    return run_name(str(parameters.get("preset", "default")), parameters.get("overrides"))


@flow(name="full-pipeline", flow_run_name=pipeline_run_name)
def full_pipeline(preset: str = "default", store: str = "store", overrides: list[str] | None = None) -> dict[str, dict]:
    """Every stage of the preset, in order; completed stages come back from the cache."""
    config = load_config(preset, overrides or [])
    results = run_pipeline(config, Store(store), preset=preset, flow="full-pipeline", overrides=overrides)
    return summaries(results)


def _stage_flow(stage: str):
    def run_stage(preset: str = "default", store: str = "store", overrides: list[str] | None = None) -> dict[str, dict]:
        config = load_config(preset, overrides or [])
        results = run_pipeline(config, Store(store), preset=preset, flow=f"stage-{stage}", until=stage,
                               overrides=overrides)
        return summaries(results)

    run_stage.__name__ = f"{stage.replace('-', '_')}_flow"
    run_stage.__doc__ = f"Stage `{stage}`, with the stages it reads coming back from the cache when possible."
    return flow(name=f"stage-{stage}", flow_run_name=pipeline_run_name)(run_stage)


# One flow per stage of the registry, for reruns from the CLI, the UI or a deployment. They are also
# module attributes (`ingest_flow`, `embed_text_flow`, ...): the entrypoints deployments name.
STAGE_FLOWS = {name: _stage_flow(name) for name in STAGE_ORDER}
globals().update({f"{name.replace('-', '_')}_flow": stage_flow for name, stage_flow in STAGE_FLOWS.items()})
