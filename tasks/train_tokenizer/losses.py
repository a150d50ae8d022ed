"""The tokenizer's training objectives as the trainer builds them: the configured perceptual
network, and the discriminator state that checkpoints hold."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from models.inception import InceptionFeatures
from models.tokenizer_loss import TokenizerLoss, load_lpips_if_available
from tasks.config import TrainTokenizerConfig


class GanState(nn.Module):
    """The discriminator and LeCAM anchors of a `TokenizerLoss`, for checkpoints.

    Holds the loss's own discriminator and buffer tensors (not copies): loading a checkpoint
    into this module restores them in the loss, and the frozen perceptual network (which
    never changes) stays out of every checkpoint.
    """

    def __init__(self, loss: TokenizerLoss):
        super().__init__()
        self.discriminator = loss.discriminator
        self.register_buffer("ema_real_logits", loss.ema_real_logits)
        self.register_buffer("ema_fake_logits", loss.ema_fake_logits)


class InceptionMaps(nn.Module):
    """Inception feature maps as the list-of-maps network `PerceptualLoss` expects."""

    def __init__(self, inception: InceptionFeatures):
        super().__init__()
        self.inception = inception

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.inception.feature_maps(images)


def uses_inception(config: TrainTokenizerConfig) -> bool:
    """Whether the perceptual loss runs the Inception network (which then also scores rFID)."""
    return config.perceptual == "inception" and config.loss.perceptual_weight > 0


def build_loss(config: TrainTokenizerConfig, inception: InceptionFeatures | None) -> TokenizerLoss:
    """Generator/discriminator objectives with the configured perceptual network."""
    loss_config = config.loss.to_dataclass(channels=3)
    if config.perceptual == "none" or loss_config.perceptual_weight == 0:
        return TokenizerLoss(dataclasses.replace(loss_config, perceptual_weight=0.0), None)
    if config.perceptual == "lpips":
        distance = load_lpips_if_available(config.lpips_path, loss_config.perceptual_resize)
        if distance is None:
            raise FileNotFoundError(
                f"train_tokenizer.perceptual=lpips needs the `lpips` package and a full LPIPS(vgg) state dict at "
                f"train_tokenizer.lpips_path (got {config.lpips_path!r}); or use perceptual: inception"
            )
        return TokenizerLoss(loss_config, distance)
    return TokenizerLoss(loss_config, InceptionMaps(inception))
