"""Exponential moving average of model weights, and AdamW parameter groups."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

# Parameter-name components that never get weight decay (besides every tensor with ndim < 2,
# which covers norms and biases): learned embeddings and tokens, whose scale is meaningful.
NO_DECAY_NAMES = frozenset({
    "pos_embed", "latent_pos_embed", "decoder_pos_embed", "decoder_latent_pos_embed",
    "latent_tokens", "mask_token", "codebook", "embedding", "embeddings", "class_embedding",
    "cls_token", "decoder_cls_token", "token_embedding", "token_embed",
})


class EMA:
    """Keeps ``module``, a frozen copy of a model whose floating-point parameters follow
    ``ema = d * ema + (1 - d) * param``; buffers are copied as they are.

    With ``warmup`` (the default) the decay at (0-based) step s is
    ``d = min(decay, (1 + s) / (10 + s))``, as in TensorFlow's and timm's EMA. A fixed decay keeps
    ``decay ** steps`` of the initial weights in the EMA: 22% after 1500 steps at 0.999, and a
    DiT's noise prediction shrunk that much diverges when sampled. Warmed up, the EMA follows the
    weights early and reaches ``decay`` after ~10 / (1 - decay) steps. The decay depends on the
    step only, so a resumed run averages exactly as an uninterrupted one.

    Pass the plain model (not a DDP or torch.compile wrapper) to both the constructor and
    ``update``. ``state_dict()`` is a flat dict of tensors, savable with safetensors.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the update after (0-based) training step `step`."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the copy towards `model`'s weights after training step `step` (0-based)."""
        ema_params = list(self.module.parameters())
        params = list(model.parameters())
        if len(ema_params) != len(params):
            raise ValueError(f"EMA.update: model has {len(params)} parameters, EMA copy has {len(ema_params)}; "
                             "pass the same (unwrapped) model the EMA was built from")
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            ema_f, model_f = zip(*floats)
            torch._foreach_lerp_(list(ema_f), [p.detach() for p in model_f], 1.0 - self.decay_at(step))
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        # Contiguous clones: safetensors refuses shared or strided storage.
        return {k: v.detach().contiguous().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)


def param_groups_for_adamw(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay for matrices/kernels, none for norms, biases, embeddings,
    position embeddings, latent tokens, mask tokens and codebooks."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or NO_DECAY_NAMES.intersection(name.split(".")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
