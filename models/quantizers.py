"""Bottlenecks for 1D tokenizers, one class per `TokenizerConfig.bottleneck`: an l2-normalised
vector quantizer (TiTok, "vq") and a diagonal Gaussian KL bottleneck (TexTok's continuous
tokens, "kl"), both implementing `Bottleneck`; `BOTTLENECKS` is the name -> class table.

Each takes encoder outputs of shape [B, N, input_dim(token_dim)] and returns
``(latents_for_decoder, tokens, losses, stats)``. All state lives in parameters and
registered buffers so the modules behave identically under DDP.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Bottleneck(nn.Module, ABC):
    """What the tokenizer needs from a bottleneck: its input width, how to build it from the
    config, the encode step (`forward`) and the decode step from tokens (`latents`).

    The tokenizer registers it as ``quantizer``, so its parameters and buffers appear in the
    state dict as ``quantizer.*``.
    """

    #: True when tokens are integer ids ([B, N] long), False when they are vectors [B, N, D].
    discrete: ClassVar[bool]

    @classmethod
    @abstractmethod
    def input_dim(cls, token_dim: int) -> int:
        """Width of the encoder projection feeding this bottleneck."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any) -> Bottleneck:
        """The bottleneck for a tokenizer config (reads only the fields it needs)."""

    @abstractmethod
    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """h: [B, N, input_dim] -> (decoder latents [B, N, token_dim], tokens, weighted losses,
        detached stats)."""

    @abstractmethod
    def latents(self, tokens: Tensor, num_tokens: int) -> Tensor:
        """Tokens as returned by `forward` -> decoder latents [B, num_tokens, token_dim];
        raises ValueError on a wrong token shape."""


class VectorQuantizer(Bottleneck):
    """Nearest-neighbour lookup by cosine similarity with a straight-through estimator.

    Both the encoder output and the codebook are l2-normalised before the lookup, so the
    decoder always sees unit-norm code vectors. With ``l2_norm=False`` (TiTok checkpoints
    saved with ``use_l2_norm: false``) the lookup is euclidean on the raw vectors and the
    decoder sees the raw codes. Optional dead-code restart: a code that has not been picked
    for ``dead_code_restart_steps`` consecutive training steps is re-initialised from a
    random encoder output of the current batch.
    """

    discrete = True

    @classmethod
    def input_dim(cls, token_dim: int) -> int:
        return token_dim

    @classmethod
    def from_config(cls, config: Any) -> VectorQuantizer:
        return cls(config.codebook_size, config.token_dim, config.commitment, config.dead_code_restart_steps,
                   config.l2_norm)

    def __init__(self, codebook_size: int, token_dim: int, commitment: float = 0.25,
                 dead_code_restart_steps: int = 0, l2_norm: bool = True):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {token_dim}")
        if dead_code_restart_steps < 0:
            raise ValueError(f"dead_code_restart_steps must be >= 0 (0 = off), got {dead_code_restart_steps}")
        self.codebook_size = codebook_size
        self.token_dim = token_dim
        self.commitment = commitment
        self.dead_code_restart_steps = dead_code_restart_steps
        self.l2_norm = l2_norm
        self.codebook = nn.Embedding(codebook_size, token_dim)
        # Unit-norm init (uniform on the sphere): the lookup is scale-invariant, and with Adam a
        # code's angular step is lr / ||code||, so unit norm keeps that step equal to the lr.
        with torch.no_grad():
            self.codebook.weight.copy_(F.normalize(torch.randn(codebook_size, token_dim), dim=-1))
        # Consecutive training steps each code went unused (summed over ranks under DDP).
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    def normalized_codebook(self) -> Tensor:
        """The codes as the lookup and the decoder see them: unit-norm (raw when l2_norm=False)."""
        weight = self.codebook.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [B, N] -> code vectors [B, N, token_dim] (unit-norm unless l2_norm=False)."""
        if ids.dtype != torch.long:
            raise ValueError(f"VQ token ids must be torch.long, got {ids.dtype}")
        return F.embedding(ids, self.normalized_codebook())

    def nearest(self, z: Tensor, codebook: Tensor) -> Tensor:
        """Ids of the codes nearest to z [B, N, D]: the largest cosine for unit vectors, else the
        smallest squared distance (written as TiTok writes it, so near-ties resolve the same way)."""
        if self.l2_norm:
            return torch.argmax(z @ codebook.t(), dim=-1)
        distance = z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2.0 * (z @ codebook.t())
        return torch.argmin(distance, dim=-1)

    def latents(self, tokens: Tensor, num_tokens: int) -> Tensor:
        """Token ids [B, num_tokens] -> code vectors (the decoder's input)."""
        if tokens.ndim != 2 or tokens.shape[1] != num_tokens:
            raise ValueError(f"vq decode expects ids [B, {num_tokens}], got {tuple(tokens.shape)}")
        return self.embed(tokens)

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: Tensor) -> None:
        # Sync-free: replacement candidates are drawn for every code and only the dead ones
        # are written, so no host round trip is needed to ask whether any code is dead.
        candidates = z_flat[torch.randint(z_flat.shape[0], (self.codebook_size,), device=z_flat.device)]
        candidates = candidates.to(self.codebook.weight.dtype).contiguous()
        if _distributed():
            dist.broadcast(candidates, src=0)  # identical codebooks on every rank
        dead = self.steps_unused >= self.dead_code_restart_steps
        self.codebook.weight.copy_(torch.where(dead[:, None], candidates, self.codebook.weight))
        self.steps_unused.masked_fill_(dead, 0)

    @torch.no_grad()
    def _update_usage(self, ids: Tensor) -> None:
        counts = torch.bincount(ids.flatten(), minlength=self.codebook_size)
        if _distributed():
            dist.all_reduce(counts)
        self.steps_unused.copy_(torch.where(counts > 0, 0, self.steps_unused + 1))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """z: [B, N, token_dim] -> (quantized [B, N, D] with straight-through grads, ids [B, N],
        {"commitment"}, {"codebook_usage", "perplexity"})."""
        if z.ndim != 3 or z.shape[-1] != self.token_dim:
            raise ValueError(f"VectorQuantizer expects [B, N, {self.token_dim}], got {tuple(z.shape)}")
        # The lookup and losses run in float32 even under bf16 autocast: cosine ties and tiny
        # commitment terms are not resolvable in bf16.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1) if self.l2_norm else z.float()
            restart = self.training and self.dead_code_restart_steps > 0
            if restart:
                self._restart_dead_codes(z.detach().reshape(-1, self.token_dim))
            codebook = self.normalized_codebook()
            ids = self.nearest(z.detach(), codebook)
            quantized = F.embedding(ids, codebook)
            codebook_loss = F.mse_loss(quantized, z.detach())
            commitment_loss = F.mse_loss(z, quantized.detach())
            loss = codebook_loss + self.commitment * commitment_loss
            if restart:
                self._update_usage(ids)
            quantized = z + (quantized - z).detach()
            stats = codebook_stats(ids, self.codebook_size)
        return quantized, ids, {"commitment": loss}, stats


