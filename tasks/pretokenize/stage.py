"""The `pretokenize` stage's declaration: every ingested image -> its 1D tokens under the trained
(EMA) tokenizer, in a sharded, resumable `tokens` table checked by decoding back.

What it computes is in tasks/pretokenize/compute.py (torch, the tokenizer), imported when the
stage runs: loading a config and answering a fully cached run import this module, not torch.
"""

from __future__ import annotations

from tasks.config import PretokenizeConfig
from tasks.stage import Stage, StageContext, StageOutput


def run_pretokenize(ctx: StageContext) -> StageOutput:
    # Imported here, not with the module (torch); the code version follows it all the same.
    from tasks.pretokenize.compute import run_pretokenize as run

    return run(ctx)


def pretokenize_inputs(config) -> tuple[str, ...]:
    """Images and tokenizer; a TexTok also reads the caption embeddings it encodes with, and a
    text-conditioned generator needs each row's caption id (so then the captions are read too)."""
    if config.train_tokenizer.use_text:
        return ("ingest", "caption", "embed-text", "train-tokenizer")
    if config.train_generator.conditioning == "text":
        return ("ingest", "caption", "train-tokenizer")
    return ("ingest", "train-tokenizer")


STAGE = Stage(
    name="pretokenize",
    description=(
        "Encode every ingested image with the trained EMA tokenizer into a sharded, resumable `tokens` table "
        "(uint16 ids or float16 KL means) and check that the stored tokens decode back to the reconstructions."
    ),
    config=PretokenizeConfig,
    inputs=pretokenize_inputs,
    run=run_pretokenize,
)
