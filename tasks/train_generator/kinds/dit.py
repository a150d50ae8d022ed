"""DiT + Gaussian diffusion on continuous (KL) tokens, conditioned on the class label or, through
cross-attention, on the caption's text-embedding tokens.

The DiT trains on tokens divided by the std of the train tokens (generator.json `scale`), so the
diffusion's unit-variance noise matches the data; samples are multiplied back before decoding.
Guidance follows DiT: eps = uncond + s * (cond - uncond); s = 1 is unguided and the scale is
constant (`guidance_schedule` applies to MaskGIT only). `sampling.steps` respaces the timesteps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models.diffusion import GaussianDiffusion
from models.dit import DiT, DiTConfig
from tasks.config import SamplingConfig, TrainGeneratorConfig
from tasks.train_generator.kinds.base import Generator, GeneratorKind, TokenBatch
from tasks.training.loop import autocast


def pooled_std(meta: dict[str, Any]) -> float:
    """Std of every value of the continuous train tokens, from pretokenize's per-channel statistics.

    Every channel has the same count, so the overall variance is
    mean_c(std_c^2 + mean_c^2) - mean_c(mean_c)^2.
    """
    if "token_std" not in meta or "token_mean" not in meta:
        raise ValueError("tokens.json has no token_mean/token_std (the table has no continuous train tokens, or "
                         "was written by older code); rerun the pretokenize stage")
    mean, std = np.asarray(meta["token_mean"], np.float64), np.asarray(meta["token_std"], np.float64)
    scale = math.sqrt(max(float(np.mean(std**2 + mean**2) - np.mean(mean) ** 2), 0.0))
    if not scale > 0:
        raise ValueError("every train token value is the same; the tokenizer's bottleneck has collapsed")
    return scale


class DiTKind(GeneratorKind):
    """A diffusion transformer (adaLN-Zero) predicting the noise, with learned sigma by default."""

    name = "dit"
    title = "DiT"
    discrete = False
    supports_text = True

    def model_fields(self, config: TrainGeneratorConfig, meta: dict[str, Any], text_dim: int) -> dict[str, Any]:
        text = config.conditioning == "text"
        return dict(seq_len=int(meta["seq_len"]), width=config.width, depth=config.depth, heads=config.heads,
                    mlp_ratio=config.mlp_ratio, class_dropout=config.class_dropout,
                    token_dim=int(meta["token_dim"]), num_classes=0 if text else int(meta["num_classes"]),
                    learn_sigma=config.learn_sigma, text_dim=text_dim if text else 0)

    def build(self, fields: dict[str, Any]) -> nn.Module:
        return DiT(DiTConfig(**fields))

    def settings(self, config: TrainGeneratorConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return {"diffusion": {"steps": config.diffusion_steps, "learn_sigma": config.learn_sigma},
                "scale": pooled_std(meta)}

    def diffusion(self, info: dict[str, Any]) -> GaussianDiffusion:
        return GaussianDiffusion.linear(info["diffusion"]["steps"], learn_sigma=info["diffusion"]["learn_sigma"])

    def training_loss(self, generator: Generator, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
        model = generator.model
        if batch.text is not None:
            kwargs = {"text": batch.text, "text_mask": batch.text_mask}
        else:
            kwargs = {"labels": batch.labels} if model.config.num_classes > 0 else {}
        return generator.diffusion.training_loss(model, batch.tokens, model_kwargs=kwargs)

    def sample(self, generator: Generator, labels: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator,
               text: torch.Tensor | None, text_mask: torch.Tensor | None) -> torch.Tensor:
        model, device = generator.model, generator.device
        config = model.config
        kwargs: dict[str, torch.Tensor] = {}
        if config.num_classes > 0:
            kwargs["labels"] = labels.to(device)
        if config.text_dim > 0:
            kwargs["text"] = text.to(device).float()
            kwargs["text_mask"] = text_mask.to(device)
        guided = config.conditional and sampling.guidance_scale != 1.0

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(device, "auto"):
                if guided:
                    return model.forward_with_cfg(x, t, guidance_scale=sampling.guidance_scale, **kwargs).float()
                return model(x, t, **kwargs).float()

        shape = (labels.shape[0], config.seq_len, config.token_dim)
        if sampling.sampler == "ddim":
            x = generator.diffusion.ddim_sample(model_fn, shape, steps=sampling.steps, eta=sampling.ddim_eta,
                                                generator=rng, device=device)
        else:
            x = generator.diffusion.ddpm_sample(model_fn, shape, steps=sampling.steps, generator=rng, device=device)
        return x * generator.scale

    def sampler(self, sampling: SamplingConfig) -> str:
        return sampling.sampler
