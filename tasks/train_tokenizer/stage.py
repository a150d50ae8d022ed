"""The `train-tokenizer` stage: a TiTok (VQ) or TexTok (KL, text-conditioned) 1D tokenizer
trained on the ingested train split with the shared loop, then scored on the validation split.

The trainer (`tasks.train_tokenizer.trainer`) runs in the stage's own process, or, with several
processes (`runtime.processes`, or one per GPU), in torchrun workers started by the shared
launcher (`tasks.training.launch`). Every rank derives its random numbers from (seed, step,
rank), and the loop checkpoints weights, EMA, discriminator, optimizers and the data position,
so a killed run resumes from `work_dir` and ends with the weights of an uninterrupted one.

With `import_titok.path` set the stage trains nothing: it imports an official TiTok checkpoint
(tasks/train_tokenizer/titok.py) into the same artifact format, reading no ingest.
"""

from __future__ import annotations

from models.tokenizer_config import BOTTLENECK_NAMES
from tasks.config import TrainTokenizerConfig
from tasks.stage import Stage, StageContext, StageOutput
from tasks.train_tokenizer.titok_files import fingerprint


def run_train_tokenizer(ctx: StageContext) -> StageOutput:
    # The trainer, the importer and the launcher import torch: here, not with the module, so that
    # loading a config and answering a fully cached run stay torch-free (the code version follows
    # these imports all the same, tasks/code_version.py).
    if ctx.config.import_titok.path:
        from tasks.train_tokenizer.titok import run_import

        return run_import(ctx)
    from tasks.train_tokenizer.trainer import TokenizerTrainer
    from tasks.training.launch import run_training

    return run_training(ctx, TokenizerTrainer)


def check_tokenizer(config: TrainTokenizerConfig) -> None:
    """The model section as the trainer will build it, checked when the config loads: a bad size
    or token count fails before ingest runs, not after. The values the trainer derives from its
    inputs (image size, text width) get stand-ins that pass, so only the section is judged."""
    if config.import_titok.path and config.use_text:
        raise ValueError("train_tokenizer.import_titok: an imported TiTok takes no text; set train_tokenizer.use_text=false")
    if config.model.bottleneck not in BOTTLENECK_NAMES:
        raise ValueError(f"train_tokenizer.model.bottleneck: unknown bottleneck {config.model.bottleneck!r}; "
                         f"known: {sorted(BOTTLENECK_NAMES)}")
    text = 1 if config.use_text else 0
    try:
        config.model.to_dataclass(image_size=max(config.model.patch_size, 1), channels=3, text_dim=text,
                                  max_text_tokens=text)
    except ValueError as error:
        raise ValueError(f"train_tokenizer.model: {error}") from None


def tokenizer_inputs(config) -> tuple[str, ...]:
    """The images; a TexTok also reads the captions and their text embeddings; an import reads nothing."""
    if config.train_tokenizer.import_titok.path:
        return ()
    return ("ingest", "caption", "embed-text") if config.train_tokenizer.use_text else ("ingest",)


STAGE = Stage(
    name="train-tokenizer",
    description=(
        "Train a TiTok (VQ) or TexTok (KL, caption-conditioned) 1D image tokenizer with L2, perceptual and "
        "GAN losses, EMA and resumable checkpoints (DDP with several processes); report PSNR, SSIM, rFID and "
        "codebook use on the validation split."
    ),
    config=TrainTokenizerConfig,
    inputs=tokenizer_inputs,
    check=check_tokenizer,
    run=run_train_tokenizer,
    fingerprint=lambda config: fingerprint(config.import_titok),
    multinode=lambda config: not config.import_titok.path,  # an import trains nothing
)
