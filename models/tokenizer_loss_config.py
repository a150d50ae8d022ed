"""The tokenizer loss's configuration (`TokenizerLossConfig`), without torch.

Apart from the loss (models/tokenizer_loss.py) for the same reason as models/tokenizer_config.py:
the pipeline validates its fields when a config loads, and that must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenizerLossConfig:
    """Weights of the tokenizer's loss terms, the perceptual input size and the discriminator's shape."""

    l2_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_resize: int = 224  # feature-net input size; >= 75 for Inception
    gan_weight: float = 0.1
    gan_start_step: int = 0
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    discriminator_width: int = 64
    discriminator_layers: int = 3
    channels: int = 3

    def __post_init__(self) -> None:
        for name in ("l2_weight", "perceptual_weight", "gan_weight", "lecam_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenizerLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"lecam_decay must be in [0, 1), got {self.lecam_decay}")
        if self.perceptual_resize < 1:
            raise ValueError(f"perceptual_resize must be >= 1, got {self.perceptual_resize}")
