"""One batch of generated images: tokens from the generator, decoded by the tokenizer, quantised
to uint8 as a PNG would be. What evaluate computes its metrics on, and what the Python API's
`Generator.sample` returns (tok1d/generator.py), so both draw the same images from the same rng."""

from __future__ import annotations

import numpy as np
import torch

from models.tokenizer import Tokenizer
from tasks.config import SamplingConfig
from tasks.train_generator.kinds import Generator
from tasks.training.loop import autocast


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [B, C, H, W] in [0, 1] -> uint8 [B, H, W, 3], quantised as a PNG would be."""
    images = images.detach().float().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_images(generator: Generator, tokenizer: Tokenizer, labels: torch.Tensor, sampling: SamplingConfig,
                    rng: torch.Generator, text: torch.Tensor | None = None,
                    text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded images [B, C, H, W] (floats, about [0, 1]) of `labels` (and, where the generator or
    the tokenizer is text-conditioned, the captions' text tokens on the model's device). All
    randomness comes from `rng`, which lives on the generator's device."""
    tokens = generator.sample(labels, sampling, rng, *((text, text_mask) if generator.uses_text else ()))
    with autocast(generator.device, "auto"):
        return tokenizer.decode(tokens, *((text, text_mask) if tokenizer.uses_text else ()))
