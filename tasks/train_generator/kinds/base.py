"""What every generator kind gives the stages (`GeneratorKind`: how to build it for a token
table, its training loss, how evaluate samples tokens from it), and the two things its methods
take: a trained `Generator` and a training `TokenBatch`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from models.diffusion import GaussianDiffusion
from tasks.config import SamplingConfig, TrainGeneratorConfig


@dataclass
class TokenBatch:
    """What one training step sees: tokens (ids [B, N], or vectors [B, N, D] divided by the
    generator's token scale), class labels [B], and with text conditioning the caption tokens."""

    tokens: torch.Tensor
    labels: torch.Tensor
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None


class GeneratorKind(ABC):
    """One family of generators (a `train_generator.kind`), stateless: the trained network and
    what it samples with live in a `Generator`, which the kind's methods take."""

    #: the `train_generator.kind` value, and the `kind` of generator.json
    name: ClassVar[str]
    #: the name in messages
    title: ClassVar[str]
    #: trains on token ids (a VQ tokenizer's), else on token vectors (a KL tokenizer's)
    discrete: ClassVar[bool]
    #: can be conditioned on caption embeddings (`train_generator.conditioning: text`)
    supports_text: ClassVar[bool]

    @abstractmethod
    def model_fields(self, config: TrainGeneratorConfig, meta: dict[str, Any], text_dim: int) -> dict[str, Any]:
        """The fields of the network's config dataclass for this token table (tokens.json) and config."""

    @abstractmethod
    def build(self, fields: dict[str, Any]) -> nn.Module:
        """A freshly initialised network from `model_fields` (also what generator.json stores)."""

    def settings(self, config: TrainGeneratorConfig, meta: dict[str, Any]) -> dict[str, Any]:
        """The kind's own entries of generator.json besides the model fields (none by default); a
        `scale` entry divides the train tokens before the network sees them."""
        return {}

    def diffusion(self, info: dict[str, Any]) -> GaussianDiffusion | None:
        """The diffusion process of a generator.json, for kinds that train and sample through one."""
        return None

    @abstractmethod
    def training_loss(self, generator: Generator, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch (the caller runs autocast, backward and the optimizer) and its logs."""

    @abstractmethod
    def sample(
        self,
        generator: Generator,
        labels: torch.Tensor,
        sampling: SamplingConfig,
        rng: torch.Generator,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Tokens the tokenizer decodes: ids [B, N] or vectors [B, N, D] in the tokenizer's scale.
        All randomness comes from `rng`, on the model's device."""

    @abstractmethod
    def sampler(self, sampling: SamplingConfig) -> str:
        """The name of the sampling procedure `sample` runs with these settings (for the summary)."""


@dataclass
class Generator:
    """A generator network with what its kind trains and samples with: the diffusion process and
    token scale of a diffusion kind (None otherwise), and its generator.json."""

    kind: GeneratorKind
    conditioning: str
    model: nn.Module
    diffusion: GaussianDiffusion | None
    # What the train tokens were divided by: the network samples tokens / scale.
    scale: float | None
    info: dict[str, Any]

    @classmethod
    def from_info(cls, kind: GeneratorKind, model: nn.Module, info: dict[str, Any]) -> Generator:
        return cls(kind, info["conditioning"], model, kind.diffusion(info), info.get("scale"), info)

    @property
    def seq_len(self) -> int:
        return self.model.config.seq_len

    @property
    def num_classes(self) -> int:
        """Classes of the token table (the generator itself has none when text-conditioned)."""
        return int(self.info["tokens"]["num_classes"])

    @property
    def discrete(self) -> bool:
        return self.kind.discrete

    @property
    def uses_text(self) -> bool:
        return self.conditioning == "text"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator,
               text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens the tokenizer can decode: ids [B, N] or vectors [B, N, D] in the tokenizer's scale.
        All randomness comes from `rng`, which must live on the model's device."""
        if self.uses_text and text is None:
            raise ValueError("this generator is text-conditioned: pass the captions' text embeddings")
        return self.kind.sample(self, labels, sampling, rng, text, text_mask)
