"""The files of a `train-generator` artifact: writing them, and loading the generator back.

The one module of the stage that other stages import; it owns the artifact's file format:
`generator.safetensors` (EMA weights), `generator-raw.safetensors` (the raw weights) and
`generator.json`, which says everything needed to rebuild the network:

    kind            a `train_generator.kind` (tasks/train_generator/kinds)
    conditioning    "class" | "text"
    model           the fields of the network's config dataclass
    tokens          the pretokenize artifact's tokens.json (seq_len, codebook_size, token_dim...)
    tokens_artifact id of the pretokenize artifact the generator was trained on
    text            {"dim": D, "max_tokens": T} of the caption embeddings (text conditioning)
    train, steps    the train section and the steps trained
  plus the kind's own settings; a diffusion kind adds
    diffusion       {"steps": T, "learn_sigma": bool}
    scale           std of the train tokens (tokens / scale is what the diffusion sees,
                    samples * scale is what the tokenizer decodes)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tasks.store import Manifest, Store, write_json
from tasks.train_generator.kinds import Generator, get_kind
from tasks.training.export import save_weights

__all__ = ["EMA_WEIGHTS", "INFO_FILE", "RAW_WEIGHTS", "Generator", "load_generator", "read_info", "save_generator"]

INFO_FILE = "generator.json"
EMA_WEIGHTS = "generator.safetensors"
RAW_WEIGHTS = "generator-raw.safetensors"


def save_generator(directory: Path, ema: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
                   info: dict[str, Any]) -> None:
    """Both weight files and generator.json."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(ema, directory / EMA_WEIGHTS)
    save_weights(raw, directory / RAW_WEIGHTS)
    write_json(directory / INFO_FILE, info)


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
    kind = get_kind(info["kind"])
    model = kind.build(info["model"])
    weights = manifest.path(store, EMA_WEIGHTS if ema else RAW_WEIGHTS)
    model.load_state_dict(load_file(weights, device="cpu"))
    model.to(device).eval().requires_grad_(False)
    return Generator.from_info(kind, model, info), info
