"""`PipelineConfig`: a run's whole configuration as one strict model.

One section per stage of the registry (tasks/registry.py), under the stage's name with "_" for
"-", plus `runtime` (how to run, never in a cache key) and `stages` (what to run; validated
against the registry). The sections come from the stages' declarations, so importing this module
imports every stage module (torch-free: they import what they compute when they run);
tasks/presets.py imports it only to validate.
"""

from __future__ import annotations

from pydantic import create_model, field_validator

from tasks.config import RuntimeConfig, Section
from tasks.registry import STAGE_ORDER, get_stage


class PipelineBase(Section):
    """The parts of a run's configuration that are not a stage's section."""

    name: str
    description: str = ""
    # The stages to run, in any order; the run adds what they read (tasks/registry.py order).
    stages: list[str] = list(STAGE_ORDER[:3])
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        unknown = [stage for stage in stages if stage not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGE_ORDER)}")
        return stages

    def section(self, stage: str) -> Section:
        return getattr(self, stage.replace("-", "_"))


PipelineConfig = create_model(
    "PipelineConfig",
    __base__=PipelineBase,
    __doc__="A run's configuration: the base fields plus one section per registered stage.",
    **{stage.section_key: (stage.config, stage.config()) for stage in map(get_stage, STAGE_ORDER)},
)
