"""The table of pipeline stages, in pipeline order: the one list of stages.

Config validation of `stages:` (tasks/presets.py), the per-stage flows (flows/full_pipeline.py),
`tok1d status` and deployments/prefect.yaml (checked by a test) all come from `STAGES`.
Adding a stage = its package under tasks/ (with `stage.py` declaring `STAGE`) + one line here.
"""

from __future__ import annotations

from tasks.caption.stage import STAGE as CAPTION
from tasks.embed_text.stage import STAGE as EMBED_TEXT
from tasks.evaluate.stage import STAGE as EVALUATE
from tasks.ingest.stage import STAGE as INGEST
from tasks.pretokenize.stage import STAGE as PRETOKENIZE
from tasks.stage import Stage
from tasks.train_generator.stage import STAGE as TRAIN_GENERATOR
from tasks.train_tokenizer.stage import STAGE as TRAIN_TOKENIZER

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (INGEST, CAPTION, EMBED_TEXT, TRAIN_TOKENIZER, PRETOKENIZE, TRAIN_GENERATOR, EVALUATE)
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]
