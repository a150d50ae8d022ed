"""The inputs evaluate reads, fabricated small: labelled striped images, a random nano tokenizer's
tokens of them, and a briefly trained generator on those tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from builders.ingest import ingest_from_images
from builders.store import commit_output
from builders.tokenizer import random_tokenizer
from builders.tokens import token_artifact
from models.tokenizer import Tokenizer
from models.tokenizer_config import TokenizerConfig
from tasks.caption.backends import caption_id
from tasks.config import RuntimeConfig, TrainConfig, TrainGeneratorConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store
from tasks.train_generator.stage import run_train_generator

RES, CLASSES = 16, 3
NAMES = ["shirt", "shoe", "bag"]


def class_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy image whose colour and stripe direction depend on the class."""
    image = np.zeros((RES, RES, 3), np.float64)
    image[..., label] = 0.7
    stripes = (np.arange(RES) // 2 % 2)[:, None] if label % 2 else (np.arange(RES) // 2 % 2)[None, :]
    image += 0.3 * stripes[..., None] + rng.normal(0, 0.08, image.shape)
    return (image.clip(0, 1) * 255).astype(np.uint8)


def splits(rows: int) -> list[str]:
    return ["val" if i % 9 == 8 else "train" for i in range(rows)]


def image_ids(rows: int) -> list[str]:
    return [f"img-{i:03d}" for i in range(rows)]


def ingest_artifact(store: Store, rows: int = 72) -> tuple[Manifest, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % CLASSES
    images = np.stack([class_image(int(label), rng) for label in labels])
    manifest = ingest_from_images(store, list(images), labels, NAMES, splits(rows), image_ids=image_ids(rows))
    return manifest, images, labels


@torch.no_grad()
def pretokenize(store: Store, tokenizer: Tokenizer, images: np.ndarray, labels: np.ndarray,
                texts=None, captions: list[str] | None = None) -> Manifest:
    """The tokenizer's tokens of the images (with the captions' text tokens if given), as a pretokenize artifact."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    text = mask = None
    if texts is not None:
        text, mask = texts.lookup([caption_id(c) for c in captions])
        text = text.float()
    tokens, _, _ = tokenizer.encode(x, text, mask)
    config = tokenizer.config
    return token_artifact(store, tokens, labels, splits(len(labels)), class_names=NAMES, token_dim=config.token_dim,
                          codebook_size=config.codebook_size, image_ids=image_ids(len(labels)),
                          caption_ids=[caption_id(c) for c in captions] if captions else None,
                          uses_text=tokenizer.uses_text)


def train_generator(store: Store, inputs: dict[str, Manifest], work: Path, **fields) -> Manifest:
    train = TrainConfig(steps=6, batch_size=16, lr=3e-3, warmup_steps=1, checkpoint_every=100, log_every=1, ema_decay=0.5)
    config = TrainGeneratorConfig(width=32, depth=1, heads=2, diffusion_steps=50, train=train, **fields)
    ctx = StageContext("train-generator", config, inputs, store, RuntimeConfig(device="cpu"), "g" * 64, work)
    return commit_output(store, ctx, run_train_generator(ctx))


def maskgit_inputs(store: Store, work: Path) -> dict[str, Manifest]:
    """Evaluate's inputs for a class-conditional MaskGIT on a random nano VQ tokenizer's tokens."""
    ingest, images, labels = ingest_artifact(store)
    config = TokenizerConfig(image_size=RES, patch_size=8, size="nano", num_latent_tokens=8, bottleneck="vq",
                             codebook_size=16, token_dim=4)
    tokenizer_manifest, tokenizer = random_tokenizer(store, config)
    tokens = pretokenize(store, tokenizer, images, labels)
    generator = train_generator(store, {"pretokenize": tokens}, work)
    return {"ingest": ingest, "train-tokenizer": tokenizer_manifest, "pretokenize": tokens, "train-generator": generator}
