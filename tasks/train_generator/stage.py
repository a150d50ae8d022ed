"""The `train-generator` stage: a pretokenize token table -> a generator of the configured kind.

The kinds (tasks/train_generator/kinds) are a table: kind=auto picks the one whose tokens match
the tokenizer's (discrete VQ ids or continuous KL vectors). Training goes through the shared
harness (tasks/training): warmup + cosine schedule, grad clipping, EMA with warm-up, bf16
autocast on GPU, atomic checkpoints in the stage's work directory, so a killed run resumes where
its last checkpoint left off and ends with the same weights as an uninterrupted one. With
runtime.processes > 1 (default: one per visible GPU) the trainer runs in torchrun workers.

Output: generator.safetensors (EMA weights), generator-raw.safetensors, generator.json,
losses.jsonl, losses.png (format: tasks/train_generator/read.py).
"""

from __future__ import annotations

import logging

from tasks.config import TrainGeneratorConfig
from tasks.stage import Stage, StageContext, StageOutput
from tasks.train_generator.kind_names import check_kind

log = logging.getLogger("tok1d")


def run_train_generator(ctx: StageContext) -> StageOutput:
    # The trainer and the launcher import torch: here, not with the module, so that loading a
    # config and answering a fully cached run stay torch-free (the code version follows these
    # imports all the same, tasks/code_version.py).
    from tasks.train_generator.trainer import GeneratorTrainer
    from tasks.training.launch import run_training

    output = run_training(ctx, GeneratorTrainer)
    if ctx.runtime.node_rank > 0:  # a node beside node 0, which reports and commits the run
        return output
    summary = output.summary
    log.info("train-generator: %s (%s) trained for %d steps, final loss %s",
             summary["kind"], summary["conditioning"], summary["steps"], summary["final_loss"])
    return output


def generator_inputs(config) -> tuple[str, ...]:
    """The token table, and the caption embeddings when the generator is text-conditioned."""
    text = ("caption", "embed-text") if config.train_generator.conditioning == "text" else ()
    return (*text, "pretokenize")


STAGE = Stage(
    name="train-generator",
    description="MaskGIT (discrete tokens) or DiT (continuous tokens) trained on the token table",
    config=TrainGeneratorConfig,
    inputs=generator_inputs,
    check=check_kind,
    run=run_train_generator,
    multinode=lambda _config: True,
)
