"""Drawing samples from a trained generator: balanced labels, pool captions, tokens.

Guidance conventions follow each model's paper, with the one `guidance_scale` of SamplingConfig:
  * MaskGIT (TiTok): logits = cond + s_k * (cond - uncond); s = 0 is unguided, and with the
    "linear" schedule s_k grows from 0 to s over the steps.
  * DiT: eps = uncond + s * (cond - uncond) (classifier-free guidance as in DiT); s = 1 is
    unguided and the scale is constant (`guidance_schedule` applies to MaskGIT only).
`steps` is the number of MaskGIT decoding steps or of respaced DDIM/DDPM timesteps.
"""

from __future__ import annotations

import numpy as np
import torch

from tasks.config import SamplingConfig
from tasks.train_generator.load import Generator
from tasks.training.loop import autocast


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ...: every class gets num_samples // K samples (the first ones one more)."""
    if num_samples < 1:
        raise ValueError(f"evaluate.num_samples must be >= 1, got {num_samples}")
    return np.arange(num_samples, dtype=np.int64) % max(1, num_classes)


def draw_captions(labels: np.ndarray, pool: dict[int, list[tuple[str, str]]], seed: int) -> list[tuple[str, str]]:
    """One (caption_id, caption) per sample from its class's pool, as TexTok does for class-
    conditional generation with a text-conditioned detokenizer. Deterministic in `seed`."""
    missing = sorted({int(label) for label in labels} - {label for label, entries in pool.items() if entries})
    if missing:
        raise ValueError(f"the caption pool has no captions for class(es) {missing}; the caption stage must "
                         "give every class a pool (caption.backend=label, dataset or gemini)")
    rng = np.random.default_rng([seed, 0x7E7])
    picks = rng.random(len(labels))
    return [pool[int(label)][int(pick * len(pool[int(label)]))] for label, pick in zip(labels, picks)]


@torch.no_grad()
def sample_tokens(
    generator: Generator,
    labels: torch.Tensor,
    sampling: SamplingConfig,
    rng: torch.Generator,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens the tokenizer can decode: ids [B, N] (MaskGIT) or vectors [B, N, D] (DiT, in the
    tokenizer's scale). All randomness comes from `rng`, which must live on the model's device."""
    model = generator.model
    device = generator.device
    if generator.uses_text and text is None:
        raise ValueError("this generator is text-conditioned: pass the captions' text embeddings")
    if generator.kind == "maskgit":
        unconditional = generator.num_classes == 0
        if unconditional:
            labels = torch.zeros_like(labels)  # the null class: nothing to guide towards
        with autocast(device, "auto"):
            return model.sample(
                labels.to(device),
                steps=sampling.steps,
                temperature=sampling.temperature,
                temperature_end=sampling.temperature_end,
                guidance_scale=0.0 if unconditional else sampling.guidance_scale,
                guidance_schedule=sampling.guidance_schedule,
                generator=rng,
            )
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
