"""Building generators from their description, and loading a `train-generator` artifact.

The artifact holds `generator.safetensors` (EMA weights), `generator-raw.safetensors` (the raw
weights) and `generator.json`, which says everything needed to rebuild the network:

    kind            "maskgit" | "dit"
    conditioning    "class" | "text"
    model           the MaskGITConfig / DiTConfig fields
    diffusion       {"steps": T, "learn_sigma": bool} (dit only)
    scale           std of the train tokens the DiT was trained on (dit only; tokens / scale is
                    what the diffusion sees, samples * scale is what the tokenizer decodes)
    tokens          the pretokenize artifact's tokens.json (seq_len, codebook_size, token_dim...)
    tokens_artifact id of the pretokenize artifact the generator was trained on
    text            {"dim": D, "max_tokens": T} of the caption embeddings (text conditioning)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from models.diffusion import GaussianDiffusion
from models.dit import DiT, DiTConfig
from models.maskgit import MaskGIT, MaskGITConfig
from tasks.store import Manifest, Store

INFO_FILE = "generator.json"
EMA_WEIGHTS = "generator.safetensors"
RAW_WEIGHTS = "generator-raw.safetensors"
KINDS = ("maskgit", "dit")


def build_model(kind: str, model_config: dict[str, Any]) -> nn.Module:
    """A fresh MaskGIT or DiT from the fields of its config dataclass."""
    if kind == "maskgit":
        return MaskGIT(MaskGITConfig(**model_config))
    if kind == "dit":
        return DiT(DiTConfig(**model_config))
    raise ValueError(f"unknown generator kind {kind!r}; expected one of {KINDS}")


def config_fields(model: nn.Module) -> dict[str, Any]:
    """The config dataclass of a MaskGIT/DiT as a JSON-ready dict (inverse of `build_model`)."""
    return dataclasses.asdict(model.config)


@dataclass
class Generator:
    """A trained generator ready to sample: the network, its diffusion (DiT) and token scale."""

    kind: str
    conditioning: str
    model: nn.Module
    diffusion: GaussianDiffusion | None
    # Std of the train tokens (DiT): the network samples tokens / scale.
    scale: float | None
    info: dict[str, Any]

    @property
    def seq_len(self) -> int:
        return self.model.config.seq_len

    @property
    def num_classes(self) -> int:
        """Classes of the token table (the generator itself has none when text-conditioned)."""
        return int(self.info["tokens"]["num_classes"])

    @property
    def discrete(self) -> bool:
        return self.kind == "maskgit"

    @property
    def uses_text(self) -> bool:
        return self.conditioning == "text"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def read_info(manifest: Manifest, store: Store) -> dict[str, Any]:
    if manifest.stage != "train-generator":
        raise ValueError(f"expected a train-generator artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    path = manifest.path(store, INFO_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"train-generator artifact {manifest.artifact_id} has no {INFO_FILE} at {path}; rerun the stage")
    return json.loads(path.read_text())


def load_generator(
    manifest: Manifest, store: Store, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[Generator, dict[str, Any]]:
    """The generator of a train-generator artifact in eval mode on `device` (EMA weights by default)."""
    info = read_info(manifest, store)
    model = build_model(info["kind"], info["model"])
    weights = manifest.path(store, EMA_WEIGHTS if ema else RAW_WEIGHTS)
    model.load_state_dict(load_file(weights, device="cpu"))
    model.to(device).eval().requires_grad_(False)
    diffusion = None
    if info["kind"] == "dit":
        diffusion = GaussianDiffusion.linear(info["diffusion"]["steps"], learn_sigma=info["diffusion"]["learn_sigma"])
    generator = Generator(info["kind"], info["conditioning"], model, diffusion, info.get("scale"), info)
    return generator, info
