"""The table of pipeline stages, in pipeline order."""

from __future__ import annotations

from functools import lru_cache

from tasks.stage import Stage


@lru_cache(maxsize=1)
def all_stages() -> dict[str, Stage]:
    # Imported here so that `tasks.stage` stays importable without every stage's dependencies.
    from tasks.caption.stage import STAGE as CAPTION
    from tasks.embed_text.stage import STAGE as EMBED_TEXT
    from tasks.evaluate.stage import STAGE as EVALUATE
    from tasks.ingest.stage import STAGE as INGEST
    from tasks.pretokenize.stage import STAGE as PRETOKENIZE
    from tasks.train_generator.stage import STAGE as TRAIN_GENERATOR
    from tasks.train_tokenizer.stage import STAGE as TRAIN_TOKENIZER

    stages = [INGEST, CAPTION, EMBED_TEXT, TRAIN_TOKENIZER, PRETOKENIZE, TRAIN_GENERATOR, EVALUATE]
    return {stage.name: stage for stage in stages}


def get_stage(name: str) -> Stage:
    stages = all_stages()
    if name not in stages:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(stages)}")
    return stages[name]
