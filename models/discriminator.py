"""PatchGAN discriminator (pix2pix / taming-transformers style) for tokenizer training."""

from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm instead of pix2pix's BatchNorm: no running statistics to drift apart across
    # DDP ranks, and real/fake batches are not mixed through batch statistics.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """``num_layers`` stride-2 4x4 convolutions (width doubling, capped at 8x) followed by a
    3x3 convolution and a 1-channel 3x3 head: returns a logit map [B, 1, H/2^L, W/2^L].

    Inputs are images in [0, 1]; they are centred to [-1, 1] internally.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        if width < 1 or num_layers < 1:
            raise ValueError(f"PatchDiscriminator needs width >= 1 and num_layers >= 1, got {width}, {num_layers}")
        self.num_layers = num_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, num_layers):
            out = width * min(2 ** i, 8)
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            channels = out
        out = width * min(2 ** num_layers, 8)
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2),
                   nn.Conv2d(out, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        min_size = 2 ** self.num_layers
        if images.ndim != 4 or min(images.shape[-2:]) < min_size:
            raise ValueError(f"PatchDiscriminator with {self.num_layers} layers needs [B, C, H, W] images with "
                             f"H, W >= {min_size}, got {tuple(images.shape)}; lower discriminator_layers")
        return self.net(images * 2.0 - 1.0)
