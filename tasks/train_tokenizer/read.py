"""The tokenizer files of a `train-tokenizer` artifact: writing them, loading the model back.

The one module of the stage that other stages import; it owns the artifact's file format:

    tokenizer.safetensors       EMA weights (the inference model)
    tokenizer-raw.safetensors   the optimised (non-EMA) weights
    tokenizer.json              TokenizerConfig as a dict, token shape, the text it expects
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.tokenizer import Tokenizer
from models.tokenizer_config import TokenizerConfig
from tasks.store import Manifest, Store, read_json, temporary_path, write_json
from tasks.training.export import save_weights

INFO_FILE = "tokenizer.json"
EMA_WEIGHTS = "tokenizer.safetensors"
RAW_WEIGHTS = "tokenizer-raw.safetensors"


def save_tokenizer(
    directory: Path, config: TokenizerConfig, ema: dict[str, torch.Tensor], raw: dict[str, torch.Tensor] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write both weight files and tokenizer.json (config, token shape, plus `extra`); returns the json.
    `raw=None`: the weights were not trained here (an import), the raw file is a hard link to the EMA one."""
    save_weights(ema, directory / EMA_WEIGHTS)
    if raw is not None:
        save_weights(raw, directory / RAW_WEIGHTS)
    else:
        link_weights(directory / EMA_WEIGHTS, directory / RAW_WEIGHTS)
    discrete = config.bottleneck == "vq"
    info = {
        "config": dataclasses.asdict(config),
        "discrete": discrete,
        "seq_len": config.num_latent_tokens,
        "codebook_size": config.codebook_size if discrete else None,
        "token_dim": config.token_dim,
        "image_size": config.image_size,
        "weights": {"ema": EMA_WEIGHTS, "raw": RAW_WEIGHTS},
        **extra,
    }
    write_json(directory / INFO_FILE, info)
    return info


def link_weights(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a copy where links are not possible): the same tensors
    under both names without storing them twice."""
    tmp = temporary_path(target)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def tokenizer_info(manifest: Manifest, store: Store) -> dict[str, Any]:
    """The artifact's tokenizer.json: model config, token shape and the text it expects."""
    if manifest.stage != "train-tokenizer":
        raise ValueError(f"expected a train-tokenizer artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    path = manifest.path(store, INFO_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"train-tokenizer/{manifest.artifact_id} has no {INFO_FILE} at {path}; rerun train-tokenizer")
    return read_json(path)


def load_tokenizer(
    manifest: Manifest, store: Store, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer in eval mode (EMA weights unless `ema=False`) and its tokenizer.json."""
    info = tokenizer_info(manifest, store)
    weights = manifest.path(store, EMA_WEIGHTS if ema else RAW_WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"train-tokenizer/{manifest.artifact_id} has no weights file {weights}")
    config = TokenizerConfig(**info["config"])
    # Built without memory, then given the stored tensors: no time spent on a random init.
    with torch.device("meta"):
        model = Tokenizer(config)
    model.load_state_dict(load_file(weights, device=str(device)), strict=True, assign=True)
    return model.eval(), info
