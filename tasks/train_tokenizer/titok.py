"""Importing an official TiTok checkpoint as the train-tokenizer stage's output.

Set `train_tokenizer.import_titok.path` (or run `tok1d import-titok PATH`) and the stage reads
the checkpoint's settings (config.json, or the repository's config.yaml) and weights
(model.safetensors, or pytorch_model.bin loaded with `weights_only=True`, never a full pickle),
maps them exactly onto tok1d's tokenizer (models/titok_import.py, which refuses anything it
cannot map) and writes the artifact as training would (tasks/train_tokenizer/read.py), with
`imported_from` (paths and sha256 of the files) in tokenizer.json and the summary. The stage
then reads no ingest: the cache key holds the checkpoint's stat fingerprint instead (computed
torch-free when a run is planned: tasks/train_tokenizer/titok_files.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from models.titok_import import TitokImportError, import_titok
from tasks.config import ImportTitokConfig
from tasks.hashing import sha256_file
from tasks.stage import StageContext, StageOutput
from tasks.train_tokenizer.read import save_tokenizer
from tasks.train_tokenizer.titok_files import locate

log = logging.getLogger("tok1d")


def read_settings(path: Path) -> dict[str, Any]:
    """config.json or the repository's YAML (plain YAML; OmegaConf interpolations stay strings)."""
    try:
        text = path.read_text()
        settings = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise TitokImportError(f"{path} is not readable {path.suffix[1:].upper()}: {' '.join(str(error).split())}") from None
    if not isinstance(settings, dict):
        raise TitokImportError(f"{path} holds no settings mapping")
    return settings


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: safetensors, or a torch file through the weights-only unpickler
    (it refuses anything but tensors and plain containers, so no code of the file runs)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's refusals come as several exception types
        raise TitokImportError(f"{path} does not load with torch.load(weights_only=True): "
                               f"{' '.join(str(error).split())[:300]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TitokImportError(f"{path} is not a state dict of tensors")
    return state


def run_import(ctx: StageContext) -> StageOutput:
    """Write the imported tokenizer into the stage's output folder; summary names its source."""
    config: ImportTitokConfig = ctx.config.import_titok
    if ctx.config.use_text:
        raise ValueError("train_tokenizer.use_text is true, but an imported TiTok takes no text; set it false")
    files = locate(config)
    sizes = {name: tuple(dims) for name, dims in config.sizes.items()}
    model, weights = import_titok(read_settings(files.settings), read_weights(files.weights), sizes)
    source = {
        "format": "titok",
        "settings": str(files.settings),
        "settings_sha256": sha256_file(files.settings),
        "weights": str(files.weights),
        "weights_sha256": sha256_file(files.weights),
    }
    # raw=None: the raw weights file is a hard link to the EMA one (nothing was trained here).
    info = save_tokenizer(ctx.output_dir, model.config, weights, None, {
        "text": {"uses_text": False}, "ingest_artifact": None, "steps": 0, "imported_from": source})
    c = model.config
    log.info("train-tokenizer: imported TiTok %s/%s %s, %d tokens, from %s", c.size, c.decoder_size or c.size,
             c.bottleneck, c.num_latent_tokens, files.weights)
    summary = {
        "imported": "titok",
        "source": source["weights"],
        "source_sha256": source["weights_sha256"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "seq_len": info["seq_len"],
        "steps": 0,
    }
    return StageOutput(tables={}, summary=summary)
