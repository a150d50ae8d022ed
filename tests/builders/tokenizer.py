"""Train-tokenizer artifacts: random weights written with the stage's own writer (save_tokenizer),
or a real training run of a nano tokenizer (the stage's run, committed like execute_stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from builders.store import commit_folder, commit_output, work_folder
from models.tokenizer import Tokenizer
from models.tokenizer_config import TokenizerConfig
from tasks.config import RuntimeConfig, TrainTokenizerConfig
from tasks.stage import StageContext, StageOutput
from tasks.store import Manifest, Store
from tasks.train_tokenizer.read import save_tokenizer
from tasks.train_tokenizer.stage import run_train_tokenizer


def random_tokenizer(store: Store, config: TokenizerConfig, seed: int = 0,
                     ingest_artifact: str | None = None) -> tuple[Manifest, Tokenizer]:
    """A train-tokenizer artifact holding an untrained tokenizer (torch seed `seed`; same EMA and
    raw weights), and the model in eval mode. A text tokenizer records float32 text of its
    config's text_dim x max_text_tokens."""
    torch.manual_seed(seed)
    tokenizer = Tokenizer(config).eval()
    text: dict[str, Any] = {"uses_text": False}
    if config.text_dim:
        text = {"uses_text": True, "encoder": "test", "dim": config.text_dim, "max_tokens": config.max_text_tokens,
                "dtype": "float32", "in_encoder": config.text_in_encoder, "in_decoder": config.text_in_decoder}
    folder = work_folder(store)
    weights = tokenizer.state_dict()
    save_tokenizer(folder, config, weights, weights, {"text": text, "ingest_artifact": ingest_artifact, "steps": 0})
    return commit_folder(store, "train-tokenizer", folder, {}, {"steps": 0}), tokenizer


def tiny_config(bottleneck: str = "vq", **overrides) -> TrainTokenizerConfig:
    """A nano tokenizer on 16x16 images: 8 tokens, a 64-code book, a few steps; `overrides` set
    fields (a dict updates that section)."""
    raw = {
        "model": {"size": "nano", "patch_size": 4, "num_latent_tokens": 8, "bottleneck": bottleneck,
                  "codebook_size": 64, "token_dim": 8},
        "loss": {"gan_weight": 0.1, "discriminator_layers": 2, "discriminator_width": 16, "perceptual_resize": 75},
        "train": {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 1, "warmup_steps": 2,
                  "ema_decay": 0.5, "lr": 1e-3},
        "perceptual": "none",
        "eval_images": 6,
        "eval_batch_size": 4,
        "grid_images": 4,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return TrainTokenizerConfig.model_validate(raw)


def tokenizer_context(store: Store, inputs: dict[str, Manifest], config: TrainTokenizerConfig, work: Path,
                      runtime: RuntimeConfig | None = None) -> StageContext:
    """The train-tokenizer stage's context (CPU unless `runtime` says otherwise)."""
    return StageContext(
        stage="train-tokenizer", config=config, inputs=inputs, store=store,
        runtime=runtime or RuntimeConfig(device="cpu"), cache_key="k" * 64, work_dir=work,
    )


def train_and_commit(store: Store, inputs: dict[str, Manifest], config: TrainTokenizerConfig, work: Path,
                     runtime: RuntimeConfig | None = None) -> tuple[StageOutput, Manifest]:
    """Run the stage and commit its output like execute_stage does; returns (output, manifest)."""
    ctx = tokenizer_context(store, inputs, config, work, runtime)
    output = run_train_tokenizer(ctx)
    return output, commit_output(store, ctx, output, config_hash=config.digest())