@torch.no_grad()
def codebook_stats(ids: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Fraction of codes used in ``ids`` and the perplexity exp(H(p)) of their histogram."""
    counts = torch.bincount(ids.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"codebook_usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class KLBottleneck(Bottleneck):
    """Diagonal Gaussian bottleneck: the input holds mean and log-variance (2 * token_dim).

    Training samples with the reparameterisation trick; eval returns the mean, so encoding
    is deterministic at inference. The KL to N(0, I) is summed over tokens and channels,
    averaged over the batch and scaled by ``kl_weight`` (the LDM convention).
    """

    discrete = False

    @classmethod
    def input_dim(cls, token_dim: int) -> int:
        return 2 * token_dim  # mean and log-variance

    @classmethod
    def from_config(cls, config: Any) -> KLBottleneck:
        return cls(config.token_dim, config.kl_weight)

    def __init__(self, token_dim: int, kl_weight: float = 1e-6):
        super().__init__()
        if token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {token_dim}")
        self.token_dim = token_dim
        self.kl_weight = kl_weight

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """h: [B, N, 2*token_dim] -> (z, z, {"kl"}, {"kl_per_dim", "posterior_std"})."""
        if h.ndim != 3 or h.shape[-1] != 2 * self.token_dim:
            raise ValueError(f"KLBottleneck expects [B, N, {2 * self.token_dim}], got {tuple(h.shape)}")
        with torch.autocast(device_type=h.device.type, enabled=False):
            mean, logvar = self.posterior(h)
            std = torch.exp(0.5 * logvar)
            z = mean + std * torch.randn_like(mean) if self.training else mean
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
            loss = self.kl_weight * kl.sum(dim=(1, 2)).mean()
            stats = {"kl_per_dim": kl.mean().detach(), "posterior_std": std.mean().detach()}
        return z, z, {"kl": loss}, stats

    @staticmethod
    def posterior(h: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) in float32: the first and second halves of the channels, the
        log-variance clamped to [-30, 20] (keeps exp() finite early in training; TiTok's too)."""
        mean, logvar = h.float().chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def latents(self, tokens: Tensor, num_tokens: int) -> Tensor:
        """Continuous tokens [B, num_tokens, token_dim] are the decoder latents themselves."""
        if tokens.ndim != 3 or tokens.shape[1:] != (num_tokens, self.token_dim):
            raise ValueError(f"kl decode expects [B, {num_tokens}, {self.token_dim}], got {tuple(tokens.shape)}")
        return tokens


# TokenizerConfig.bottleneck -> implementation.
BOTTLENECKS: dict[str, type[Bottleneck]] = {
    "vq": VectorQuantizer,
    "kl": KLBottleneck,
}
