"""The `evaluate` stage's declaration: samples of the generator, decoded by the tokenizer and
scored (gFID, KID, IS, precision/recall, CLIP score) against a reference of the dataset.

What it computes is in tasks/evaluate/compute.py (torch, the models, Inception), imported when
the stage runs: loading a config and answering a fully cached run import this module, not torch.
"""

from __future__ import annotations

from tasks.config import EvaluateConfig
from tasks.stage import Stage, StageContext, StageOutput


def run_evaluate(ctx: StageContext) -> StageOutput:
    # Imported here, not with the module (torch); the code version follows it all the same.
    from tasks.evaluate.compute import run_evaluate as run

    return run(ctx)


def evaluate_inputs(config) -> tuple[str, ...]:
    """Captions and their embeddings only when the generator or the detokenizer reads text."""
    uses_text = config.train_tokenizer.use_text or config.train_generator.conditioning == "text"
    text = ("caption", "embed-text") if uses_text else ()
    return ("ingest", *text, "train-tokenizer", "pretokenize", "train-generator")


STAGE = Stage(
    name="evaluate",
    description="Samples from the generator decoded by the tokenizer: gFID, IS, precision/recall, CLIP score",
    config=EvaluateConfig,
    inputs=evaluate_inputs,
    run=run_evaluate,
)
