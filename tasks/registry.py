"""The table of pipeline stages, in pipeline order: the one list of stages.

Config validation of `stages:` and the run's config sections (tasks/pipeline_config.py), the
per-stage flows (flows/full_pipeline.py), `tok1d status` and deployments/prefect.yaml (checked by
a test) all come from here. Adding a stage = its package under tasks/ (with `stage.py` declaring
`STAGE`) + one line in `STAGE_MODULES`.

The stage modules are imported on first use of `stages()`, not with the registry: `tok1d status`
or `tok1d presets` need only the names. A stage module declares the stage without importing torch
(what it computes, and torch with it, is imported by its `run`), so loading a config and answering
a fully cached run stay light.
"""

from __future__ import annotations

import importlib
from functools import cache

from tasks.stage import Stage

# Stage name -> the module declaring its `STAGE`, in pipeline order.
STAGE_MODULES: dict[str, str] = {
    "ingest": "tasks.ingest.stage",
    "caption": "tasks.caption.stage",
    "embed-text": "tasks.embed_text.stage",
    "train-tokenizer": "tasks.train_tokenizer.stage",
    "pretokenize": "tasks.pretokenize.stage",
    "train-generator": "tasks.train_generator.stage",
    "evaluate": "tasks.evaluate.stage",
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGE_MODULES)


@cache
def stages() -> dict[str, Stage]:
    """Every stage's declaration by name, in pipeline order (imports all stage modules once)."""
    declared: dict[str, Stage] = {}
    for name, module in STAGE_MODULES.items():
        stage = importlib.import_module(module).STAGE
        if stage.name != name:
            raise RuntimeError(f"{module} declares stage {stage.name!r}, but the registry lists it as {name!r}")
        declared[name] = stage
    return declared


def get_stage(name: str) -> Stage:
    known = stages()
    if name not in known:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(known)}")
    return known[name]
