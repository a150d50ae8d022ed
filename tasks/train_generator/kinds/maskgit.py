"""MaskGIT on discrete (VQ) tokens, class-conditional, as TiTok trains its generator.

Guidance follows TiTok: logits = cond + s_k * (cond - uncond); s = 0 is unguided, and with the
"linear" schedule s_k grows from 0 to `guidance_scale` over the decoding steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from models.maskgit import MaskGIT, MaskGITConfig
from tasks.config import SamplingConfig, TrainGeneratorConfig
from tasks.train_generator.kinds.base import Generator, GeneratorKind, TokenBatch
from tasks.training.loop import autocast


class MaskGITKind(GeneratorKind):
    """A bidirectional transformer that unmasks token ids over a few steps (arccos schedule)."""

    name = "maskgit"
    title = "MaskGIT"
    discrete = True
    supports_text = False

    def model_fields(self, config: TrainGeneratorConfig, meta: dict[str, Any], text_dim: int) -> dict[str, Any]:
        return dict(seq_len=int(meta["seq_len"]), width=config.width, depth=config.depth, heads=config.heads,
                    mlp_ratio=config.mlp_ratio, class_dropout=config.class_dropout,
                    vocab_size=int(meta["codebook_size"]), num_classes=int(meta["num_classes"]),
                    dropout=config.dropout, label_smoothing=config.label_smoothing)

    def build(self, fields: dict[str, Any]) -> nn.Module:
        return MaskGIT(MaskGITConfig(**fields))

    def training_loss(self, generator: Generator, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return generator.model.training_loss(batch.tokens, batch.labels)

    def sample(self, generator: Generator, labels: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator,
               text: torch.Tensor | None, text_mask: torch.Tensor | None) -> torch.Tensor:
        device = generator.device
        unconditional = generator.num_classes == 0
        if unconditional:
            labels = torch.zeros_like(labels)  # the null class: nothing to guide towards
        with autocast(device, "auto"):
            return generator.model.sample(
                labels.to(device),
                steps=sampling.steps,
                temperature=sampling.temperature,
                temperature_end=sampling.temperature_end,
                guidance_scale=0.0 if unconditional else sampling.guidance_scale,
                guidance_schedule=sampling.guidance_schedule,
                generator=rng,
            )

    def sampler(self, sampling: SamplingConfig) -> str:
        return self.name
